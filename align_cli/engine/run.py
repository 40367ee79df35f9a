"""One training run, whatever its loop: what the supervised loop (engine/loop.py) and the on-policy
loops (stages/ppo.py) share, written once.

A ``Run`` owns the optimizer and scheduler (built and prepared by accelerate), the resume from the
latest checkpoint (with the stage's own state through one hook), periodic and requested checkpoints
(SIGTERM/SIGINT only set a flag, answered at the loop's safe points), the NaN/inf policy, the metrics
log and the experiment trackers (engine/tracking.py), the progress bar (or, when stdout is not a
terminal, one plain line per logged step), and the end: final models saved aside and renamed in,
summary, plot, table. The loop itself (what a step is) stays with its stage.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from align_cli.engine import tracking
from align_cli.engine.checkpoint import SaveSchedule, latest_checkpoint, load_checkpoint, save_checkpoint
from align_cli.engine.distributed import configure_deepspeed
from align_cli.engine.metrics import MetricsLog, plot_metrics, print_table
from align_cli.engine.nonfinite import NonFiniteError, last_good_checkpoint, nan_context
from align_cli.engine.optim import apply_training_settings, build_optimizer, build_scheduler
from align_cli.engine.signals import StopFlag, StoppedBySignal, stop_on_signals, stop_requested
from align_cli.engine.timing import SectionTimer, describe_split, time_split
from align_cli.model_card import write_model_card
from align_cli.models import count_parameters
from align_cli.recipe import TrainingSection
from align_cli.runs import FINAL, after_final, peak_memory_mb, record_output, runs_root, write_summary


class Run:
    """The bookkeeping of one run of ``total`` steps (optimizer steps, or PPO iterations: ``unit``)."""

    def __init__(
        self,
        name: str,
        t: TrainingSection,
        run_dir: Path,
        accelerator: Accelerator,
        console: Console,
        total: int,
        unit: str = "step",
        get_state: Callable[[], dict[str, Any]] = dict,
        set_state: Callable[[dict[str, Any]], None] = lambda state: None,
    ) -> None:
        self.name, self.t, self.run_dir, self.acc, self.console = name, t, run_dir, accelerator, console
        self.total, self.unit = total, unit
        self.get_state, self.set_state = get_state, set_state  # the stage's state in checkpoints
        self.step = 0  # steps completed (restored by a resume)
        self.skipped = 0  # updates dropped for a NaN/inf loss or gradient (nan_policy: skip)
        self.pending_eval = False  # stopped in the middle of an evaluation: it reruns on resume
        self.last_saved: int | None = None
        self.metrics: MetricsLog | None = None
        self.stop: StopFlag | None = None
        self.started = time.perf_counter()
        self.start_step = 0  # where this process began (a resumed run: its checkpoint), for the ETA
        self.trackers: list[str] = []  # experiment trackers started (training.report_to)
        self.plain = not console.is_terminal  # SLURM, `> train.log`: lines instead of a progress bar
        self.schedule = SaveSchedule.for_run(t.save_every, t.save_every_minutes, total, time.monotonic())
        # adds config and tokenizer to each checkpoint so from_pretrained loads it (set by the stage)
        self.hf_files: Callable[[Path], Any] | None = None
        # on-policy loops: time/<section>_s of an iteration
        self.timer = SectionTimer(getattr(accelerator, "device", None))

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    # ------------------------------------------------------------------ start

    def prepare(self, model: torch.nn.Module, optimizer_steps: int, micro_batch_size: int) -> tuple:
        """AdamW (or 8-bit) and the lr schedule over ``optimizer_steps``, prepared with the model."""
        optimizer = build_optimizer(model, self.t)
        scheduler = build_scheduler(optimizer, self.t, optimizer_steps)
        configure_deepspeed(self.acc, micro_batch_size)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        return self.model, self.optimizer, self.scheduler

    def restore(self, resume: bool) -> int:
        """With ``resume``, load the latest checkpoint (weights, optimizer, scheduler, RNG and the stage's
        state) and put the recipe's training settings back; open the metrics log. Returns the step."""
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            state = load_checkpoint(self.acc, checkpoint)
            apply_training_settings(self.optimizer, self.scheduler, self.t)
            self.step, self.skipped = state["step"], state.get("skipped_steps", 0)
            self.pending_eval = state.get("pending_eval", False)
            self.set_state(state.get("stage", {}))
            self.last_saved = self.step
            if self.is_main:
                self.console.print(f"[bold]resumed[/] from {checkpoint} at {self.unit} {self.step}")
        self.metrics = MetricsLog(self.run_dir, resume_step=self.step) if self.is_main else None
        self.trackers = tracking.start_trackers(self.acc, self.t, self.run_dir, self.step)
        self.started, self.start_step = time.perf_counter(), self.step
        return self.step

    def first(self, key: str) -> float | None:
        """The first logged value of ``key`` (kept across a resume)."""
        rows = self.metrics.rows if self.metrics else []
        return next((r[key] for r in rows if key in r), None)

    def log(self, row: dict[str, Any]) -> None:
        """A metrics row (with its ``step``) to metrics.jsonl and .csv and to the trackers."""
        if self.metrics:
            self.metrics.add(row)
        if self.trackers:
            self.acc.log(tracking.numeric(row), step=row["step"])

    def log_samples(self, rows: list[dict[str, Any]], at: int) -> None:
        """Sampled texts of iteration ``at`` (already in samples.jsonl) as a table in the trackers."""
        tracking.log_samples(self.acc, self.trackers, rows, at)

    def say(self, at: int, figures: dict[str, Any]) -> None:
        """When stdout is not a terminal, one plain line: ``step 12/40  loss 1.234  lr 2.0e-05  eta
        0:01:10`` (the progress bar stands in for it in a terminal)."""
        if not (self.plain and self.is_main):
            return
        parts = [f"{self.unit} {at}/{self.total}", *(f"{k} {_figure(k, v)}" for k, v in figures.items())]
        done = at - self.start_step
        if done > 0:
            left = self.elapsed / done * (self.total - at)
            parts.append(f"eta {datetime.timedelta(seconds=round(left))}")
        self.console.print("  ".join(parts), soft_wrap=True, highlight=False, markup=False)

    def say_eval(self, at: int, row: dict[str, Any], final: bool = False) -> None:
        """When stdout is not a terminal, one plain line per evaluation: ``eval step 12  loss 1.301``
        (``final eval step 40  ...`` for the one after the last step)."""
        figures = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
        if figures and self.plain and self.is_main:
            head = f"{'final eval' if final else 'eval'} {self.unit} {at}"
            parts = [head, *(f"{k} {_figure(k, v)}" for k, v in figures.items())]
            self.console.print("  ".join(parts), soft_wrap=True, highlight=False, markup=False)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # ------------------------------------------------------------------ while running

    @contextmanager
    def running(self) -> Iterator[None]:
        """SIGTERM/SIGINT only set a flag meanwhile; a progress bar with rate and ETA."""
        progress = Progress(
            TextColumn(f"[bold]{self.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.is_main or self.plain,
            transient=False,
        )
        with stop_on_signals() as stop, progress:
            self.stop, self._progress = stop, progress
            self._task = progress.add_task(self.name, total=self.total, completed=self.step, info="", rate="")
            yield

    def show(self, completed: int, **fields: str) -> None:
        """Move the progress bar (``info``, ``rate``: its text columns)."""
        self._progress.update(self._task, completed=completed, **fields)

    def stop_requested(self) -> bool:
        """Whether a stop was requested on any process (every process must call this together)."""
        return stop_requested(self.stop, self.acc)

    def save(self, at: int, pending_eval: bool = False) -> Path:
        state = {"stage": self.get_state(), "skipped_steps": self.skipped, "pending_eval": pending_eval}
        path = save_checkpoint(self.acc, self.run_dir, at, state, self.t.keep_last, self.hf_files)
        self.last_saved = at
        self.schedule.saved(time.monotonic())
        if self.metrics:
            self.metrics.flush()
        return path

    def save_if_due(self, at: int) -> None:
        """A periodic checkpoint (training.save_every, save_every_minutes); the end saves final/ instead."""
        if at < self.total and self.schedule.due_now(at, self.acc):
            self.save(at)

    def stop_here(self, at: int, pending_eval: bool = False) -> NoReturn:
        """Answer a requested stop: checkpoint at ``at`` (unless that one is saved already), then end."""
        found = latest_checkpoint(self.run_dir)
        if self.last_saved == at and not pending_eval and found is not None:
            if self.metrics:
                self.metrics.flush()
        else:
            found = self.save(at, pending_eval)
        name = self.stop.name if self.stop is not None else "signal"
        tracking.end_trackers(self.acc)  # the trackers' runs end with what was logged
        raise StoppedBySignal(self.name, self.run_dir, at, name or "signal", found)

    def non_finite(
        self, exc: NonFiniteError, wheres: list[str | None], settings: dict[str, Any], what: str = "records"
    ) -> None:
        """The NaN/inf policy for an update that was not applied: by default end the run with where to
        look (the batch's ``what``: file:line), the recipe keys that can cause it and the last good
        checkpoint; with ``training.nan_policy: skip`` drop the update and count it."""
        context = nan_context(
            wheres, {"training.lr": self.t.lr, "training.precision": self.t.precision} | settings, what
        )
        if self.t.nan_policy != "skip":
            raise NonFiniteError(f"{exc}; {context}; {last_good_checkpoint(self.run_dir)}", exc.what) from exc
        self.optimizer.zero_grad(set_to_none=True)  # the update is dropped, its data consumed
        self.skipped += 1
        if self.is_main:
            self.console.print(f"[yellow]skipped[/] {exc}; {context} (nan_policy: skip)")

    def end_iteration(
        self, at: int, stats: dict[str, Any], lr: float, headline: dict[str, float]
    ) -> dict[str, Any]:
        """The bookkeeping after on-policy iteration ``at`` (PPO, GRPO/RLOO, online DPO): its metrics row
        logged, the progress bar moved (or a plain line with the stage's ``headline`` figures, e.g.
        reward and KL), a periodic checkpoint when due, a requested stop answered."""
        row = {
            "step": at,
            **stats,
            **({"skipped_steps": self.skipped} if self.t.nan_policy == "skip" else {}),
        }
        row |= {"lr": lr, "elapsed_s": self.elapsed}
        self.step = at
        self.log(row)
        bar = (f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in headline.items())
        self.show(at, info=" ".join(bar))
        self.say(at, headline | {"lr": lr})
        self.save_if_due(at)
        if self.stop_requested():
            self.stop_here(at)
        return row

    # ------------------------------------------------------------------ the end

    def cost_rows(self, summary: dict[str, Any]) -> list[tuple[str, Any]]:
        """The summary table's last rows, the same for every stage: skipped updates (when any, or when
        skipping is on), the on-policy time split (when iterations logged one), peak memory, elapsed time,
        the final model."""
        skipped = [("skipped updates (non-finite)", self.skipped)]
        split = [("time", describe_split(summary["time_split"]))] if summary.get("time_split") else []
        return [
            *(skipped if self.t.nan_policy == "skip" or self.skipped else []),
            *split,
            ("peak memory (MB)", summary["peak_memory_mb"]),
            ("elapsed (s)", summary["elapsed_s"]),
            ("final model", summary["final_model"]),
        ]

    def summary(self, model: torch.nn.Module, **figures: Any) -> dict[str, Any]:
        """summary.json of a run: what ran and where, the stage's own ``figures``, and the costs (with
        ``time_split``: seconds and fractions per section, when the iterations logged ``time/...``)."""
        trainable, total = count_parameters(model)
        split = time_split(self.metrics.rows) if self.metrics else {}
        return {
            "stage": self.name,
            "run_dir": str(self.run_dir),
            "final_model": str(self.run_dir / FINAL),
            **figures,
            **({"time_split": split} if split else {}),
            "elapsed_s": self.elapsed,
            "peak_memory_mb": peak_memory_mb(),
            "parameters_trainable": trainable,
            "parameters_total": total,
            "skipped_steps": self.skipped,
        }

    def finish(
        self,
        write_models: Callable[[Path], None],
        summarize: Callable[[], tuple[dict[str, Any], list[tuple[str, Any]]]],
        plot_keys: list[str],
    ) -> dict[str, Any]:
        """Save the final model(s) with ``write_models(final_dir)`` (every process calls it: sharded
        weights are gathered), then write summary.json, metrics.csv, the plot and runs/latest.json and print
        the summary table (``summarize() -> (summary, table rows)``). Bookkeeping after the models only
        warns on failure. A SIGTERM/SIGINT meanwhile lets all of it finish, then stops the run with its
        final model complete."""
        final_dir = self.run_dir / FINAL
        with stop_on_signals() as stop:
            write_models(final_dir)
            self.acc.wait_for_everyone()
            summary, rows = summarize()
            if self.is_main:
                metrics = self.metrics
                if metrics is not None:
                    after_final(self.run_dir / "metrics.csv", final_dir, metrics.flush)
                    plot = self.run_dir / "metrics.png"
                    after_final(plot, final_dir, lambda: plot_metrics(metrics, plot_keys, plot))
                after_final(
                    self.run_dir / "summary.json", final_dir, lambda: write_summary(self.run_dir, summary)
                )
                after_final(
                    runs_root() / "latest.json", final_dir, lambda: record_output(self.name, final_dir)
                )
                for folder in (final_dir, self.run_dir / "final-value", self.run_dir / "best"):  # Hub cards
                    card = partial(write_model_card, folder, self.run_dir, self.name, summary)
                    after_final(folder / "README.md", final_dir, card)
                print_table(f"align {self.name}: summary", rows, self.console)
            tracking.end_trackers(self.acc)
            stopped = stop_requested(stop, self.acc)
        if stopped:
            name = stop.name or "signal"
            raise StoppedBySignal(self.name, self.run_dir, self.step, name, final_dir, final_save=True)
        return summary


def _figure(key: str, value: Any) -> str:
    """A figure of a plain log line: lr in scientific notation, rates whole, others to 4 digits."""
    if not isinstance(value, float) or isinstance(value, bool):
        return str(value)
    if key == "lr":
        return f"{value:.1e}"
    if key.endswith("/s"):
        return f"{value:.0f}"
    return f"{value:.4g}"
