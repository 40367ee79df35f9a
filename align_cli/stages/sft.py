"""Supervised fine-tuning (InstructGPT step 1, Llama 2 SFT).

The prompt and the answer form one sequence; the loss is the negative log-likelihood of the answer
tokens only (prompt tokens are masked), summed over tokens and divided by the number of supervised
tokens in the optimizer step:

    L = - (1 / N_resp) * sum_{t in response} log pi(y_t | x, y_<t)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console

from align_cli.data.collate import pad_collate, padding_free_collate
from align_cli.data.formats import PREFERRED_FT_KINDS, SFT_KINDS, load_records
from align_cli.data.mixture import load_mixture
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.data.tokenize import IGNORE_INDEX, DataStats, tokenize_sft
from align_cli.engine.loop import StageSpec, Trainer
from align_cli.engine.resume import Resume
from align_cli.engine.session import finish_run, open_run, require, split_holdout
from align_cli.engine.tracking import check_trackers
from align_cli.forward import response_logprobs
from align_cli.memory import MemoryPlan, meta_model, print_estimate, trained_lora
from align_cli.models import load_causal_lm, load_tokenizer
from align_cli.recipe import Recipe


def sft_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed negative log-likelihood of the response tokens (the loop divides by their count)."""
    logps, _ = response_logprobs(model, batch)
    return -logps.sum(), {}


def make_collate(pad_token_id: int, packing: bool):
    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = padding_free_collate(examples) if packing else pad_collate(examples, pad_token_id)
        batch["units"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch["tokens"] = sum(e["length"] for e in examples)
        return batch

    return collate


def prepare_sft_data(recipe: Recipe, tokenizer: Any) -> tuple[list, list, dict[str, DataStats]]:
    """Read, validate and tokenize train/eval data; nothing is dropped without a count."""
    d = recipe.data
    records, sources = load_mixture(
        d.train, d.format, SFT_KINDS + PREFERRED_FT_KINDS, d, recipe.training.seed
    )
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, records))
    train, stats = tokenize_sft(records, tokenizer, d.template, d.max_length, d.on_too_long)
    stats.sources = sources
    if d.eval:
        eval_records = load_records(d.eval, d.format, SFT_KINDS + PREFERRED_FT_KINDS, read_options(d))
        settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, eval_records))
        held, eval_stats = tokenize_sft(eval_records, tokenizer, d.template, d.max_length, d.on_too_long)
    else:
        train, held = split_holdout(train, d.eval_fraction, recipe.training.seed)
        eval_stats = DataStats(read=len(held), kept=len(held))
        stats.kept -= len(held)
        stats.read -= len(held)
    return train, held, {"train": stats, "eval": eval_stats}


def run_sft(recipe: Recipe, resume: bool | Resume = False, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    require(recipe, "model.name_or_path", "data.train")
    tokenizer = load_tokenizer(recipe.model)
    train, held, data_stats = prepare_sft_data(recipe, tokenizer)  # bad data fails before any run dir exists
    console.print(f"[bold]data[/] train: {data_stats['train'].describe()}; eval: {len(held)} examples")
    set_seed(recipe.training.seed)  # LoRA adapters are initialised at random
    model = load_causal_lm(recipe.model, tokenizer)
    run_dir, accelerator = open_run(recipe, resume)
    spec = StageSpec(
        name="sft",
        model=model,
        train_examples=train,
        eval_examples=held,
        collate=make_collate(tokenizer.pad_token_id, recipe.data.packing),
        tokenizer=tokenizer,
        compute_loss=sft_loss,
    )
    trainer = Trainer(spec, recipe.training, run_dir, accelerator, recipe.data.group_by_length, console)
    print_estimate(recipe, model, accelerator, console)
    result = trainer.run(resume=bool(resume))
    return finish_run("sft", recipe, Path(run_dir), accelerator, result, tokenizer, data_stats, console)


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the policy (with its LoRA adapters) is trained; nothing else is held."""
    return MemoryPlan(meta_model(config, recipe, lora=trained_lora(recipe)))


run = run_sft  # the registry's face (align_cli/stages/__init__.py)
