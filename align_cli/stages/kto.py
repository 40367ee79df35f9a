"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired completions, labelled desirable or not.

Data: TRL's unpaired preference format, one completion per record: ``prompt``, ``completion`` and
``label`` (true: desirable, false: undesirable); prompt and completion as text, or as messages (a chat
prompt and the assistant turn(s) that continue it). With log-probs summed over the completion tokens and
pi_ref the starting (SFT) model,

    r(x, y) = log pi(y|x) - log pi_ref(y|x)
    z_ref   = max(0, mean over the micro-batch of r(x_i, y_{i-1}))         (detached)
    L       = lambda_D (1 - sigma(beta (r - z_ref)))    for a desirable y
              lambda_U (1 - sigma(beta (z_ref - r)))    for an undesirable y   (align_cli.losses.kto_loss)

z_ref, the KL baseline, is estimated as TRL does: each prompt of a micro-batch followed by the
completion of the example before it (the batch's completions rotated by one), scored by the policy
(without gradient) and the reference. Each process estimates it from its own micro-batch. The reference
is live: a second frozen copy, or under LoRA the policy with its adapters disabled. The loss is the mean
over completions; logged: ``kl`` (z_ref), ``rewards/signed`` (beta r, negated for undesirable
completions: it grows as the policy learns the labels) and ``rewards/accuracy`` (the share of
completions on their label's side of z_ref).
"""

from __future__ import annotations

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
from align_cli.forward import summed_logps
from align_cli.losses import kto_loss
from align_cli.memory import MemoryPlan, meta_model, print_estimate, reference_copy, trained_lora
from align_cli.models import load_causal_lm, load_tokenizer
from align_cli.recipe import KTOSection, Recipe, RecipeError
from align_cli.reference import open_live_reference
from align_cli.runs import write_summary
from align_cli.stages.dpo import Reference, resolve_policy

UNPAIRED_KINDS = ("unpaired",)
KL_KEYS = ("input_ids", "attention_mask", "labels", "buckets")  # the mismatched rows, as "kl_<key>"


# ----------------------------------------------------------------------------- the loss


def mismatched(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """The KL rows of a micro-batch: prompt i followed by the completion of example i - 1 (TRL's +1
    rotation: the batch's own completions, each after another prompt), cut to ``max_length``. None for a
    micro-batch of one (no other completion to pair with)."""
    if len(examples) < 2:
        return []
    rows = []
    for i, e in enumerate(examples):
        completion = examples[i - 1]["responses"][0][: max_length - len(e["prompt_ids"])]
        rows.append({"prompt_ids": e["prompt_ids"], "responses": [completion], "margin": None})
    return rows


def make_collate(pad_token_id: int, max_length: int):
    """One row per completion (units: completions), the label of each, and the mismatched rows."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_responses(examples, pad_token_id)
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
        kl_rows = mismatched(examples, max_length)
        if kl_rows:
            kl = collate_responses(kl_rows, pad_token_id)
            batch |= {f"kl_{key}": kl[key] for key in KL_KEYS}
        return batch

    return collate


def kl_batch(batch: dict[str, Any]) -> dict[str, Any] | None:
    """The mismatched rows of a collated batch as a batch of their own (None when it has none)."""
    if "kl_input_ids" not in batch:
        return None
    return {key: batch[f"kl_{key}"] for key in KL_KEYS}


def make_compute_loss(cfg: KTOSection, reference: Reference):
    """compute_loss for the Trainer: (summed loss, metric sums) over the completions of a batch."""

    def compute_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        policy = summed_logps(model, batch)
        ref = reference(model, batch).to(policy.dtype)
        kl = kl_batch(batch)
        if kl is None:
            policy_kl = ref_kl = policy.new_zeros(0)
        else:
            with torch.no_grad():  # z_ref is a detached baseline: no graph for these rows
                policy_kl = summed_logps(model, kl)
            ref_kl = reference(model, kl).to(policy.dtype)
        desirable = batch["desirable"]
        losses, rewards, z_ref = kto_loss(
            policy, ref, desirable, policy_kl, ref_kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight
        )
        sign = torch.where(desirable, 1.0, -1.0).to(rewards.dtype)
        right_side = (sign * (rewards - cfg.beta * z_ref)) > 0
        metrics = {
            "kl": z_ref * len(policy),  # sums over completions: the loop divides by their number
            "rewards/signed": (sign * rewards).sum(),
            "rewards/accuracy": right_side.sum().to(rewards.dtype),
        }
        return losses.sum(), metrics

    return compute_loss


# ----------------------------------------------------------------------------- data


def tokenize(records: list, tokenizer: Any, recipe: Recipe) -> tuple[list[dict[str, Any]], DataStats]:
    """Unpaired records -> examples (prompt_ids, responses: [completion ids], desirable), rendered and cut
    as DPO's (``on_too_long: drop`` drops every record that had to be cut)."""
    d = recipe.data
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, records))
    return tokenize_preferences(
        records,
        tokenizer,
        d.template,
        d.max_length,
        d.max_prompt_length,
        drop_truncated=d.on_too_long == "drop",
        extra=lambda record: {"desirable": record.fields["label"]},
    )


def prepare_kto_data(recipe: Recipe, tokenizer: Any) -> tuple[list, list, dict[str, DataStats]]:
    """Read, validate, tokenize and split train (or read a separate eval file)."""
    d, seed = recipe.data, recipe.training.seed
    records, sources = load_mixture(d.train, d.format, UNPAIRED_KINDS, d, seed)
    train, stats = tokenize(records, tokenizer, recipe)
    stats.sources = sources
    held, eval_stats = [], DataStats()
    if d.eval:
        held, eval_stats = tokenize(
            load_records(d.eval, d.format, UNPAIRED_KINDS, read_options(d)), tokenizer, recipe
        )
    if not train:
        raise RecipeError(f"data.train: no usable completion left in {d.train} ({stats.describe()})")
    if not d.eval:
        train, held = split_holdout(train, d.eval_fraction, seed)
        stats.read, stats.kept = stats.read - len(held), stats.kept - len(held)
        eval_stats = DataStats(read=len(held), kept=len(held))
    return train, held, {"train": stats, "eval": eval_stats}


def label_counts(examples: list[dict[str, Any]]) -> dict[str, int]:
    desirable = sum(bool(e["desirable"]) for e in examples)
    return {"desirable": desirable, "undesirable": len(examples) - desirable}


# ----------------------------------------------------------------------------- the stage


def run_kto(recipe: Recipe, resume: bool | Resume = False, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    resolve_policy(recipe, console, "kto")
    require(recipe, "model.name_or_path", "data.train")
    cfg = recipe.kto
    tokenizer = load_tokenizer(recipe.model)
    train, held, data_stats = prepare_kto_data(recipe, tokenizer)  # bad data fails before any run dir
    set_seed(recipe.training.seed)  # LoRA adapters are initialised at random
    model = load_causal_lm(recipe.model, tokenizer)
    run_dir, accelerator = open_run(recipe, resume)

    reference, ref_model, mode = open_live_reference(
        recipe.model, cfg.reference_model, accelerator, tokenizer
    )
    counts = label_counts(train)
    console.print(f"[bold]reference[/]: {mode}")
    console.print(
        f"[bold]data[/] train: {data_stats['train'].describe()} ({counts['desirable']} desirable, "
        f"{counts['undesirable']} undesirable); eval: {len(held)} examples"
    )

    spec = StageSpec(
        name="kto",
        model=model,
        train_examples=train,
        eval_examples=held,
        collate=make_collate(tokenizer.pad_token_id, recipe.data.max_length),
        tokenizer=tokenizer,
        compute_loss=make_compute_loss(cfg, reference),
        loss_settings={
            "kto.beta": cfg.beta,
            "kto.desirable_weight": cfg.desirable_weight,
            "kto.undesirable_weight": cfg.undesirable_weight,
        },
    )
    trainer = Trainer(spec, recipe.training, run_dir, accelerator, recipe.data.group_by_length, console)
    print_estimate(recipe, model, accelerator, console, frozen={"reference": ref_model})
    result = trainer.run(resume=bool(resume))
    plots = ("loss", "eval/loss", "rewards/accuracy", "eval/rewards/accuracy", "kl")
    summary = finish_run(
        "kto", recipe, Path(run_dir), accelerator, result, tokenizer, data_stats, console, plots
    )
    summary["reference"] = {"mode": mode}
    summary["labels"] = counts
    if accelerator.is_main_process:
        write_summary(Path(run_dir), summary)
    return summary


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the policy and its live reference (none under LoRA: the adapters-off policy)."""
    m = recipe.model
    separate = recipe.kto.reference_model not in (None, "", m.name_or_path)
    frozen = {"reference": reference_copy(config, recipe)} if separate or not m.lora.enabled else {}
    return MemoryPlan(meta_model(config, recipe, lora=trained_lora(recipe)), frozen)


run = run_kto  # the registry's face (align_cli/stages/__init__.py)
