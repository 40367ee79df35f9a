"""`align data check`: a file through the same reading, mapping, templating and tokenizing as training.

The stage (``--stage``, else the recipe's) decides which record kinds the file may hold, as in training,
so a file that `data check` accepts trains, and one it refuses gets training's own message. With a
model it shows one record as the model sees it (masked and supervised spans) and what the recipe's
length limits would do to the file.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from align_cli.data.formats import KINDS, PREFERRED_FT_KINDS, SFT_KINDS, load_records
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.data.tokenize import IGNORE_INDEX, DataStats, tokenize_sft
from align_cli.recipe import Recipe

PROMPT_STAGES = ("ppo", "rejection-sample", "grpo", "rloo")
STAGE_KINDS = {
    "sft": SFT_KINDS + PREFERRED_FT_KINDS,
    "reward": ("preference", "ranked"),
    "dpo": ("preference", "ranked"),
    "kto": ("unpaired",),
}


def percentiles(values: list[int], qs: tuple[int, ...] = (0, 50, 90, 95, 99, 100)) -> dict[int, int]:
    ordered = sorted(values)
    return {q: ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] for q in qs}


def spans(ids: list[int], trained: list[bool], tokenizer: Any) -> str:
    """Rich markup of token ids: masked spans dim, supervised spans bold green."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = escape(tokenizer.decode(ids[start:i]))
            out.append(f"[bold green]{text}[/]" if trained[start] else f"[dim]{text}[/]")
            start = i
    return "".join(out)


def check_file(source: str, recipe: Recipe, console: Console, stage: str | None = None) -> None:
    d = recipe.data
    stage = stage or recipe.stage
    if stage in PROMPT_STAGES:
        return _check_prompts(source, recipe, console)
    records = load_records(source, d.format, STAGE_KINDS.get(stage, KINDS), read_options(d))
    kinds = Counter(r.kind for r in records)
    by_kind = ", ".join(f"{n} {k}" for k, n in kinds.items())
    console.print(
        f"[green]ok[/] {source}: {len(records)} valid records ({by_kind}) for {stage or 'any stage'}"
    )
    if not recipe.model.name_or_path:
        console.print("(give --model or a recipe with model.name_or_path for token-length statistics)")
        return
    from align_cli.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, records))  # as training does
    if records[0].kind in SFT_KINDS or stage == "sft":
        raw, _ = tokenize_sft(records, tokenizer, d.template, 10**9, "truncate")
        lengths = [e["length"] for e in raw]
        _, stats = tokenize_sft(records, tokenizer, d.template, d.max_length, d.on_too_long)
        first = raw[0]
        shown = spans(first["input_ids"], [label != IGNORE_INDEX for label in first["labels"]], tokenizer)
    else:
        from align_cli.data.preference import tokenize_preferences

        raw, _ = tokenize_preferences(records, tokenizer, d.template, 10**9, 10**9)
        lengths = [e["length"] for e in raw]
        # DPO and KTO drop a cut record with data.on_too_long: drop; reward models always cut
        drop = stage in ("dpo", "kto") and d.on_too_long == "drop"
        _, stats = tokenize_preferences(
            records, tokenizer, d.template, d.max_length, d.max_prompt_length, drop_truncated=drop
        )
        first = raw[0]
        shown = "\n[italic]-- next response --[/]\n".join(
            spans(first["prompt_ids"] + r, [False] * len(first["prompt_ids"]) + [True] * len(r), tokenizer)
            for r in first["responses"]
        )
    console.print(
        f"[bold]{records[0].where}[/] as the model sees it ([dim]masked[/], [bold green]trained[/]):"
    )
    console.print(shown, highlight=False)
    _length_table(lengths, stats, d.max_length, console)


def _check_prompts(source: str, recipe: Recipe, console: Console) -> None:
    from align_cli.data.prompts import load_prompts

    prompts = load_prompts(source, read_options(recipe.data))
    console.print(f"[green]ok[/] {source}: {len(prompts)} valid prompts")
    if recipe.model.name_or_path:
        from align_cli.models import load_tokenizer

        tokenizer = load_tokenizer(recipe.model)
        settle_chat_template(tokenizer, recipe.data.chat_template, needs_chat(recipe.data.template, prompts))
        ids = prompts[0].ids(recipe.data.template, tokenizer)
        console.print(f"[bold]{prompts[0].where}[/] as the model sees it:")
        console.print(spans(ids, [False] * len(ids), tokenizer), highlight=False)


def _length_table(lengths: list[int], stats: DataStats, max_length: int, console: Console) -> None:
    table = Table(title=f"token lengths (max_length {max_length})")
    for column in ("p0", "p50", "p90", "p95", "p99", "p100", "over max", "would be dropped"):
        table.add_column(column, justify="right")
    over = sum(n > max_length for n in lengths)
    p = percentiles(lengths)
    dropped = sum(stats.dropped.values())
    table.add_row(*[str(p[q]) for q in (0, 50, 90, 95, 99, 100)], str(over), str(dropped))
    console.print(table)
