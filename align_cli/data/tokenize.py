"""Segments -> token ids with a loss mask, built together; truncation policy and its counts."""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from align_cli.data.formats import Record
from align_cli.data.ranked import chosen_segments
from align_cli.data.templates import Segment, render_sft_record

IGNORE_INDEX = -100  # label of a token that is not trained on (prompt, padding)


@dataclass
class DataStats:
    """What happened to the records of one split: read = kept + sum(dropped)."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    # a mixture's sources: {path: {"read": records in it, "taken": records it gave (its share)}}
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "read": self.read,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
        }
        return out | ({"sources": self.sources} if self.sources else {})

    def describe(self) -> str:
        drops = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        text = f"{self.read} read, {self.kept} kept, {self.truncated} truncated, dropped: {drops}"
        if len(self.sources) > 1 or any(c["read"] != c["taken"] for c in self.sources.values()):
            text += "; sources: " + ", ".join(
                f"{p} {c['taken']} of {c['read']}" for p, c in self.sources.items()
            )
        return text


def segment_ids(piece: str | list[int], tokenizer: Any) -> list[int]:
    """Token ids of one segment: literal ids as given, text tokenized without added specials."""
    return piece if isinstance(piece, list) else tokenizer(piece, add_special_tokens=False)["input_ids"]


# tokenizer -> the ids its own encoding puts before any text (probed once per tokenizer object)
_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer(text)`` puts before the text itself: ``[BOS]`` for Llama/Mistral-style
    tokenizers, ``[]`` for GPT-2/Qwen-style ones. Probed by encoding one text with and without special
    tokens, so align feeds a model what plain transformers (``tokenizer(text)``, pipelines) feeds it.

    Only the prefix is followed: a suffix the tokenizer's encoding appends (EOS, on tokenizers built with
    add_eos_token) is not, because the templates end a finished response with the end marker already and
    a sample cut at max_new_tokens must not be scored as finished."""
    try:
        return list(_PREFIXES[tokenizer])
    except (KeyError, TypeError):
        pass
    probe = "x"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    starts = [k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain]
    prefix = full[: starts[0]] if starts else []
    try:
        _PREFIXES[tokenizer] = tuple(prefix)
    except TypeError:  # not weak-referenceable: probe again next time
        pass
    return prefix


def encode_segments(segments: list[Segment], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where not trainable), segment by segment.

    The tokenizer's own special prefix (``special_prefix``: BOS where its encoding adds one) is put first
    unless the rendered text already starts with it (a chat template that writes BOS itself)."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, trainable in segments:
        piece_ids = segment_ids(piece, tokenizer)
        ids.extend(piece_ids)
        labels.extend(piece_ids if trainable else [IGNORE_INDEX] * len(piece_ids))
    prefix = special_prefix(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids[:0] = prefix
        labels[:0] = [IGNORE_INDEX] * len(prefix)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
    return ids, labels


def fit_sft(ids: list[int], labels: list[int], max_length: int, on_too_long: str) -> tuple[list, list] | str:
    """Apply the length policy; returns (ids, labels) or the reason the example is dropped."""
    if len(ids) > max_length:
        if on_too_long == "drop":
            return "too_long"
        ids, labels = ids[:max_length], labels[:max_length]  # keep the start: the prompt must stay whole
    if all(label == IGNORE_INDEX for label in labels):
        return "no_response_tokens_left" if len(ids) == max_length else "no_response_tokens"
    return ids, labels


def tokenize_sft(
    records: list[Record], tokenizer: Any, template: str, max_length: int, on_too_long: str
) -> tuple[list[dict], DataStats]:
    """Records -> examples {input_ids, labels, length, n_supervised, where}, with accounting."""
    stats = DataStats()
    examples = []
    for record in records:
        stats.read += 1
        if record.kind in ("preference", "ranked"):  # Preferred-FT: SFT on prompt + chosen
            segments = chosen_segments(record, template, tokenizer)
        else:
            segments = render_sft_record(record.kind, record.fields, template, tokenizer)
        ids, labels = encode_segments(segments, tokenizer)
        truncated = len(ids) > max_length
        fitted = fit_sft(ids, labels, max_length, on_too_long)
        if isinstance(fitted, str):
            stats.dropped[fitted] += 1
            continue
        stats.truncated += truncated
        stats.kept += 1
        ids, labels = fitted
        examples.append(
            {
                "input_ids": ids,
                "labels": labels,
                "length": len(ids),
                "n_supervised": sum(label != IGNORE_INDEX for label in labels),
                "where": record.where,
            }
        )
    return examples, stats
