"""Run directories: where a run writes, how stages find the previous stage's output, summaries."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from align_cli.engine.checkpoint import checkpoint_dirs, latest_checkpoint

FINAL = "final"
log = logging.getLogger(__name__)


class RunDirError(ValueError):
    pass


def runs_root() -> Path:
    return Path(os.environ.get("ALIGN_RUNS_DIR", "runs"))


def default_run_dir(stage: str) -> Path:
    return runs_root() / stage / time.strftime("%Y%m%d-%H%M%S")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory; refuse to mix a new run into an old one's files."""
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise RunDirError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            hint = "add --resume to continue it" if checkpoint_dirs(run_dir) else "choose another --out"
            raise RunDirError(f"{run_dir} already holds a run; {hint}, or --set output.overwrite=true")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def read_json_object(path: Path, hint: str) -> dict[str, Any]:
    """A JSON object align wrote (summary.json, latest.json); RunDirError in one line, ending with
    ``hint`` (what to do), when a kill or a full disk left it cut off or it is corrupt."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RunDirError(f"{path}: not valid JSON, cut off or corrupt ({exc}); {hint}") from None
    if not isinstance(loaded, dict):
        raise RunDirError(f"{path}: not a JSON object, corrupt; {hint}")
    return loaded


LATEST_HINT = "delete it (it only names the latest run of each stage) or name the model to use"


def record_output(stage: str, final_dir: Path) -> None:
    """Remember ``final_dir`` as the latest output of ``stage`` for the next stage to chain from."""
    index = runs_root() / "latest.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    try:
        known = read_json_object(index, "writing it afresh") if index.exists() else {}
    except RunDirError as exc:  # a finished run is not failed by its bookkeeping
        log.warning("%s", exc)
        known = {}
    known[stage] = str(final_dir.resolve())
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, index)


def last_output(stage: str) -> Path | None:
    """The final model of the latest completed ``stage`` run, if it still exists."""
    index = runs_root() / "latest.json"
    if not index.exists():
        return None
    path = read_json_object(index, LATEST_HINT).get(stage)
    return Path(path) if path and Path(path).is_dir() else None


def peak_memory_mb() -> float:
    """Peak accelerator memory if on GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
