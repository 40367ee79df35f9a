"""`align data check`: validate a file and show what the recipe's length limits would do to it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from align_cli.data.formats import SFT_KINDS, Record, load_records
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, render_prompt, settle_chat_template
from align_cli.data.tokenize import tokenize_sft
from align_cli.recipe import Recipe


def percentiles(values: list[int], qs: tuple[int, ...] = (0, 50, 90, 95, 99, 100)) -> dict[int, int]:
    ordered = sorted(values)
    return {q: ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] for q in qs}


def _response_texts(record: Record) -> list[str]:
    f = record.fields
    if record.kind == "preference":
        return [f["chosen"], f["rejected"]]
    return list(f["responses"])


def _preference_lengths(records: list[Record], tokenizer: Any, template: str) -> list[int]:
    lengths = []
    for record in records:
        prompt = record.fields.get("prompt", "")
        prompt_text = (
            render_prompt(prompt, template if template != "auto" else "plain", tokenizer) if prompt else ""
        )
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        for response in _response_texts(record):
            text = response if isinstance(response, str) else " ".join(m["content"] for m in response)
            lengths.append(n_prompt + len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 2)
    return lengths


def check_file(source: str, recipe: Recipe, console: Console) -> None:
    d = recipe.data
    records = load_records(source, d.format, options=read_options(d))
    kinds = Counter(r.kind for r in records)
    by_kind = ", ".join(f"{n} {k}" for k, n in kinds.items())
    console.print(f"[green]ok[/] {source}: {len(records)} valid records ({by_kind})")
    if not recipe.model.name_or_path:
        console.print("(give --model or a recipe with model.name_or_path for token-length statistics)")
        return
    from align_cli.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, records))  # as training does
    table = Table(title=f"token lengths (max_length {d.max_length})")
    for column in ("p0", "p50", "p90", "p95", "p99", "p100", "over max", "would be dropped"):
        table.add_column(column, justify="right")
    if records[0].kind in SFT_KINDS:
        raw, _ = tokenize_sft(records, tokenizer, d.template, 10**9, "truncate")
        lengths = [e["length"] for e in raw]
        _, stats = tokenize_sft(records, tokenizer, d.template, d.max_length, d.on_too_long)
        dropped = sum(stats.dropped.values())
    else:
        lengths = _preference_lengths(records, tokenizer, d.template)
        dropped = 0
    over = sum(n > d.max_length for n in lengths)
    p = percentiles(lengths)
    table.add_row(*[str(p[q]) for q in (0, 50, 90, 95, 99, 100)], str(over), str(dropped))
    console.print(table)
