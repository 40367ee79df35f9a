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

The losses are the pure functions of ``align_cli.losses``; this file wires them to the models: ``PPO``
does steps 1-6 for one iteration, driven by the stage (stages/ppo.py) and timed by ``make bench``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from align_cli import losses as L
from align_cli.actor_critic import ActorCritic, to_padded
from align_cli.data.collate import length_buckets, pad_collate
from align_cli.data.preference import collate_responses
from align_cli.data.prompts import Prompt
from align_cli.engine.distributed import for_generation, mean_across
from align_cli.engine.faults import fault_point
from align_cli.engine.nonfinite import NonFiniteError, check_finite
from align_cli.engine.run import Run
from align_cli.generation import SamplingParams, sample
from align_cli.models import load_causal_lm, load_reward_model, load_tokenizer
from align_cli.recipe import ModelSection, PPOSection, Recipe, RecipeError
from align_cli.reference import LiveReference, frozen_reference
from align_cli.scoring import score
from align_cli.vllm_engine import VllmRollouts


@dataclass
class PPOModels:
    """What PPO holds: the trained actor (policy + value), the frozen reference (None under LoRA: the
    adapters-off policy) and the reward model, each with its tokenizer."""

    tokenizer: Any
    actor: ActorCritic
    reference: nn.Module | None
    scorer: nn.Module
    scorer_tokenizer: Any


def load_models(recipe: Recipe, policy_dir: str, scorer_dir: str, tokenizer: Any) -> PPOModels:
    p = recipe.ppo
    policy_section = ModelSection(**{**vars(recipe.model), "name_or_path": policy_dir})
    policy = load_causal_lm(policy_section, tokenizer)
    reference = frozen_reference(policy_section, tokenizer=tokenizer)  # LoRA: None, the policy's base
    scorer_tokenizer = load_tokenizer(ModelSection(name_or_path=scorer_dir))
    scorer = load_reward_model(ModelSection(name_or_path=scorer_dir), scorer_tokenizer.pad_token_id).eval()
    scorer.requires_grad_(False)
    value_model = None
    if p.value_model == "reward_model":
        if scorer_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise RecipeError("ppo.value_model=reward_model needs the policy's tokenizer; use policy_head")
        # under LoRA the value model trains adapters too (and its whole scalar head)
        value_section = ModelSection(
            name_or_path=scorer_dir,
            lora=recipe.model.lora,
            gradient_checkpointing=recipe.model.gradient_checkpointing,
            disable_dropout=recipe.model.disable_dropout,
        )
        value_model = load_reward_model(value_section, scorer_tokenizer.pad_token_id)
    return PPOModels(tokenizer, ActorCritic(policy, value_model), reference, scorer, scorer_tokenizer)


def apply_or_skip(
    run: Run, p: PPOSection, loss: torch.Tensor, grad_norm: Any, iteration: int, prompts: list[Prompt]
) -> bool:
    """The NaN guard of one update: True to apply it; False when ``training.nan_policy: skip`` drops it;
    by default a NaN/inf loss or gradient ends the run naming the mini-batch's prompts (file:line) and
    the recipe keys that can cause it."""
    try:
        check_finite(float(loss.detach()), float(grad_norm), f"ppo iteration {iteration + 1}", run.acc.scaler)
    except NonFiniteError as exc:
        keys = {"ppo.temperature": p.temperature, "ppo.kl_coef": p.kl_coef, "ppo.vf_coef": p.vf_coef}
        keys |= {"ppo.score_clip": p.score_clip, **({"ppo.ptx_coef": p.ptx_coef} if p.ptx_data else {})}
        run.non_finite(exc, [x.where for x in prompts], keys, "prompts")
        return False
    return True


class PPO:
    """Rollouts and updates of one PPO run: the stage's loop (``run_ppo``) and the bench drive it."""

    def __init__(self, recipe: Recipe, models: PPOModels, run: Run, ptx: list | None = None) -> None:
        p = self.p = recipe.ppo
        self.recipe, self.models, self.run, self.ptx = recipe, models, run, ptx or []
        self.engine: VllmRollouts | None = None  # ppo.backend vllm: the stage sets it
        acc = self.acc = run.acc
        updates = p.ppo_epochs * -(-p.rollout_batch_size // p.mini_batch_size)  # optimizer steps each
        self.actor, self.optimizer, self.scheduler = run.prepare(
            models.actor, run.total * updates, p.mini_batch_size // acc.num_processes
        )
        for frozen in (models.reference, models.scorer):
            if frozen is not None:
                frozen.to(acc.device)
        self.kl_ctl = (
            L.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
            if p.adaptive_kl
            else L.FixedKLController(p.kl_coef)
        )
        run.get_state = lambda: {"kl_ctl": self.kl_ctl.state_dict()}
        run.set_state = lambda state: self.kl_ctl.load_state_dict(state["kl_ctl"])

    # ------------------------------------------------------------------ steps 1-4: one rollout

    @torch.no_grad()
    def rollout(self, prompts: list[Prompt], iteration: int) -> dict[str, Any]:
        """Sample, score, shape the rewards, estimate advantages."""
        p, tok, actor, acc = self.p, self.models.tokenizer, self.actor, self.acc
        params = SamplingParams(
            n=1,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=self.recipe.training.seed * 100_003 + iteration,
            prompts_per_batch=len(prompts),
        )
        prompt_ids = [x.ids(self.recipe.data.template, tok) for x in prompts]
        timer = self.run.timer
        with timer("generation"), for_generation(acc, actor) as (unwrapped, synced):  # ZeRO-3 / FSDP
            if self.engine is not None:  # ppo.backend vllm
                samples = self.engine.sample(unwrapped.policy, prompt_ids, params, acc.process_index)
            else:
                first, policy = acc.process_index, unwrapped.policy
                samples = sample(policy, tok, prompt_ids, params, first_batch=first, synced_gpus=synced)
        examples = [
            {"prompt_ids": s.prompt_ids, "responses": [s.response_ids], "margin": None} for s in samples
        ]
        collated = collate_responses(examples, tok.pad_token_id)
        batch = {k: collated[k].to(acc.device) for k in ("input_ids", "attention_mask", "labels")}
        row_lengths = (collated["last_index"] + 1).tolist()  # prompt + response, on the host: no sync
        lengths = torch.tensor([len(s.response_ids) for s in samples], device=batch["input_ids"].device)
        mask = to_padded(torch.ones(int(lengths.sum()), device=lengths.device), lengths)
        with timer("old_policy"):
            actor.eval()
            logps, values, _ = actor(**batch, buckets=collated["buckets"], temperature=p.temperature)
            actor.train()
        with timer("reference"):
            ref_logps = self.reference_logprobs(batch, collated["buckets"])
        texts = [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        ended = [s.finished for s in samples]
        finished = torch.tensor(ended, device=mask.device)
        m, template = self.models, self.recipe.data.template
        with timer("reward"):
            raw = torch.tensor(
                score(m.scorer, m.scorer_tokenizer, prompts, texts, template, ended), device=mask.device
            )
        scores = L.shape_scores(raw, finished, p.missing_eos_penalty, p.score_clip, p.score_norm)
        old_logps, ref_logps, old_values = (to_padded(x, lengths) for x in (logps, ref_logps, values))
        rewards, kl = L.per_token_rewards(
            scores, old_logps, ref_logps, mask, self.kl_ctl.value, p.kl_estimator
        )
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
        self, batch: dict[str, torch.Tensor], buckets: list[tuple[list[int], int]] | None = None
    ) -> torch.Tensor:
        """log pi_ref of the response tokens [N]: the frozen SFT model, or under LoRA the policy itself
        with its adapters disabled (its base weights are the SFT weights: no second copy in memory). Scored
        as the policy is: at the sampling temperature and under the same autocast, so the KL at identical
        weights is 0."""
        live = LiveReference(self.acc, self.models.reference, self.p.temperature, lambda actor: actor.policy)
        return live.token_logprobs(self.actor, {**batch, "buckets": buckets})

    # ------------------------------------------------------------------ step 5: updates on one rollout

    def ptx_batch(self, iteration: int, index: int) -> dict[str, torch.Tensor] | None:
        """A deterministic batch of the PPO-ptx data for this optimizer step (each process its own slice)."""
        if not self.ptx:
            return None
        size, acc = self.p.ptx_batch_size, self.acc
        start = (((iteration * 1000 + index) * acc.num_processes + acc.process_index) * size) % len(self.ptx)
        chosen = [self.ptx[(start + i) % len(self.ptx)] for i in range(size)]
        batch = pad_collate(chosen, self.models.tokenizer.pad_token_id)
        return {k: v.to(acc.device) for k, v in batch.items()}

    def update(self, ro: dict[str, Any], iteration: int) -> dict[str, float]:
        """ppo_epochs passes of mini-batch updates on one rollout; returns mean statistics."""
        p, acc, actor = self.p, self.acc, self.actor
        n = ro["mask"].shape[0]
        mini = p.mini_batch_size // acc.num_processes  # mini_batch_size counts rollouts of all processes
        gen = torch.Generator().manual_seed(self.recipe.training.seed * 7919 + iteration)
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
                    ro[k][rows][:, :width]
                    for k in ("mask", "old_logps", "old_values", "advantages", "returns")
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
                extra = self.ptx_batch(iteration, steps)
                if extra is not None and p.ptx_coef > 0:
                    # the LM loss on data is at temperature 1; through the wrapper, for DDP
                    ptx_logps, _, _ = actor(**extra, with_values=False)
                    ptx_loss = -ptx_logps.mean()
                    loss = loss + p.ptx_coef * ptx_loss
                    stats["loss/ptx"] = ptx_loss
                acc.backward(loss)
                if steps == 0:
                    fault_point("step", iteration + 1)
                max_norm = self.recipe.training.max_grad_norm or float("inf")
                stats["grad_norm"] = acc.clip_grad_norm_(actor.parameters(), max_norm)
                prompts = [ro["prompts"][r] for r in rows]
                if not apply_or_skip(self.run, p, loss, stats["grad_norm"], iteration, prompts):
                    continue
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + float(torch.as_tensor(v).detach())
                steps += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}

    def iteration(self, prompts: list[Prompt], iteration: int) -> tuple[dict[str, Any], dict[str, float]]:
        """One rollout and its updates (a requested stop is answered between the two); the statistics
        are means over every process's rollouts, as the KL controller must see them; ``time/<section>_s``
        are this process's own."""
        timer = self.run.timer
        timer.begin()
        ro = self.rollout(prompts, iteration)
        if self.run.stop_requested():  # nothing applied yet: the checkpoint is the previous iteration's
            self.run.stop_here(iteration)
        with timer("update"):
            updated = self.update(ro, iteration)
        stats = {**rollout_metrics(ro, self.kl_ctl.value), **updated}
        if self.acc.num_processes > 1:
            stats["score/sq_mean"] = (ro["scores"] ** 2).mean().item()
            stats = mean_across(self.acc, stats, len(prompts))
            var, n = stats.pop("score/sq_mean") - stats["score/mean"] ** 2, self.p.rollout_batch_size
            stats["score/std"] = math.sqrt(max(var, 0.0) * n / (n - 1))
        self.kl_ctl.update(stats["objective/kl"], self.p.rollout_batch_size)
        return ro, stats | timer.row()


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
