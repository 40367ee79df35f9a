"""`align online-dpo`: DPO on pairs sampled from the current policy each iteration.

Offline DPO learns from a fixed file of pairs; here each iteration samples ``online_dpo.num_generations``
responses per prompt from the policy being trained, scores them with the reward model and/or Python
reward functions (``rewards.RewardSource``), pairs the best against the worst of each prompt (ties give
no pair, counted), and takes DPO steps on those pairs against the frozen reference pi_ref, the starting
policy (under LoRA: the policy with its adapters off):

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    L = -log sigma(beta * h)                   (ipo, hinge, conservative DPO: as `align dpo`)

The loop is ``align_cli.online_dpo_core``; resolving the policy, reward and prompts is shared with GRPO
and RLOO (``group_stage``). The offline counterpart is ``rejection-sample`` -> pairs.jsonl -> ``dpo``
(examples/sentiment/offline-dpo.yaml).
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
from align_cli.group_stage import resolve, reward_scorer
from align_cli.memory import MemoryPlan, meta_model, print_estimate, trained_lora
from align_cli.models import load_causal_lm, load_tokenizer, save_model
from align_cli.online_dpo_core import OnlineDPO, OnlineDPOSettings
from align_cli.recipe import DPOSection, ModelSection, Recipe, RecipeError
from align_cli.reference import frozen_reference
from align_cli.sections import uses_reward_model
from align_cli.vllm_engine import make_rollouts, resolve_backend


def settings(recipe: Recipe) -> OnlineDPOSettings:
    o = recipe.online_dpo
    return OnlineDPOSettings(
        num_generations=o.num_generations,
        prompts_per_iteration=o.prompts_per_iteration,
        prompts_per_batch=o.prompts_per_batch,
        mini_batch_size=o.mini_batch_size,
        num_epochs=o.num_epochs,
        max_new_tokens=o.max_new_tokens,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        loss=DPOSection(beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing),
        template=recipe.data.template,
        seed=recipe.training.seed,
    )


def run_online_dpo(
    recipe: Recipe, resume: bool | Resume = False, console: Console | None = None
) -> dict[str, Any]:
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    section, t, d = recipe.online_dpo, recipe.training, recipe.data
    s = settings(recipe)
    policy_dir, scorer_dir, prompt_source = resolve(recipe, section, "online_dpo")
    prompts = load_prompts(prompt_source, read_options(d))  # bad lines fail before anything is built
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError(
            "online-dpo runs on one process (its pairs per process would differ, and with them the number "
            "of optimizer steps); launch it without accelerate launch / torchrun"
        )
    tokenizer = load_tokenizer(ModelSection(name_or_path=policy_dir))
    settle_chat_template(tokenizer, d.chat_template, needs_chat(d.template, prompts))
    room = prompt_room(d.max_length, s.max_new_tokens, d.max_prompt_length)
    prompts, prompt_stats = fit_prompts(prompts, tokenizer, d.template, room)
    backend = resolve_backend(section.backend, "online_dpo")  # a missing vLLM / GPU fails before models load
    set_seed(t.seed)
    policy_section = ModelSection(**{**vars(recipe.model), "name_or_path": policy_dir})
    policy = load_causal_lm(policy_section, tokenizer)
    reference = frozen_reference(policy_section, tokenizer=tokenizer)  # None under LoRA: adapters off
    source = reward_scorer(section, scorer_dir, d.template)  # the one scoring call: its score_samples
    run_dir, acc = open_run(recipe, resume)
    source.to(acc.device)
    iterations = t.max_steps or section.iterations
    run = Run("online-dpo", t, run_dir, acc, console, iterations, unit="iteration")
    core = OnlineDPO(s, policy, reference, tokenizer, source, run)
    run.hf_files = checkpoint_files(acc, core.model, tokenizer)  # checkpoints load with from_pretrained
    core.engine = make_rollouts(backend, policy_dir, tokenizer, t.seed)
    frozen = {"reference": reference, "reward model": source.reward_model}
    print_estimate(recipe, core.model, acc, console, frozen, policy.config)
    start = run.restore(bool(resume))
    if resume:
        keep_samples_until(run_dir / "samples.jsonl", start)
    console.print(
        f"[bold]online-dpo[/]: policy {policy_dir} (also pi_ref), reward {source.describe()}, {len(prompts)} "
        f"prompts, {iterations} iterations x {s.prompts_per_iteration} prompts x {s.num_generations} "
        f"samples -> best vs worst pairs; prompts: {prompt_stats.describe()}"
    )
    prompt_order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(t.seed)).tolist()
    with run.running():
        for iteration in range(start, iterations):
            # the prompts are a function of the iteration, so a resumed run sees the same ones
            first = iteration * s.prompts_per_iteration
            chosen = [
                prompts[prompt_order[(first + i) % len(prompts)]] for i in range(s.prompts_per_iteration)
            ]
            ro, stats = core.iteration(chosen, iteration)
            rows = log_pairs(run_dir / "samples.jsonl", ro, iteration + 1, section.log_samples)
            run.log_samples(rows, iteration + 1)
            headline = {"reward": stats["reward/mean"], "pairs": len(ro["pairs"])}
            run.end_iteration(iteration + 1, stats, core.scheduler.get_last_lr()[0], headline)
    return finish(core, prompt_stats)


def log_pairs(path: Path, ro: dict[str, Any], iteration: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` pairs of an iteration: prompt, chosen and rejected with their rewards, to
    samples.jsonl; returns them (for the trackers' table)."""
    rows = []
    with path.open("a") as handle:
        for prompt, chosen, rejected, chosen_reward, rejected_reward in ro["pairs"][:count]:
            row = {"iteration": iteration, "prompt": prompt.prompt, "chosen": chosen, "rejected": rejected}
            row |= {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward}
            handle.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


def finish(core: OnlineDPO, prompt_stats: DataStats) -> dict[str, Any]:
    """Save the policy to final/ (renamed in once complete), then the summary, plot and table."""
    run, acc = core.run, core.acc
    unwrapped = acc.unwrap_model(core.model)

    def write_models(final_dir: Path) -> None:
        state_dict = acc.get_state_dict(core.model)
        save_final(final_dir, lambda out: save_model(unwrapped, core.tokenizer, out, state_dict=state_dict))

    def summarize() -> tuple[dict[str, Any], list[tuple[str, Any]]]:
        rows = run.metrics.rows if run.metrics else []
        summary = run.summary(
            unwrapped,
            iterations=run.total,
            first_reward=run.first("reward/mean"),
            last_reward=rows[-1].get("reward/mean") if rows else None,
            pairs=int(sum(r.get("pairs", 0) for r in rows)),
            pairs_skipped_tied=int(sum(r.get("pairs/skipped_tied", 0) for r in rows)),
            data={"prompts": prompt_stats.as_dict()},
        )
        table = [
            ("iterations", run.total),
            ("reward (first iteration)", summary["first_reward"]),
            ("reward (last iteration)", summary["last_reward"]),
            (
                "pairs trained on (prompts without one: tied)",
                f"{summary['pairs']} ({summary['pairs_skipped_tied']})",
            ),
            ("prompts", prompt_stats.describe()),
            *run.cost_rows(summary),
        ]
        return summary, table

    return run.finish(
        write_models, summarize, ["reward/mean", "loss", "dpo/rewards/accuracy", "dpo/rewards/margin"]
    )


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the policy, the frozen reference (none under LoRA: the adapters-off policy) and the
    reward model (none when reward functions score alone)."""
    policy = meta_model(config, recipe, lora=trained_lora(recipe))
    frozen = {} if recipe.model.lora.enabled else {"reference": meta_model(config, recipe)}
    if uses_reward_model(recipe.online_dpo):
        frozen["reward model"] = meta_model(reward_config or config, recipe, True)
    return MemoryPlan(policy, frozen)


run = run_online_dpo  # the registry's face (align_cli/stages/__init__.py)
