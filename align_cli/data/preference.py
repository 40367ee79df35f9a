"""Preference data (pairs and rankings) -> token ids, shared by the reward, DPO and KTO stages.

Each record becomes one prompt and K >= 2 responses ordered best first (a pair is K = 2); an unpaired
record (KTO) becomes one prompt and its one completion, with the same rendering and length policy. The
prompt/response boundary is decided while rendering, segment by segment. Length policy: the prompt
keeps its end (its start is cut to ``max_prompt_length``), each response keeps its start (its end is
cut to fit ``max_length``); records left with an empty response are dropped and counted.
"""

from __future__ import annotations

from typing import Any

import torch

from align_cli.data.collate import length_buckets
from align_cli.data.formats import DataError, Record
from align_cli.data.templates import Segment, continuation, render_prompt, response_segments
from align_cli.data.tokenize import IGNORE_INDEX, DataStats, encode_segments, segment_ids


def split_conversations(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Anthropic-HH style: two full conversations -> (shared prompt messages, chosen tail, rejected tail)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # the responses start at an assistant turn
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def ranked_responses(record: Record) -> tuple[Any, list[Any]]:
    """(prompt, responses best first) of a preference or ranked record; (prompt, [completion]) of an
    unpaired one."""
    f = record.fields
    if record.kind == "unpaired":
        return f["prompt"], [f["completion"]]
    if record.kind == "preference":
        prompt, chosen, rejected = f.get("prompt"), f["chosen"], f["rejected"]
        # full conversations beside a `prompt` field (UltraFeedback-binarized): the shared turns are the
        # prompt, so the user's message is never trained on or counted as part of the response
        if (
            isinstance(chosen, list)
            and isinstance(rejected, list)
            and chosen[:1] == rejected[:1]
            and chosen[:1]
            and isinstance(chosen[0], dict)
            and chosen[0].get("role") != "assistant"
        ):
            prompt = None
        if prompt is None:
            if not (isinstance(chosen, list) and isinstance(rejected, list)):
                raise DataError(
                    f"{record.where}: prompt: missing (needed unless chosen/rejected are conversations)"
                )
            prompt, chosen, rejected = split_conversations(chosen, rejected)
            if not chosen or not rejected:
                raise DataError(
                    f"{record.where}: chosen: identical conversations leave no response to compare"
                )
        return prompt, [chosen, rejected]
    responses = list(f["responses"])
    if "scores" in f:
        order = sorted(range(len(responses)), key=lambda i: -f["scores"][i])
        responses = [responses[i] for i in order]
    return f["prompt"], responses


def response_template(prompt: Any, template: str) -> str:
    """The template a record's prompt and responses render with, decided per record: with data.template
    auto, chat when the prompt is a list of messages, else plain. Reward training and every scorer
    (``scoring.scored_row``) decide it here, so a sample is scored as the reward model's records were."""
    if template == "auto":
        return "chat" if isinstance(prompt, list) else "plain"
    return template


def _response_ids(prompt: Any, response: Any, template: str, tokenizer: Any) -> list[int]:
    """Token ids of a response: a string, or chat messages that continue a chat prompt."""
    if isinstance(response, list):
        return segment_ids(continuation(prompt, response, tokenizer), tokenizer)
    segments = response_segments(response, template, tokenizer)
    return [t for piece, _ in segments for t in segment_ids(piece, tokenizer)]


def chosen_segments(record: Record, template: str, tokenizer: Any) -> list[Segment]:
    """Preferred-FT (the DPO paper's baseline): a preference or ranked record as an SFT example, the
    prompt (not trained) followed by the chosen / best response, with the same template as DPO."""
    prompt, responses = ranked_responses(record)
    template = response_template(prompt, template)
    prompt_text = render_prompt(prompt, template, tokenizer)
    best = responses[0]
    if isinstance(best, list):  # chat messages continuing the prompt: the text after the generation prompt
        return [(prompt_text, False), (continuation(prompt, best, tokenizer), True)]
    return [(prompt_text, False), *response_segments(best, template, tokenizer)]


def encode_preference(
    record: Record, tokenizer: Any, template: str, max_length: int, max_prompt_length: int | None
) -> tuple[dict[str, Any] | None, str | None, bool]:
    """One record -> ({prompt_ids, responses, margin, rating, length, where}, drop reason, truncated)."""
    prompt, responses = ranked_responses(record)
    template = response_template(prompt, template)
    prompt_text = render_prompt(prompt, template, tokenizer)
    prompt_ids, _ = encode_segments([(prompt_text, False)], tokenizer)
    cap = max_prompt_length or max_length // 2
    truncated = len(prompt_ids) > cap
    if truncated:  # keep the end of the prompt, next to the response; BOS stays first
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - cap + 1 :]
    response_ids = []
    for response in responses:
        ids = _response_ids(prompt, response, template, tokenizer)
        room = max_length - len(prompt_ids)
        if len(ids) > room:
            ids, truncated = ids[:room], True
        if not ids:
            return None, "no_response_tokens_left", truncated
        response_ids.append(ids)
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
) -> tuple[list[dict[str, Any]], DataStats]:
    stats = DataStats()
    examples = []
    for record in records:
        stats.read += 1
        example, reason, truncated = encode_preference(
            record, tokenizer, template, max_length, max_prompt_length
        )
        if example is None:
            stats.dropped[reason] += 1
            continue
        stats.kept += 1
        stats.truncated += truncated
        examples.append(example)
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
