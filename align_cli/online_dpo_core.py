"""Online DPO: preference pairs drawn from the current policy every iteration, labelled by a reward.

Each iteration:
  1. sample:    n samples of every prompt from the policy at the recipe's temperature;
  2. score:     r(x, y) of every sample through ONE call, ``score_samples`` (a ``rewards.RewardSource``);
  3. pair:      per prompt the best against the worst sample (``best_of_n.best_worst_pair``); a prompt whose
                samples all score the same gives no pair (counted: ``pairs/skipped_tied``);
  4. reference: log pi_ref(y|x) of every paired response, once per iteration (pi_ref: the starting policy,
                frozen; under LoRA the policy with its adapters off);
  5. update:    ``num_epochs`` passes over the pairs in shuffled mini-batches, one optimizer step each,
                minimising the DPO loss of the pairs (``losses.dpo_loss`` through ``stages.dpo``'s
                ``preference_loss``, the loss offline DPO uses).

The loss reads log-probs at temperature 1, as offline DPO: pi(y|x) is the model's own distribution; the
sampling temperature only decides which responses are drawn. Best-vs-worst of n is the pairing of
iterative / online DPO with a reward model (Xu et al. 2023; Guo et al. 2024 label pairs with an AI judge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from align_cli.best_of_n import best_worst_pair
from align_cli.data.prompts import Prompt
from align_cli.engine.faults import fault_point
from align_cli.engine.nonfinite import NonFiniteError, check_finite
from align_cli.engine.run import Run
from align_cli.generation import SamplingParams, sample
from align_cli.group_core import ScoreSamples
from align_cli.reference import LiveReference
from align_cli.sections import DPOSection
from align_cli.stages.dpo import make_collate, make_compute_loss
from align_cli.vllm_engine import VllmRollouts


@dataclass
class OnlineDPOSettings:
    """Plain settings of the loop, read from the recipe's ``online_dpo`` section."""

    num_generations: int  # samples per prompt
    prompts_per_iteration: int
    prompts_per_batch: int  # prompts per generate call
    mini_batch_size: int  # pairs per optimizer step
    num_epochs: int  # update passes over one iteration's pairs
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    loss: DPOSection  # beta, loss_type, label_smoothing: what ``preference_loss`` reads
    template: str  # data.template
    seed: int  # training.seed

    def optimizer_steps(self) -> int:
        """The most optimizer steps of one iteration (every prompt gives a pair)."""
        return self.num_epochs * -(-self.prompts_per_iteration // self.mini_batch_size)


def make_pairs(
    group_of: list[int], scores: list[float], texts: list[str], prompts: int
) -> tuple[list[tuple[int, int]], int]:
    """(pairs, ties): for each of ``prompts`` prompts the (best, worst) sample indices among its samples
    (``group_of[i]``: the prompt of sample i); ``ties``: prompts whose samples gave no pair."""
    members: list[list[int]] = [[] for _ in range(prompts)]
    for i, p in enumerate(group_of):
        members[p].append(i)
    pairs, ties = [], 0
    for idx in members:
        pair = best_worst_pair([scores[i] for i in idx], [texts[i] for i in idx])
        if pair is None:
            ties += 1
        else:
            pairs.append((idx[pair[0]], idx[pair[1]]))
    return pairs, ties


class OnlineDPO:
    """Samples, pairs and DPO updates of one online DPO run; the stage's loop drives ``iteration``."""

    def __init__(
        self,
        settings: OnlineDPOSettings,
        policy: nn.Module,
        reference: nn.Module | None,
        tokenizer: Any,
        score_samples: ScoreSamples,
        run: Run,
    ) -> None:
        self.s, self.tokenizer, self.score_samples, self.run = settings, tokenizer, score_samples, run
        acc = self.acc = run.acc
        self.model, self.optimizer, self.scheduler = run.prepare(
            policy, run.total * settings.optimizer_steps(), settings.mini_batch_size
        )
        self.reference = LiveReference(acc, reference.to(acc.device) if reference is not None else None)
        self.engine: VllmRollouts | None = None  # online_dpo.backend vllm: the stage sets it
        self.collate = make_collate(tokenizer.pad_token_id)
        self.compute_loss = make_compute_loss(settings.loss)  # reads each batch's ref_logps

    def _on_device(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        return {k: v.to(self.acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ steps 1-4: one rollout

    @torch.no_grad()
    def rollout(self, prompts: list[Prompt], iteration: int) -> dict[str, Any]:
        """Sample each prompt's n responses, score them, pair best with worst, attach log pi_ref."""
        s, tok = self.s, self.tokenizer
        params = SamplingParams(
            n=s.num_generations,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed * 100_003 + iteration,
            prompts_per_batch=min(s.prompts_per_batch, len(prompts)),
        )
        prompt_ids = [x.ids(s.template, tok) for x in prompts]
        timer = self.run.timer
        with timer("generation"):
            if self.engine is not None:  # online_dpo.backend vllm
                samples = self.engine.sample(self.acc.unwrap_model(self.model), prompt_ids, params)
            else:
                samples = sample(self.acc.unwrap_model(self.model), tok, prompt_ids, params)
        texts = [tok.decode(x.response_ids, skip_special_tokens=True) for x in samples]
        finished = [x.finished for x in samples]
        group_of = [x.prompt_index for x in samples]
        with timer("reward"):
            scores = self.score_samples([prompts[p] for p in group_of], texts, finished).total
        pairs, ties = make_pairs(group_of, scores, texts, len(prompts))
        examples = [
            {
                "prompt_ids": samples[w].prompt_ids,
                "responses": [samples[w].response_ids, samples[lo].response_ids],
            }
            | {"margin": None}
            for w, lo in pairs
        ]
        for start in range(0, len(examples), s.mini_batch_size):  # pi_ref does not change: once
            chunk = examples[start : start + s.mini_batch_size]
            # a pair's two rows share their prompt: it runs once (forward.prefix_logprobs)
            shared = [([2 * k, 2 * k + 1], len(e["prompt_ids"])) for k, e in enumerate(chunk)]
            with timer("reference"):
                ref = self.reference(self.model, self._on_device(chunk) | {"prefix_groups": shared})
            ref = ref.float().tolist()
            for k, example in enumerate(chunk):
                example["ref_logps"] = ref[2 * k : 2 * k + 2]
        return {
            "examples": examples,
            "pairs": [(prompts[group_of[w]], texts[w], texts[lo], scores[w], scores[lo]) for w, lo in pairs],
            "scores": scores,
            "finished": finished,
            "lengths": [len(x.response_ids) for x in samples],
            "ties": ties,
            "prompts": len(prompts),
        }

    # ------------------------------------------------------------------ step 5: DPO updates on the pairs

    def update(self, ro: dict[str, Any], iteration: int) -> dict[str, float]:
        """``num_epochs`` passes of mini-batch DPO steps over the iteration's pairs; mean statistics."""
        s, acc, model, examples = self.s, self.acc, self.model, ro["examples"]
        gen = torch.Generator().manual_seed(s.seed * 7919 + iteration)
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(s.num_epochs if examples else 0):
            order = torch.randperm(len(examples), generator=gen).tolist()
            for start in range(0, len(examples), s.mini_batch_size):
                rows = [examples[i] for i in order[start : start + s.mini_batch_size]]
                loss_sum, sums = self.compute_loss(model, self._on_device(rows))
                loss = loss_sum / len(rows)
                acc.backward(loss)
                if steps == 0:
                    fault_point("step", iteration + 1)
                grad_norm = acc.clip_grad_norm_(model.parameters(), self.run.t.max_grad_norm or float("inf"))
                if not self._finite(loss, grad_norm, iteration, ro, order[start : start + s.mini_batch_size]):
                    continue
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                # DPO's own figures (implicit rewards beta * log(pi / pi_ref), accuracy, log-probs) as dpo/...
                stats = {
                    "loss": loss,
                    "grad_norm": grad_norm,
                    **{f"dpo/{k}": v / len(rows) for k, v in sums.items()},
                }
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + float(torch.as_tensor(v).detach())
                steps += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}

    def _finite(self, loss: torch.Tensor, grad_norm: Any, iteration: int, ro: dict, rows: list[int]) -> bool:
        """The NaN guard: a NaN/inf loss or gradient ends the run naming the pairs' prompts (file:line), or
        with ``training.nan_policy: skip`` the update is dropped and counted."""
        try:
            where = f"online_dpo iteration {iteration + 1}"
            check_finite(float(loss.detach()), float(grad_norm), where, self.acc.scaler)
        except NonFiniteError as exc:
            keys = {"online_dpo.beta": self.s.loss.beta, "online_dpo.loss_type": self.s.loss.loss_type}
            self.run.non_finite(exc, [ro["pairs"][r][0].where for r in rows], keys, "prompts")
            self.optimizer.zero_grad(set_to_none=True)
            return False
        return True

    # ------------------------------------------------------------------ one iteration

    def iteration(self, prompts: list[Prompt], iteration: int) -> tuple[dict[str, Any], dict[str, float]]:
        """One rollout and its updates (a requested stop is answered between the two), with the
        iteration's ``time/<section>_s``."""
        timer = self.run.timer
        timer.begin()
        ro = self.rollout(prompts, iteration)
        if self.run.stop_requested():  # nothing applied yet: the checkpoint is the previous iteration's
            self.run.stop_here(iteration)
        with timer("update"):
            updated = self.update(ro, iteration)
        return ro, {**rollout_metrics(ro), **updated} | timer.row()


def rollout_metrics(ro: dict[str, Any]) -> dict[str, float]:
    """Reward mean and std over every sample; the mean reward of the chosen and of the rejected samples;
    pairs made and prompts skipped for a tie; response length and EOS rate."""
    scores, pairs = ro["scores"], ro["pairs"]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / max(len(scores) - 1, 1))
    stats = {
        "reward/mean": mean,
        "reward/std": std,
        "pairs": float(len(pairs)),
        "pairs/skipped_tied": float(ro["ties"]),
        "response/length": sum(ro["lengths"]) / len(ro["lengths"]),
        "response/eos_rate": sum(ro["finished"]) / len(ro["finished"]),
    }
    if pairs:
        stats["reward/chosen"] = sum(p[3] for p in pairs) / len(pairs)
        stats["reward/rejected"] = sum(p[4] for p in pairs) / len(pairs)
    return stats
