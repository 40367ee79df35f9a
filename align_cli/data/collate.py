"""Batch planning (length-grouped, deterministic, sharded per rank) and collation.

The plan is a pure function of (lengths, batch shape, seed, epoch), so a resumed or multi-process
run sees exactly the batches an uninterrupted single-process run would.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from align_cli.data.tokenize import IGNORE_INDEX

MEGABATCH_STEPS = 16  # steps whose examples are sorted by length together


def plan_epoch(
    lengths: list[int],
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[list[int]]]:
    """Example indices for each optimizer step, as a list of global micro-batches.

    A global micro-batch holds micro_batch_size * world_size examples; rank r later takes
    ``shard(micro_batch, r, world_size)``. With ``group_by_length`` the examples of
    MEGABATCH_STEPS steps are sorted by length before being cut into steps, so padding stays small
    while the order of steps stays random. Only the step size (micro * accum * world) decides which
    examples share a step, so 4 x 2 and 8 x 1 give the same updates."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    usable = len(order) - len(order) % world_size  # every rank needs the same number of examples
    order = order[:usable]
    step_size = micro_batch_size * grad_accum * world_size
    micro_size = micro_batch_size * world_size
    steps = []
    chunk = step_size * MEGABATCH_STEPS if group_by_length else step_size
    for start in range(0, len(order), chunk):
        block = order[start : start + chunk]
        if group_by_length:
            block.sort(key=lambda i: -lengths[i])
        steps += [block[i : i + step_size] for i in range(0, len(block), step_size)]
    if group_by_length:
        rng.shuffle(steps)
    plan = []
    for step in steps:
        if group_by_length:
            step = sorted(step, key=lambda i: -lengths[i])
        plan.append([step[i : i + micro_size] for i in range(0, len(step), micro_size)])
    return plan


def shard(micro_batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a global micro-batch (interleaved: ranks get similar lengths)."""
    return micro_batch[rank::world_size]


def pad_collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded labels are IGNORE_INDEX."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def padding_free_collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """All examples in one row, no padding. Position ids restart at 0 for each example, which
    transformers turns into a block-diagonal causal mask (no attention across examples) when the
    attention mask is None."""
    input_ids = torch.tensor([t for e in examples for t in e["input_ids"]])[None]
    labels = torch.tensor([t for e in examples for t in e["labels"]])[None]
    position_ids = torch.cat([torch.arange(len(e["input_ids"])) for e in examples])[None]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# a batch whose rows differ in length (the chosen and rejected response of a pair, K ranked responses)
# runs as up to MAX_BUCKETS forward passes over rows of similar length; each extra pass must save at
# least BUCKET_MIN_SAVING of the batch's real tokens, and BUCKET_MIN_TOKENS, in padding
MAX_BUCKETS = 3
BUCKET_MIN_SAVING = 0.04
BUCKET_MIN_TOKENS = 64


def length_buckets(lengths: list[int]) -> list[tuple[list[int], int]]:
    """Rows grouped for separate forward passes: (row indices, width) per group, longest first.

    Rows sorted by length are cut into contiguous groups minimising padded tokens (dynamic programming
    over the cut points); one group (a single forward pass over the whole batch) unless more save."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    penalty = max(BUCKET_MIN_SAVING * sum(sizes), BUCKET_MIN_TOKENS)
    # best[k][j]: least padded tokens for the first j sorted rows in k groups, and the last cut
    inf = float("inf")
    best = [[(inf, 0)] * (n + 1) for _ in range(MAX_BUCKETS + 1)]
    best[0][0] = (0, 0)
    for k in range(1, MAX_BUCKETS + 1):
        for j in range(1, n + 1):
            best[k][j] = min((best[k - 1][i][0] + (j - i) * sizes[i], i) for i in range(j))
    k = min(range(1, MAX_BUCKETS + 1), key=lambda k: best[k][n][0] + k * penalty)
    groups, j = [], n
    while k:
        i = best[k][j][1]
        groups.append(([order[r] for r in range(i, j)], sizes[i]))
        j, k = i, k - 1
    return groups[::-1]


def row_buckets(batch: dict[str, Any]) -> list[tuple[torch.Tensor | None, dict[str, Any]]]:
    """(row index or None for all rows, sub-batch) for each forward pass over ``batch["buckets"]`` (from
    ``length_buckets``); a sub-batch holds its rows of input_ids/attention_mask/labels cut to its width."""
    buckets = batch.get("buckets")
    if not buckets or len(buckets) == 1:
        return [(None, batch)]
    device = batch["input_ids"].device
    out = []
    for rows, width in buckets:
        index = torch.tensor(rows, device=device)
        sub = {k: batch[k][index, :width] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        out.append((index, sub))
    return out
