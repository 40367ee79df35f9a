"""Preference data (pairs and rankings) -> token ids, shared by the reward and DPO stages.

Each record becomes one prompt and K >= 2 responses ordered best first (a pair is K = 2). The
prompt/response boundary is decided while rendering, segment by segment. Length policy: the prompt
keeps its end (its start is cut to ``max_prompt_length``), each response keeps its start (its end is
cut to fit ``max_length``): ``fit_lengths``, which every reward-model scorer applies too. Records left
with an empty response are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from align_cli.data.collate import length_buckets
from align_cli.data.formats import Record
from align_cli.data.ranked import ranked_responses, response_template
from align_cli.data.templates import continuation, render_prompt, response_segments
from align_cli.data.tokenize import IGNORE_INDEX, DataStats, encode_segments, segment_ids, special_prefix


def _response_ids(prompt: Any, response: Any, template: str, tokenizer: Any) -> list[int]:
    """Token ids of a response: a string, or chat messages that continue a chat prompt."""
    if isinstance(response, list):
        return segment_ids(continuation(prompt, response, tokenizer), tokenizer)
    segments = response_segments(response, template, tokenizer)
    return [t for piece, _ in segments for t in segment_ids(piece, tokenizer)]


def fit_lengths(
    prompt_ids: list[int],
    responses: list[list[int]],
    max_length: int,
    max_prompt_length: int | None,
    keep_first: int = 1,
) -> tuple[list[int], list[list[int]], bool]:
    """The one length rule of preference data and of every reward-model scorer (``scoring``): the prompt
    keeps its end, cut to ``max_prompt_length`` (default ``max_length // 2``) with its first
    ``keep_first`` tokens (the tokenizer's special prefix, BOS) kept; each response keeps its start, cut
    to the room the prompt leaves in ``max_length``. Returns (prompt ids, response ids, whether anything
    was cut)."""
    cap = max_prompt_length or max_length // 2
    truncated = len(prompt_ids) > cap
    if truncated:  # keep the end of the prompt, next to the response
        prompt_ids = prompt_ids[:keep_first] + prompt_ids[len(prompt_ids) - cap + keep_first :]
    room = max_length - len(prompt_ids)
    truncated = truncated or any(len(ids) > room for ids in responses)
    return prompt_ids, [ids[:room] for ids in responses], truncated


def encode_preference(
    record: Record, tokenizer: Any, template: str, max_length: int, max_prompt_length: int | None
) -> tuple[dict[str, Any] | None, str | None, bool]:
    """One record -> ({prompt_ids, responses, margin, rating, length, where}, drop reason, truncated)."""
    prompt, responses = ranked_responses(record)
    template = response_template(prompt, template)
    prompt_ids, _ = encode_segments([(render_prompt(prompt, template, tokenizer), False)], tokenizer)
    response_ids = [_response_ids(prompt, response, template, tokenizer) for response in responses]
    keep = len(special_prefix(tokenizer))
    prompt_ids, response_ids, truncated = fit_lengths(
        prompt_ids, response_ids, max_length, max_prompt_length, keep
    )
    if not all(response_ids):
        return None, "no_response_tokens_left", truncated
    if len({tuple(r) for r in response_ids}) < len(response_ids):
        return None, "responses_identical_after_truncation", truncated
    f = record.fields
    example = {
        "prompt_ids": prompt_ids,
        "responses": response_ids,
        "margin": f.get("margin"),
        "rating": f.get("rating"),
        "length": len(prompt_ids) + max(len(r) for r in response_ids),
        "where": record.where,
    }
    return example, None, truncated


def tokenize_preferences(
    records: list[Record],
    tokenizer: Any,
    template: str,
    max_length: int,
    max_prompt_length: int | None = None,
    drop_truncated: bool = False,
    extra: Callable[[Record], dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], DataStats]:
    """Records -> examples, every record counted: kept (cut ones among them, ``truncated``) or dropped
    by reason. ``drop_truncated`` (data.on_too_long: drop) drops a record that had to be cut; ``extra``
    adds a record's own fields to its example (KTO's label)."""
    stats = DataStats()
    examples = []
    for record in records:
        stats.read += 1
        example, reason, truncated = encode_preference(
            record, tokenizer, template, max_length, max_prompt_length
        )
        if example is not None and truncated and drop_truncated:
            example, reason = None, "too_long"
        if example is None:
            stats.dropped[reason] += 1
            continue
        stats.kept += 1
        stats.truncated += truncated
        examples.append(example | (extra(record) if extra else {}))
    return examples, stats


def collate_responses(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Every response of every example as one row (prompt + response), for one forward pass.

    Rows are ordered example by example, best response first. ``group`` [R] gives each row's example,
    ``rank`` [R] its place in that example's ranking (0 = best); ``labels`` mask the prompt and padding;
    ``last_index`` [R] is the position of each row's final token (where a reward model reads its score).
    """
    rows, group, rank = [], [], []
    for i, e in enumerate(examples):
        for k, response in enumerate(e["responses"]):
            rows.append((e["prompt_ids"], response))
            group.append(i)
            rank.append(k)
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    last_index = torch.zeros(len(rows), dtype=torch.long)
    for row, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[row, :n] = torch.tensor(p + r)
        labels[row, len(p) : n] = torch.tensor(r)
        attention_mask[row, :n] = 1
        last_index[row] = n - 1
    margins = [e["margin"] if e["margin"] is not None else 0.0 for e in examples]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "last_index": last_index,
        "group": torch.tensor(group),
        "rank": torch.tensor(rank),
        "margin": torch.tensor(margins, dtype=torch.float32),
        "units": len(examples),
        "tokens": int(attention_mask.sum()),
        "buckets": length_buckets((last_index + 1).tolist()),  # forward passes over rows of similar length
    }
