"""The lean decode loop behind ``generation.sample``: shared prompt prefill, then one forward per token.

Why not ``model.generate``: with ``num_return_sequences=n`` it copies every prompt n times before the
prefill, so a best-of-16 batch runs each prompt through the model 16 times, and its per-step machinery
(stopping criteria, logits-processor lists, output bookkeeping) costs host time that a small model's
decode step does not hide. Here:

- the prompts of a batch are prefilled once (LM head on the last position only); the KV cache and the
  last logits are then repeated n times (the cache's ``batch_repeat_interleave``), so the n samples of a
  prompt share its prefill;
- every step is one forward of the model on one token per live row; the only host sync is the count of
  finished rows, and rows that finished are dropped from the batch (cache included) once a quarter of
  the live rows has finished, so the tail of long responses does not drag short ones;
- the next token is drawn from transformers' own logits warpers, in ``generate``'s order (temperature,
  then top-k, then top-p) on float32 logits, so the distribution is the one ``generate`` samples.

What it returns per token, besides the token: ``log softmax(logits / temperature)`` of the token drawn,
i.e. the log-prob under the temperature-scaled policy *before* top-k/top-p truncation -- the quantity the
trainers recompute for PPO/GRPO ratios (``actor_critic``/``forward.token_logprobs`` at the stage's
temperature). With top-k/top-p on, the truncated distribution actually sampled differs from it; the
stages recompute their log-probs with the trainer in any case and never use these for a loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

DROP_FRACTION = 0.25  # drop finished rows once this share of the live batch has finished
# torch.compile of the decode step, off by default: on this project's CPU machine (small preset, 16 rows)
# a compiled step took ~1.0 s of CPU per 48 steps against ~1.1-1.3 s eager, after ~50 s of CPU to compile
# (330 s wall on the shared machine): not worth it for one rollout. ``SamplingParams.compile_decode``.


def compiled_step(model: torch.nn.Module) -> torch.nn.Module:
    """The model under torch.compile (dynamic shapes: the cache grows every step), made once per model
    and kept in its __dict__ (object.__setattr__), so it does not become a submodule of its state dict."""
    if "_align_compiled_step" not in model.__dict__:
        object.__setattr__(model, "_align_compiled_step", torch.compile(model, dynamic=True))
    return model.__dict__["_align_compiled_step"]


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in one buffer sized for prompt + ``room`` new tokens.

    DynamicLayer concatenates a new tensor every step (a fresh allocation and a copy of the whole cache
    per layer per token: half of a CPU decode step at 200 cached tokens); here a step writes one column in
    place and attention reads a view of the filled part. Unlike StaticCache, attention only spans the
    filled length (StaticCache attends over the full preallocated length: slower on CPU, measured)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room, self.length = room, 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = key_states.shape[-2]
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, step + self.room, d))
            self._v = value_states.new_empty((b, h, step + self.room, d))
            self.device, self.is_initialized = key_states.device, True
        if self.length + step > self._k.shape[-2]:
            raise RuntimeError("preallocated KV cache is full")  # decode() sizes it: a bug if reached
        self._k[:, :, self.length : self.length + step] = key_states
        self._v[:, :, self.length : self.length + step] = value_states
        self.length += step
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k, self._v = (x.repeat_interleave(repeats, dim=0) for x in (self._k, self._v))
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def preallocated_cache(room: int) -> Cache:
    """A cache of PreallocatedLayers (created lazily, one per attention layer) with ``room`` new tokens."""
    return Cache(layer_class_to_replicate=functools.partial(PreallocatedLayer, room))


@dataclass
class Decoded:
    tokens: list[list[int]]  # per row (prompt-major, n rows per prompt), stop token included if emitted
    finished: list[bool]
    logprobs: list[list[float]]  # log pi_T of each token (see the module docstring)


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The warpers ``generate`` builds for these settings, in its order (generation/utils.py)."""
    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return chain


def prefill(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int, room: int | None = None
) -> tuple[Cache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the left-padded prompts once; return (cache, last logits, attention mask, next positions),
    each repeated n times along the batch (row r*n + k is sample k of prompt r). ``room``: preallocate
    the cache for that many new tokens (None: transformers' DynamicCache)."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache() if room is None else preallocated_cache(room)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache if getattr(out, "cache", None) is not None else cache
    logits = out.logits[:, -1, :].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        positions = positions.repeat_interleave(n, dim=0)
    return cache, logits, mask, positions[:, -1:] + 1


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    max_new_tokens: int,
    stops: list[int],
    pad_id: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    compile_step: bool = False,
    streamer: Any = None,
) -> Decoded:
    """Sample n continuations of each left-padded prompt row (greedy when ``temperature <= 0``).
    ``streamer``: fed as ``generate`` feeds one (the prompt, then each token, then ``end()``); one row
    only, and it costs a host copy per token."""
    step_model = compiled_step(model) if compile_step else model
    device = ids.device
    greedy = temperature <= 0
    chain = warpers(1.0 if greedy else temperature, 0 if greedy else top_k, 1.0 if greedy else top_p)
    scale = 1.0 if greedy else temperature
    stop_ids = torch.tensor(stops, device=device)
    if streamer is not None:
        if ids.shape[0] * n != 1:
            raise ValueError("a streamer takes one prompt and one sample")
        streamer.put(ids.cpu())
    cache, logits, mask, pos = prefill(model, ids, mask, n, room=max_new_tokens)
    rows = logits.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    ends = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)  # response length
    alive = torch.arange(rows, device=device)  # original row of each live row
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    dummy = torch.empty((rows, 0), dtype=torch.long, device=device)  # warpers ignore input_ids
    for step in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(chain(dummy[: len(alive)], logits), dim=-1)
            nxt = torch.multinomial(probs, 1).squeeze(1)
        lp = torch.log_softmax(logits / scale, dim=-1).gather(1, nxt[:, None]).squeeze(1)
        tokens[alive, step] = nxt
        logps[alive, step] = lp
        hit = torch.isin(nxt, stop_ids) & ~done  # a finished row's later tokens are cut off below
        ends[alive] = torch.where(hit, step + 1, ends[alive])  # no boolean indexing: no host sync
        done = done | hit
        if streamer is not None:
            streamer.put(nxt.cpu())
        finished = int(done.sum())  # the one host sync of the step
        if finished == len(alive) or step == max_new_tokens - 1:
            break
        if finished >= DROP_FRACTION * len(alive):  # drop finished rows: cache, mask, positions
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, nxt, mask, pos = alive[keep], nxt[keep], mask[keep], pos[keep]
            done = done[keep]
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
        out = step_model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
        )
        cache = out.cache if getattr(out, "cache", None) is not None else cache
        logits = out.logits[:, -1, :].float()
        pos = pos + 1
    if streamer is not None:
        streamer.end()
    lengths = ends.tolist()
    token_rows, logp_rows = tokens.tolist(), logps.tolist()
    return Decoded(
        tokens=[t[:k] for t, k in zip(token_rows, lengths)],
        finished=[t[k - 1] in stops for t, k in zip(token_rows, lengths)],
        logprobs=[lp[:k] for lp, k in zip(logp_rows, lengths)],
    )
