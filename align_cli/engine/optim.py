"""The optimizer and the learning-rate schedule every stage trains with."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from align_cli.recipe import TrainingSection


def build_optimizer(model: torch.nn.Module, t: TrainingSection) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit); no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": t.lr, "betas": tuple(t.adam_betas), "eps": t.adam_eps}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    if t.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if not torch.cuda.is_available():
        raise ValueError(
            "training.optimizer: paged_adamw_8bit pages optimizer state between GPU and CPU and needs "
            "a GPU; use adamw_8bit"
        )
    return bnb.optim.PagedAdamW8bit(groups, **kwargs)


def lr_factor(step: int, scheduler: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """The multiple of training.lr at ``step``: linear warmup from 0 over ``warmup`` steps, then constant,
    linear decay to 0, or half a cosine down to ``min_ratio`` at ``total`` (Llama 2: 0.1). The same numbers
    as transformers' get_*_schedule_with_warmup, whose module costs every command seconds of imports
    (transformers.trainer_utils pulls in peft)."""
    if step < warmup:
        return step / max(1, warmup)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, cosine * (1 - min_ratio) + min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingSection, total_steps: int) -> Any:
    warmup = max(t.warmup_steps, math.ceil(t.warmup_ratio * total_steps))
    factor = partial(
        lr_factor, scheduler=t.scheduler, warmup=warmup, total=total_steps, min_ratio=t.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_training_settings(optimizer: torch.optim.Optimizer, scheduler: Any, t: TrainingSection) -> None:
    """Put the recipe's lr, betas, eps and weight decay back into the optimizer and scheduler after a
    checkpoint restored theirs: a resume with changed values uses them from its next step, at the
    schedule's current position (the schedule's shape is the recipe's already). Unchanged values give
    the same numbers the checkpoint held."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper holds the LambdaLR
    inner.base_lrs = [t.lr for _ in inner.base_lrs]
    lrs = [base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
    decays = (t.weight_decay, 0.0)  # build_optimizer's groups: decayed weights, then biases and norms
    for group, lr, decay in zip(optimizer.param_groups, lrs, decays):
        group.update(lr=lr, initial_lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=decay)
    inner._last_lr = lrs
