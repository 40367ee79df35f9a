"""Rejection sampling / best-of-N (Llama 2).

Sample N responses per prompt from the policy, score each with the reward model and/or Python reward
functions (``rewards.RewardSource``), keep the best, and optionally fine-tune on them (SFT) and repeat
over rounds, each round starting from the last round's model. Selecting the best of N samples moves
the output distribution away from the sampling policy by at most

    KL(best-of-N || pi) = log N - (N - 1) / N

while the expected reward of the best sample grows with N: the gap between the best and the mean
of N is the headroom rejection sampling exploits.

A finished round (``round-N/round.json``; with ``then: sft`` also a complete ``round-N/sft/final``) is
kept by ``--resume``, which continues with the next round (an interrupted SFT from its checkpoint).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import PartialState
from rich.console import Console
from rich.table import Table

from align_cli.best_of_n import best_of_n_table, best_worst_pair, print_round_table, select
from align_cli.data.prompts import Prompt, fit_prompts, load_prompts, prompt_room
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.engine.metrics import fmt
from align_cli.engine.session import open_run
from align_cli.engine.signals import StoppedBySignal
from align_cli.engine.tracking import check_trackers, end_trackers, numeric, start_trackers
from align_cli.generation import choose_backend
from align_cli.memory import MemoryPlan, meta_model, trained_lora
from align_cli.models import load_tokenizer
from align_cli.recipe import ModelSection, Recipe, RecipeError
from align_cli.rewards import RewardSource, load_reward_source
from align_cli.runs import (
    FINAL,
    after_final,
    can_resume,
    is_complete_model,
    last_output,
    record_output,
    runs_root,
    write_atomic,
    write_summary,
)
from align_cli.sample_and_score import sample_and_score
from align_cli.sections import uses_reward_model

# ----------------------------------------------------------------------------- one round


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sft_record(prompt: Prompt, response: str, finished: bool = True) -> dict[str, Any]:
    """An SFT-ready record: Alpaca when the prompt came from one, else prompt/completion (or chat). A
    response that did not end by itself is marked ``finished: false``: SFT then adds no end marker."""
    mark = {} if finished else {"finished": False}
    if prompt.instruction is not None:
        return {"instruction": prompt.instruction, "input": prompt.input, "output": response} | mark
    if isinstance(prompt.prompt, list) and finished:
        return {"messages": [*prompt.prompt, {"role": "assistant", "content": response}]}
    return {"prompt": prompt.prompt, "completion": response} | mark


def run_round(
    round_dir: Path,
    policy_dir: str,
    reward: RewardSource,
    prompts: list[Prompt],
    recipe: Recipe,
    seed: int,
    best_so_far: dict[int, tuple[bool, float, str]],
    backend: str,
    console: Console,
) -> dict:
    """Sample, score, select; write samples.jsonl, best.jsonl and pairs.jsonl; return the round's figures."""
    rs = recipe.rejection
    samples, texts, scored = sample_and_score(
        policy_dir, reward, prompts, recipe, seed, rs.n, backend, console
    )
    rewards = scored.total
    state = PartialState()  # every process holds all results; the main process writes the files
    write = _write_jsonl if state.is_main_process else lambda path, rows: None
    if state.is_main_process:
        round_dir.mkdir(parents=True, exist_ok=True)
    per_prompt: list[list[int]] = [[] for _ in prompts]
    for i, s in enumerate(samples):
        per_prompt[s.prompt_index].append(i)
    write(
        round_dir / "samples.jsonl",
        [
            {
                "prompt_id": s.prompt_index,
                "sample_index": s.sample_index,
                "seed": seed,
                "prompt": prompts[s.prompt_index].prompt,
                "response": texts[i],
                "reward": rewards[i],
                **({"reward_sources": scored.sample(i)} if reward.functions else {}),
                "finished": s.finished,
            }
            for i, s in enumerate(samples)
        ],
    )
    best_rows, pair_rows, no_selection = [], [], 0
    pair_counts = {"tied": 0, "too_few_finished": 0}  # prompts without a pair, by reason
    for p, idx in enumerate(per_prompt):
        prompt_rewards = [rewards[i] for i in idx]
        ended = [samples[i].finished for i in idx]
        chosen = select(prompt_rewards, rs.select, rs.keep, rs.threshold, ended)
        chosen = [c for c in chosen if texts[idx[c]].strip()]  # an empty reply is no SFT example
        if rs.keep_previous_best and chosen:
            top = idx[chosen[0]]
            candidate = (
                samples[top].finished,
                rewards[top],
                texts[top],
            )  # a finished sample beats any cut one
            if p not in best_so_far or candidate[:2] > best_so_far[p][:2]:
                best_so_far[p] = candidate
            if rs.select == "best":  # Llama 2: train on the best sample seen so far for this prompt
                end, reward, text = best_so_far[p]
                best_rows.append(sft_record(prompts[p], text, end) | {"reward": reward})
                chosen = []
        no_selection += not chosen and not (rs.keep_previous_best and rs.select == "best")
        best_rows += [
            sft_record(prompts[p], texts[idx[c]], ended[c]) | {"reward": prompt_rewards[c]} for c in chosen
        ]
        # pairs for DPO, which ends both responses with the end marker: non-empty samples that ended
        whole = [i for i in idx if samples[i].finished and texts[i].strip()]
        if len(whole) < 2:
            pair_counts["too_few_finished"] += 1
            continue
        pair = best_worst_pair([rewards[i] for i in whole], [texts[i] for i in whole])
        if pair is None:
            pair_counts["tied"] += 1
            continue
        hi, lo = whole[pair[0]], whole[pair[1]]
        pair_rows.append(
            {
                "prompt_id": p,
                "prompt": prompts[p].prompt,
                "chosen": texts[hi],
                "rejected": texts[lo],
                "margin": rewards[hi] - rewards[lo],
                "chosen_reward": rewards[hi],
                "rejected_reward": rewards[lo],
            }
        )
    write(round_dir / "best.jsonl", best_rows)
    write(round_dir / "pairs.jsonl", pair_rows)
    state.wait_for_everyone()  # e.g. `then: sft` on every process reads best.jsonl next
    table = best_of_n_table([[rewards[i] for i in idx] for idx in per_prompt])
    return {
        "table": table,
        "mean_reward": sum(rewards) / len(rewards),
        "reward_sources": scored.means(),  # reward/<source>: each source's mean where it applied
        "best_jsonl_mean_reward": sum(r["reward"] for r in best_rows) / max(len(best_rows), 1),
        "selected": len(best_rows),
        "selected_unfinished": sum(r.get("finished") is False for r in best_rows),
        "prompts_without_selection": no_selection,
        "pairs": len(pair_rows),
        "pairs_skipped_tied": pair_counts["tied"],
        "pairs_skipped_too_few_finished": pair_counts["too_few_finished"],
        "eos_rate": sum(s.finished for s in samples) / len(samples),
    }


ROUND_FILE = "round.json"


def save_round(round_dir: Path, figures: dict, best_so_far: dict[int, tuple[bool, float, str]]) -> None:
    """Mark a round's sampling and selection finished (written after its files): its figures, and the best
    sample so far of each prompt, which later rounds build on."""
    best = {str(p): list(v) for p, v in best_so_far.items()}
    write_atomic(round_dir / ROUND_FILE, json.dumps({"figures": figures, "best_so_far": best}))


def load_round(round_dir: Path) -> tuple[dict, dict[int, tuple[bool, float, str]]] | None:
    """A finished round's figures and best samples so far, or None when the round has not finished."""
    try:
        state = json.loads((round_dir / ROUND_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state["figures"], {int(p): tuple(v) for p, v in state["best_so_far"].items()}


def sft_on_round(recipe: Recipe, round_dir: Path, policy_dir: str, console: Console) -> str:
    """Fine-tune ``policy_dir`` on the round's best.jsonl in ``round-N/sft``; return the new policy. A
    complete one is kept; an interrupted one resumes from its checkpoint, else starts again."""
    from align_cli.stages.sft import run_sft

    sft_dir = round_dir / "sft"
    if not is_complete_model(sft_dir / FINAL):
        sft_recipe = copy.deepcopy(recipe)
        sft_recipe.stage = "sft"
        sft_recipe.model.name_or_path = policy_dir
        sft_recipe.data.train, sft_recipe.data.eval, sft_recipe.data.format = (
            str(round_dir / "best.jsonl"),
            None,
            "auto",
        )
        sft_recipe.output.dir, sft_recipe.output.overwrite = str(sft_dir), True  # a folder of this run
        # its tracker run is named after this run and round (the folder's own name is just "sft")
        sft_recipe.training.run_name = (
            f"{recipe.training.run_name or round_dir.parent.name}-{round_dir.name}-sft"
        )
        run_sft(sft_recipe, resume=can_resume(sft_dir, "sft"), console=console)
    return str(sft_dir / FINAL)


# ----------------------------------------------------------------------------- the stage


def _resolve(recipe: Recipe) -> tuple[str, str | None, str]:
    """(policy, reward model or None, prompts). Reward functions without a named reward model score
    alone: the last `align reward` output is used only when neither is named."""
    rs = recipe.rejection
    policy = recipe.model.name_or_path or (str(last_output("sft")) if last_output("sft") else None)
    scorer = rs.reward_model
    if scorer is None and uses_reward_model(rs):
        scorer = str(last_output("reward")) if last_output("reward") else None
    prompts = rs.prompts or recipe.data.train
    missing = []
    if not policy:
        missing.append("a policy: --model, or run `align sft` first")
    if not scorer and not rs.reward_functions:
        missing.append(
            "a reward: --reward-model (rejection.reward_model), rejection.reward_functions, or run "
            "`align reward` first"
        )
    if not prompts:
        missing.append("prompts: --prompts (rejection.prompts) or --data")
    if rs.select == "threshold" and rs.threshold is None:
        missing.append("rejection.threshold (select: threshold)")
    if missing:
        raise RecipeError("rejection-sample needs " + "; ".join(missing))
    return policy, scorer, prompts


def run_rejection_sampling(
    recipe: Recipe, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    console = console or Console()
    check_trackers(recipe.training)  # a missing tracker package: before any model loads
    rs = recipe.rejection
    policy_dir, scorer_dir, prompt_source = _resolve(recipe)
    backend = choose_backend(rs.backend)  # vLLM without a GPU fails here, before any model loads
    prompts = load_prompts(prompt_source, read_options(recipe.data))  # bad lines fail here
    # too long: dropped and counted, as is max_prompts
    room = prompt_room(recipe.data.max_length, rs.max_new_tokens, recipe.data.max_prompt_length)
    policy_tok = load_tokenizer(ModelSection(name_or_path=policy_dir))
    settle_chat_template(policy_tok, recipe.data.chat_template, needs_chat(recipe.data.template, prompts))
    prompts, prompt_stats = fit_prompts(prompts, policy_tok, recipe.data.template, room, rs.max_prompts)
    reward = load_reward_source(
        scorer_dir, rs.reward_functions, rs.reward_weights, recipe.data.template, rs.score_batch_size
    )
    run_dir, accelerator = open_run(recipe, resume)
    reward.to(accelerator.device)
    main = accelerator.is_main_process
    console.print(
        f"[bold]rejection sampling[/]: policy {policy_dir}, reward {reward.describe()}, "
        f"{len(prompts)} prompts x {rs.n} samples, generation backend: {backend}; "
        f"prompts: {prompt_stats.describe()}"
    )
    start_policy, rounds, best_so_far = policy_dir, [], {}
    for r in range(1, rs.rounds + 1):
        round_dir = run_dir / f"round-{r}"
        done = load_round(round_dir)
        if done is not None:
            figures, best_so_far = done
            console.print(f"round {r}: finished by an earlier run, kept ({round_dir})")
        else:
            figures = run_round(
                round_dir,
                policy_dir,
                reward,
                prompts,
                recipe,
                recipe.training.seed + r,
                best_so_far,
                backend,
                console,
            )
            print_round_table(f"round {r}: reward by N (policy {policy_dir})", figures["table"], console)
            console.print(
                f"round {r}: {figures['eos_rate']:.0%} of samples ended by themselves; selected "
                f"{figures['selected']} ({figures['selected_unfinished']} cut at max_new_tokens, kept "
                f"only where no sample of the prompt ended; written without an end marker), "
                f"{figures['pairs']} pairs (no pair: {figures['pairs_skipped_tied']} prompts whose best and "
                f"worst tied, {figures['pairs_skipped_too_few_finished']} with fewer than 2 finished samples)"
                + "".join(f"; {k} {fmt(v)}" for k, v in figures["reward_sources"].items())
            )
            if main:
                save_round(round_dir, figures, best_so_far)
            accelerator.wait_for_everyone()
        if rs.then == "sft":
            try:
                policy_dir = sft_on_round(recipe, round_dir, policy_dir, console)
            except StoppedBySignal as stopped:  # --resume continues this rejection sampling, not its SFT
                raise StoppedBySignal(
                    "rejection-sample", run_dir, r, stopped.signal_name, stopped.checkpoint
                ) from None
        figures["policy_after"] = policy_dir
        rounds.append(figures)
    # each round's figures, once the rounds are done: a round's SFT (`then: sft`) runs its own trackers,
    # which must not nest inside this run's (W&B would hand it this run, MLflow refuse a second one)
    if start_trackers(accelerator, recipe.training, run_dir):
        for r, figures in enumerate(rounds, start=1):
            accelerator.log(numeric({**figures, **figures.get("reward_sources", {})}), step=r)
    for name in ("samples.jsonl", "best.jsonl", "pairs.jsonl"):  # the last round's, at the top for chaining
        if main:
            shutil.copy(run_dir / f"round-{rs.rounds}" / name, run_dir / name)
    summary = {
        "stage": "rejection-sample",
        "run_dir": str(run_dir),
        "start_policy": start_policy,
        "reward_model": scorer_dir,
        "reward_functions": rs.reward_functions,
        "reward_weights": reward.weights,
        "rounds": rounds,
        "backend": backend,
        "data": {"prompts": prompt_stats.as_dict()},
    }
    if rs.then == "sft":
        evaluation = {}
        for label, path in (("start", start_policy), ("final", policy_dir)):
            seed = recipe.training.seed + 10_000
            _, _, scored = sample_and_score(path, reward, prompts, recipe, seed, rs.eval_n, backend, console)
            evaluation[label] = sum(scored.total) / len(scored.total)
        summary["policy_mean_reward"] = evaluation
        if main:
            final = Path(policy_dir)
            after_final(runs_root() / "latest.json", final, lambda: record_output("rejection-sample", final))
        table = Table(title="policy mean sampled reward")
        table.add_column("policy")
        table.add_column("mean reward", justify="right")
        table.add_row(f"start ({start_policy})", fmt(evaluation["start"]))
        table.add_row(f"after {rs.rounds} round(s) of best-of-{rs.n} + SFT", fmt(evaluation["final"]))
        console.print(table)
    if main:
        write_summary(run_dir, summary)
    end_trackers(accelerator)
    return summary


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the sampling policy and the reward model (none when reward functions score alone);
    the policy is trained only with ``rejection.then: sft`` (after sampling, the sampler freed)."""
    frozen = {"policy (sampling)": meta_model(config, recipe)}
    if uses_reward_model(recipe.rejection):
        frozen["reward model"] = meta_model(reward_config or config, recipe, True)
    then_sft = recipe.rejection.then == "sft"
    return MemoryPlan(meta_model(config, recipe, lora=trained_lora(recipe)) if then_sft else None, frozen)


run = run_rejection_sampling  # the registry's face (align_cli/stages/__init__.py)
