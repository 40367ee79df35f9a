"""Forward passes: the one place a batch is run through a model to get numbers a loss or a scorer uses.

- ``response_logprobs``: log pi_T(y_t | x, y_<t) of every supervised (response) token, pi_T =
  softmax(logits / T); ``summed_logps``: their sum per row, log pi_T(y | x);
- ``token_logprobs``: one pass of the same, optionally with the entropy of pi_T (PPO);
- ``reward_scores``: r(x, y), a reward model's scalar head read at each row's final token;
  ``token_scores``: that head read at every position that predicts a response token (PPO's value);
- ``to_device``: a collated batch moved to the model's device.

Only positions whose next token is supervised reach the LM head (transformers' boolean
``logits_to_keep``), and those go through it in chunks fused with the log-softmax and the gather
(``align_cli.logprobs``, the kernel), so no vocabulary-sized tensor for the whole batch ever exists.
A batch with length buckets (``batch["buckets"]``, from ``length_buckets``) runs one forward pass per
bucket, with the same result as one padded pass. A batch whose rows share prompts (GRPO/RLOO groups,
``batch["prefix_groups"]``) runs each prompt once and only the responses per row (``prefix_logprobs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from align_cli.data.collate import row_buckets
from align_cli.data.tokenize import IGNORE_INDEX
from align_cli.logprobs import head_logprobs
from align_cli.models import score_head

Batch = dict[str, Any]


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Every tensor of ``batch`` on ``device``; other values (buckets, counts) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sequence_index(batch: Batch) -> torch.Tensor:
    """Which sequence each token belongs to: the row when padded, or the packed example when a
    padding-free batch holds several examples in one row (position ids restart at 0)."""
    if "position_ids" in batch:
        return (batch["position_ids"] == 0).long().cumsum(-1) - 1
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    return rows[:, None].expand_as(batch["input_ids"])


def _predicts_response(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] True at the positions whose next token is supervised (the ones the LM head must see)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def token_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi_T(target) [N], entropy of pi_T [N] or None) for the N supervised tokens of ``batch`` in
    row-major order, in one forward pass (no buckets)."""
    labels = batch["labels"]
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    cache = batch.get("cache")  # a shared prompt's KV cache (prefix_logprobs)
    with head_logprobs(model, targets, with_entropy, temperature) as result:
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            logits_to_keep=_predicts_response(labels),
            use_cache=cache is not None,
            **({"cache": cache} if cache is not None else {}),
        )
    return result[-1]


def per_token_by_bucket(
    run: Callable[[Batch], tuple[torch.Tensor | None, ...]],
    batch: Batch,
    buckets: list[tuple[list[int], int]] | None,
) -> tuple[torch.Tensor | None, ...]:
    """``run(sub_batch)`` once per length bucket (``length_buckets``), its flat per-supervised-token
    outputs put back in the whole batch's row-major order: the same result as one padded pass, with
    short rows not padded to the longest."""
    groups = row_buckets({**batch, "buckets": buckets})
    if len(groups) == 1:
        return run(batch)
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    # flat position of each supervised token in the whole batch's row-major order
    numbering = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
    numbering[keep] = torch.arange(int(keep.sum()), device=keep.device)
    parts, where = [], []
    for index, sub in groups:
        parts.append(run(sub))
        width = sub["labels"].shape[1] - 1
        where.append(numbering[index, :width][keep[index, :width]])
    where = torch.cat(where)
    outputs = []
    for k, first in enumerate(parts[0]):
        if first is None:
            outputs.append(None)
            continue
        values = torch.cat([part[k] for part in parts])
        outputs.append(values.new_empty(values.shape).scatter(0, where, values))
    return tuple(outputs)


def prefix_logprobs(
    model: nn.Module, batch: Batch, groups: list[tuple[list[int], int]], temperature: float = 1.0
) -> torch.Tensor | None:
    """log pi_T of every supervised token [N] (row-major, as ``response_logprobs``) of a right-padded
    prompt + response batch whose rows come in ``groups``: (rows, prompt length), the rows of a group
    sharing the same prompt. Each prompt but its last token runs once, its KV cache is repeated for the
    group's rows, and only the last prompt token (it predicts the first response token) and the
    responses run per row: n samples of a prompt cost one prompt, not n. None when the model returns no
    cache (e.g. gradient checkpointing in train mode): the caller takes the plain path."""
    labels = batch["labels"]
    keep = labels[:, 1:] != IGNORE_INDEX
    numbering = torch.full(keep.shape, -1, dtype=torch.long, device=keep.device)
    numbering[keep] = torch.arange(int(keep.sum()), device=keep.device)
    row_lengths = batch["attention_mask"].sum(-1).tolist()
    parts, where = [], []
    for rows, prompt_length in groups:
        start = prompt_length - 1  # the prefix, run once; the rows' own part starts at its last token
        width = max(row_lengths[r] for r in rows) - start
        index = torch.tensor(rows, device=labels.device)
        sub = {k: batch[k][index, start : start + width] for k in ("input_ids", "labels", "attention_mask")}
        if start > 0:
            prefix = batch["input_ids"][index[:1], :start]
            out = model(
                input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1
            )
            cache = getattr(out, "cache", None)
            if cache is None:
                return None
            cache.batch_repeat_interleave(len(rows))
            sub["cache"] = cache
            seen = sub["attention_mask"].new_ones(len(rows), start)  # the rows attend to the whole prefix
            sub["attention_mask"] = torch.cat([seen, sub["attention_mask"]], 1)
        parts.append(token_logprobs(model, sub, temperature)[0])
        where.append(numbering[index, start : start + width - 1][keep[index, start : start + width - 1]])
    values = torch.cat(parts)
    return values.new_empty(values.shape).scatter(0, torch.cat(where), values)


def response_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_T(token) [N], sequence index [N]) for every supervised token of the batch, N in row-major
    order; one forward pass per length bucket when the batch has ``buckets``, or per shared prompt when
    it has ``prefix_groups`` (``prefix_logprobs``; inference only: no cache is kept for a backward)."""
    logps = None
    if batch.get("prefix_groups") and not torch.is_grad_enabled():
        logps = prefix_logprobs(model, batch, batch["prefix_groups"], temperature)
    if logps is None:
        (logps,) = per_token_by_bucket(
            lambda sub: (token_logprobs(model, sub, temperature)[0],), batch, batch.get("buckets")
        )
    return logps, sequence_index(batch)[:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]


def summed_logps(model: nn.Module, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi_T(y|x) = sum_t log pi_T(y_t | x, y_<t) over each row's response tokens: [R] for the R rows
    of ``batch`` (one forward pass per length bucket when the batch has ``buckets``)."""
    logps, seq = response_logprobs(model, batch, temperature)
    rows = batch["input_ids"].shape[0]
    return torch.zeros(rows, device=logps.device, dtype=logps.dtype).index_add(0, seq, logps)


def response_lengths(batch: Batch) -> torch.Tensor:
    """The number of supervised (response) tokens of each row: [R], the tokens ``summed_logps`` sums
    over (IPO divides by it, for the policy's and the cached or live reference's sums alike)."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    seq = sequence_index(batch)[:, 1:][keep]
    return torch.bincount(seq, minlength=batch["input_ids"].shape[0])


# ----------------------------------------------------------------------------- reward models


def reward_scores(model: nn.Module, batch: Batch) -> torch.Tensor:
    """r(x, y) of every row: the scalar head read at the row's final token ``batch["last_index"]``.

    The head's per-position output is captured with a forward hook, so the model still runs through
    its wrappers (DDP, autocast, peft) and HF's pad-id guess is never used (it picks the wrong token
    when the pad token is EOS and responses end with EOS). Rows run in one forward pass per length
    bucket (``batch["buckets"]``), so short rows are not padded. Returns float32 scores, shape [R]."""
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda mod, args, out: captured.append(out))
    groups = row_buckets(batch)
    parts = []
    try:
        for index, sub in groups:
            model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], use_cache=False)
            per_position = captured[-1]  # [rows, T, 1]
            rows = torch.arange(per_position.shape[0], device=per_position.device)
            last = batch["last_index"] if index is None else batch["last_index"][index]
            parts.append(per_position[rows, last, 0].float())
    finally:
        handle.remove()
    if len(groups) == 1:
        return parts[0]
    scores = torch.cat(parts)  # bucket order -> the batch's row order
    return scores.new_empty(scores.shape).scatter(0, torch.cat([index for index, _ in groups]), scores)


def token_scores(model: nn.Module, batch: Batch) -> torch.Tensor:
    """A reward model's scalar head at every position that predicts a response token: [N], float32,
    aligned with ``token_logprobs`` (PPO reads V(s_t) there when the value model is a reward model)."""
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    return captured[-1][..., 0][_predicts_response(batch["labels"])].float()
