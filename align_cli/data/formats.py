"""Readers and validators for every record kind the CLI accepts.

Records are read from JSONL files (or hub data sets through ``datasets``) and validated before any
model is loaded. Every problem is reported as ``file:line: field: what is wrong``; all problems of a
file are collected (up to a cap) and raised together as one DataError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_REPORTED_ERRORS = 20
ROLES = ("system", "user", "assistant")
KINDS = ("alpaca", "prompt_completion", "messages", "text", "preference", "ranked")
SFT_KINDS = ("alpaca", "prompt_completion", "messages", "text")
# `align sft` also takes preference records: Preferred-FT, SFT on prompt + chosen (best) response
PREFERRED_FT_KINDS = ("preference", "ranked")


class DataError(ValueError):
    """Input data that cannot be used; the message names file, line and field."""


@dataclass
class Record:
    """One validated input record and where it came from."""

    source: str  # file path or hub id
    line: int  # 1-based line number (row number + 1 for hub data)
    kind: str
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """Parse a JSONL file into (line number, object); blank lines are skipped.

    Non-UTF-8 bytes and malformed JSON are errors naming the line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    rows, errors = [], []
    with p.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(
                    f"{p}:{line_no}: not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
                )
                continue
            if not text.strip():
                continue
            try:
                rows.append((line_no, json.loads(text)))
            except json.JSONDecodeError as exc:
                errors.append(f"{p}:{line_no}: malformed JSON: {exc.msg} (column {exc.colno})")
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    _raise_if(errors, p)
    if not rows:
        raise DataError(f"{p}: no records (the file is empty)")
    return rows


def read_hub(name: str, split: str) -> list[tuple[int, Any]]:
    """Rows of a hub (or local ``datasets``) data set as (row number + 1, dict)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many kinds; the user needs the name and the reason
        raise DataError(f"{name}: could not load data set (split {split!r}): {exc}") from exc
    return [(i + 1, row) for i, row in enumerate(ds)]


def detect_kind(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return "messages"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "responses" in obj:
        return "ranked"
    if "instruction" in obj:
        return "alpaca"
    if "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _raise_if(errors: list[str], source: Any) -> None:
    if errors:
        more = " (showing the first ones)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        raise DataError(f"{source}: {len(errors)} bad record(s){more}:\n  " + "\n  ".join(errors))


def _text(obj: dict, key: str, errors: list[str], required: bool = True, allow_empty: bool = False) -> None:
    if key not in obj or obj[key] is None:
        if required:
            errors.append(f"{key}: missing")
        return
    value = obj[key]
    if not isinstance(value, str):
        errors.append(f"{key}: expected a string, got {type(value).__name__}")
    elif not allow_empty and not value.strip():
        errors.append(f"{key}: empty")


def validate_messages(messages: Any, key: str = "messages", need_assistant_last: bool = True) -> list[str]:
    """Problems of a chat ``messages`` list (roles, order, content types)."""
    if not isinstance(messages, list) or not messages:
        return [f"{key}: expected a non-empty list of {{role, content}}"]
    errors = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            errors.append(f"{where}: expected an object with role and content")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            errors.append(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            errors.append(f"{where}.role: a system message may only come first")
        if not isinstance(content, str):
            errors.append(f"{where}.content: expected a string, got {type(content).__name__}")
        elif role == "assistant" and not content.strip():
            errors.append(f"{where}.content: empty assistant response")
    turns = [m.get("role") for m in messages if isinstance(m, dict) and m.get("role") != "system"]
    for prev, cur in zip(turns, turns[1:]):
        if prev == cur:
            errors.append(f"{key}: two {cur} messages in a row (roles must alternate user/assistant)")
            break
    if turns and turns[0] != "user":
        errors.append(f"{key}: the first non-system message must be from the user")
    if need_assistant_last and (not turns or turns[-1] != "assistant"):
        errors.append(f"{key}: must end with an assistant message")
    return errors


def _validate_ranked(obj: dict, errors: list[str]) -> None:
    _prompt(obj, errors)
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        errors.append("responses: expected a list of at least 2 responses, best first")
        return
    for i, resp in enumerate(responses):
        _response(resp, f"responses[{i}]", errors)
    if "scores" in obj:
        scores = obj["scores"]
        if not isinstance(scores, list) or len(scores) != len(responses):
            errors.append("scores: expected one number per response")
        elif not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            errors.append("scores: expected numbers")
    texts = [json.dumps(r, sort_keys=True) for r in responses]
    if len(set(texts)) != len(texts):
        errors.append("responses: two responses are identical")


def _prompt(obj: dict, errors: list[str]) -> None:
    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        errors.extend(validate_messages(prompt, "prompt", need_assistant_last=False))
    elif "prompt" in obj or "messages" not in obj:
        _text(obj, "prompt", errors)


def _response(value: Any, key: str, errors: list[str]) -> None:
    if isinstance(value, list):
        errors.extend(validate_messages(value, key))
    elif not isinstance(value, str):
        errors.append(f"{key}: expected a string or a messages list, got {type(value).__name__}")
    elif not value.strip():
        errors.append(f"{key}: empty response")


def _validate_preference(obj: dict, errors: list[str]) -> None:
    if "prompt" in obj:
        _prompt(obj, errors)
    for key in ("chosen", "rejected"):
        if key not in obj:
            errors.append(f"{key}: missing")
        else:
            _response(obj[key], key, errors)
    if "chosen" in obj and obj.get("chosen") == obj.get("rejected"):
        errors.append("chosen: identical to rejected")
    if "margin" in obj and obj["margin"] is not None:
        m = obj["margin"]
        if not isinstance(m, (int, float)) or isinstance(m, bool):
            errors.append(f"margin: expected a number, got {m!r}")
    if "rating" in obj and not isinstance(obj["rating"], str):
        errors.append(f"rating: expected a string label, got {obj['rating']!r}")


def validate_record(obj: Any, kind: str) -> list[str]:
    """Problems of one record of ``kind``, each as 'field: what is wrong'."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    errors: list[str] = []
    if kind == "alpaca":
        _text(obj, "instruction", errors)
        _text(obj, "input", errors, required=False, allow_empty=True)
        _text(obj, "output", errors)
    elif kind == "prompt_completion":
        _text(obj, "prompt", errors)
        _text(obj, "completion", errors)
    elif kind == "messages":
        errors.extend(validate_messages(obj.get("messages")))
    elif kind == "text":
        _text(obj, "text", errors)
    elif kind == "preference":
        _validate_preference(obj, errors)
    elif kind == "ranked":
        _validate_ranked(obj, errors)
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return errors


def load_records(
    source: str, kind: str = "auto", allowed: Iterable[str] = KINDS, hub_split: str = "train"
) -> list[Record]:
    """Read and validate every record of a JSONL file or hub data set.

    ``kind='auto'`` detects it from the first record; all records must then be of that kind.
    Raises DataError naming file, line and field for every bad record (up to a cap)."""
    allowed = tuple(allowed)
    is_file = source.endswith((".jsonl", ".json")) or Path(source).exists()
    rows = read_jsonl(source) if is_file else read_hub(source, hub_split)
    if kind == "auto":
        first = rows[0][1]
        kind = detect_kind(first) if isinstance(first, dict) else None
        if kind is None:
            raise DataError(
                f"{source}:{rows[0][0]}: cannot tell the record kind from its fields "
                f"({', '.join(first) if isinstance(first, dict) else type(first).__name__}); expected one "
                "of: instruction/input/output, prompt/completion, messages, text, prompt/chosen/rejected, "
                "prompt/responses"
            )
    if kind not in allowed:
        raise DataError(f"{source}: records are {kind!r}; this command takes {', '.join(allowed)}")
    records, errors = [], []
    for line, obj in rows:
        problems = validate_record(obj, kind)
        if problems:
            errors.extend(f"{source}:{line}: {p}" for p in problems)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        else:
            records.append(Record(source=source, line=line, kind=kind, fields=obj))
    _raise_if(errors, source)
    return records
