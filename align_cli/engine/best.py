"""The best checkpoint by an eval metric, and early stopping (HF Trainer's metric_for_best_model,
greater_is_better, load_best_model_at_end's saved copy and EarlyStoppingCallback, for align's loop).

``training.best_metric`` names a logged eval metric (``eval/loss``, ``eval/accuracy``, ...; HF's
``eval_loss`` spelling and a bare ``loss`` are read as ``eval/loss``). Lower is better for a loss,
higher otherwise, unless ``training.greater_is_better`` says. Every evaluation is compared with the best
so far: an improvement resets the patience count (and, with ``training.save_best``, the caller saves
RUN/best/); ``training.early_stopping_patience`` evaluations in a row without one stop the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from align_cli.errors import AlignError
from align_cli.recipe import TrainingSection

BEST_DIR = "best"  # RUN/best/: the best model, loadable with from_pretrained
BEST_RECORD = "best.json"  # in it: the step and the metric's value


class BestMetricError(AlignError, ValueError):
    """training.best_metric names no metric the evaluation reports."""


def metric_name(name: str) -> str:
    """``eval/loss`` from ``eval/loss``, ``eval_loss`` (HF's spelling) or ``loss``."""
    if name.startswith("eval/"):
        return name
    return "eval/" + (name[len("eval_") :] if name.startswith("eval_") else name)


@dataclass
class BestTracker:
    metric: str
    greater: bool
    patience: int  # 0: never stop early
    save_best: bool
    best: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_at: int | None = None

    @classmethod
    def from_training(cls, t: TrainingSection) -> BestTracker:
        metric = metric_name(t.best_metric)
        greater = t.greater_is_better if t.greater_is_better is not None else not metric.endswith("loss")
        return cls(metric, greater, t.early_stopping_patience, t.save_best)

    @property
    def active(self) -> bool:
        return self.save_best or self.patience > 0

    def update(self, step: int, row: dict[str, Any]) -> bool:
        """Record the eval ``row`` of ``step``; True when it is the best so far."""
        if not self.active or not any(k.startswith("eval/") for k in row):
            return False
        if self.metric not in row:
            known = ", ".join(sorted(k for k in row if k.startswith("eval/")))
            raise BestMetricError(
                f"training.best_metric: {self.metric!r} is not an eval metric; one of {known}"
            )
        value = float(row[self.metric])
        better = self.best is None or (value > self.best if self.greater else value < self.best)
        if better:
            self.best, self.best_step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        return better

    def should_stop(self, step: int) -> bool:
        """True (and remembered) once ``patience`` evaluations in a row did not improve."""
        if self.patience and self.evals_without_improvement >= self.patience:
            self.stopped_at = step
        return self.stopped_at is not None

    def state(self) -> dict[str, Any]:
        """For the checkpoint, so a resumed run compares with the same best."""
        return asdict(self)

    def load_state(self, state: dict[str, Any]) -> None:
        """A checkpoint's state; a best by another metric or direction (--resume-with-changes) is dropped."""
        if (state.get("metric"), state.get("greater")) != (self.metric, self.greater):
            return
        for key in ("best", "best_step", "evals_without_improvement", "stopped_at"):
            if key in state:
                setattr(self, key, state[key])

    def summary(self) -> dict[str, Any]:
        """summary.json keys: best_step, best_<metric>, early_stopped_at (when they apply)."""
        if not self.active or self.best_step is None:
            return {}
        out: dict[str, Any] = {"best_step": self.best_step, f"best_{self.metric}": self.best}
        return out | ({"early_stopped_at": self.stopped_at} if self.stopped_at is not None else {})

    def rows(self) -> list[tuple[str, Any]]:
        """Summary table rows."""
        figures = self.summary()
        if not figures:
            return []
        rows: list[tuple[str, Any]] = [(f"best {self.metric}", f"{self.best:.4g} (step {self.best_step})")]
        if self.stopped_at is not None:
            rows.append(
                (
                    "early stopped",
                    f"at step {self.stopped_at}: {self.metric} did not improve in {self.patience} eval(s)",
                )
            )
        return rows
