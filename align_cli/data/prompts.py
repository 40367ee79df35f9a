"""Prompts to sample from: prompt JSONL, Alpaca instruction/input, chat messages or preference files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align_cli.data.formats import validate_messages
from align_cli.data.normalize import normalize
from align_cli.data.ranked import split_conversations
from align_cli.data.readers import DataError, ReadOptions, read_rows
from align_cli.data.templates import alpaca_prompt, render_prompt
from align_cli.data.tokenize import DataStats, encode_segments


@dataclass
class Prompt:
    where: str  # file:line
    prompt: str | list[dict]  # text, or chat messages ending with a user turn
    instruction: str | None = None  # Alpaca prompts keep their parts, for SFT-ready outputs
    input: str = ""
    # the row's other columns (an answer, a label...), passed to reward functions by name
    columns: dict[str, Any] = field(default_factory=dict)

    def text(self, template: str, tokenizer: Any) -> str:
        if self.instruction is not None and template in ("auto", "alpaca"):
            return alpaca_prompt(self.instruction, self.input)
        return render_prompt(self.prompt, "plain" if template == "auto" else template, tokenizer)

    def ids(self, template: str, tokenizer: Any) -> list[int]:
        return prompt_ids(self.text(template, tokenizer), tokenizer)


def prompt_ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a rendered prompt as training encodes it (the tokenizer's own prefix, e.g. BOS)."""
    return encode_segments([(text, False)], tokenizer)[0]


# the fields a prompt is read from; every other column of a row is kept in Prompt.columns
PROMPT_FIELDS = ("prompt", "instruction", "input", "messages")


def _parse(obj: Any, where: str) -> Prompt | str:
    """A Prompt, or the problem with the record."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    parsed = _parse_prompt(obj, where)
    if isinstance(parsed, Prompt):
        parsed.columns = {k: v for k, v in obj.items() if k not in PROMPT_FIELDS}
    return parsed


def _parse_prompt(obj: dict[str, Any], where: str) -> Prompt | str:
    if "instruction" in obj:
        instruction, input_text = obj.get("instruction"), obj.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            return "instruction: missing or empty"
        if not isinstance(input_text, str):
            return "input: expected a string"
        return Prompt(where, f"{instruction}\n\n{input_text}".strip(), instruction, input_text)
    if "messages" in obj:
        messages = obj["messages"]
        problems = validate_messages(messages, need_assistant_last=False)
        if problems:
            return problems[0]
        while messages and messages[-1]["role"] == "assistant":  # sample a fresh final reply
            messages = messages[:-1]
        return Prompt(where, messages)
    if "prompt" not in obj and isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
        obj = {"prompt": split_conversations(obj["chosen"], obj["rejected"])[0]}  # the shared turns
    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        problems = validate_messages(prompt, "prompt", need_assistant_last=False)
        return problems[0] if problems else Prompt(where, prompt)
    if prompt is None:
        return "prompt: missing (expected prompt, instruction/input or messages)"
    if not isinstance(prompt, str):
        return f"prompt: expected a string, got {type(prompt).__name__}"
    if not prompt.strip():
        return "prompt: empty"
    return Prompt(where, prompt)


def load_prompts(source: str, options: ReadOptions | None = None, limit: int | None = None) -> list[Prompt]:
    """Every prompt of a source (any reader of ``readers.read_rows``, mapped by ``normalize``: a
    preference set gives its prompts); all bad rows are reported together with file and line."""
    options = options or ReadOptions()
    prompts, errors = [], []
    for where, line, raw in read_rows(source, options):
        obj = normalize(raw, options.columns, options.roles)
        parsed = _parse(obj, f"{where}:{line}")
        if isinstance(parsed, str):
            errors.append(f"{where}:{line}: {parsed}")
        else:
            prompts.append(parsed)
    if errors:
        raise DataError(f"{source}: {len(errors)} bad prompt(s):\n  " + "\n  ".join(errors[:20]))
    return prompts[:limit] if limit else prompts


def prompt_room(max_length: int, max_new_tokens: int, max_prompt_length: int | None = None) -> int:
    """The most tokens a prompt may have: room for ``max_new_tokens`` within ``data.max_length``, and at
    most ``data.max_prompt_length`` when that is set (as TRL's trainers cap prompts)."""
    room = max_length - max_new_tokens
    return room if max_prompt_length is None else min(room, max_prompt_length)


def fit_prompts(
    prompts: list[Prompt], tokenizer: Any, template: str, max_tokens: int, limit: int | None = None
) -> tuple[list[Prompt], Any]:
    """The prompts that leave room to generate (at most ``max_tokens`` tokens: ``prompt_room``), the
    first ``limit`` of them, and their accounting (a DataStats: read = kept + dropped by reason). Longer
    prompts are dropped, never cut: a cut prompt asks another question."""
    stats = DataStats(read=len(prompts))
    kept = []
    for prompt in prompts:
        if len(prompt.ids(template, tokenizer)) > max_tokens:
            stats.dropped["prompt_too_long"] += 1
        elif limit is not None and len(kept) >= limit:
            stats.dropped["beyond_max_prompts"] += 1
        else:
            kept.append(prompt)
    stats.kept = len(kept)
    if not kept:
        source = prompts[0].where.rsplit(":", 1)[0] if prompts else "prompts"
        raise DataError(
            f"{source}: no prompt fits in {max_tokens} tokens (data.max_prompt_length, or data.max_length "
            f"minus max_new_tokens); "
            f"{stats.describe()}"
        )
    return kept, stats
