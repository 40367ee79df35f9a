"""The stage around ``group_core.GroupPolicyGradient``, shared by `align grpo` and `align rloo`: resolve
the models and prompts, build the one scoring callable, run the iterations through the engine's ``Run``
(optimizer, checkpoints and resume, stop-and-save, NaN policy, metrics, progress), save the final policy,
report. Each stage module (stages/grpo.py, stages/rloo.py) holds its algorithm and its settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console

from align_cli.data.prompts import fit_prompts, load_prompts, prompt_room
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.data.tokenize import DataStats
from align_cli.engine.hf_layout import checkpoint_files
from align_cli.engine.metrics import keep_samples_until
from align_cli.engine.resume import Resume
from align_cli.engine.run import Run
from align_cli.engine.session import open_run, save_final
from align_cli.engine.tracking import check_trackers
from align_cli.group_core import GroupAlgorithm, GroupPolicyGradient, GroupSettings
from align_cli.memory import MemoryPlan, meta_model, print_estimate, trained_lora
from align_cli.models import load_causal_lm, load_tokenizer, save_model
from align_cli.recipe import ModelSection, Recipe, RecipeError
from align_cli.reference import frozen_reference
from align_cli.rewards import REWARD_MODEL, RewardSource, load_reward_source
from align_cli.runs import last_output
from align_cli.sections import uses_reward_model
from align_cli.vllm_engine import make_rollouts, resolve_backend


def resolve(recipe: Recipe, section: Any, name: str) -> tuple[str, str | None, str]:
    """(policy, reward model or None, prompt source): named, or chained from the last `align sft` /
    `align reward`; reward functions without a named reward model score alone (no fallback)."""
    policy = recipe.model.name_or_path or (str(last_output("sft")) if last_output("sft") else None)
    scorer = section.reward_model
    if scorer is None and uses_reward_model(section):
        scorer = str(last_output("reward")) if last_output("reward") else None
    prompts = section.prompts or recipe.data.train
    missing = [
        what
        for what, ok in (
            ("a policy: --model, or run `align sft` first", policy),
            (
                f"a reward: --reward-model ({name}.reward_model), {name}.reward_functions, or run "
                "`align reward` first",
                scorer or section.reward_functions,
            ),
            (f"prompts: --prompts ({name}.prompts) or --data", prompts),
        )
        if not ok
    ]
    if missing:
        raise RecipeError(f"{name} needs " + "; ".join(missing))
    return policy, scorer, prompts


def reward_scorer(section: Any, scorer_dir: str | None, template: str) -> RewardSource:
    """The stage's reward source (align_cli/rewards.py), which is its ``score_samples``: a reward model,
    each sample rendered and cut exactly as its training records were (no EOS after a sample that did
    not end), and/or weighted Python reward functions; it returns the total and each source's values."""
    source = load_reward_source(scorer_dir, section.reward_functions, section.reward_weights, template)
    if source.reward_model is not None:
        source.reward_model.requires_grad_(False)
    return source


def run_group_stage(
    recipe: Recipe,
    section: Any,
    settings: GroupSettings,
    algorithm: GroupAlgorithm,
    resume: bool | Resume = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run `align grpo` / `align rloo` (``settings.stage``) and return its summary."""
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    name, s, t, d = settings.stage, settings, recipe.training, recipe.data
    policy_dir, scorer_dir, prompt_source = resolve(recipe, section, name)
    prompts = load_prompts(prompt_source, read_options(d))  # bad lines fail before anything is built
    tokenizer = load_tokenizer(ModelSection(name_or_path=policy_dir))
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, prompts))
    room = prompt_room(d.max_length, s.max_new_tokens, d.max_prompt_length)
    prompts, prompt_stats = fit_prompts(prompts, tokenizer, d.template, room)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # before any model loads
    if s.prompts_per_iteration % world or s.mini_batch_size % world:
        raise RecipeError(
            f"{name}.prompts_per_iteration ({s.prompts_per_iteration}) and {name}.mini_batch_size "
            f"({s.mini_batch_size}) count over all {world} processes and must be multiples of that number "
            "(each process samples whole groups of its own prompts)"
        )
    backend = resolve_backend(section.backend, name)  # a missing vLLM / GPU fails before models load
    set_seed(t.seed)
    policy_section = ModelSection(**{**vars(recipe.model), "name_or_path": policy_dir})
    policy = load_causal_lm(policy_section, tokenizer)
    # beta 0: no KL term, so no reference at all; under LoRA the adapters-off policy is the reference
    reference = frozen_reference(policy_section, tokenizer=tokenizer) if s.beta > 0 else None
    source = reward_scorer(section, scorer_dir, d.template)
    run_dir, acc = open_run(recipe, resume)
    source.to(acc.device)
    iterations = t.max_steps or section.iterations
    run = Run(name, t, run_dir, acc, console, iterations, unit="iteration")
    core = GroupPolicyGradient(s, algorithm, policy, reference, tokenizer, source, run)
    run.hf_files = checkpoint_files(acc, core.model, tokenizer)  # checkpoints load with from_pretrained
    core.engine = make_rollouts(backend, policy_dir, tokenizer, t.seed)
    print_estimate(
        recipe,
        core.model,
        acc,
        console,
        {"reference": reference, "reward model": source.reward_model},
        policy.config,
    )
    start = run.restore(bool(resume))
    if resume and acc.is_main_process:
        keep_samples_until(run_dir / "samples.jsonl", start)
    no_reference = " (beta 0: no reference model)" if s.beta == 0 else ""
    console.print(
        f"[bold]{name}[/]: policy {policy_dir}, reward {source.describe()}{no_reference}, {len(prompts)} "
        f"prompts, {iterations} iterations x {s.prompts_per_iteration} prompts x {s.group_size} samples; "
        f"prompts: {prompt_stats.describe()}"
    )
    prompt_order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(t.seed)).tolist()
    share = s.prompts_per_iteration // acc.num_processes
    with run.running():
        for iteration in range(start, iterations):
            # prompt position is a function of the iteration, so a resumed run sees the same prompts; each
            # process takes a contiguous share of whole prompts (their groups stay on it)
            first = iteration * s.prompts_per_iteration + acc.process_index * share
            chosen = [prompts[prompt_order[(first + i) % len(prompts)]] for i in range(share)]
            ro, stats = core.iteration(chosen, iteration)
            if acc.is_main_process:
                rows = log_samples(run_dir / "samples.jsonl", ro, iteration + 1, section.log_samples)
                run.log_samples(rows, iteration + 1)
            headline = {"reward": stats["reward/mean"]}
            headline |= {"kl": stats["objective/kl"]} if "objective/kl" in stats else {}
            run.end_iteration(iteration + 1, stats, core.scheduler.get_last_lr()[0], headline)
    return finish(core, prompt_stats)


def log_samples(path: Path, ro: dict[str, Any], iteration: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` samples of an iteration (whole groups first), with reward and advantage, to
    samples.jsonl; returns them (for the trackers' table)."""
    rows = []
    with path.open("a") as handle:
        for i in range(min(count, len(ro["texts"]))):
            row = {"iteration": iteration, "prompt": ro["prompts"][i].prompt, "response": ro["texts"][i]}
            row |= {"reward": ro["scores"][i].item(), "advantage": ro["advantages"][i].item()}
            if set(ro["rewards"].by_source) - {REWARD_MODEL}:  # functions score: each source's own value
                row["reward_sources"] = ro["rewards"].sample(i)
            if ro["ref_logps"] is not None:
                row["kl"] = ((ro["old_logps"][i] - ro["ref_logps"][i]) * ro["mask"][i]).sum().item()
            handle.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


def finish(core: GroupPolicyGradient, prompt_stats: DataStats) -> dict[str, Any]:
    """Save the policy to final/ (renamed in once complete), then the summary, plot and table."""
    run, acc, s = core.run, core.acc, core.s
    unwrapped = acc.unwrap_model(core.model)

    def write_models(final_dir: Path) -> None:
        state_dict = acc.get_state_dict(core.model)  # every process joins: gathers ZeRO-3 / FSDP shards
        if acc.is_main_process:
            save_final(
                final_dir, lambda out: save_model(unwrapped, core.tokenizer, out, state_dict=state_dict)
            )

    def summarize() -> tuple[dict[str, Any], list[tuple[str, Any]]]:
        last = run.metrics.rows[-1] if run.metrics and run.metrics.rows else {}
        summary = run.summary(
            unwrapped,
            iterations=run.total,
            first_reward=run.first("reward/mean"),
            last_reward=last.get("reward/mean"),
            last_kl=last.get("objective/kl"),
            data={"prompts": prompt_stats.as_dict()},
        )
        rows = [
            ("iterations", run.total),
            ("reward (first iteration)", summary["first_reward"]),
            ("reward (last iteration)", summary["last_reward"]),
            *([("KL to reference (last)", summary["last_kl"])] if s.beta > 0 else []),
            ("prompts", prompt_stats.describe()),
            *run.cost_rows(summary),
        ]
        return summary, rows

    plot_keys = ["reward/mean", "loss", "policy/clipfrac", *(["objective/kl"] if s.beta > 0 else [])]
    return run.finish(write_models, summarize, plot_keys)


def group_memory_plan(recipe: Recipe, config: Any, reward_config: Any, section: Any) -> MemoryPlan:
    """`align plan`: the policy, the frozen reference when beta > 0 (none under LoRA: the adapters-off
    policy) and the reward model (none when reward functions score alone)."""
    beta = section.beta
    policy = meta_model(config, recipe, lora=trained_lora(recipe))
    frozen = {"reference": meta_model(config, recipe)} if beta > 0 and not recipe.model.lora.enabled else {}
    if uses_reward_model(section):
        frozen["reward model"] = meta_model(reward_config or config, recipe, True)
    return MemoryPlan(policy, frozen)
