"""`align grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), and Dr. GRPO.

No value model: each prompt's G samples are their own baseline. Per iteration the policy samples G
responses per prompt, the reward model scores them, and each sample's advantage is its reward against
its group's (``losses.group_advantages``: (r - mean) / (std + eps), or r - mean with
``grpo.scale_rewards: false``, Dr. GRPO). The loss (``losses.grpo_loss``) is PPO's clipped surrogate per
token with that advantage, plus beta times the k3 estimate of KL(pi || pi_ref) per token, reduced as
``grpo.loss_type`` says. beta 0 drops the KL term and loads no reference model.

The shared loop (sampling, log-probs at the sampling temperature, mini-batch updates, metrics) is
``align_cli.group_core``; the stage around it is ``align_cli.group_stage``.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console

from align_cli import losses as L
from align_cli.engine.resume import Resume
from align_cli.group_core import GroupSettings
from align_cli.group_stage import group_memory_plan, run_group_stage
from align_cli.memory import MemoryPlan
from align_cli.recipe import Recipe


class GRPO:
    """GRPO's advantages and loss (a ``group_core.GroupAlgorithm``)."""

    def __init__(
        self,
        group_size: int,
        scale_rewards: bool,
        epsilon: float,
        beta: float,
        loss_type: str,
        max_new_tokens: int,
    ) -> None:
        self.group_size, self.scale_rewards, self.epsilon = group_size, scale_rewards, epsilon
        self.beta, self.loss_type, self.max_new_tokens = beta, loss_type, max_new_tokens

    def advantages(self, ro: dict[str, Any], acc: Any) -> tuple[torch.Tensor, dict[str, float]]:
        adv = L.group_advantages(ro["scores"], self.group_size, scale=self.scale_rewards)
        return adv, {}

    def loss(
        self, logps: torch.Tensor, mb: dict[str, torch.Tensor], global_tokens: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = L.grpo_loss(
            logps,
            mb["old_logps"],
            mb["advantages"],
            mb["mask"],
            self.epsilon,
            beta=self.beta,
            ref_logprobs=mb["ref_logps"],
            loss_type=self.loss_type,
            max_completion_length=self.max_new_tokens,  # Dr. GRPO's constant: the generation budget
            num_tokens=global_tokens,
        )
        return loss, {f"policy/{k}": v for k, v in stats.items()}


def settings(recipe: Recipe) -> tuple[GroupSettings, GRPO]:
    g = recipe.grpo
    shared = GroupSettings(
        stage="grpo",
        group_size=g.num_generations,
        prompts_per_iteration=g.prompts_per_iteration,
        prompts_per_batch=g.prompts_per_batch,
        mini_batch_size=g.mini_batch_size,
        num_iterations=g.num_iterations,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        beta=g.beta,
        template=recipe.data.template,
        seed=recipe.training.seed,
        nan_keys={"grpo.beta": g.beta, "grpo.epsilon": g.epsilon, "grpo.scale_rewards": g.scale_rewards},
    )
    algorithm = GRPO(g.num_generations, g.scale_rewards, g.epsilon, g.beta, g.loss_type, g.max_new_tokens)
    return shared, algorithm


def run_grpo(recipe: Recipe, resume: bool | Resume = False, console: Console | None = None) -> dict[str, Any]:
    shared, algorithm = settings(recipe)
    return run_group_stage(recipe, recipe.grpo, shared, algorithm, resume, console)


def memory_plan(recipe: Recipe, config: Any, reward_config: Any = None) -> MemoryPlan:
    """`align plan`: the policy, the reference when grpo.beta > 0 (not under LoRA), the reward model."""
    return group_memory_plan(recipe, config, reward_config, recipe.grpo)


run = run_grpo  # the registry's face (align_cli/stages/__init__.py)
