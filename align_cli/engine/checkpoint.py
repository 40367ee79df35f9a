"""Atomic checkpoints with exact resume.

A checkpoint is written to ``checkpoint-NNNNNNN.tmp`` and renamed once complete, so a run killed
mid-save never leaves a directory that ``--resume`` would pick. accelerate saves the model
(safetensors), optimizer, scheduler and RNG states of every process; ``trainer_state.json`` holds the
step (which fixes the data position, the batch plan being a function of seed and epoch) and any
stage state such as a KL controller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ``.tmp`` directories are never listed)."""
    if not run_dir.is_dir():
        return []
    found = [
        p for p in run_dir.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file() and p.is_dir()
    ]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, step: int, state: dict[str, Any], keep_last: int
) -> Path:
    """Save everything needed to resume at ``step``; prune to the newest ``keep_last``."""
    final = run_dir / f"checkpoint-{step:07d}"
    tmp = run_dir / f"{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state | {"step": step}, indent=1))
            for item in [*tmp.iterdir(), tmp]:
                _fsync(item)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(run_dir)
    except OSError as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"saving checkpoint at step {step} failed: {exc}; the previous checkpoint "
            f"{previous or '(none)'} is intact"
        ) from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG; return the trainer state."""
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())


def _fsync(path: Path) -> None:
    """Flush a file or directory entry to disk, so a rename never publishes unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
