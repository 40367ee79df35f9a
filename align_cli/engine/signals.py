"""Graceful stop on SIGTERM / SIGINT: the handler only sets a flag; the training loop checks it at its
safe points (before a step's forward pass, after each optimizer step, after each evaluation batch),
saves a checkpoint and raises ``StoppedBySignal``, which the CLI turns into exit code 0 and the command
that resumes the run. A second signal while stopping gives up waiting (KeyboardInterrupt)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Exception):
    """The run stopped on request after saving a checkpoint; ``--resume`` continues it. With
    ``final_save`` the signal came while the final model was being saved: the save (``checkpoint``, the
    final model) finished and the run is complete."""

    def __init__(
        self,
        stage: str,
        run_dir: Path,
        step: int,
        signal_name: str,
        checkpoint: Path,
        final_save: bool = False,
    ) -> None:
        self.stage, self.run_dir, self.step, self.signal_name = stage, Path(run_dir), step, signal_name
        self.checkpoint, self.final_save = checkpoint, final_save
        if final_save:
            message = f"{stage}: stopped by {signal_name} during the final save at step {step}; "
            message += f"the final model is complete: {checkpoint}"
        else:
            message = f"{stage}: stopped by {signal_name} at step {step}; checkpoint saved to {checkpoint}"
        super().__init__(message)


class StopFlag:
    """Set by the signal handler; read by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install flag-setting SIGTERM/SIGINT handlers for the duration; the previous ones come back after.

    Only the main thread may install handlers; elsewhere (a run started from a worker thread) the flag
    is simply never set."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag.requested:  # asked twice: stop waiting for the safe point
            raise KeyboardInterrupt
        flag.signum = signum  # nothing else here: the loop saves at its next safe point

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_requested(flag: StopFlag | None, accelerator: Any = None) -> bool:
    """Whether any process was asked to stop; with several processes all of them agree (a collective
    call, so every process must reach it), so they stop at the same step."""
    if flag is None:
        return False
    if accelerator is None or accelerator.num_processes == 1:
        return flag.requested
    import torch

    local = torch.tensor([float(flag.requested)], device=accelerator.device)
    return bool(accelerator.reduce(local, "sum").item() > 0)
