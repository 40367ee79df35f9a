"""Run directories: where a run writes, how stages find the previous stage's output, summaries.

A run directory belongs to one process at a time: ``lock_run_dir`` holds an exclusive ``fcntl.flock``
on its ``.align.lock`` (which names the owner's pid) until the process ends. The kernel drops the lock
when the process ends, even by ``kill -9``, so a crashed run never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from align_cli.errors import AlignError

FINAL = "final"
LOCK_FILE = ".align.lock"
log = logging.getLogger("align")
_held: dict[Path, IO[str]] = {}  # run directories this process holds, by resolved path


class RunDirError(AlignError, ValueError):
    pass


def runs_root() -> Path:
    return Path(os.environ.get("ALIGN_RUNS_DIR", "runs"))


def default_run_dir(stage: str) -> Path:
    """runs/<stage>/<time>-<random>: two runs started in the same second never share a folder."""
    return runs_root() / stage / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def why(exc: BaseException) -> str:
    """An OS error's own words ("No space left on device"), else the exception's type and first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def can_resume(run_dir: Path, stage: str) -> bool:
    """Whether ``--resume`` has something to continue in ``run_dir``: rejection sampling a started run (its
    finished rounds are kept), a training stage a complete checkpoint."""
    if stage == "rejection-sample":
        return (run_dir / "recipe.yaml").is_file()
    from align_cli.engine.checkpoint import latest_checkpoint  # torch: imported once a run is at hand

    return latest_checkpoint(run_dir) is not None


def is_finished(run_dir: Path) -> bool:
    """A run that completed: its final model, or (rejection sampling without SFT) its summary.json."""
    return (run_dir / FINAL).is_dir() or (run_dir / "summary.json").is_file()


def latest_unfinished_run(stage: str) -> Path:
    """The run ``--resume`` without ``--out`` continues: the newest (by modification time) folder under
    runs/<stage>/ that has something to resume and is not finished. RunDirError says where it looked."""
    folder = runs_root() / stage
    runs = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    unfinished = [p for p in runs if can_resume(p, stage) and not is_finished(p)]
    if not unfinished:
        what = "a started run" if stage == "rejection-sample" else "a complete checkpoint"
        raise RunDirError(
            f"--resume without --out: no unfinished {stage} run in {folder} (looked for a folder with "
            f"{what} and no final/ nor summary.json; {len(runs)} run folder(s) there); name one with --out"
        )
    return max(unfinished, key=lambda p: p.stat().st_mtime)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, stage: str = "") -> None:
    """Create (or reopen, with --resume) the run directory and hold it for this process; refuse to mix a
    new run into an old one's files. Overwrite empties only a folder that holds an align run."""
    if resume and not can_resume(run_dir, stage):
        what = "no started run" if stage == "rejection-sample" else "no complete checkpoint"
        raise RunDirError(f"--resume: {run_dir} has {what} to resume from")
    previous = [] if resume else _previous_run(run_dir)
    if previous and not overwrite:
        hint = "add --resume to continue it" if can_resume(run_dir, stage) else "choose another --out"
        raise RunDirError(f"{run_dir} already holds a run; {hint}, or --set output.overwrite=true")
    if previous and not (run_dir / "recipe.yaml").is_file():
        raise RunDirError(
            f"{run_dir} holds files but not an align run (no recipe.yaml); output.overwrite empties only "
            "a run folder: choose another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(
            f"cannot create the run folder {run_dir}: {why(exc)}; nothing was written: choose another "
            "--out (or ALIGN_RUNS_DIR)"
        ) from exc
    lock_run_dir(run_dir)
    if previous:  # only now, under the lock: another process may have been writing there
        log.warning("output.overwrite: deleting the previous run in %s: %s", run_dir, ", ".join(previous))
        clear_run_dir(run_dir)


def _previous_run(run_dir: Path) -> list[str]:
    """What is in ``run_dir`` already (its lock file aside), sorted."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def clear_run_dir(run_dir: Path) -> None:
    """Delete what a previous run left in ``run_dir``, but not the folder itself nor its lock; a link is
    removed, never followed, so nothing outside the run directory is ever deleted."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir`` for the rest of this process, or refuse when another process holds it."""
    key = run_dir.resolve()
    if key in _held:
        return
    try:
        handle = open(run_dir / LOCK_FILE, "a+")  # held open until the process ends or lets go
    except OSError as exc:
        raise RunDirError(
            f"cannot write in the run folder {run_dir}: {why(exc)}; nothing was written"
        ) from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(
            f"{run_dir} is in use by another align process (pid {owner}); wait for it to end, or choose "
            "another --out"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[key] = handle


def release_run_dirs() -> None:
    """Let go of every run directory this process holds: for a caller that runs several runs in one
    process (the CLI when a command returns, tests). A process that ends lets go by itself."""
    for handle in _held.values():
        handle.close()
    _held.clear()


def is_complete_model(path: Path) -> bool:
    """Whether ``path`` holds a whole saved model: its config and every weight file (a sharded model's
    index names its shards). A folder cut short by a kill or a full disk is not one."""
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((path / shard).is_file() for shard in shards)
    return (path / "model.safetensors").is_file() or (path / "adapter_model.safetensors").is_file()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a uniquely named temporary file beside ``path``, then rename it over ``path``:
    readers (and concurrent writers) see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are shared like the runs directory
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Remember ``final_dir`` as the latest output of ``stage`` for the next stage to chain from. Runs
    that finish at the same time update runs/latest.json one at a time (a lock), so none is lost."""
    index = runs_root() / "latest.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index.with_name(".latest.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            known = read_json_object(index, "writing it afresh") if index.exists() else {}
        except RunDirError as exc:  # a finished run is not failed by its bookkeeping
            log.warning("%s", exc)
            known = {}
        known[stage] = str(final_dir.resolve())
        write_atomic(index, json.dumps(known, indent=1))


def last_output(stage: str) -> Path | None:
    """The final model of the latest completed ``stage`` run, if it still exists."""
    index = runs_root() / "latest.json"
    if not index.exists():
        return None
    path = read_json_object(index, LATEST_HINT).get(stage)
    return Path(path) if path and Path(path).is_dir() else None


def after_final(path: Path, final_dir: Path, write: Callable[[], Any]) -> None:
    """Write ``path``, bookkeeping that follows the final save (summary, plot, runs/latest.json). A
    failure there (full disk, read-only folder) is a warning: the run is finished, its model complete."""
    try:
        write()
    except OSError as exc:
        log.warning(
            "could not write %s at %s: %s; the final model in %s is complete",
            path.name,
            path,
            why(exc),
            final_dir,
        )


def peak_memory_mb() -> float:
    """Peak accelerator memory if on GPU, else the process's peak resident set size."""
    import torch  # here: this module is imported by commands that report errors before torch loads

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
