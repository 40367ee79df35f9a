"""`align ppo`: PPO for RLHF (InstructGPT, Llama 2). The algorithm, one iteration at a time, is
``align_cli.ppo_core.PPO`` (read it next to the papers); this module is the stage around it: resolve the
models and prompts, run the iterations through the engine's ``Run`` (optimizer, checkpoints and resume,
stop-and-save, NaN policy, metrics, progress), save the final policy and value model, report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console
from torch import nn

from align_cli.data.formats import SFT_KINDS, load_records
from align_cli.data.prompts import fit_prompts, load_prompts, prompt_room
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.data.tokenize import DataStats, tokenize_sft
from align_cli.engine.metrics import keep_samples_until
from align_cli.engine.resume import Resume
from align_cli.engine.run import Run
from align_cli.engine.session import open_run, save_final
from align_cli.engine.tracking import check_trackers
from align_cli.memory import MemoryPlan, meta_model, print_estimate, trained_lora
from align_cli.models import load_tokenizer, save_model
from align_cli.ppo_core import PPO, load_models
from align_cli.recipe import ModelSection, Recipe, RecipeError
from align_cli.runs import last_output
from align_cli.vllm_engine import make_rollouts, resolve_backend


def _resolve(recipe: Recipe) -> tuple[str, str, str]:
    p = recipe.ppo
    policy = recipe.model.name_or_path or (str(last_output("sft")) if last_output("sft") else None)
    scorer = p.reward_model or (str(last_output("reward")) if last_output("reward") else None)
    prompts = p.prompts or recipe.data.train
    missing = [
        what
        for what, ok in (
            ("a policy: --model, or run `align sft` first", policy),
            ("a reward model: --reward-model (ppo.reward_model), or run `align reward` first", scorer),
            ("prompts: --prompts (ppo.prompts) or --data", prompts),
        )
        if not ok
    ]
    if p.ptx_coef > 0 and not p.ptx_data:
        missing.append("ppo.ptx_data (ptx_coef > 0)")
    if missing:
        raise RecipeError("ppo needs " + "; ".join(missing))
    return policy, scorer, prompts


def run_ppo(recipe: Recipe, resume: bool | Resume = False, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    p, t, d = recipe.ppo, recipe.training, recipe.data
    policy_dir, scorer_dir, prompt_source = _resolve(recipe)
    prompts = load_prompts(prompt_source, read_options(d))  # bad lines fail before anything is built
    tokenizer = load_tokenizer(ModelSection(name_or_path=policy_dir))
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, prompts))
    room = prompt_room(d.max_length, p.max_new_tokens, d.max_prompt_length)
    prompts, prompt_stats = fit_prompts(prompts, tokenizer, d.template, room)
    ptx, ptx_stats = [], DataStats()
    if p.ptx_data:
        records = load_records(p.ptx_data, "auto", SFT_KINDS)
        ptx, ptx_stats = tokenize_sft(records, tokenizer, d.template, d.max_length, "truncate")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # before any model loads
    if p.rollout_batch_size % world or p.mini_batch_size % world:
        raise RecipeError(
            f"ppo.rollout_batch_size ({p.rollout_batch_size}) and ppo.mini_batch_size ({p.mini_batch_size}) "
            f"count rollouts over all {world} processes and must be multiples of that number"
        )
    backend = resolve_backend(p.backend, "ppo")  # a missing vLLM / GPU fails before models load
    set_seed(t.seed)
    models = load_models(recipe, policy_dir, scorer_dir, tokenizer)
    run_dir, acc = open_run(recipe, resume)
    iterations = t.max_steps or p.iterations
    run = Run("ppo", t, run_dir, acc, console, iterations, unit="iteration")
    ppo = PPO(recipe, models, run, ptx)
    ppo.engine = make_rollouts(backend, policy_dir, tokenizer, t.seed)
    value = models.actor.value_model
    frozen = {"reference": models.reference, "reward model": models.scorer}
    policy_config = models.actor.policy.config
    print_estimate(recipe, ppo.actor, acc, console, frozen, policy_config, value.config if value else None)
    start = run.restore(bool(resume))
    if resume and acc.is_main_process:
        keep_samples_until(run_dir / "samples.jsonl", start)
    console.print(
        f"[bold]ppo[/]: policy {policy_dir}, reward model {scorer_dir}, value: {p.value_model}, "
        f"{len(prompts)} prompts, {iterations} iterations x {p.rollout_batch_size} rollouts; "
        f"prompts: {prompt_stats.describe()}"
    )
    prompt_order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(t.seed)).tolist()
    with run.running():
        for iteration in range(start, iterations):
            # prompt position is a function of the iteration, so a resumed run sees the same prompts
            first = iteration * p.rollout_batch_size
            chosen = [prompt_order[(first + i) % len(prompts)] for i in range(p.rollout_batch_size)]
            ro, stats = ppo.iteration(
                [prompts[i] for i in chosen[acc.process_index :: acc.num_processes]], iteration
            )
            if acc.is_main_process:
                rows = log_samples(run_dir / "samples.jsonl", ro, iteration + 1, p.log_samples)
                run.log_samples(rows, iteration + 1)
            headline = {"score": stats["score/mean"], "kl": stats["objective/kl"]}
            run.end_iteration(iteration + 1, stats, ppo.scheduler.get_last_lr()[0], headline)
    return finish_ppo(ppo, prompt_stats, ptx_stats)


def log_samples(path: Path, ro: dict[str, Any], iteration: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` samples of an iteration, with their scores and KL, to samples.jsonl; returns
    them (for the trackers' table)."""
    rows = []
    with path.open("a") as handle:
        for i in range(min(count, len(ro["texts"]))):
            row = {"iteration": iteration, "prompt": ro["prompts"][i].prompt, "response": ro["texts"][i]}
            row |= {"score": ro["scores"][i].item(), "kl": ro["kl"][i].sum().item()}
            handle.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


def finish_ppo(ppo: PPO, prompt_stats: DataStats, ptx_stats: DataStats) -> dict[str, Any]:
    """Save the policy to final/ and the value model (or head) to final-value/, each renamed in once
    complete; then the summary, plot and table (engine/run.py: Run.finish)."""
    run, acc, p = ppo.run, ppo.acc, ppo.p
    unwrapped = acc.unwrap_model(ppo.actor)

    def write_models(final_dir: Path) -> None:
        full = acc.get_state_dict(ppo.actor)  # every process joins: gathers ZeRO-3 / FSDP shards
        if not acc.is_main_process:
            return
        part = {  # "policy.x" -> "x": the policy's (or, under LoRA, its adapter's) own state dict
            name: {k[len(name) + 1 :]: v for k, v in full.items() if k.startswith(name + ".")}
            for name in ("policy", "value_model", "value_head")
        }
        tok, value_tok = ppo.models.tokenizer, ppo.models.scorer_tokenizer
        save_final(final_dir, lambda out: save_model(unwrapped.policy, tok, out, state_dict=part["policy"]))
        if unwrapped.value_model is not None:
            value = part["value_model"]
            write_value = lambda out: save_model(unwrapped.value_model, value_tok, out, state_dict=value)  # noqa: E731
        else:
            write_value = lambda out: torch.save(part["value_head"], out / "value_head.pt")  # noqa: E731
        save_final(run.run_dir / "final-value", write_value)

    def summarize() -> tuple[dict[str, Any], list[tuple[str, Any]]]:
        last = run.metrics.rows[-1] if run.metrics and run.metrics.rows else {}
        summary = run.summary(
            unwrapped,
            iterations=run.total,
            first_score=run.first("score/mean"),
            last_score=last.get("score/mean"),
            last_kl=last.get("objective/kl"),
            kl_coef=ppo.kl_ctl.value,
            data={
                "prompts": prompt_stats.as_dict(),
                **({"ptx": ptx_stats.as_dict()} if p.ptx_data else {}),
            },
        )
        rows = [
            ("iterations", run.total),
            ("score (first iteration)", summary["first_score"]),
            ("score (last iteration)", summary["last_score"]),
            ("KL to reference (last)", summary["last_kl"]),
            ("kl_coef (final)", ppo.kl_ctl.value),
            ("prompts", prompt_stats.describe()),
            *([("ptx examples", ptx_stats.describe())] if p.ptx_data else []),
            *run.cost_rows(summary),
        ]
        return summary, rows

    return run.finish(write_models, summarize, ["score/mean", "objective/kl", "loss/policy", "loss/value"])


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the policy (with the value model when that is a reward-model copy, trained with it),
    the frozen reference (none under LoRA: the adapters-off policy) and the reward model."""
    reward_config = reward_config or config
    lora = trained_lora(recipe)
    policy = meta_model(config, recipe, lora=lora)
    frozen = {} if recipe.model.lora.enabled else {"reference": meta_model(config, recipe)}
    frozen["reward model"] = meta_model(reward_config, recipe, True)
    if recipe.ppo.value_model != "reward_model":
        return MemoryPlan(policy, frozen)
    value = meta_model(reward_config, recipe, True, lora)
    return MemoryPlan(nn.ModuleDict({"policy": policy, "value": value}), frozen, reward_config)


run = run_ppo  # the registry's face (align_cli/stages/__init__.py)
