"""Reward model training (InstructGPT step 2, Llama 2 reward models); ``align reward score`` is in
align_cli/reward_score.py.

The reward model is the (SFT) language model with its LM head replaced by a scalar head; r(x, y) is
that head read at the final token of prompt + response. Every record is one prompt with K >= 2
responses ordered best first (a pair is K = 2). All C(K,2) pairs of a prompt are in the same batch
and every response is scored once (one forward pass per response, not one per pair):

    loss = sum_prompts sum_{(w, l) pairs of the prompt} 1/C(K,2) * -log sigma(r(x, y_w) - r(x, y_l) - m)
           + center_coef * 1/C(K,2) * (r(x, y_w) + r(x, y_l))^2

divided by the number of prompts in the optimizer step, so a plain pair and a K-way ranking each count
once. m is the Llama 2 margin of a pair (its ``margin``, else the recipe's ``reward.margins[rating]``;
0 for rankings); the second term is the optional reward centering (Eisenstein et al. 2023).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console

from align_cli.data.formats import DataError, Record, load_records
from align_cli.data.mixture import load_mixture
from align_cli.data.preference import collate_responses, tokenize_preferences
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.data.tokenize import DataStats
from align_cli.engine.loop import StageSpec, Trainer
from align_cli.engine.resume import Resume
from align_cli.engine.session import finish_run, open_run, require, split_holdout
from align_cli.engine.tracking import check_trackers
from align_cli.forward import reward_scores
from align_cli.losses import pairwise_reward_loss, ranking_pairs, reward_centering_loss
from align_cli.memory import MemoryPlan, meta_model, print_estimate, trained_lora
from align_cli.models import load_reward_model, load_tokenizer
from align_cli.recipe import Recipe, RecipeError, RewardSection
from align_cli.runs import last_output

REWARD_KINDS = ("preference", "ranked")


# ----------------------------------------------------------------------------- data


def rating_key(label: str) -> str:
    """'Significantly better' -> 'significantly_better' (ratings are matched case- and space-blind)."""
    return "_".join(label.strip().lower().replace("-", " ").split())


def record_margins(records: list[Record], section: RewardSection) -> dict[str, float]:
    """The Llama 2 margin m of every record (by ``where``); DataError with file:line for bad ones.

    A pair's explicit ``margin`` wins, else its ``rating`` through ``section.margins``, else 0;
    rankings get 0. Tied ``scores`` of a ranking are refused (a tie has no preferred response)."""
    table = {rating_key(k): v for k, v in section.margins.items()}
    margins, errors = {}, []
    for record in records:
        f, margin = record.fields, 0.0
        if record.kind == "ranked" and "scores" in f and len(set(f["scores"])) < len(f["scores"]):
            errors.append(f"{record.where}: scores: tied scores {f['scores']} cannot be ranked")
        elif record.kind == "preference" and section.use_margin:
            if f.get("margin") is not None:
                margin = float(f["margin"])
                if margin < 0:
                    errors.append(
                        f"{record.where}: margin: must be >= 0 (chosen is the better one), got {margin}"
                    )
            elif f.get("rating") is not None:
                if rating_key(f["rating"]) not in table:
                    errors.append(
                        f"{record.where}: rating: {f['rating']!r} is not in reward.margins "
                        f"({', '.join(section.margins)})"
                    )
                else:
                    margin = table[rating_key(f["rating"])]
        margins[record.where] = margin
    if errors:
        raise DataError(f"{records[0].source}: {len(errors)} bad record(s):\n  " + "\n  ".join(errors[:20]))
    return margins


def _load(records: list[Record], recipe: Recipe, tokenizer: Any) -> tuple[list[dict[str, Any]], DataStats]:
    d = recipe.data
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, records))
    margins = record_margins(records, recipe.reward)
    examples, stats = tokenize_preferences(records, tokenizer, d.template, d.max_length, d.max_prompt_length)
    for e in examples:
        e["margin"] = margins[e["where"]]
    return examples, stats


def prepare_reward_data(recipe: Recipe, tokenizer: Any) -> tuple[list, list, dict[str, DataStats]]:
    """Read, validate and tokenize train/eval preferences; nothing is dropped without a count."""
    d = recipe.data
    records, sources = load_mixture(d.train, d.format, REWARD_KINDS, d, recipe.training.seed)
    train, stats = _load(records, recipe, tokenizer)
    stats.sources = sources
    if d.eval:
        held, eval_stats = _load(
            load_records(d.eval, d.format, REWARD_KINDS, read_options(d)), recipe, tokenizer
        )
    else:
        train, held = split_holdout(train, d.eval_fraction, recipe.training.seed)
        eval_stats = DataStats(read=len(held), kept=len(held))
        stats.kept -= len(held)
        stats.read -= len(held)
    return train, held, {"train": stats, "eval": eval_stats}


def collate_pairs(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One row per response (``collate_responses``) plus the batch's pairs as row indices.

    For a prompt with K responses (rows best first): all C(K,2) pairs (better row, worse row), each
    weighted 1/C(K,2), with the prompt's margin; ``row_weight`` 1/K gives per-prompt reward means."""
    batch = collate_responses(examples, pad_token_id)
    better, worse, weight, margin, row_weight = [], [], [], [], []
    start = 0
    for e in examples:
        k = len(e["responses"])
        pairs = ranking_pairs(k)
        for i, j in pairs:
            better.append(start + i)
            worse.append(start + j)
            weight.append(1.0 / len(pairs))
            margin.append(float(e["margin"] or 0.0))
        row_weight += [1.0 / k] * k
        start += k
    batch |= {
        "better": torch.tensor(better),
        "worse": torch.tensor(worse),
        "pair_weight": torch.tensor(weight),
        "pair_margin": torch.tensor(margin),
        "row_weight": torch.tensor(row_weight),
    }
    return batch


# ----------------------------------------------------------------------------- loss


def make_compute_loss(center_coef: float = 0.0):
    """compute_loss(model, batch) -> (loss summed over prompts, metric sums over prompts)."""

    def compute_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        r = reward_scores(model, batch)  # [R]: each response scored once
        b, w, weight = batch["better"], batch["worse"], batch["pair_weight"]
        loss = pairwise_reward_loss(r, b, w, weight, batch["pair_margin"])
        gap = (r[b] - r[w]).detach()
        rd = r.detach()
        metrics = {
            "accuracy": (weight * (gap > 0)).sum(),  # per prompt: share of its pairs ordered right
            "reward_gap": (weight * gap).sum(),  # mean r_better - r_worse
            "reward_mean": (batch["row_weight"] * rd).sum(),
            "reward_sq_mean": (batch["row_weight"] * rd**2).sum(),  # std = sqrt(sq_mean - mean^2)
        }
        if center_coef:
            center = (weight * reward_centering_loss(r[b], r[w])).sum()
            metrics["center"] = center.detach()
            loss = loss + center_coef * center
        return loss, metrics

    return compute_loss


def reward_std(metrics: dict[str, float], prefix: str = "") -> float | None:
    mean, sq = metrics.get(f"{prefix}reward_mean"), metrics.get(f"{prefix}reward_sq_mean")
    return None if mean is None or sq is None else math.sqrt(max(sq - mean**2, 0.0))


# ----------------------------------------------------------------------------- training


def resolve_model(recipe: Recipe, console: Console) -> None:
    """No model named: start from the last `align sft` output (InstructGPT / Llama 2 start the RM there)."""
    if recipe.model.name_or_path:
        return
    previous = last_output("sft")
    if previous is None:
        raise RecipeError(
            "no model to start the reward model from: pass --model (model.name_or_path), "
            "or run `align sft` first (its output is then used)"
        )
    recipe.model.name_or_path = str(previous)
    console.print(f"[bold]model[/] {previous} (the last `align sft` output)")


def run_reward(
    recipe: Recipe, resume: bool | Resume = False, console: Console | None = None
) -> dict[str, Any]:
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    require(recipe, "data.train")
    resolve_model(recipe, console)
    tokenizer = load_tokenizer(recipe.model)
    train, held, data_stats = prepare_reward_data(recipe, tokenizer)  # bad data: no run dir is made
    ranked = sum(len(e["responses"]) > 2 for e in train)
    console.print(
        f"[bold]data[/] train: {data_stats['train'].describe()} ({len(train) - ranked} pairs, {ranked} "
        f"rankings of K > 2); eval: {len(held)} examples"
    )
    set_seed(recipe.training.seed)  # the new scalar head and LoRA adapters are initialised at random
    model = load_reward_model(recipe.model, tokenizer.pad_token_id, recipe.reward.head, tokenizer)
    run_dir, accelerator = open_run(recipe, resume)
    pad = tokenizer.pad_token_id
    spec = StageSpec(
        name="reward",
        model=model,
        train_examples=train,
        eval_examples=held,
        collate=lambda examples: collate_pairs(examples, pad),
        tokenizer=tokenizer,
        compute_loss=make_compute_loss(recipe.reward.center_coef),
        # margins: the records' own, else reward.margins by rating
        loss_settings={
            "reward.use_margin": recipe.reward.use_margin,
            "reward.center_coef": recipe.reward.center_coef,
        },
    )
    trainer = Trainer(spec, recipe.training, run_dir, accelerator, recipe.data.group_by_length, console)
    print_estimate(recipe, model, accelerator, console)
    result = trainer.run(resume=bool(resume))
    if result["final_eval"]:
        result["final_eval"]["eval/reward_std"] = reward_std(result["final_eval"], "eval/")
    plots = ("loss", "eval/loss", "accuracy", "eval/accuracy", "reward_gap", "lr")
    return finish_run(
        "reward", recipe, Path(run_dir), accelerator, result, tokenizer, data_stats, console, plots
    )


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: a sequence-classification copy of the policy is trained; nothing else is held."""
    return MemoryPlan(meta_model(config, recipe, True, trained_lora(recipe)))


run = run_reward  # the registry's face (align_cli/stages/__init__.py)
