"""`align rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024), optionally with REINFORCE++'s batch
normalisation (Hu 2025).

No value model: a completion is one action. Per iteration the policy samples k responses per prompt;
each gets the reward with the KL penalty in it, R = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))
(``losses.kl_shaped_scores``, log-probs of the sampling policy at the sampling temperature), and is
baselined by the mean R of the prompt's other k - 1 samples (``losses.leave_one_out_advantages``);
``rloo.normalize: reinforce_pp`` then whitens the advantages over the whole batch of every process.

The loss (``losses.rloo_loss``) is REINFORCE on the sequence log-prob, -A log pi(y|x), written as a
clipped sequence ratio pi(y|x) / pi_old(y|x) as TRL's RLOO trainer does: on the first update of a batch
the ratio is 1 and the gradient is exactly REINFORCE's; later mini-batches and passes
(``rloo.num_iterations``) are off-policy, and the clip (``rloo.cliprange``) bounds how far they move.
beta 0 loads no reference model.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console

from align_cli import losses as L
from align_cli.engine.resume import Resume
from align_cli.group_core import GroupSettings, whiten_across
from align_cli.group_stage import group_memory_plan, run_group_stage
from align_cli.memory import MemoryPlan
from align_cli.recipe import Recipe


class RLOO:
    """RLOO's advantages and loss (a ``group_core.GroupAlgorithm``)."""

    def __init__(self, k: int, beta: float, cliprange: float, normalize: str) -> None:
        self.k, self.beta, self.cliprange, self.normalize = k, beta, cliprange, normalize

    def advantages(self, ro: dict[str, Any], acc: Any) -> tuple[torch.Tensor, dict[str, float]]:
        scores, metrics = ro["scores"], {}
        if self.beta > 0:
            scores, _ = L.kl_shaped_scores(scores, ro["old_logps"], ro["ref_logps"], ro["mask"], self.beta)
            metrics["objective/rlhf_reward"] = scores.mean().item()
        adv = L.leave_one_out_advantages(scores, self.k)
        if self.normalize == "reinforce_pp":
            adv = whiten_across(acc, adv, L.normalize_batch)
        return adv, metrics

    def loss(
        self, logps: torch.Tensor, mb: dict[str, torch.Tensor], global_tokens: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = L.rloo_loss(logps, mb["old_logps"], mb["advantages"], mb["mask"], self.cliprange)
        return loss, {f"policy/{k}": v for k, v in stats.items()}


def settings(recipe: Recipe) -> tuple[GroupSettings, RLOO]:
    r = recipe.rloo
    shared = GroupSettings(
        stage="rloo",
        group_size=r.k,
        prompts_per_iteration=r.prompts_per_iteration,
        prompts_per_batch=r.prompts_per_batch,
        mini_batch_size=r.mini_batch_size,
        num_iterations=r.num_iterations,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        beta=r.beta,
        template=recipe.data.template,
        seed=recipe.training.seed,
        nan_keys={"rloo.beta": r.beta, "rloo.cliprange": r.cliprange, "rloo.normalize": r.normalize},
    )
    return shared, RLOO(r.k, r.beta, r.cliprange, r.normalize)


def run_rloo(recipe: Recipe, resume: bool | Resume = False, console: Console | None = None) -> dict[str, Any]:
    shared, algorithm = settings(recipe)
    return run_group_stage(recipe, recipe.rloo, shared, algorithm, resume, console)


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the policy, the reference when rloo.beta > 0 (not under LoRA), the reward model."""
    return group_memory_plan(recipe, config, reward_config, recipe.rloo)


run = run_rloo  # the registry's face (align_cli/stages/__init__.py)
