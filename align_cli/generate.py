"""`align generate`: sample completions for prompts from a file or the command line, one JSONL row each.

Prompts are rendered as the sampling stages render them (``Prompt.text``: chat ``messages`` through the
chat template, Alpaca records through the Alpaca template, a plain prompt by the template), with the
template the model was trained with (its run's recipe.yaml), so the model sees the format it learned.
Sampling is the shared ``generation.sample``: same seed and batch size, same samples.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from align_cli.data.prompts import Prompt, load_prompts, prompt_ids
from align_cli.data.readers import DataError
from align_cli.errors import AlignError
from align_cli.generation import SamplingParams, sample
from align_cli.models import load_causal_lm, load_tokenizer
from align_cli.recipe import ModelSection
from align_cli.scoring import trained_settings

TEMPLATES = ("auto", "alpaca", "chat", "plain")


class GenerateError(AlignError, ValueError):
    """Flags of `align generate` / `align chat` that cannot be used together or are out of range."""


def check_params(params: SamplingParams) -> SamplingParams:
    """Refuse sampling settings ``model.generate`` would reject with a traceback, naming the flag."""
    problems = [
        (params.max_new_tokens < 1, "--max-new-tokens must be at least 1"),
        (params.temperature < 0, "--temperature must be >= 0 (0 = greedy)"),
        (not 0 < params.top_p <= 1, "--top-p must be in (0, 1]"),
        (params.top_k < 0, "--top-k must be >= 0 (0 = off)"),
        (params.n < 1, "--n must be at least 1"),
        (params.prompts_per_batch < 1, "--batch-size must be at least 1"),
    ]
    for bad, message in problems:
        if bad:
            raise GenerateError(message)
    return params


def load_policy(model: str, tokenizer: Any) -> Any:
    """The model to sample from: a model directory, hub id or LoRA run output (its adapter merged into
    its base), in eval mode, on the GPU when there is one."""
    policy = load_causal_lm(ModelSection(name_or_path=model), tokenizer).eval()
    return policy.cuda() if torch.cuda.is_available() else policy


def resolve_template(model: str, tokenizer: Any, requested: str | None) -> tuple[str, str]:
    """(template, where it came from): ``requested`` (--template); else the data.template of the model's
    run (RUN/recipe.yaml beside RUN/final), as that run rendered its prompts; else, for a model that was
    not trained here (a hub model), ``chat`` when its tokenizer ships a chat template, else ``auto``."""
    if requested:
        if requested not in TEMPLATES:
            raise GenerateError(f"--template {requested!r}: choose one of {', '.join(TEMPLATES)}")
        return requested, "--template"
    trained = trained_settings(model).get("template") if Path(model).is_dir() else None
    if trained:
        return trained, "the model's run recipe"
    if tokenizer.chat_template:
        return "chat", "the tokenizer's chat template"
    return "auto", "default"


def with_system(messages: list[dict], system: str) -> list[dict]:
    """``messages`` with ``system`` as their system turn (replacing one the prompt had)."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system}, *rest]


def prompt_text(prompt: Prompt, template: str, tokenizer: Any, system: str | None, raw: bool) -> str:
    """The text the model continues. ``raw`` (--no-template): the prompt as written. ``system`` makes a
    text prompt a chat (system + user turn), since only chat templates have a place for it."""
    if raw:
        if isinstance(prompt.prompt, list):
            raise GenerateError(
                f"{prompt.where}: messages: a chat prompt needs a template; drop --no-template"
            )
        return prompt.prompt
    if system is None:
        return prompt.text(template, tokenizer)
    if template in ("alpaca", "plain"):
        raise GenerateError(f"--system needs a chat template; the prompts render with template {template!r}")
    messages = (
        prompt.prompt if isinstance(prompt.prompt, list) else [{"role": "user", "content": prompt.prompt}]
    )
    return Prompt(prompt.where, with_system(messages, system)).text("chat", tokenizer)


@contextmanager
def template_errors(where: str) -> Iterator[None]:
    """A tokenizer's own Jinja chat template may refuse a conversation (no system turn, roles that must
    alternate): one line naming the prompt instead of a traceback."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as exc:
        raise GenerateError(f"{where}: the chat template refused the prompt: {exc}") from exc


def encode_prompt(prompt: Prompt, template: str, tokenizer: Any, system: str | None, raw: bool) -> list[int]:
    with template_errors(prompt.where):
        return prompt_ids(prompt_text(prompt, template, tokenizer, system, raw), tokenizer)


def gather_prompts(prompts_file: str | None, texts: list[str]) -> list[Prompt]:
    """The prompts of ``prompts_file`` (prompt, Alpaca instruction/input, chat messages, preference
    pairs: ``load_prompts``), then each --prompt."""
    if not prompts_file and not texts:
        raise GenerateError("no prompts: pass --prompts FILE.jsonl and/or --prompt TEXT")
    prompts = load_prompts(prompts_file) if prompts_file else []
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise DataError(f"--prompt #{i}: empty")
        prompts.append(Prompt(f"--prompt #{i}", text))
    return prompts


def output_row(prompt: Prompt, texts: list[str], samples: list[Any]) -> dict[str, Any]:
    """One prompt's JSONL row: the prompt as read, and its completion (``completions`` when n > 1) with
    whether a stop token ended it and its generated token count."""
    row: dict[str, Any] = {"prompt": prompt.prompt}
    if prompt.instruction is not None:
        row |= {"instruction": prompt.instruction, "input": prompt.input}
    if len(samples) == 1:
        return row | {
            "completion": texts[0],
            "finished": samples[0].finished,
            "tokens": len(samples[0].response_ids),
        }
    return row | {
        "completions": texts,
        "finished": [s.finished for s in samples],
        "tokens": [len(s.response_ids) for s in samples],
    }


@dataclass
class GenerateRequest:
    model: str
    prompts_file: str | None
    prompt_texts: list[str]
    params: SamplingParams
    system: str | None = None
    template: str | None = None
    raw: bool = False  # --no-template


def generate_rows(
    policy: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    ids: list[list[int]],
    params: SamplingParams,
    progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows in prompt order, one generation batch at a time (batches are seeded by their index, as one
    ``sample`` call over all prompts seeds them), so rows are written as they are done."""
    per_batch = params.prompts_per_batch
    for batch, start in enumerate(range(0, len(prompts), per_batch)):
        samples = sample(policy, tokenizer, ids[start : start + per_batch], params, first_batch=batch)
        for offset in range(0, len(samples), params.n):
            group = samples[offset : offset + params.n]
            texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in group]
            yield output_row(prompts[start + group[0].prompt_index], texts, group)
        if progress is not None:
            progress(len(samples) // params.n)


def run_generate(request: GenerateRequest, out: Path | None, console: Console) -> int:
    """`align generate`: write one JSONL row per prompt to ``out`` (stdout when None); a progress bar on
    ``console`` (stderr) for a prompts file. Bad prompts fail before the model loads. Returns the number
    of rows written."""
    check_params(request.params)
    prompts = gather_prompts(request.prompts_file, request.prompt_texts)
    tokenizer = load_tokenizer(ModelSection(name_or_path=request.model))
    template, source = resolve_template(request.model, tokenizer, request.template)
    ids = [encode_prompt(p, template, tokenizer, request.system, request.raw) for p in prompts]
    policy = load_policy(request.model, tokenizer)
    shown = "none (--no-template)" if request.raw else f"{template} (from {source})"
    console.print(
        f"[bold]align generate[/] {escape(request.model)}: {len(prompts)} prompt(s), template {shown}"
    )
    handle: IO[str] = sys.stdout if out is None else _open(out)
    count = 0
    try:
        with _progress(console, len(prompts), show=bool(request.prompts_file)) as advance:
            for row in generate_rows(policy, tokenizer, prompts, ids, request.params, advance):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
                count += 1
    finally:
        if out is not None:
            handle.close()
    if out is not None:
        console.print(f"wrote {count} row(s) to [bold]{escape(str(out))}[/]")
    return count


def _open(out: Path) -> IO[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.open("w", encoding="utf-8")


@contextmanager
def _progress(console: Console, total: int, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar over prompts (for a prompts file); yields its advance function."""
    if not show:
        yield None
        return
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("generate", total=total)
        yield lambda done: bar.advance(task, done)
