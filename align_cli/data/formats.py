"""Readers and validators for every record kind the CLI accepts.

Records are read from JSONL files (or hub data sets through ``datasets``) and validated before any
model is loaded. Every problem is reported as ``file:line: field: what is wrong``; all problems of a
file are collected (up to a cap) and raised together as one DataError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align_cli.data.normalize import normalize
from align_cli.data.readers import DataError, ReadOptions, read_rows

MAX_REPORTED_ERRORS = 20
# a JSONL line longer than this is refused without being read into memory (a runaway line is almost
# always a broken export, e.g. a whole file on one line); ALIGN_MAX_LINE_MB changes it
MAX_LINE_MB_ENV = "ALIGN_MAX_LINE_MB"
DEFAULT_MAX_LINE_MB = 10.0
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


def max_line_bytes() -> int:
    raw = os.environ.get(MAX_LINE_MB_ENV)
    try:
        megabytes = float(raw) if raw else DEFAULT_MAX_LINE_MB
    except ValueError:
        raise DataError(f"{MAX_LINE_MB_ENV}={raw!r}: expected a number of megabytes") from None
    return max(1, int(megabytes * 2**20))


def _lines(handle: Any, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes or None when longer than ``limit``, size in bytes), reading at most about
    ``limit`` bytes at a time: an overlong line is skipped in bounded chunks, never held whole."""
    line_no = 0
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield line_no, raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = handle.readline(2**20)
            if not raw:
                break
            size += len(raw)
        yield line_no, None, size


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # plain json would keep the last value, silently
            raise ValueError(f"duplicate key {key!r} (which value is meant?)")
        obj[key] = value
    return obj


# refuses NaN/Infinity (and numbers that overflow to inf): such a value in a margin or score would turn
# the loss into NaN; and a key given twice in one object (which value was meant?)
JSON_DECODER = json.JSONDecoder(
    parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys
)


def parse_json_line(text: str) -> Any:
    """One JSON document, by ``JSON_DECODER``. Raises ValueError with the reason."""
    try:
        return JSON_DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """Parse a JSONL file into (line number, object); blank lines are skipped.

    The file is read line by line. Non-UTF-8 bytes, malformed JSON, NaN/Infinity and lines longer than
    ``ALIGN_MAX_LINE_MB`` (default 10) are errors naming the line; all of them are reported together."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    limit = max_line_bytes()
    rows, errors = [], []
    with p.open("rb") as handle:
        for line_no, raw, size in _lines(handle, limit):
            if raw is None:
                errors.append(
                    f"{p}:{line_no}: line is {size / 2**20:.1f} MB; lines over {limit / 2**20:g} MB are "
                    f"refused (set {MAX_LINE_MB_ENV} to allow longer ones)"
                )
            else:
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading BOM is fine
                except UnicodeDecodeError as exc:
                    bad = raw[exc.start : exc.start + 1]
                    errors.append(f"{p}:{line_no}: not valid UTF-8 (byte {exc.start}: {bad!r})")
                    continue
                if not text.strip():
                    continue
                try:
                    rows.append((line_no, parse_json_line(text)))
                except ValueError as exc:
                    errors.append(f"{p}:{line_no}: malformed JSON: {exc}")
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    _raise_if(errors, p)
    if not rows:
        raise DataError(f"{p}: no records (the file is empty or only blank lines)")
    return rows


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
    _raise_if(errors, source)
    return records
