"""Validators for every record kind the CLI accepts.

Records are read by ``align_cli.data.readers`` (JSONL, JSON, Parquet, CSV/TSV, saved or hub data sets)
and validated here before any model is loaded. Every problem is reported as ``file:line: field: what is
wrong``; all problems of a file are collected (up to a cap) and raised together as one DataError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from align_cli.data.normalize import normalize
from align_cli.data.readers import MAX_REPORTED_ERRORS, DataError, ReadOptions, raise_collected, read_rows

ROLES = ("system", "user", "assistant", "tool")
USER_SIDE = ("user", "tool")  # turns the model answers: a user's, or a tool's result
KINDS = ("alpaca", "prompt_completion", "messages", "text", "preference", "ranked", "unpaired")
SFT_KINDS = ("alpaca", "prompt_completion", "messages", "text")
# `align sft` also takes preference records: Preferred-FT, SFT on prompt + chosen (best) response
PREFERRED_FT_KINDS = ("preference", "ranked")


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


# the fields that make a record of each kind, in the order kinds are preferred when a record fits
# several (UltraFeedback rows hold both `messages` and `chosen`/`rejected`)
KIND_FIELDS = {
    "messages": ("messages",),
    "preference": ("chosen", "rejected"),
    "ranked": ("responses",),
    "unpaired": ("label",),  # TRL's unpaired preference (KTO): prompt, completion, label true/false
    "alpaca": ("instruction",),
    "prompt_completion": ("completion",),
    "text": ("text",),
}


def detect_kind(obj: dict[str, Any], allowed: Iterable[str] = KINDS) -> str | None:
    """The kind of a record, decided by what the stage takes: the first kind in preference order whose
    fields the record has and that ``allowed`` holds (a preference file with a `messages` column is
    preference data for reward and DPO, chat data for SFT); None when no allowed kind fits."""
    fitting = [kind for kind, fields in KIND_FIELDS.items() if any(f in obj for f in fields)]
    return next((kind for kind in fitting if kind in allowed), None)


def _kind_hint(obj: dict[str, Any], allowed: tuple[str, ...], found: str | None) -> str:
    """What a record holds and how to map it onto a kind the stage takes (a record of a known kind the
    stage cannot use, e.g. chats for DPO, is other data, not a naming problem)."""
    wanted = {
        "alpaca": "instruction, input, output",
        "prompt_completion": "prompt, completion",
        "messages": "messages",
        "text": "text",
        "preference": "prompt, chosen, rejected",
        "ranked": "prompt, responses",
        "unpaired": "prompt, completion, label",
    }
    first = next(iter(obj), "COLUMN")
    fields = ", ".join(obj) or "none"
    kinds = "; ".join(f"{k} ({wanted[k]})" for k in allowed)
    if found is not None:
        return f"found the fields {fields}; this command takes {kinds}"
    return (
        f"found the fields {fields}; this command takes {kinds}. Map a column onto one of these with "
        f"data.columns, e.g. --set data.columns.prompt={first}, or give data.format"
    )


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


def validate_messages(
    messages: Any, key: str = "messages", need_assistant_last: bool = True, first: tuple[str, ...] = ("user",)
) -> list[str]:
    """Problems of a chat ``messages`` list (roles, order, content types). Turns alternate between the
    assistant and the other side (a user, or a tool's result); the first non-system turn is one of
    ``first`` (a response that continues a prompt starts with the assistant)."""
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
    sides = ["user" if role in USER_SIDE else role for role in turns]
    for prev, cur in zip(sides, sides[1:]):
        if prev == cur:
            errors.append(f"{key}: two {cur} messages in a row (roles must alternate user/assistant)")
            break
    if turns and turns[0] not in first:
        errors.append(f"{key}: the first non-system message must be from the {' or the '.join(first)}")
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
        _response(resp, f"responses[{i}]", errors, "prompt" in obj)
    if "scores" in obj:
        scores = obj["scores"]
        if not isinstance(scores, list) or len(scores) != len(responses):
            errors.append("scores: expected one number per response")
        elif not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            errors.append("scores: expected numbers")
        elif len(set(scores)) < len(scores):  # a tie gives no order; sorting would invent one
            errors.append(f"scores: tied scores {scores} cannot be ranked")
    texts = [json.dumps(r, sort_keys=True) for r in responses]
    if len(set(texts)) != len(texts):
        errors.append("responses: two responses are identical")


def _prompt(obj: dict, errors: list[str]) -> None:
    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        errors.extend(validate_messages(prompt, "prompt", need_assistant_last=False))
    elif "prompt" in obj or "messages" not in obj:
        _text(obj, "prompt", errors)


def _response(value: Any, key: str, errors: list[str], has_prompt: bool) -> None:
    """A response: text, a whole conversation, or (beside a prompt) the assistant turn(s) that continue
    the prompt."""
    if isinstance(value, list):
        errors.extend(validate_messages(value, key, first=("user", "assistant") if has_prompt else ("user",)))
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
            _response(obj[key], key, errors, "prompt" in obj)
    if "chosen" in obj and obj.get("chosen") == obj.get("rejected"):
        errors.append("chosen: identical to rejected")
    if "margin" in obj and obj["margin"] is not None:
        m = obj["margin"]
        if not isinstance(m, (int, float)) or isinstance(m, bool):
            errors.append(f"margin: expected a number, got {m!r}")
    if "rating" in obj and not isinstance(obj["rating"], str):
        errors.append(f"rating: expected a string label, got {obj['rating']!r}")


def _completion(obj: dict, errors: list[str]) -> None:
    """A completion: text, or (TRL's conversational prompt-completion) the assistant turn(s) after it."""
    if isinstance(obj.get("completion"), list):
        errors.extend(validate_messages(obj["completion"], "completion", first=("assistant",)))
    else:
        _text(obj, "completion", errors)


def _validate_unpaired(obj: dict, errors: list[str]) -> None:
    if isinstance(obj.get("prompt"), list):
        errors.extend(validate_messages(obj["prompt"], "prompt", need_assistant_last=False))
    else:
        _text(obj, "prompt", errors)
    _completion(obj, errors)
    if "label" not in obj:
        errors.append("label: missing (true: a desirable completion, false: an undesirable one)")
    elif not isinstance(obj["label"], bool):  # "false" or 0 would be truthy or ambiguous
        errors.append(f"label: expected true or false, got {obj['label']!r}")


def validate_record(obj: Any, kind: str) -> list[str]:
    """Problems of one record of ``kind``, each as 'field: what is wrong'."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    errors: list[str] = []
    if kind == "alpaca":
        _text(obj, "instruction", errors)
        _text(obj, "input", errors, required=False, allow_empty=True)
        _text(obj, "output", errors)
    elif kind == "prompt_completion":  # text, or TRL's conversational prompt-completion
        _prompt(obj, errors)
        _completion(obj, errors)
    elif kind == "messages":
        errors.extend(validate_messages(obj.get("messages")))
    elif kind == "text":
        _text(obj, "text", errors)
    elif kind == "preference":
        _validate_preference(obj, errors)
    elif kind == "ranked":
        _validate_ranked(obj, errors)
    elif kind == "unpaired":
        _validate_unpaired(obj, errors)
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return errors


def load_records(
    source: str, kind: str = "auto", allowed: Iterable[str] = KINDS, options: ReadOptions | None = None
) -> list[Record]:
    """Read (``readers.read_rows``: JSONL, JSON, Parquet, CSV/TSV, saved data sets, folders, hub ids),
    map onto align's fields (``normalize``: column and role mapping, TRL, ShareGPT and HH shapes) and
    validate every record of ``source``.

    ``kind='auto'`` detects it from the first record, as the stage needs it (``detect_kind``); all
    records must then be of that kind. Raises DataError naming file, line and field for every bad
    record (up to a cap)."""
    options = options or ReadOptions()
    allowed = tuple(allowed)
    rows = [
        (where, line, normalize(obj, options.columns, options.roles))
        for where, line, obj in read_rows(source, options)
    ]
    if not rows:  # a file with no records is refused by its reader; a hub split can be empty
        raise DataError(f"{source}: no records")
    if kind == "auto":
        where, line, first = rows[0]
        if not isinstance(first, dict):
            raise DataError(f"{where}:{line}: expected a JSON object, got {type(first).__name__}")
        kind = detect_kind(first, allowed)
        if kind is None:
            found = detect_kind(first)
            what = f"records are {found!r}" if found else "cannot tell the record kind"
            raise DataError(f"{where}:{line}: {what}: {_kind_hint(first, allowed, found)}")
    if kind not in allowed:
        raise DataError(f"{source}: records are {kind!r}; this command takes {', '.join(allowed)}")
    records, errors = [], []
    for where, line, obj in rows:
        problems = validate_record(obj, kind)
        if problems:
            errors.extend(f"{where}:{line}: {p}" for p in problems)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        else:
            records.append(Record(source=where, line=line, kind=kind, fields=obj))
    raise_collected(errors, source)
    return records
