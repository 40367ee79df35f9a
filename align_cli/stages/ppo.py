"""PPO for RLHF (Ziegler et al. 2019, InstructGPT, Llama 2), written to be read next to the papers.

Each iteration:
  1. rollout: sample one response y per prompt x from the policy pi;
  2. score:   r(x, y) from the reward model at the final token (optional EOS penalty, clip, norm);
  3. shape:   r_t = -beta * KL_t on every response token, plus r(x, y) at the last one, where
              KL_t estimates log pi(a_t|s_t) - log pi_ref(a_t|s_t) against the frozen SFT model;
  4. GAE:     delta_t = r_t + gamma V(s_{t+1}) - V(s_t),  A_t = sum_l (gamma lambda)^l delta_{t+l},
              returns R_t = A_t + V(s_t); advantages whitened over the batch;
  5. update:  ppo_epochs passes over mini-batches, one optimizer step each, minimising
              -E[min(rho A, clip(rho, 1-eps, 1+eps) A)] + vf_coef * 0.5 max((V-R)^2, (V_clip-R)^2)
              with rho = pi / pi_old, plus (PPO-ptx) ptx_coef * the LM loss on pretraining/SFT data;
  6. KL control: beta fixed, or adapted toward a target KL (Ziegler et al.).

The losses are the pure functions of ``align_cli.losses``; this file only wires models and data.
Unlike the other stages PPO alternates sampling and updates, so it has its own iteration loop, built
from the engine's parts (accelerator, optimizer, scheduler, checkpoints, metrics).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from align_cli import losses as L
from align_cli.data.collate import length_buckets, pad_collate
from align_cli.data.formats import SFT_KINDS, load_records
from align_cli.data.preference import collate_responses
from align_cli.data.prompts import Prompt, fit_prompts, load_prompts
from align_cli.data.readers import read_options
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.data.tokenize import DataStats, tokenize_sft
from align_cli.engine.checkpoint import (
    SaveSchedule,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from align_cli.engine.distributed import configure_deepspeed, for_generation, mean_across
from align_cli.engine.faults import fault_point
from align_cli.engine.loop import (
    NonFiniteError,
    apply_training_settings,
    build_optimizer,
    build_scheduler,
    check_finite,
    last_good_checkpoint,
    nan_context,
)
from align_cli.engine.metrics import MetricsLog, plot_metrics, print_table, read_rows
from align_cli.engine.resume import Resume
from align_cli.engine.session import open_run, save_final
from align_cli.engine.signals import StopFlag, StoppedBySignal, stop_on_signals, stop_requested
from align_cli.forward import per_token_by_bucket, token_logprobs, token_scores
from align_cli.generation import SamplingParams, sample
from align_cli.memory import MemoryPlan, meta_model, print_estimate, trained_lora
from align_cli.models import count_parameters, load_causal_lm, load_reward_model, load_tokenizer, save_model
from align_cli.recipe import ModelSection, Recipe, RecipeError
from align_cli.reference import LiveReference, frozen_reference
from align_cli.runs import (
    FINAL,
    after_final,
    last_output,
    peak_memory_mb,
    record_output,
    runs_root,
    write_summary,
)
from align_cli.scoring import score

# ----------------------------------------------------------------------------- models


class ActorCritic(nn.Module):
    """The policy and its value function V(s_t), evaluated in one call at the positions that predict
    response tokens. The value is either a separate model (InstructGPT initialises it from the reward
    model) or a scalar head on the policy's final hidden state (read as the LM head's input)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # FSDP auto-wrap (recipes/accelerate/fsdp.yaml) shards by these layer classes of both models
        models = [m for m in (policy, value_model) if m is not None]
        self._no_split_modules = sorted(
            {c for m in models for c in getattr(m, "_no_split_modules", None) or []}
        )
        hidden = policy.get_output_embeddings().in_features
        self.value_head = nn.Linear(hidden, 1) if value_model is None else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        with_values: bool = True,
        buckets: list[tuple[list[int], int]] | None = None,
        temperature: float = 1.0,
    ) -> tuple:
        """(log pi_T(a_t|s_t) [N], V(s_t) [N] or None, entropy of pi_T [N]) for the N supervised tokens,
        row by row, pi_T = softmax(logits / temperature) (the sampling distribution); one pass per length
        bucket of rows (``length_buckets``) so short rollouts are not padded."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        def rows(sub: dict[str, torch.Tensor]) -> tuple:
            return self._rows(**sub, with_values=with_values, temperature=temperature)

        return per_token_by_bucket(rows, batch, buckets)

    def _rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        with_values: bool,
        temperature: float,
    ) -> tuple:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        hidden: list[torch.Tensor] = []
        hook = None
        if with_values and self.value_head is not None:  # the LM head sees exactly the kept hidden states
            hook = self.policy.get_output_embeddings().register_forward_hook(
                lambda m, a, o: hidden.append(a[0])
            )
        try:
            logps, entropy = token_logprobs(self.policy, batch, temperature, with_entropy=True)
        finally:
            if hook is not None:
                hook.remove()
        if not with_values:
            values = None
        elif self.value_head is not None:
            values = self.value_head(hidden[-1].to(self.value_head.weight.dtype)).squeeze(-1).float()
        else:
            values = token_scores(self.value_model, batch)
        return logps, values, entropy


def to_padded(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row-major flat per-token values -> [B, T] right-padded with zeros."""
    mask = torch.arange(int(lengths.max()), device=flat.device)[None] < lengths[:, None]
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out


# ----------------------------------------------------------------------------- one rollout


@torch.no_grad()
def rollout(ctx: dict[str, Any], prompts: list[Prompt], iteration: int) -> dict[str, Any]:
    """Steps 1-4: sample, score, shape the rewards, estimate advantages."""
    recipe, p = ctx["recipe"], ctx["recipe"].ppo
    tok, actor = ctx["tokenizer"], ctx["actor"]
    params = SamplingParams(
        n=1,
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=recipe.training.seed * 100_003 + iteration,
        prompts_per_batch=len(prompts),
    )
    prompt_ids = [x.ids(recipe.data.template, tok) for x in prompts]
    acc = ctx["accelerator"]
    with for_generation(acc, actor) as (unwrapped, synced):  # ZeRO-3 / FSDP: every process keeps stepping
        samples = sample(
            unwrapped.policy, tok, prompt_ids, params, first_batch=acc.process_index, synced_gpus=synced
        )
    examples = [{"prompt_ids": s.prompt_ids, "responses": [s.response_ids], "margin": None} for s in samples]
    collated = collate_responses(examples, tok.pad_token_id)
    batch = {k: collated[k].to(ctx["accelerator"].device) for k in ("input_ids", "attention_mask", "labels")}
    row_lengths = (collated["last_index"] + 1).tolist()  # prompt + response, on the host: no device sync
    lengths = torch.tensor([len(s.response_ids) for s in samples], device=batch["input_ids"].device)
    mask = to_padded(torch.ones(int(lengths.sum()), device=lengths.device), lengths)
    actor.eval()
    logps, values, _ = actor(**batch, buckets=collated["buckets"], temperature=p.temperature)
    actor.train()
    ref_logps = reference_logprobs(ctx, batch, collated["buckets"])
    texts = [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    ended = [s.finished for s in samples]
    finished = torch.tensor(ended, device=mask.device)
    raw = torch.tensor(
        score(ctx["scorer"], ctx["scorer_tokenizer"], prompts, texts, recipe.data.template, ended),
        device=mask.device,
    )
    scores = L.shape_scores(raw, finished, p.missing_eos_penalty, p.score_clip, p.score_norm)
    old_logps, ref_logps, old_values = (to_padded(x, lengths) for x in (logps, ref_logps, values))
    rewards, kl = L.per_token_rewards(scores, old_logps, ref_logps, mask, ctx["kl_ctl"].value, p.kl_estimator)
    advantages, returns = L.gae(rewards, old_values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = L.whiten(advantages, mask)
    return {
        "batch": batch,
        "row_lengths": row_lengths,
        "lengths": lengths,
        "mask": mask,
        "old_logps": old_logps,
        "old_values": old_values,
        "advantages": advantages,
        "returns": returns,
        "rewards": rewards,
        "kl": kl,
        "scores": raw,
        "shaped_scores": scores,
        "finished": finished,
        "texts": texts,
        "prompts": prompts,
    }


def reference_logprobs(
    ctx: dict[str, Any], batch: dict[str, torch.Tensor], buckets: list[tuple[list[int], int]] | None = None
) -> torch.Tensor:
    """log pi_ref of the response tokens [N]: the frozen SFT model, or under LoRA the policy itself with
    its adapters disabled (its base weights are the SFT weights: no second copy in memory). Scored as the
    policy is: at the sampling temperature and under the same autocast, so the KL at identical weights
    is 0."""
    temperature = ctx["recipe"].ppo.temperature
    live = LiveReference(ctx["accelerator"], ctx["reference"], temperature, lambda actor: actor.policy)
    return live.token_logprobs(ctx["actor"], {**batch, "buckets": buckets})


# ----------------------------------------------------------------------------- one update


def ptx_batch(ctx: dict[str, Any], iteration: int, index: int) -> dict[str, torch.Tensor] | None:
    """A deterministic batch of the PPO-ptx data for this optimizer step."""
    data = ctx["ptx"]
    if not data:
        return None
    size = ctx["recipe"].ppo.ptx_batch_size
    acc = ctx["accelerator"]  # each process takes its own slice
    start = (((iteration * 1000 + index) * acc.num_processes + acc.process_index) * size) % len(data)
    chosen = [data[(start + i) % len(data)] for i in range(size)]
    batch = pad_collate(chosen, ctx["tokenizer"].pad_token_id)
    return {k: v.to(ctx["accelerator"].device) for k, v in batch.items()}


def update(ctx: dict[str, Any], ro: dict[str, Any], iteration: int) -> dict[str, float]:
    """Step 5: ppo_epochs passes of mini-batch updates on one rollout; returns mean statistics."""
    p, acc, actor = ctx["recipe"].ppo, ctx["accelerator"], ctx["actor"]
    n = ro["mask"].shape[0]
    mini = p.mini_batch_size // acc.num_processes  # mini_batch_size counts rollouts of all processes
    gen = torch.Generator().manual_seed(ctx["recipe"].training.seed * 7919 + iteration)
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(p.ppo_epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, mini):
            rows = order[start : start + mini]
            # the mini-batch cut to its own longest row, and run in length buckets: little padding
            row_lengths = [ro["row_lengths"][r] for r in rows]
            mb = {k: v[rows][:, : max(row_lengths)] for k, v in ro["batch"].items()}
            mb["buckets"] = length_buckets(row_lengths)
            lengths = ro["lengths"][rows]
            width = int(lengths.max())
            mask, old_logps, old_values, adv, ret = (
                ro[k][rows][:, :width] for k in ("mask", "old_logps", "old_values", "advantages", "returns")
            )
            logps, values, entropy = actor(**mb, temperature=p.temperature)
            logps, values, entropy = (to_padded(x, lengths) for x in (logps, values, entropy))
            pg_loss, pg_stats = L.ppo_policy_loss(logps, old_logps, adv, mask, p.cliprange)
            vf_loss, vf_stats = L.ppo_value_loss(values, old_values, ret, mask, p.cliprange_value)
            loss = pg_loss + p.vf_coef * vf_loss
            stats = {
                "loss/policy": pg_loss,
                "loss/value": vf_loss,
                "policy/entropy": L.masked_mean(entropy, mask),
                "policy/clipfrac": pg_stats["clipfrac"],
                "policy/approx_kl": pg_stats["approx_kl"],
                "value/clipfrac": vf_stats["vf_clipfrac"],
            }
            extra = ptx_batch(ctx, iteration, steps)
            if extra is not None and p.ptx_coef > 0:
                # the LM loss on data is at temperature 1; through the wrapper, for DDP
                ptx_logps, _, _ = actor(**extra, with_values=False)
                ptx_loss = -ptx_logps.mean()
                loss = loss + p.ptx_coef * ptx_loss
                stats["loss/ptx"] = ptx_loss
            acc.backward(loss)
            if steps == 0:
                fault_point("step", iteration + 1)
            max_norm = ctx["recipe"].training.max_grad_norm or float("inf")
            stats["grad_norm"] = acc.clip_grad_norm_(actor.parameters(), max_norm)
            prompts = [ro["prompts"][r] for r in rows]
            if not finite_or_skip(ctx, loss, stats["grad_norm"], iteration, prompts):
                continue
            ctx["optimizer"].step()
            ctx["scheduler"].step()
            ctx["optimizer"].zero_grad(set_to_none=True)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(torch.as_tensor(v).detach())
            steps += 1
    return {k: v / max(steps, 1) for k, v in totals.items()}


def finite_or_skip(
    ctx: dict[str, Any], loss: torch.Tensor, grad_norm: Any, iteration: int, prompts: list[Prompt]
) -> bool:
    """The NaN guard of one update: True to apply it; False to drop it (``training.nan_policy: skip``,
    counted); with the default policy a NaN/inf loss or gradient ends the run, last checkpoint kept. The
    error names the mini-batch's prompts (file:line) and the recipe keys that can cause it."""
    where, scaler = f"ppo iteration {iteration + 1}", ctx["accelerator"].scaler
    try:
        check_finite(float(loss.detach()), float(grad_norm), where, scaler)
    except NonFiniteError as exc:
        if ctx["recipe"].training.nan_policy != "skip":
            t, p = ctx["recipe"].training, ctx["recipe"].ppo
            keys = {"training.lr": t.lr, "training.precision": t.precision, "ppo.temperature": p.temperature}
            keys |= {"ppo.kl_coef": p.kl_coef, "ppo.vf_coef": p.vf_coef, "ppo.score_clip": p.score_clip}
            if p.ptx_data:
                keys["ppo.ptx_coef"] = p.ptx_coef
            context = nan_context([x.where for x in prompts], keys, "prompts")
            message = f"{exc}; {context}; {last_good_checkpoint(ctx['run_dir'])}"
            raise NonFiniteError(message, exc.what) from exc
        ctx["optimizer"].zero_grad(set_to_none=True)
        ctx["skipped"] += 1
        return False
    return True


def checkpoint_state(ctx: dict[str, Any]) -> dict[str, Any]:
    return {"stage": {"kl_ctl": ctx["kl_ctl"].state_dict()}, "skipped_steps": ctx["skipped"]}


def stop_at(ctx: dict[str, Any], stop: StopFlag, iteration: int, metrics: MetricsLog | None) -> None:
    """A requested stop: checkpoint at ``iteration`` (unless one is there already) and end the run."""
    run_dir = ctx["run_dir"]
    found = latest_checkpoint(run_dir)
    if found is None or checkpoint_step(found) != iteration:
        t = ctx["recipe"].training
        found = save_checkpoint(ctx["accelerator"], run_dir, iteration, checkpoint_state(ctx), t.keep_last)
    if metrics:
        metrics.flush()
    raise StoppedBySignal("ppo", run_dir, iteration, stop.name or "signal", found)


def keep_samples_until(path: Any, iteration: int) -> None:
    """On resume, samples.jsonl keeps the iterations the checkpoint covers (the rest are redone)."""
    if not path.exists():
        return
    kept = [r for r in read_rows(path) if r.get("iteration", 0) <= iteration]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def rollout_metrics(ro: dict[str, Any], kl_coef: float) -> dict[str, float]:
    mask = ro["mask"]
    seq_kl = ro["kl"].sum(-1)
    non_score = (-kl_coef * ro["kl"]).sum(-1)
    values, returns = ro["old_values"], ro["returns"]
    residual_var = L.masked_var(returns - values, mask, unbiased=False)
    explained = 1 - residual_var / (L.masked_var(returns, mask, unbiased=False) + 1e-8)
    return {
        "score/mean": ro["scores"].mean().item(),
        "score/std": ro["scores"].std().item() if len(ro["scores"]) > 1 else 0.0,
        "objective/kl": seq_kl.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/total_reward": (ro["shaped_scores"] + non_score).mean().item(),
        "value/explained_variance": explained.item(),
        "response/length": mask.sum(-1).float().mean().item(),
        "response/eos_rate": ro["finished"].float().mean().item(),
        "kl_coef": kl_coef,
    }


# ----------------------------------------------------------------------------- the stage


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
    p, t = recipe.ppo, recipe.training
    policy_dir, scorer_dir, prompt_source = _resolve(recipe)
    prompts = load_prompts(
        prompt_source, read_options(recipe.data)
    )  # bad lines fail before anything is built
    tokenizer = load_tokenizer(ModelSection(name_or_path=policy_dir))
    settle_chat_template(tokenizer, recipe.data.chat_template, needs_chat(recipe.data.template, prompts))
    room = recipe.data.max_length - p.max_new_tokens
    prompts, prompt_stats = fit_prompts(prompts, tokenizer, recipe.data.template, room)
    ptx, ptx_stats = [], DataStats()
    if p.ptx_data:
        ptx, ptx_stats = tokenize_sft(
            load_records(p.ptx_data, "auto", SFT_KINDS),
            tokenizer,
            recipe.data.template,
            recipe.data.max_length,
            "truncate",
        )
    set_seed(t.seed)
    policy_section = ModelSection(**{**vars(recipe.model), "name_or_path": policy_dir})
    policy = load_causal_lm(policy_section, tokenizer)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if p.rollout_batch_size % world or p.mini_batch_size % world:
        raise RecipeError(
            f"ppo.rollout_batch_size ({p.rollout_batch_size}) and ppo.mini_batch_size ({p.mini_batch_size}) "
            f"count rollouts over all {world} processes and must be multiples of that number"
        )
    reference = frozen_reference(policy_section, tokenizer=tokenizer)  # LoRA: None, the policy's base
    scorer_tokenizer = load_tokenizer(ModelSection(name_or_path=scorer_dir))
    scorer = load_reward_model(ModelSection(name_or_path=scorer_dir), scorer_tokenizer.pad_token_id).eval()
    scorer.requires_grad_(False)
    value_model = None
    if p.value_model == "reward_model":
        # under LoRA the value model trains adapters too (and its whole scalar head)
        value_section = ModelSection(
            name_or_path=scorer_dir,
            lora=recipe.model.lora,
            gradient_checkpointing=recipe.model.gradient_checkpointing,
            disable_dropout=recipe.model.disable_dropout,
        )
        value_model = load_reward_model(value_section, scorer_tokenizer.pad_token_id)
        if scorer_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise RecipeError("ppo.value_model=reward_model needs the policy's tokenizer; use policy_head")
    actor = ActorCritic(policy, value_model)

    run_dir, acc = open_run(recipe, resume)
    iterations = t.max_steps or p.iterations
    steps_per_iteration = p.ppo_epochs * -(-p.rollout_batch_size // p.mini_batch_size)
    optimizer = build_optimizer(actor, t)
    scheduler = build_scheduler(optimizer, t, iterations * steps_per_iteration)
    configure_deepspeed(acc, p.mini_batch_size // acc.num_processes)
    actor, optimizer, scheduler = acc.prepare(actor, optimizer, scheduler)
    if reference is not None:
        reference.to(acc.device)
    scorer.to(acc.device)
    value_config = value_model.config if value_model is not None else None
    frozen = {"reference": reference, "reward model": scorer}
    print_estimate(recipe, actor, acc, console, frozen, policy.config, value_config)
    kl_ctl = (
        L.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
        if p.adaptive_kl
        else L.FixedKLController(p.kl_coef)
    )
    ctx = {
        "recipe": recipe,
        "tokenizer": tokenizer,
        "actor": actor,
        "reference": reference,
        "scorer": scorer,
        "scorer_tokenizer": scorer_tokenizer,
        "accelerator": acc,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "kl_ctl": kl_ctl,
        "ptx": ptx,
        "run_dir": run_dir,
        "skipped": 0,  # updates dropped for a NaN/inf loss or gradient (nan_policy: skip)
    }
    start = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(acc, checkpoint)
        apply_training_settings(optimizer, scheduler, t)
        start = state["step"]
        kl_ctl.load_state_dict(state["stage"]["kl_ctl"])
        ctx["skipped"] = state.get("skipped_steps", 0)
        if acc.is_main_process:
            keep_samples_until(run_dir / "samples.jsonl", start)
        console.print(f"[bold]resumed[/] from {checkpoint} at iteration {start}")
    metrics = MetricsLog(run_dir, resume_step=start) if acc.is_main_process else None
    console.print(
        f"[bold]ppo[/]: policy {policy_dir}, reward model {scorer_dir}, value: {p.value_model}, "
        f"{len(prompts)} prompts, {iterations} iterations x {p.rollout_batch_size} rollouts; "
        f"prompts: {prompt_stats.describe()}"
    )
    order_gen = torch.Generator().manual_seed(t.seed)
    prompt_order = torch.randperm(len(prompts), generator=order_gen).tolist()
    started, first_score = time.perf_counter(), None
    schedule = SaveSchedule.for_run(t.save_every, t.save_every_minutes, iterations, time.monotonic())
    columns = (
        TextColumn("[bold]ppo"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    # SIGTERM/SIGINT only set a flag: checked after the rollout (nothing applied yet) and after each iteration
    with (
        Progress(*columns, console=console, disable=not acc.is_main_process) as progress,
        stop_on_signals() as stop,
    ):
        task = progress.add_task("ppo", total=iterations, completed=start, info="")
        for iteration in range(start, iterations):
            # prompt position is a function of the iteration, so a resumed run sees the same prompts
            first = iteration * p.rollout_batch_size
            chosen = [prompt_order[(first + i) % len(prompts)] for i in range(p.rollout_batch_size)]
            mine = [prompts[i] for i in chosen[acc.process_index :: acc.num_processes]]
            ro = rollout(ctx, mine, iteration)
            if stop_requested(stop, acc):
                stop_at(ctx, stop, iteration, metrics)
            stats = {**rollout_metrics(ro, kl_ctl.value), **update(ctx, ro, iteration)}
            if acc.num_processes > 1:  # means over every process's rollouts (the KL controller sees all)
                stats["score/sq_mean"] = (ro["scores"] ** 2).mean().item()
                stats = mean_across(acc, stats, len(mine))
                var = stats.pop("score/sq_mean") - stats["score/mean"] ** 2
                stats["score/std"] = math.sqrt(
                    max(var, 0.0) * p.rollout_batch_size / (p.rollout_batch_size - 1)
                )
            row = {"step": iteration + 1, **stats}
            if t.nan_policy == "skip":
                row["skipped_steps"] = ctx["skipped"]
            row["lr"] = scheduler.get_last_lr()[0]
            row["elapsed_s"] = time.perf_counter() - started
            kl_ctl.update(row["objective/kl"], p.rollout_batch_size)
            first_score = row["score/mean"] if first_score is None else first_score
            if metrics:
                metrics.add(row)
                with (run_dir / "samples.jsonl").open("a") as handle:
                    for i in range(min(p.log_samples, len(ro["texts"]))):
                        prompt = ro["prompts"][i].prompt
                        handle.write(
                            json.dumps(
                                {
                                    "iteration": iteration + 1,
                                    "prompt": prompt,
                                    "response": ro["texts"][i],
                                    "score": ro["scores"][i].item(),
                                    "kl": ro["kl"][i].sum().item(),
                                }
                            )
                            + "\n"
                        )
            progress.update(
                task,
                completed=iteration + 1,
                info=f"score {row['score/mean']:.3f} kl {row['objective/kl']:.3f}",
            )
            if iteration + 1 < iterations and schedule.due_now(iteration + 1, acc):
                save_checkpoint(acc, run_dir, iteration + 1, checkpoint_state(ctx), t.keep_last)
                schedule.saved(time.monotonic())
                if metrics:
                    metrics.flush()
            if stop_requested(stop, acc):
                stop_at(ctx, stop, iteration + 1, metrics)
    # from here a SIGTERM/SIGINT only sets a flag: the final models are saved whole, then the run stops
    with stop_on_signals() as stop:
        summary = finish_ppo(ctx, metrics, iterations, first_score, started, prompt_stats, ptx_stats, console)
        stopped = stop_requested(stop, acc)
    if stopped:
        raise StoppedBySignal(
            "ppo", run_dir, iterations, stop.name or "signal", run_dir / FINAL, final_save=True
        )
    return summary


def finish_ppo(
    ctx: dict[str, Any],
    metrics: MetricsLog | None,
    iterations: int,
    first_score: float | None,
    started: float,
    prompt_stats: Any,
    ptx_stats: DataStats,
    console: Console,
) -> dict[str, Any]:
    """Save the policy to final/ and the value model (or head) to final-value/, each renamed in once
    complete; write the summary and plot (bookkeeping: a failure there only warns); print the table."""
    acc, run_dir, kl_ctl = ctx["accelerator"], ctx["run_dir"], ctx["kl_ctl"]
    p, t = ctx["recipe"].ppo, ctx["recipe"].training
    final_dir = run_dir / FINAL
    unwrapped = acc.unwrap_model(ctx["actor"])
    full = acc.get_state_dict(ctx["actor"])  # every process joins: gathers ZeRO-3 / FSDP shards
    if acc.is_main_process:
        part = {  # "policy.x" -> "x": the policy's (or, under LoRA, its adapter's) own state dict
            name: {k[len(name) + 1 :]: v for k, v in full.items() if k.startswith(name + ".")}
            for name in ("policy", "value_model", "value_head")
        }
        save_final(
            final_dir, lambda d: save_model(unwrapped.policy, ctx["tokenizer"], d, state_dict=part["policy"])
        )
        if unwrapped.value_model is not None:
            value_tok, value_state = ctx["scorer_tokenizer"], part["value_model"]
            save_final(
                run_dir / "final-value",
                lambda d: save_model(unwrapped.value_model, value_tok, d, state_dict=value_state),
            )
        else:
            save_final(run_dir / "final-value", lambda d: torch.save(part["value_head"], d / "value_head.pt"))
        after_final(run_dir / "metrics.csv", final_dir, metrics.flush)
        plot, keys = run_dir / "metrics.png", ["score/mean", "objective/kl", "loss/policy", "loss/value"]
        after_final(plot, final_dir, lambda: plot_metrics(metrics, keys, plot))
        after_final(runs_root() / "latest.json", final_dir, lambda: record_output("ppo", final_dir))
    last = metrics.rows[-1] if metrics and metrics.rows else {}
    trainable, total = count_parameters(unwrapped)
    summary = {
        "stage": "ppo",
        "run_dir": str(run_dir),
        "final_model": str(final_dir),
        "iterations": iterations,
        "first_score": first_score,
        "last_score": last.get("score/mean"),
        "last_kl": last.get("objective/kl"),
        "kl_coef": kl_ctl.value,
        "elapsed_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
        "parameters_trainable": trainable,
        "parameters_total": total,
        "skipped_steps": ctx["skipped"],
        "data": {"prompts": prompt_stats.as_dict(), **({"ptx": ptx_stats.as_dict()} if p.ptx_data else {})},
    }
    if acc.is_main_process:
        after_final(run_dir / "summary.json", final_dir, lambda: write_summary(run_dir, summary))
        print_table(
            "align ppo: summary",
            [
                ("iterations", iterations),
                ("score (first iteration)", first_score),
                ("score (last iteration)", summary["last_score"]),
                ("KL to reference (last)", summary["last_kl"]),
                ("kl_coef (final)", kl_ctl.value),
                ("prompts", prompt_stats.describe()),
                *([("ptx examples", ptx_stats.describe())] if p.ptx_data else []),
                *(
                    [("skipped updates (non-finite)", ctx["skipped"])]
                    if t.nan_policy == "skip" or ctx["skipped"]
                    else []
                ),
                ("peak memory (MB)", summary["peak_memory_mb"]),
                ("elapsed (s)", summary["elapsed_s"]),
                ("final model", str(final_dir)),
            ],
            console,
        )
    return summary


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
