"""Records in the shapes public data sets really have, mapped onto align's own fields before validation.

Applied to every row as it is read (``formats.load_records``, ``prompts.load_prompts``), in this order:
- column renames, ``data.columns`` (our field -> the source's column: ``{prompt: question}``);
- ShareGPT: ``conversations`` of ``{from, value}`` becomes ``messages`` of ``{role, content}`` with the
  roles human -> user, gpt -> assistant (system, tool kept);
- in every message list: content given as a list of parts (``[{type: text, text: ...}]``) becomes the
  joined text, and roles are renamed by ``data.roles`` (``{human: user, gpt: assistant}``);
- raw Anthropic HH transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``) in ``chosen``/``rejected``
  become conversations;
- TRL's implicit prompt: text ``chosen``/``rejected`` without a ``prompt`` share their start, which is
  the prompt (the longest common prefix, as TRL's ``extract_prompt``); conversations without a prompt
  are split at their shared turns later (``ranked.split_conversations``).
The original row is left untouched; the returned one is what is validated and trained on.
"""

from __future__ import annotations

import re
from typing import Any

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}  # fmt: skip
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")


def normalize(obj: Any, columns: dict[str, str] | None = None, roles: dict[str, str] | None = None) -> Any:
    """One row in align's own shape (see the module docstring); anything not a JSON object is returned
    as it is, for the validator to refuse."""
    if not isinstance(obj, dict):
        return obj
    row = dict(obj)
    for ours, theirs in (columns or {}).items():
        if theirs in row:
            row[ours] = row.pop(theirs)
    if "conversations" in row and "messages" not in row and isinstance(row["conversations"], list):
        row["messages"] = [_sharegpt_message(m) for m in row.pop("conversations")]
    for key in MESSAGE_FIELDS:
        if _is_messages(row.get(key)):
            row[key] = [_message(m, roles or {}) for m in row[key]]
    if "responses" in row and isinstance(row["responses"], list):
        row["responses"] = [
            [_message(m, roles or {}) for m in r] if _is_messages(r) else r for r in row["responses"]
        ]
    for key in ("chosen", "rejected"):
        if is_hh_transcript(row.get(key)):
            row[key] = hh_messages(row[key])
    if "prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
        row["prompt"], row["chosen"], row["rejected"] = split_common_prefix(row["chosen"], row["rejected"])
    return row


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _sharegpt_message(message: Any) -> Any:
    if not isinstance(message, dict) or "from" not in message:
        return message
    role = str(message["from"])
    return {"role": SHAREGPT_ROLES.get(role, role), "content": message.get("value")}


def _message(message: dict[str, Any], roles: dict[str, str]) -> dict[str, Any]:
    out = dict(message)
    if out.get("role") in roles:
        out["role"] = roles[out["role"]]
    content = out.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):  # text parts only
            out["content"] = "".join(texts)
    return out


def is_hh_transcript(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("\n\nHuman: ")


def hh_messages(transcript: str) -> list[dict[str, str]]:
    """An Anthropic HH transcript as messages: each "\\n\\nHuman: " / "\\n\\nAssistant: " starts a turn."""
    parts = HH_TURN.split(transcript)[1:]  # ['Human', text, 'Assistant', text, ...]
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": text}
        for speaker, text in zip(parts[::2], parts[1::2])
    ]


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of an implicit-prompt text pair: the prompt is their longest common
    prefix, given back a space that starts both responses (TRL's extract_prompt)."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if 0 < n < limit and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]
