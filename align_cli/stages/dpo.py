"""Direct Preference Optimization (Rafailov et al. 2023) and its family: cDPO, IPO, hinge, SimPO, ORPO,
Plackett-Luce.

With log-probs summed over the response tokens and pi_ref the starting (SFT) model,

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    L = -log sigma(beta * h)                       (variants: align_cli.losses.PREFERENCE_LOSSES)

and for K ranked responses (best first) one term per rank position (plackett_luce_dpo_loss), which is
DPO for K = 2. The implicit reward beta * (log pi - log pi_ref) is logged for chosen and rejected.
IPO divides every summed log-prob, the policy's and the (cached or live) reference's, by its response's
number of tokens (per-token means, as TRL and torchtune do). SimPO and ORPO have no reference: none is
loaded or cached, and ORPO trains from the base model (its loss holds the chosen responses' NLL).

Efficiency: all responses of a batch go through the policy in one forward pass (collate_responses).
By default the reference log-probs are computed once before training in a no-grad pass and cached on
disk, so no reference model is held in memory while training; with ``dpo.reference_cache: false`` a
live reference scores every batch instead. With LoRA the reference is the base model with the adapters
disabled: no second copy. Building and scoring the reference: align_cli/reference.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console

from align_cli.data.formats import load_records
from align_cli.data.mixture import load_mixture
from align_cli.data.preference import collate_responses, tokenize_preferences
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.data.tokenize import DataStats
from align_cli.engine.loop import StageSpec, Trainer
from align_cli.engine.resume import Resume
from align_cli.engine.session import finish_run, open_run, require, split_holdout
from align_cli.engine.tracking import check_trackers
from align_cli.forward import response_lengths, summed_logps
from align_cli.losses import dpo_loss, plackett_luce_dpo_loss, preference_beta, uses_reference
from align_cli.memory import MemoryPlan, meta_model, print_estimate, reference_copy, trained_lora
from align_cli.models import load_causal_lm, load_tokenizer
from align_cli.recipe import DPOSection, Recipe, RecipeError
from align_cli.reference import cache_reference_logps, open_live_reference
from align_cli.runs import last_output, write_summary

PREFERENCE_KINDS = ("preference", "ranked")
Reference = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]


# ----------------------------------------------------------------------------- the loss


def to_grid(values: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values [R] -> [B, Kmax] (example x rank, best first) and the mask of real entries."""
    group, rank = batch["group"], batch["rank"]
    shape = (batch["units"], int(rank.max()) + 1)
    grid = values.new_zeros(shape).index_put((group, rank), values)  # differentiable in ``values``
    mask = torch.zeros(shape, dtype=torch.bool, device=values.device).index_put(
        (group, rank), torch.ones_like(group, dtype=torch.bool)
    )
    return grid, mask


def preference_metrics(
    logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums over records (the loop divides by their number). "rejected" is the mean over the responses
    after the best (the rejected one of a pair); accuracy is the share of correctly ordered pairs (i, j),
    i ranked above j, within a record: for a pair, 1 when r_chosen > r_rejected."""
    rest = mask[:, 1:].float()
    n_rest = rest.sum(1).clamp(min=1)
    chosen_r, rejected_r = rewards[:, 0], (rewards[:, 1:] * rest).sum(1) / n_rest
    k = mask.shape[1]
    above = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(1)
    pairs = mask[:, :, None] & mask[:, None, :] & above
    correct = (rewards[:, :, None] > rewards[:, None, :]) & pairs
    accuracy = correct.sum((1, 2)).float() / pairs.sum((1, 2)).clamp(min=1)
    return {
        "rewards/chosen": chosen_r.sum(),
        "rewards/rejected": rejected_r.sum(),
        "rewards/accuracy": accuracy.sum(),
        "rewards/margin": (chosen_r - rejected_r).sum(),
        "logps/chosen": logps[:, 0].sum(),
        "logps/rejected": ((logps[:, 1:] * rest).sum(1) / n_rest).sum(),
    }


def preference_loss(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    batch: dict[str, Any],
    cfg: DPOSection,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, metric sums) from per-row summed log-probs [R] of the policy and the reference (None:
    a loss without one), and the rows' response lengths [R] (``response_lengths``; the per-token
    variants divide the sums by them).

    Pairs use ``dpo_loss`` (every variant); a batch holding a ranking of K > 2 uses Plackett-Luce
    (sigmoid only, checked before training, on sums), whose K = 2 rows equal sigmoid DPO."""
    pol, mask = to_grid(policy, batch)
    if reference is not None and uses_reference(cfg.loss_type, cfg.reference_free):
        ref = to_grid(reference.to(policy.dtype), batch)[0]
    else:
        ref = None
    if mask.shape[1] == 2 and bool(mask.all()):
        n = to_grid(lengths.to(policy.dtype), batch)[0] if lengths is not None else None
        losses, chosen, rejected = dpo_loss(
            pol[:, 0], pol[:, 1], *((ref[:, 0], ref[:, 1]) if ref is not None else (None, None)), cfg.beta,
            cfg.loss_type, cfg.label_smoothing, cfg.reference_free,
            *((n[:, 0], n[:, 1]) if n is not None else (None, None)), cfg.simpo_gamma, cfg.orpo_lambda,
        )  # fmt: skip
        rewards = torch.stack([chosen, rejected], 1)
    else:
        beta = preference_beta(cfg.loss_type, cfg.beta)
        losses, rewards = plackett_luce_dpo_loss(pol, ref, beta, mask)
    return losses.sum(), preference_metrics(pol.detach(), rewards, mask)


def make_compute_loss(cfg: DPOSection, reference: Reference | None = None):
    """compute_loss for the Trainer. ``reference`` scores a batch live; None: the batch carries the
    cached ``ref_logps`` (or the loss reads no reference)."""

    def compute_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        policy = summed_logps(model, batch)
        if not uses_reference(cfg.loss_type, cfg.reference_free):
            ref = None
        elif reference is not None:
            ref = reference(model, batch)
        else:
            ref = batch["ref_logps"]
        return preference_loss(policy, ref, batch, cfg, response_lengths(batch))

    return compute_loss


def make_collate(pad_token_id: int):
    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_responses(examples, pad_token_id)
        if "ref_logps" in examples[0]:  # same row order as collate_responses: example by example, best first
            batch["ref_logps"] = torch.tensor(
                [v for e in examples for v in e["ref_logps"]], dtype=torch.float32
            )
        return batch

    return collate


# ----------------------------------------------------------------------------- data and models


def tokenize(records: list, tokenizer: Any, recipe: Recipe) -> tuple[list[dict[str, Any]], DataStats]:
    """Preference records -> examples, counting truncations and drops (``on_too_long: drop`` drops every
    record that had to be cut)."""
    d = recipe.data
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, records))
    return tokenize_preferences(
        records,
        tokenizer,
        d.template,
        d.max_length,
        d.max_prompt_length,
        drop_truncated=d.on_too_long == "drop",
    )


def prepare_dpo_data(recipe: Recipe, tokenizer: Any) -> tuple[list, list, dict[str, DataStats]]:
    """Read, validate and tokenize train (and a separate eval file); the split comes later, after the
    reference log-probs of the whole file are attached (one cache entry per file)."""
    d = recipe.data
    records, sources = load_mixture(d.train, d.format, PREFERENCE_KINDS, d, recipe.training.seed)
    train, stats = tokenize(records, tokenizer, recipe)
    stats.sources = sources
    held, eval_stats = [], DataStats()
    if d.eval:
        held, eval_stats = tokenize(
            load_records(d.eval, d.format, PREFERENCE_KINDS, read_options(d)), tokenizer, recipe
        )
    if not train:
        raise RecipeError(f"data.train: no usable pair left in {d.train} ({stats.describe()})")
    k_max = max(len(e["responses"]) for e in train + held)
    cfg = recipe.dpo
    if k_max > 2 and (cfg.loss_type != "sigmoid" or cfg.label_smoothing):
        raise RecipeError(
            f"dpo.loss_type={cfg.loss_type}, label_smoothing={cfg.label_smoothing}: these variants are for "
            f"pairs, but the data ranks up to {k_max} responses (Plackett-Luce); use loss_type sigmoid "
            "and label_smoothing 0, or pairwise data"
        )
    return train, held, {"train": stats, "eval": eval_stats}


def resolve_policy(recipe: Recipe, console: Console, stage: str = "dpo") -> None:
    """No model named: the last ``align sft`` output is policy and reference (pi_ref = pi_SFT)."""
    if recipe.model.name_or_path:
        return
    found = last_output("sft")
    if found is None:
        raise RecipeError(
            "no model given and no `align sft` output found to start from. Train one first, e.g.\n"
            "  align sft --recipe recipes/sft-tiny.yaml\n"
            "or the paper's Preferred-FT baseline, SFT on the chosen responses:\n"
            "  align sft --model MODEL --data prefs.jsonl\n"
            f"or name a model: align {stage} --model PATH_OR_HUB_ID --data DATA"
            + ("\n(ORPO starts from the base model: name it)" if recipe.dpo.loss_type == "orpo" else "")
        )
    recipe.model.name_or_path = str(found)
    console.print(f"[bold]policy and reference[/]: {found} (the last `align sft` output)")


# ----------------------------------------------------------------------------- the stage


def run_dpo(recipe: Recipe, resume: bool | Resume = False, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    resolve_policy(recipe, console)
    require(recipe, "model.name_or_path", "data.train")
    cfg = recipe.dpo
    tokenizer = load_tokenizer(recipe.model)
    train_all, held, data_stats = prepare_dpo_data(recipe, tokenizer)  # bad data fails before any run dir
    set_seed(recipe.training.seed)  # LoRA adapters are initialised at random
    model = load_causal_lm(recipe.model, tokenizer)
    run_dir, accelerator = open_run(recipe, resume)

    reference: Reference | None = None
    ref_model: torch.nn.Module | None = None
    with_reference = uses_reference(cfg.loss_type, cfg.reference_free)
    reason = "reference_free" if cfg.reference_free else f"loss_type {cfg.loss_type}"
    ref_info: dict[str, Any] = {"mode": "cache" if with_reference else f"none ({reason})"}
    if with_reference and cfg.reference_cache:
        sets = {"train": train_all, "eval": held}
        ref_info["cache"] = cache_reference_logps(recipe, model, accelerator, tokenizer, sets, console)
        ref_info["corrupt_entries_recomputed"] = sum(info["corrupt"] for info in ref_info["cache"].values())
    elif with_reference:
        reference, ref_model, ref_info["mode"] = open_live_reference(
            recipe.model, cfg.reference_model, accelerator, tokenizer
        )
    console.print(f"[bold]reference[/]: {ref_info['mode']}")

    if not recipe.data.eval:
        train_all, held = split_holdout(train_all, recipe.data.eval_fraction, recipe.training.seed)
        s = data_stats["train"]
        s.read, s.kept = s.read - len(held), s.kept - len(held)
        data_stats["eval"] = DataStats(read=len(held), kept=len(held))
    console.print(f"[bold]data[/] train: {data_stats['train'].describe()}; eval: {len(held)} examples")

    spec = StageSpec(
        name="dpo",
        model=model,
        train_examples=train_all,
        eval_examples=held,
        collate=make_collate(tokenizer.pad_token_id),
        tokenizer=tokenizer,
        compute_loss=make_compute_loss(cfg, reference),
        loss_settings={
            "dpo.beta": preference_beta(cfg.loss_type, cfg.beta),
            "dpo.loss_type": cfg.loss_type,
            "dpo.label_smoothing": cfg.label_smoothing,
            **{
                "simpo": {"dpo.simpo_gamma": cfg.simpo_gamma},
                "orpo": {"dpo.orpo_lambda": cfg.orpo_lambda},
            }.get(cfg.loss_type, {}),
        },
    )
    trainer = Trainer(spec, recipe.training, run_dir, accelerator, recipe.data.group_by_length, console)
    print_estimate(recipe, model, accelerator, console, frozen={"reference": ref_model})
    result = trainer.run(resume=bool(resume))
    plots = ("loss", "eval/loss", "rewards/accuracy", "eval/rewards/accuracy", "rewards/margin")
    summary = finish_run(
        "dpo", recipe, Path(run_dir), accelerator, result, tokenizer, data_stats, console, plots
    )
    summary["reference"] = ref_info
    if accelerator.is_main_process:
        write_summary(Path(run_dir), summary)
    return summary


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the policy, and a frozen reference only when it is live and not the policy itself
    with its adapters off (a cached reference is on disk, not in memory)."""
    d, m = recipe.dpo, recipe.model
    separate = d.reference_model not in (None, "", m.name_or_path)
    live = uses_reference(d.loss_type, d.reference_free) and not d.reference_cache
    frozen = (
        {"reference": reference_copy(config, recipe)} if live and (separate or not m.lora.enabled) else {}
    )
    return MemoryPlan(meta_model(config, recipe, lora=trained_lora(recipe)), frozen)


run = run_dpo  # the registry's face (align_cli/stages/__init__.py)
