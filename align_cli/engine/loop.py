"""The one training loop every stage uses.

A stage hands over a ``StageSpec``: the trainable model, tokenized examples, a collate function and
``compute_loss(model, batch) -> (loss_sum, metric_sums)``. Losses and metrics are *sums* over the
batch's weight units (supervised tokens for SFT, pairs for DPO); the loop divides by the units of
the whole optimizer step across all micro-batches and processes, so micro-batch x accumulation x
processes never changes the update. Precision, devices, distribution (accelerate), clipping,
scheduling, evaluation, checkpoints, metrics and progress all live here, once.
"""

from __future__ import annotations

import json
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

from align_cli.data.collate import plan_epoch, shard
from align_cli.data.formats import DataError
from align_cli.engine.best import BEST_DIR, BEST_RECORD, BestMetricError, BestTracker
from align_cli.engine.faults import fault_point
from align_cli.engine.hf_layout import checkpoint_files
from align_cli.engine.nonfinite import NonFiniteError, check_finite
from align_cli.engine.run import Run
from align_cli.engine.signals import StopFlag, stop_requested
from align_cli.recipe import TrainingSection

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _Interrupted(Exception):
    """A stop was requested in the middle of an evaluation."""


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
    # saved in every checkpoint with the model's config, so from_pretrained loads a checkpoint
    tokenizer: Any = None


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
        self.best = BestTracker.from_training(t)
        if self.best.active and not spec.eval_examples:
            raise BestMetricError(
                f"{spec.name}: training.save_best / early_stopping_patience compare evaluations, and there "
                "is no eval data; set data.eval or data.eval_fraction"
            )

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
        ``training.nan_policy: skip`` drops that update and counts it (engine/run.py: Run)."""
        t, spec = self.t, self.spec
        set_seed(t.seed)
        best = self.best
        run = Run(
            spec.name,
            t,
            self.run_dir,
            self.acc,
            self.console,
            self.total_steps,
            get_state=best.state,  # the best so far and the patience count resume with the run
            set_state=best.load_state,
        )
        model, optimizer, scheduler = run.prepare(spec.model, self.total_steps, t.micro_batch_size)
        run.hf_files = checkpoint_files(self.acc, model, spec.tokenizer)
        step = run.restore(resume)
        model.train()
        window_tokens, window_start, total_tokens = 0, time.perf_counter(), 0
        first_loss = run.first("loss")

        def evaluate_or_stop(at: int, row: dict[str, Any] | None = None, final: bool = False) -> dict:
            try:
                eval_row = self.evaluate(model, run.stop, at)
            except _Interrupted:
                if row:  # the step's training row is kept; its eval runs on resume
                    run.log(row)
                run.stop_here(at, pending_eval=not final)  # the final evaluation reruns on resume anyway
            run.say_eval(at, eval_row, final)
            return eval_row

        evaluated_at: list[int] = []  # the steps evaluated in this process's run

        def after_eval(at: int, eval_row: dict[str, Any], final: bool = False) -> bool:
            """Track the best eval (saving RUN/best/ when it improves); True: stop early. The final
            evaluation of a step already evaluated is not counted twice, and never stops the run."""
            if final and evaluated_at and evaluated_at[-1] == at:
                return False
            evaluated_at.append(at)
            if best.update(at, eval_row) and best.save_best:
                self._save_best(model, at)
            return not final and best.should_stop(at)

        with run.running():
            if run.pending_eval:
                eval_row = evaluate_or_stop(step)
                if eval_row:
                    run.log({"step": step, **eval_row})
                    after_eval(step, eval_row)
            while step < self.total_steps and best.stopped_at is None:
                epoch, index = divmod(step, self.steps_per_epoch)
                for micro in self._plan(epoch)[index:]:
                    batches = self._micro_batches(micro, spec.train_examples)
                    fault_point("data", step + 1)
                    if run.stop_requested():
                        run.stop_here(step)
                    try:
                        row = self.train_step(model, batches, step + 1)
                    except NonFiniteError as exc:
                        wheres = [spec.train_examples[i].get("where") for m in micro for i in m]
                        run.non_finite(exc, wheres, spec.loss_settings)
                        row = None
                    else:
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    step += 1
                    run.step = step
                    eval_due = bool(t.eval_every) and step % t.eval_every == 0
                    eval_row: dict[str, Any] = {}
                    if row is not None:
                        window_tokens += row["tokens"]
                        total_tokens += row["tokens"]
                        first_loss = row["loss"] if first_loss is None else first_loss
                    if row is None:  # a skipped update: logged, so the metric table counts it
                        run.log({"step": step, "skipped": 1, "skipped_steps": run.skipped})
                        if eval_due:
                            eval_row = evaluate_or_stop(step)
                            run.log({"step": step, **eval_row})
                    elif step % t.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        row |= {
                            "step": step,
                            "epoch": round(step / self.steps_per_epoch, 4),
                            "lr": scheduler.get_last_lr()[0],
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "elapsed_s": run.elapsed,
                        }
                        if t.nan_policy == "skip":
                            row["skipped_steps"] = run.skipped
                        window_tokens, window_start = 0, now
                        run.say(step, {k: row[k] for k in ("loss", "lr")} | {"tok/s": row["tokens_per_s"]})
                        if eval_due:
                            eval_row = evaluate_or_stop(step, row)
                            row |= eval_row
                        run.log({"step": row.pop("step"), **row})
                        run.show(
                            step, info=f"loss {row['loss']:.4f}", rate=f"{row['tokens_per_s']:.0f} tok/s"
                        )
                    elif eval_due:
                        eval_row = evaluate_or_stop(step)
                        run.log({"step": step, **eval_row})
                    run.show(step)
                    stop_early = bool(eval_row) and after_eval(step, eval_row)
                    run.save_if_due(step)
                    if run.stop_requested():
                        run.stop_here(step)
                    if step >= self.total_steps or stop_early:
                        break
            final_eval = evaluate_or_stop(step, final=True)
            if final_eval:
                after_eval(step, final_eval, final=True)
        if final_eval:
            run.log({"step": step, "final": True, **final_eval})
        if run.metrics:
            run.metrics.flush()
        elapsed = run.elapsed
        return {
            "run": run,
            "model": model,
            "steps": step,
            "first_loss": first_loss,
            "metrics": run.metrics,
            "final_eval": final_eval,
            "elapsed_s": elapsed,
            "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "last_checkpoint_step": run.last_saved,
            "skipped_steps": run.skipped,
            "best": best,
        }

    def _save_best(self, model: torch.nn.Module, step: int) -> None:
        """RUN/best/: the model of ``step`` as ``from_pretrained`` loads it, and best.json saying which step
        (written aside and renamed in, like final/; every process joins the weight gather)."""
        from align_cli.engine.session import save_final
        from align_cli.models import save_model

        state_dict = self.acc.get_state_dict(model)
        if self.acc.is_main_process:
            unwrapped, record = self.acc.unwrap_model(model), self.best.summary()

            def write(folder: Path) -> None:
                save_model(unwrapped, self.spec.tokenizer, folder, state_dict=state_dict)
                (folder / BEST_RECORD).write_text(json.dumps(record, indent=1))

            save_final(self.run_dir / BEST_DIR, write)
        self.acc.wait_for_everyone()
