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
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
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
from align_cli.data.formats import DataError
from align_cli.engine.checkpoint import SaveSchedule, latest_checkpoint, load_checkpoint, save_checkpoint
from align_cli.engine.distributed import configure_deepspeed
from align_cli.engine.faults import fault_point
from align_cli.engine.metrics import MetricsLog
from align_cli.engine.signals import StopFlag, StoppedBySignal, stop_on_signals, stop_requested
from align_cli.errors import AlignError
from align_cli.recipe import TrainingSection

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteError(AlignError, RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""

    def __init__(self, message: str, what: str = "loss") -> None:
        super().__init__(message)
        self.what = what  # "loss" or "gradient norm"


class _Interrupted(Exception):
    """A stop was requested in the middle of an evaluation."""


def last_good_checkpoint(run_dir: Path) -> str:
    """How to go on after a fatal error, for error messages."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return (
            "no checkpoint was saved before it (training.save_every and save_every_minutes set how often "
            "one is)"
        )
    return f"the last good checkpoint, {found}, is kept: fix the cause and add --resume"


def check_finite(loss: float, grad_norm: float, where: str, scaler: Any = None) -> None:
    """Raise NonFiniteError for a NaN/inf loss or gradient norm. With fp16 loss scaling (``scaler``) an
    inf gradient is the scaler's business: it skips that update and lowers the scale."""
    if not math.isfinite(loss):
        what = "loss"
    elif not math.isfinite(grad_norm) and scaler is None:
        what = "gradient norm"
    else:
        return
    raise NonFiniteError(
        f"{where}: non-finite {what} (loss={loss}, grad_norm={grad_norm}); the update was not applied", what
    )


def nan_context(wheres: list[str | None], settings: dict[str, Any], what: str = "records") -> str:
    """Where to look after a non-finite loss: the batch's records (file:line) and the recipe settings
    that can cause one (an lr too high, fp16 overflow, an extreme dpo.beta or margin...)."""
    unique = list(dict.fromkeys(w for w in wheres if w))
    more = f" and {len(unique) - 8} more" if len(unique) > 8 else ""
    named = f"{what}: {', '.join(unique[:8])}{more}; " if unique else ""
    keys = ", ".join(f"{key}={value}" for key, value in settings.items())
    return f"{named}recipe keys that can cause it: {keys}"


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
    # recipe settings of the loss (key -> value), named with training.lr and precision when it is NaN/inf
    loss_settings: dict[str, Any] = field(default_factory=dict)
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
    return Accelerator(
        mixed_precision=mixed, cpu=cpu or _launched_without_gpu(), step_scheduler_with_optimizer=False
    )


def _launched_without_gpu() -> bool:
    """Several processes (torchrun, accelerate launch) on a machine with no GPU: accelerate picks its
    gloo CPU backend only when told to use the CPU; otherwise every process would train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate.utils import is_npu_available, is_xpu_available

    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available())


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
            raise DataError(
                f"{spec.name}: no training examples left after filtering (every record was dropped; see "
                "the data line above for the reasons)"
            )
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

    def _stop_requested(self, stop: StopFlag | None) -> bool:
        return stop_requested(stop, self.acc)

    def train_step(
        self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], step: int | None = None
    ) -> dict[str, float]:
        """Forward/backward over a step's micro-batches; loss normalised by the step's total units.

        Raises NonFiniteError (before any update) for a NaN/inf loss or gradient norm."""
        units = sum(b["units"] for b in batches)  # host numbers: no device round trip on one process
        if self.world > 1:
            units = self._sum_across([units])[0].item()
        scale = self.world / max(units, 1e-12)  # DDP averages gradients over processes
        loss_sum = torch.zeros((), device=self.acc.device, dtype=torch.float64)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # DeepSpeed's engine accumulates until this flag is set, then steps (clipping included)
            self.acc.gradient_state._set_sync_gradients(last)
            with nullcontext() if last or self.world == 1 else self.acc.no_sync(model):
                loss, metrics = self.spec.compute_loss(model, batch)
                self.acc.backward(loss * scale)
            if i == 0 and step is not None:
                fault_point("step", step)
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
        check_finite(row["loss"], row["grad_norm"], f"step {step or '?'}", self.acc.scaler)
        return row

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, stop: StopFlag | None = None, step: int | None = None
    ) -> dict[str, float]:
        """Loss and metrics on the eval examples; with ``stop``, gives up after the batch during which a
        stop was requested (raising _Interrupted) so a signal is answered within one batch."""
        examples = self.spec.eval_examples
        if not examples:
            return {}
        model.eval()
        size = self.t.micro_batch_size * self.world
        order = sorted(range(len(examples)), key=lambda i: -examples[i]["length"])
        usable = len(order) - len(order) % self.world or len(order)
        loss_sum, units, metric_sums = 0.0, 0.0, {}
        for start in range(0, usable, size):
            if start > 0 and self._stop_requested(stop):  # checked on every process, batch by batch
                model.train()
                raise _Interrupted
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
            if start == 0 and step is not None:
                fault_point("eval", step)
        model.train()
        keys = list(metric_sums)
        totals = self._sum_across([loss_sum, units, *[metric_sums[k] for k in keys]]).tolist()
        row = {"eval/loss": totals[0] / max(totals[1], 1e-12)}
        row |= {f"eval/{k}": v / max(totals[1], 1e-12) for k, v in zip(keys, totals[2:])}
        return row

    # ------------------------------------------------------------------ the loop

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``total_steps``. SIGTERM/SIGINT only set a flag; at the next safe point (before a
        step's forward pass, after a step, after an eval batch) a checkpoint is saved and
        StoppedBySignal raised. A NaN/inf loss or gradient raises NonFiniteError, or with
        ``training.nan_policy: skip`` drops that update and counts it."""
        with stop_on_signals() as stop:
            return self._run(resume, stop)

    def _run(self, resume: bool, stop: StopFlag) -> dict[str, Any]:
        t, acc, spec = self.t, self.acc, self.spec
        set_seed(t.seed)
        optimizer = build_optimizer(spec.model, t)
        scheduler = build_scheduler(optimizer, t, self.total_steps)
        configure_deepspeed(acc, t.micro_batch_size)
        model, optimizer, scheduler = acc.prepare(spec.model, optimizer, scheduler)
        step, skipped, pending_eval = 0, 0, False
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            state = load_checkpoint(acc, checkpoint)
            apply_training_settings(optimizer, scheduler, t)
            step, skipped = state["step"], state.get("skipped_steps", 0)
            pending_eval = state.get("pending_eval", False)  # stopped in the middle of an evaluation
            spec.set_state(state.get("stage", {}))
            if acc.is_main_process:
                self.console.print(f"[bold]resumed[/] from {checkpoint} at step {step}")
        metrics = MetricsLog(self.run_dir, resume_step=step) if acc.is_main_process else None
        last_saved = step if checkpoint is not None else None
        model.train()
        started = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        total_tokens = 0
        first_loss = next((r["loss"] for r in metrics.rows if "loss" in r), None) if metrics else None
        schedule = SaveSchedule.for_run(
            t.save_every, t.save_every_minutes, self.total_steps, time.monotonic()
        )

        def save(at: int, pending: bool = False) -> Path:
            nonlocal last_saved
            state = {"stage": spec.get_state(), "skipped_steps": skipped, "pending_eval": pending}
            path = save_checkpoint(acc, self.run_dir, at, state, t.keep_last)
            last_saved = at
            schedule.saved(time.monotonic())
            if metrics:
                metrics.flush()
            return path

        def stop_here(at: int, pending: bool = False) -> None:
            reuse = last_saved == at and not pending and latest_checkpoint(self.run_dir) is not None
            path = latest_checkpoint(self.run_dir) if reuse else save(at, pending)
            raise StoppedBySignal(spec.name, self.run_dir, at, stop.name or "signal", path)

        def evaluate_or_stop(at: int, row: dict[str, Any] | None = None, final: bool = False) -> dict:
            try:
                return self.evaluate(model, stop, at)
            except _Interrupted:
                if metrics and row:  # the step's training row is kept; its eval runs on resume
                    metrics.add(row)
                stop_here(at, pending=not final)  # the final evaluation reruns on resume anyway
                raise  # unreachable: stop_here raises

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
            if pending_eval:
                eval_row = evaluate_or_stop(step)
                if metrics and eval_row:
                    metrics.add({"step": step, **eval_row})
            while step < self.total_steps:
                epoch, index = divmod(step, self.steps_per_epoch)
                for micro in self._plan(epoch)[index:]:
                    batches = self._micro_batches(micro, spec.train_examples)
                    fault_point("data", step + 1)
                    if self._stop_requested(stop):
                        stop_here(step)
                    try:
                        row = self.train_step(model, batches, step + 1)
                    except NonFiniteError as exc:
                        wheres = [spec.train_examples[i].get("where") for m in micro for i in m]
                        settings = {"training.lr": t.lr, "training.precision": t.precision}
                        context = nan_context(wheres, settings | spec.loss_settings)
                        if t.nan_policy != "skip":
                            message = f"{exc}; {context}; {last_good_checkpoint(self.run_dir)}"
                            raise NonFiniteError(message, exc.what) from exc
                        optimizer.zero_grad(set_to_none=True)  # the update is dropped, the data consumed
                        row = None
                        skipped += 1
                        if acc.is_main_process:
                            self.console.print(f"[yellow]skipped[/] {exc}; {context} (nan_policy: skip)")
                    else:
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    step += 1
                    eval_due = bool(t.eval_every) and step % t.eval_every == 0
                    if row is not None:
                        window_tokens += row["tokens"]
                        total_tokens += row["tokens"]
                        first_loss = row["loss"] if first_loss is None else first_loss
                    if row is None:  # a skipped update: logged, so the metric table counts it
                        if metrics:
                            metrics.add({"step": step, "skipped": 1, "skipped_steps": skipped})
                        if eval_due:
                            ev = evaluate_or_stop(step)
                            if metrics:
                                metrics.add({"step": step, **ev})
                    elif step % t.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        row |= {
                            "step": step,
                            "epoch": round(step / self.steps_per_epoch, 4),
                            "lr": scheduler.get_last_lr()[0],
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "elapsed_s": now - started,
                        }
                        if t.nan_policy == "skip":
                            row["skipped_steps"] = skipped
                        window_tokens, window_start = 0, now
                        if eval_due:
                            row |= evaluate_or_stop(step, row)
                        if metrics:
                            metrics.add({"step": row.pop("step"), **row})
                        progress.update(
                            task, info=f"loss {row['loss']:.4f}", rate=f"{row['tokens_per_s']:.0f} tok/s"
                        )
                    elif eval_due:
                        ev = evaluate_or_stop(step)
                        if metrics:
                            metrics.add({"step": step, **ev})
                    progress.update(task, completed=step)
                    if step < self.total_steps and schedule.due_now(step, acc):
                        save(step)
                    if self._stop_requested(stop):
                        stop_here(step)
                    if step >= self.total_steps:
                        break
            final_eval = evaluate_or_stop(step, final=True)
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
            "skipped_steps": skipped,
        }
