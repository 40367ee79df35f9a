"""The one training loop every stage uses.

A stage hands over a ``StageSpec``: the trainable model, tokenized examples, a collate function and
``compute_loss(model, batch) -> (loss_sum, metric_sums)``. Losses and metrics are *sums* over the
batch's weight units (supervised tokens for SFT, pairs for DPO); the loop divides by the units of
the whole optimizer step across all micro-batches and processes, so micro-batch x accumulation x
processes never changes the update. Precision, devices, distribution (accelerate), clipping,
scheduling, evaluation, checkpoints, metrics and progress all live here, once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
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

from align_cli.data.collate import plan_epoch, shard
from align_cli.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from align_cli.engine.metrics import MetricsLog
from align_cli.recipe import TrainingSection

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclass
class StageSpec:
    name: str
    model: torch.nn.Module
    train_examples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    # collate returns tensors plus two ints: "units" (what the loss is a sum over, e.g. supervised
    # tokens or pairs) and "tokens" (non-pad tokens, for throughput)
    compute_loss: LossFn
    eval_examples: list[dict[str, Any]] = field(default_factory=list)
    # stage state saved in checkpoints (e.g. a KL controller): get() -> dict, set(dict)
    get_state: Callable[[], dict[str, Any]] = dict
    set_state: Callable[[dict[str, Any]], None] = lambda state: None


def make_accelerator(precision: str, cpu: bool = False) -> Accelerator:
    from accelerate.state import AcceleratorState, GradientState

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # accelerate keeps one global state per process; stages run one after another in one process
    # (pipeline, tests) may each pick their own precision. The process group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # the scheduler is stepped once per optimizer step, not once per process
    return Accelerator(mixed_precision=mixed, cpu=cpu, step_scheduler_with_optimizer=False)


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


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingSection, total_steps: int) -> Any:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = max(t.warmup_steps, math.ceil(t.warmup_ratio * total_steps))
    if t.scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total_steps, min_lr_rate=t.min_lr_ratio
        )
    if t.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Runs a StageSpec to completion (or to ``max_steps``), resumable from checkpoints."""

    def __init__(
        self,
        spec: StageSpec,
        t: TrainingSection,
        run_dir: Path,
        accelerator: Accelerator,
        group_by_length: bool = True,
        console: Console | None = None,
    ) -> None:
        self.spec, self.t, self.run_dir, self.acc = spec, t, run_dir, accelerator
        self.group_by_length = group_by_length
        self.console = console or Console()
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.lengths = [e["length"] for e in spec.train_examples]
        self.steps_per_epoch = len(self._plan(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{spec.name}: no training examples left after filtering")
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        t = self.t
        return plan_epoch(
            self.lengths, t.micro_batch_size, t.grad_accum, self.world, t.seed, epoch, self.group_by_length
        )

    # ------------------------------------------------------------------ pieces of a step

    def _micro_batches(self, micro: list[list[int]], examples: list[dict]) -> list[dict[str, torch.Tensor]]:
        return [
            _to_device(
                self.spec.collate([examples[i] for i in shard(m, self.rank, self.world)]), self.acc.device
            )
            for m in micro
        ]

    def _sum_across(self, values: list[torch.Tensor | float]) -> torch.Tensor:
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.acc.device) for v in values]
        )
        return self.acc.reduce(stacked, "sum") if self.world > 1 else stacked

    def train_step(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward/backward over a step's micro-batches; loss normalised by the step's total units."""
        units = self._sum_across([sum(b["units"] for b in batches)])[0].item()
        scale = self.world / max(units, 1e-12)  # DDP averages gradients over processes
        loss_sum = torch.zeros((), device=self.acc.device, dtype=torch.float64)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with nullcontext() if last or self.world == 1 else self.acc.no_sync(model):
                loss, metrics = self.spec.compute_loss(model, batch)
                self.acc.backward(loss * scale)
            loss_sum += loss.detach().double()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + torch.as_tensor(v).detach().double()
            tokens += batch["tokens"]
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm else float("inf")
        grad_norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
        keys = list(metric_sums)
        totals = self._sum_across([loss_sum, tokens, *[metric_sums[k] for k in keys]]).tolist()
        row = {"loss": totals[0] / units, "grad_norm": float(grad_norm), "tokens": int(totals[1])}
        row |= {k: v / units for k, v in zip(keys, totals[2:])}
        if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
            raise NonFiniteError(
                f"non-finite {'loss' if not math.isfinite(row['loss']) else 'gradient norm'} "
                f"(loss={row['loss']}, grad_norm={row['grad_norm']}); the update was not applied"
            )
        return row

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        examples = self.spec.eval_examples
        if not examples:
            return {}
        model.eval()
        size = self.t.micro_batch_size * self.world
        order = sorted(range(len(examples)), key=lambda i: -examples[i]["length"])
        usable = len(order) - len(order) % self.world or len(order)
        loss_sum, units, metric_sums = 0.0, 0.0, {}
        for start in range(0, usable, size):
            chunk = order[start : start + size]
            mine = shard(chunk, self.rank, self.world)
            if not mine:
                continue
            batch = _to_device(self.spec.collate([examples[i] for i in mine]), self.acc.device)
            loss, metrics = self.spec.compute_loss(model, batch)
            loss_sum += loss.double()
            units += batch["units"]
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + torch.as_tensor(v).double()
        model.train()
        keys = list(metric_sums)
        totals = self._sum_across([loss_sum, units, *[metric_sums[k] for k in keys]]).tolist()
        row = {"eval/loss": totals[0] / max(totals[1], 1e-12)}
        row |= {f"eval/{k}": v / max(totals[1], 1e-12) for k, v in zip(keys, totals[2:])}
        return row

    # ------------------------------------------------------------------ the loop

    def run(self, resume: bool = False) -> dict[str, Any]:
        t, acc, spec = self.t, self.acc, self.spec
        set_seed(t.seed)
        optimizer = build_optimizer(spec.model, t)
        scheduler = build_scheduler(optimizer, t, self.total_steps)
        model, optimizer, scheduler = acc.prepare(spec.model, optimizer, scheduler)
        step = 0
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            state = load_checkpoint(acc, checkpoint)
            step = state["step"]
            spec.set_state(state.get("stage", {}))
            if acc.is_main_process:
                self.console.print(f"[bold]resumed[/] from {checkpoint} at step {step}")
        metrics = MetricsLog(self.run_dir, resume_step=step) if acc.is_main_process else None
        last_saved = step
        model.train()
        started = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        first_loss, total_tokens = None, 0
        progress = Progress(
            TextColumn(f"[bold]{spec.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not acc.is_main_process,
            transient=False,
        )
        with progress:
            task = progress.add_task(spec.name, total=self.total_steps, completed=step, info="", rate="")
            while step < self.total_steps:
                epoch, index = divmod(step, self.steps_per_epoch)
                for micro in self._plan(epoch)[index:]:
                    batches = self._micro_batches(micro, spec.train_examples)
                    row = self.train_step(model, batches)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    window_tokens += row["tokens"]
                    total_tokens += row["tokens"]
                    first_loss = row["loss"] if first_loss is None else first_loss
                    if step % t.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        row |= {
                            "step": step,
                            "epoch": round(step / self.steps_per_epoch, 4),
                            "lr": scheduler.get_last_lr()[0],
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "elapsed_s": now - started,
                        }
                        window_tokens, window_start = 0, now
                        if t.eval_every and step % t.eval_every == 0:
                            row |= self.evaluate(model)
                        if metrics:
                            metrics.add({"step": row.pop("step"), **row})
                        progress.update(
                            task, info=f"loss {row['loss']:.4f}", rate=f"{row['tokens_per_s']:.0f} tok/s"
                        )
                    elif t.eval_every and step % t.eval_every == 0 and metrics:
                        metrics.add({"step": step, **self.evaluate(model)})
                    progress.update(task, completed=step)
                    if t.save_every and step % t.save_every == 0 and step < self.total_steps:
                        save_checkpoint(acc, self.run_dir, step, {"stage": spec.get_state()}, t.keep_last)
                        last_saved = step
                        if metrics:
                            metrics.flush()
                    if step >= self.total_steps:
                        break
        final_eval = self.evaluate(model)
        if metrics and final_eval:
            metrics.add({"step": step, "final": True, **final_eval})
        if metrics:
            metrics.flush()
        elapsed = time.perf_counter() - started
        return {
            "model": model,
            "steps": step,
            "first_loss": first_loss,
            "metrics": metrics,
            "final_eval": final_eval,
            "elapsed_s": elapsed,
            "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "last_checkpoint_step": last_saved,
        }
