"""NaN/inf losses and gradients: the check, and an error that says where to look and how to go on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from align_cli.engine.checkpoint import latest_checkpoint
from align_cli.errors import AlignError


class NonFiniteError(AlignError, RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""

    def __init__(self, message: str, what: str = "loss") -> None:
        super().__init__(message)
        self.what = what  # "loss" or "gradient norm"


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
