"""The on-policy loop that GRPO and RLOO share: groups of samples per prompt, no value model.

Each iteration:
  1. sample:  G samples of every prompt from the policy at the recipe's temperature (full distribution);
  2. score:   r(x, y) of every sample through ONE call, ``score_samples(prompts, completions, finished)``,
              which returns the total and each reward source's values (logged as reward/<source>);
  3. log-probs: log pi_old of the sampled tokens at the same temperature, and log pi_ref only when the
              KL coefficient is > 0 (beta 0 loads no reference model at all);
  4. advantages: the algorithm's, from each prompt's group (GRPO: group mean/std; RLOO: leave-one-out);
  5. update:  ``num_iterations`` passes over the samples in shuffled mini-batches, one optimizer step each,
              minimising the algorithm's loss (its ratios are pi / pi_old, the pi_old of step 3).

What differs between the algorithms (advantages, loss) is a ``GroupAlgorithm``, defined with its stage
(stages/grpo.py, stages/rloo.py); what they share (sampling, log-probs, updates, NaN guard, metrics
reduced over processes) is ``GroupPolicyGradient``. Under several processes each process samples whole
groups of its own prompts, so a group's advantages never need another process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from align_cli.actor_critic import to_padded
from align_cli.data.collate import length_buckets
from align_cli.data.preference import collate_responses
from align_cli.data.prompts import Prompt
from align_cli.engine.distributed import for_generation, mean_across
from align_cli.engine.faults import fault_point
from align_cli.engine.nonfinite import NonFiniteError, check_finite
from align_cli.engine.run import Run
from align_cli.forward import per_token_by_bucket, response_logprobs, token_logprobs
from align_cli.generation import SamplingParams, sample
from align_cli.reference import LiveReference
from align_cli.rewards import Rewards
from align_cli.vllm_engine import VllmRollouts

# the one call site of scoring: r(x, y) of each (prompt, completion text, ended by itself) sample, the
# total and each source's own values (a ``rewards.RewardSource`` is one)
ScoreSamples = Callable[[list[Prompt], list[str], list[bool]], Rewards]


@dataclass
class GroupSettings:
    """Plain settings of the shared loop, read from the stage's recipe section."""

    stage: str  # "grpo" / "rloo": the recipe section, in messages
    group_size: int  # samples per prompt
    prompts_per_iteration: int  # over all processes
    prompts_per_batch: int  # prompts per generate call
    mini_batch_size: int  # samples over all processes per optimizer step
    num_iterations: int  # update passes over one iteration's samples
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    beta: float  # > 0: reference log-probs are computed
    template: str  # data.template
    seed: int  # training.seed
    nan_keys: dict[str, Any] = field(default_factory=dict)  # recipe keys named when a loss is NaN/inf

    def optimizer_steps(self) -> int:
        """Optimizer steps of one iteration."""
        samples = self.prompts_per_iteration * self.group_size
        return self.num_iterations * -(-samples // self.mini_batch_size)


class GroupAlgorithm(Protocol):
    """What GRPO and RLOO each define: advantages from a rollout, and the loss of a mini-batch."""

    def advantages(self, ro: dict[str, Any], acc: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(advantages [B] of this process's samples, metrics of the rollout)."""
        ...

    def loss(
        self, logps: torch.Tensor, mb: dict[str, torch.Tensor], global_tokens: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, stats) of a mini-batch: ``logps`` [b, T] of the policy now; ``mb`` holds the rollout's
        "old_logps", "ref_logps" (None when beta is 0), "advantages", "mask" of its rows; ``global_tokens``:
        the response tokens of this optimizer step over all processes, divided by their number."""
        ...


class GroupPolicyGradient:
    """Samples, scores and updates of one GRPO or RLOO run; the stage's loop drives ``iteration``."""

    def __init__(
        self,
        settings: GroupSettings,
        algorithm: GroupAlgorithm,
        policy: nn.Module,
        reference: nn.Module | None,
        tokenizer: Any,
        score_samples: ScoreSamples,
        run: Run,
    ) -> None:
        s = self.s = settings
        self.algorithm, self.tokenizer, self.score_samples, self.run = (
            algorithm,
            tokenizer,
            score_samples,
            run,
        )
        acc = self.acc = run.acc
        self.model, self.optimizer, self.scheduler = run.prepare(
            policy, run.total * s.optimizer_steps(), s.mini_batch_size // acc.num_processes
        )
        self.reference = reference.to(acc.device) if reference is not None else None
        self.engine: VllmRollouts | None = None  # backend vllm: the stage sets it

    # ------------------------------------------------------------------ steps 1-4: one rollout

    @torch.no_grad()
    def rollout(self, prompts: list[Prompt], iteration: int) -> dict[str, Any]:
        """Sample each prompt's group, score it, compute log-probs and the advantages."""
        s, tok, acc = self.s, self.tokenizer, self.acc
        per_batch = min(s.prompts_per_batch, len(prompts))
        params = SamplingParams(
            n=s.group_size,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed * 100_003 + iteration,
            prompts_per_batch=per_batch,
        )
        prompt_ids = [x.ids(s.template, tok) for x in prompts]
        # batches seeded by their global index: this process's prompts follow those of the processes before
        first = acc.process_index * -(-len(prompts) // per_batch)
        timer = self.run.timer
        with timer("generation"), for_generation(acc, self.model) as (unwrapped, synced):  # ZeRO-3 / FSDP
            if self.engine is not None:  # backend vllm
                samples = self.engine.sample(unwrapped, prompt_ids, params, first)
            else:
                samples = sample(unwrapped, tok, prompt_ids, params, first_batch=first, synced_gpus=synced)
        examples = [
            {"prompt_ids": x.prompt_ids, "responses": [x.response_ids], "margin": None} for x in samples
        ]
        collated = collate_responses(examples, tok.pad_token_id)
        batch = {k: collated[k].to(acc.device) for k in ("input_ids", "attention_mask", "labels")}
        device = batch["input_ids"].device
        lengths = torch.tensor([len(x.response_ids) for x in samples], device=device)
        mask = to_padded(torch.ones(int(lengths.sum()), device=device), lengths)
        # the group's samples share their prompt: it runs once in these inference passes
        scored = {**batch, "buckets": collated["buckets"], "prefix_groups": prefix_groups(samples)}
        with timer("old_policy"):
            self.model.eval()  # the distribution that sampled: same temperature, no dropout
            old = response_logprobs(self.model, scored, s.temperature)[0]
            self.model.train()
        ref = None
        if s.beta > 0:
            with timer("reference"):
                live = LiveReference(acc, self.reference, s.temperature)
                ref = to_padded(live.token_logprobs(self.model, scored), lengths)
        texts = [tok.decode(x.response_ids, skip_special_tokens=True) for x in samples]
        finished = [x.finished for x in samples]
        group_prompts = [prompts[x.prompt_index] for x in samples]
        with timer("reward"):
            rewards = self.score_samples(group_prompts, texts, finished)
        scores = torch.tensor(rewards.total, device=device, dtype=torch.float)
        ro = {
            "batch": batch,
            "row_lengths": (collated["last_index"] + 1).tolist(),  # prompt + response, on the host
            "lengths": lengths,
            "mask": mask,
            "old_logps": to_padded(old, lengths),
            "ref_logps": ref,
            "scores": scores,
            "rewards": rewards,
            "finished": torch.tensor(finished, device=device),
            "texts": texts,
            "prompts": group_prompts,
        }
        ro["advantages"], ro["metrics"] = self.algorithm.advantages(ro, acc)
        return ro

    # ------------------------------------------------------------------ step 5: updates on one rollout

    def update(self, ro: dict[str, Any], iteration: int) -> dict[str, float]:
        """``num_iterations`` passes of mini-batch updates on one rollout; returns mean statistics."""
        s, acc, model = self.s, self.acc, self.model
        n = len(ro["texts"])
        mini = s.mini_batch_size // acc.num_processes  # mini_batch_size counts samples of all processes
        gen = torch.Generator().manual_seed(s.seed * 7919 + iteration)
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(s.num_iterations):
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, mini):
                rows = order[start : start + mini]
                # the mini-batch cut to its own longest row, and run in length buckets: little padding
                row_lengths = [ro["row_lengths"][r] for r in rows]
                batch = {k: v[rows][:, : max(row_lengths)] for k, v in ro["batch"].items()}
                lengths = ro["lengths"][rows]
                width = int(lengths.max())
                mb = {k: ro[k][rows][:, :width] for k in ("mask", "old_logps")}
                mb["ref_logps"] = ro["ref_logps"][rows][:, :width] if ro["ref_logps"] is not None else None
                mb["advantages"] = ro["advantages"][rows]
                logps, entropy = per_token_by_bucket(
                    lambda sub: token_logprobs(model, sub, s.temperature, with_entropy=True),
                    batch,
                    length_buckets(row_lengths),
                )
                logps, entropy = to_padded(logps, lengths), to_padded(entropy, lengths)
                loss, stats = self.algorithm.loss(logps, mb, self._global_tokens(mb["mask"]))
                stats = {
                    "loss": loss,
                    **stats,
                    "policy/entropy": (entropy * mb["mask"]).sum() / mb["mask"].sum(),
                }
                acc.backward(loss)
                if steps == 0:
                    fault_point("step", iteration + 1)
                max_norm = self.run.t.max_grad_norm or float("inf")
                stats["grad_norm"] = acc.clip_grad_norm_(model.parameters(), max_norm)
                if not self._finite(loss, stats["grad_norm"], iteration, [ro["prompts"][r] for r in rows]):
                    continue
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + float(torch.as_tensor(v).detach())
                steps += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}

    def _global_tokens(self, mask: torch.Tensor) -> float:
        """Response tokens of this optimizer step over every process, divided by the number of processes
        (DDP averages the processes' gradients, so each divides its sum by this to divide by the total)."""
        count = mask.sum().to(torch.float64)
        if self.acc.num_processes > 1:
            count = self.acc.reduce(count, "sum") / self.acc.num_processes
        return float(count)

    def _finite(self, loss: torch.Tensor, grad_norm: Any, iteration: int, prompts: list[Prompt]) -> bool:
        """The NaN guard: True to apply the update; False when ``training.nan_policy: skip`` drops it; by
        default a NaN/inf loss or gradient ends the run naming the mini-batch's prompts (file:line)."""
        try:
            where = f"{self.s.stage} iteration {iteration + 1}"
            check_finite(float(loss.detach()), float(grad_norm), where, self.acc.scaler)
        except NonFiniteError as exc:
            keys = {f"{self.s.stage}.temperature": self.s.temperature, **self.s.nan_keys}
            self.run.non_finite(exc, [x.where for x in prompts], keys, "prompts")
            return False
        return True

    # ------------------------------------------------------------------ one iteration

    def iteration(self, prompts: list[Prompt], iteration: int) -> tuple[dict[str, Any], dict[str, float]]:
        """One rollout and its updates (a requested stop is answered between the two); the statistics are
        means over every process's samples (``time/<section>_s``: this process's own)."""
        timer = self.run.timer
        timer.begin()
        ro = self.rollout(prompts, iteration)
        if self.run.stop_requested():  # nothing applied yet: the checkpoint is the previous iteration's
            self.run.stop_here(iteration)
        with timer("update"):
            updated = self.update(ro, iteration)
        stats = {**rollout_metrics(ro, self.s.group_size), **ro["metrics"], **updated}
        if self.acc.num_processes > 1:
            n = len(ro["texts"])
            stats["reward/sq_mean"] = (ro["scores"] ** 2).mean().item()
            stats = mean_across(self.acc, stats, n)
            var, total = stats.pop("reward/sq_mean") - stats["reward/mean"] ** 2, n * self.acc.num_processes
            stats["reward/std"] = math.sqrt(max(var, 0.0) * total / (total - 1))
        return ro, stats | source_means(self.acc, ro["rewards"]) | timer.row()


def prefix_groups(samples: list[Any]) -> list[tuple[list[int], int]] | None:
    """(rows, prompt length) of each prompt's samples (``forward.prefix_logprobs``); None when no prompt
    has two samples (nothing to share)."""
    rows: dict[int, list[int]] = {}
    for row, x in enumerate(samples):
        rows.setdefault(x.prompt_index, []).append(row)
    if all(len(r) < 2 for r in rows.values()):
        return None
    return [(r, len(samples[r[0]].prompt_ids)) for r in rows.values()]


def rollout_metrics(ro: dict[str, Any], group_size: int) -> dict[str, float]:
    """Reward mean and std over the samples, the share of groups whose samples all scored the same (they
    carry no learning signal), response length and EOS rate; the sequence KL log(pi(y|x) / pi_ref(y|x))
    when reference log-probs were computed."""
    scores, mask = ro["scores"], ro["mask"]
    groups = scores.reshape(-1, group_size)
    stats = {
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "reward/frac_zero_std": (groups.max(1).values == groups.min(1).values).float().mean().item(),
        "response/length": mask.sum(-1).float().mean().item(),
        "response/eos_rate": ro["finished"].float().mean().item(),
    }
    if ro["ref_logps"] is not None:
        log_ratio = (ro["old_logps"] - ro["ref_logps"]) * mask
        stats["objective/kl"] = log_ratio.sum(-1).mean().item()
    return stats


def source_means(acc: Any, rewards: Rewards) -> dict[str, float]:
    """``reward/<source>``: each reward source's mean over the samples of every process it applied to
    (``Rewards.means`` of all of them; every process scores with the same sources, so the same keys)."""
    if acc.num_processes == 1:
        return rewards.means()
    sums = rewards.sums()
    values = torch.tensor([x for pair in sums.values() for x in pair], dtype=torch.float64, device=acc.device)
    totals = acc.reduce(values, "sum").tolist()
    return {
        f"reward/{name}": totals[2 * i] / totals[2 * i + 1]
        for i, name in enumerate(sums)
        if totals[2 * i + 1]
    }


def whiten_across(
    acc: Any, values: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``normalize`` applied to the values of every process together (e.g. REINFORCE++'s batch
    whitening); returns this process's part. Every process holds the same number of values."""
    if acc.num_processes == 1:
        return normalize(values)
    everything = normalize(acc.gather(values))
    n = values.shape[0]
    return everything[acc.process_index * n : (acc.process_index + 1) * n]
