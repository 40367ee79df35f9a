"""Batched sampling with a KV cache, shared by rejection sampling, PPO, GRPO/RLOO, online DPO and eval.

Prompts are left-padded (decoder-only models continue from the last real token) and every batch is
seeded from (seed, global batch index), so a rerun with the same seed and batch size gives the same
samples whatever the number of processes. The N samples of a prompt are drawn together by the lean
decode loop (decode.py: one shared prefill per prompt, preallocated cache, finished rows dropped);
transformers' ``generate`` (``num_return_sequences``) is the fallback for ZeRO-3 / FSDP (synced_gpus),
encoder-decoders and ``SamplingParams(decoder="generate")``; both draw from the same distribution.
vLLM (``sample_vllm``, vllm_engine.py) serves rejection sampling and the on-policy stages on GPUs.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from align_cli.errors import AlignError

log = logging.getLogger("align")


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    prompts_per_batch: int = 8  # prompts per generate call (each with its n samples)
    # "lean": decode.py's loop (shared prompt prefill); "generate": transformers' generate, the fallback
    # that ZeRO-3 / FSDP (synced_gpus) and models the lean loop cannot serve always take
    decoder: str = "lean"
    compile_decode: bool = False  # lean loop: torch.compile its decode step (measured not worth it on CPU)


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the stop token when one was emitted
    finished: bool  # True when a stop token ended the response (False: hit max_new_tokens)
    # lean decoder only: log softmax(logits / temperature) of each response token, before top-k/top-p
    # truncation (what the trainers recompute); None from the generate and vLLM paths
    logprobs: list[float] | None = None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus a chat template's end-of-turn token when the tokenizer has one."""
    ids = [tokenizer.eos_token_id]
    for marker in ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids and token >= 0:
            ids.append(token)
    return ids


VLLM_EXTRA = "pip install 'align-cli[vllm]'"


def choose_backend(requested: str = "auto") -> str:
    """The generation backend: "auto" is vLLM when installed and a GPU is present. An explicit "vllm"
    without either is an AlignError (the recipe check catches a missing vLLM before torch loads)."""
    if requested == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise AlignError(f"backend vllm: vLLM is not installed ({VLLM_EXTRA})")
        if not torch.cuda.is_available():
            raise AlignError("backend vllm: vLLM needs a CUDA GPU and none is visible; use backend auto")
    if requested != "auto":
        return requested
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm" if torch.cuda.is_available() else "transformers"


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def neutral_generation_config(model: Any, tokenizer: Any) -> Iterator[None]:
    """During the block, ``model.generation_config`` is a blank one (the tokenizer's special ids only).

    Samples must come from the policy itself: a checkpoint's generation_config (repetition penalty,
    no-repeat n-grams, min length, bad words, its own temperature...) would change the distribution they
    are drawn from, while PPO and eval score them under the plain policy. transformers fills every
    setting a call leaves unset from the model's own config, so that config is swapped out, not
    overridden; the call then passes the recipe's settings alone."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    own = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    try:
        yield
    finally:
        inner.generation_config = own


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    params: SamplingParams,
    progress: Any = None,
    first_batch: int = 0,
    synced_gpus: bool = False,
    streamer: Any = None,
) -> list[Sample]:
    """Sample ``params.n`` responses for every prompt (token ids); ordered by prompt, then sample.

    ``progress`` (optional) is called with the number of samples finished after each batch.
    ``first_batch``: the global index of this call's first batch, when the prompts are one process's
    contiguous share of a larger list (``shard_batches``): batches are seeded by global index, so the
    samples do not depend on the number of processes. ``synced_gpus``: keep stepping until every
    process is done (a model sharded with ZeRO-3 / FSDP; see engine.distributed.for_generation).
    ``streamer``: a transformers streamer (e.g. ``TextStreamer``) that sees tokens as they are
    generated, as ``model.generate`` feeds one; one prompt and ``params.n == 1`` only (``align chat``)."""
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    lean = use_lean_loop(model, params, synced_gpus)
    was_training = model.training
    model.eval()
    out: list[Sample] = []
    with neutral_generation_config(model, tokenizer):  # the model's own config, swapped out once
        for batch_index, start in enumerate(range(0, len(prompts), params.prompts_per_batch)):
            chunk = prompts[start : start + params.prompts_per_batch]
            ids, mask = left_pad(chunk, pad, device)
            torch.manual_seed(params.seed * 1_000_003 + first_batch + batch_index)
            if lean:
                rows = _lean(model, ids, mask, params, stops, pad, streamer)
            else:
                rows = _generate(model, ids, mask, params, stops, pad, synced_gpus, streamer)
            for row, (tokens, finished, logprobs) in enumerate(rows):
                prompt_row = row // params.n
                out.append(
                    Sample(
                        prompt_index=start + prompt_row,
                        sample_index=row % params.n,
                        prompt_ids=chunk[prompt_row],
                        response_ids=tokens,
                        finished=finished,
                        logprobs=logprobs,
                    )
                )
            if progress is not None:
                progress(len(rows))
    model.train(was_training)
    return out


Row = tuple[list[int], bool, list[float] | None]  # response tokens, finished, log-probs


def use_lean_loop(model: Any, params: SamplingParams, synced_gpus: bool) -> bool:
    """The lean loop serves decoder-only full-attention models; ZeRO-3 / FSDP (every process must step
    until all are done), encoder-decoders, sliding-window models and ``decoder="generate"`` take
    transformers' generate."""
    if params.decoder not in ("lean", "generate"):
        raise AlignError(f"sampling decoder must be 'lean' or 'generate', not {params.decoder!r}")
    if params.decoder == "generate" or synced_gpus:
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    config = getattr(inner, "config", None)
    accepts = inspect.signature(inner.forward).parameters
    # the preallocated cache is one full-attention layer type: sliding-window / linear-attention hybrids
    # (their own cache layers) and models without transformers 5's cache / logits_to_keep take generate
    full = all(t == "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"])
    return (
        full
        and not getattr(config, "is_encoder_decoder", False)
        and not getattr(config, "sliding_window", None)
        and "cache" in accepts
        and "logits_to_keep" in accepts
    )


def _lean(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    params: SamplingParams,
    stops: list[int],
    pad: int,
    streamer: Any = None,
) -> list[Row]:
    from align_cli.decode import decode

    d = decode(
        model, ids, mask, params.n, params.max_new_tokens, stops, pad,
        params.temperature, params.top_k, params.top_p, params.compile_decode, streamer,
    )  # fmt: skip
    return list(zip(d.tokens, d.finished, d.logprobs))


def _generate(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    params: SamplingParams,
    stops: list[int],
    pad: int,
    synced_gpus: bool,
    streamer: Any = None,
) -> list[Row]:
    greedy = params.temperature <= 0
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=not greedy,
        temperature=None if greedy else params.temperature,
        top_p=None if greedy else params.top_p,
        top_k=None if greedy else params.top_k,
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=params.n,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
        synced_gpus=synced_gpus,
        streamer=streamer,
    )
    rows: list[Row] = []
    for tokens in generated[:, ids.shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
        rows.append((tokens[:cut] if cut else tokens, cut is not None, None))
    return rows


def shard_batches(count: int, per_batch: int, rank: int, world: int) -> tuple[int, int, int]:
    """This process's contiguous share of ``count`` prompts in whole generation batches of ``per_batch``:
    (start, stop, index of its first batch). Ranks get equal numbers of batches, the first ones one more
    when they do not divide."""
    batches = -(-count // per_batch)
    base, extra = divmod(batches, world)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return min(first * per_batch, count), min(last * per_batch, count), first


def sample_vllm(
    model_dir: str, tokenizer: Any, prompts: list[list[int]], params: SamplingParams
) -> list[Sample]:
    """The same contract as ``sample`` on vLLM (chosen automatically when installed and a GPU is present).

    Every prompt gets its own request seed, params.seed * 1_000_003 + its index in ``prompts`` (the
    global index: the main process samples all prompts on vLLM), so two prompts never share a random
    stream and a new round (a new params.seed) draws new samples. Not exercised by this project's CI,
    which has no GPU and no vLLM; the transformers path is the reference."""
    from vllm import LLM
    from vllm import SamplingParams as VllmParams

    stops = stop_token_ids(tokenizer)
    llm = LLM(model=model_dir, seed=params.seed)
    greedy = params.temperature <= 0
    per_prompt = [
        VllmParams(
            n=params.n,
            temperature=0.0 if greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop_token_ids=stops,
            seed=params.seed * 1_000_003 + index,
        )
        for index in range(len(prompts))
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], per_prompt)
    samples = []
    for index, output in enumerate(outputs):
        for k, completion in enumerate(output.outputs):
            tokens = list(completion.token_ids)
            finished = bool(tokens) and tokens[-1] in stops
            samples.append(Sample(index, k, prompts[index], tokens, finished))
    return samples
