"""Atomic checkpoints with exact resume.

A checkpoint is written to ``checkpoint-NNNNNNN.tmp`` and renamed once complete, so a run killed
mid-save never leaves a directory that ``--resume`` would pick. accelerate saves the model
(safetensors), optimizer, scheduler and RNG states of every process; ``trainer_state.json`` holds the
step (which fixes the data position, the batch plan being a function of seed and epoch) and any
stage state such as a KL controller. Saving a step again renames the old copy aside
(``checkpoint-NNNNNNN.replaced``, read while the new one is not in place) and deletes it only after
the new one is renamed in, so a kill at any point leaves one complete checkpoint.

Loading is safe by construction: weights come from safetensors, and the optimizer, scheduler and RNG
states (pickles written by torch) are read with ``torch.load(weights_only=True)``, which refuses any
pickle that would construct arbitrary objects or run code. A checkpoint that cannot be read is a
CheckpointError naming it, never a silent partial restore.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from align_cli.engine.faults import fault_point

STATE_FILE = "trainer_state.json"
REPLACED = ".replaced"
_NAME = re.compile(r"^checkpoint-(\d+)(\.replaced)?$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, one per step, oldest first. Partial ``.tmp`` directories are never listed;
    ``checkpoint-N.replaced`` stands for step N only while ``checkpoint-N`` is missing (a kill between
    the two renames of a re-save)."""
    if not run_dir.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in sorted(run_dir.iterdir()):  # checkpoint-N sorts before checkpoint-N.replaced
        if _NAME.match(p.name) and p.is_dir() and (p / STATE_FILE).is_file():
            by_step.setdefault(checkpoint_step(p), p)
    return [by_step[step] for step in sorted(by_step)]


def checkpoint_step(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name).group(1))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, step: int, state: dict[str, Any], keep_last: int
) -> Path:
    """Save everything needed to resume at ``step``; prune to the newest ``keep_last``.

    Any failure while writing (disk full, quota, I/O error: torch and safetensors report these as
    RuntimeError as well as OSError) removes the partial directory and raises CheckpointError; the
    previous checkpoint is never touched before the new one is complete."""
    final = run_dir / f"checkpoint-{step:07d}"
    tmp = run_dir / f"{final.name}.tmp"
    if accelerator.is_main_process:
        for stale in _leftovers(run_dir):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every process wrote its RNG state before tmp is renamed
        fault_point("save", step)
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state | {"step": step}, indent=1))
            publish_dir(tmp, final)
    except Exception as exc:  # any write failure must leave the previous checkpoint usable
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"saving checkpoint at step {step} failed: {type(exc).__name__}: {exc}; the partial "
            f"checkpoint was removed and the previous one, {previous or '(none)'}, is intact"
        ) from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            # renamed first, so a kill during the deletion never leaves a half-deleted checkpoint-N
            doomed = old.with_name(f"{old.name}.deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` to ``target`` (a checkpoint, a final model). An existing
    ``target`` is renamed aside to ``NAME.replaced`` first and deleted only once the new one is in place:
    rename first, then delete, so a kill at any point leaves one complete copy."""
    for item in [*tmp.iterdir(), tmp]:
        _fsync(item)
    aside = target.with_name(target.name + REPLACED)
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)  # an older copy, left by a kill after its rename in
        os.replace(target, aside)
    os.replace(tmp, target)
    _fsync(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _leftovers(run_dir: Path) -> list[Path]:
    """What killed saves and prunes left: partial ``.tmp`` and half-deleted ``.deleting`` folders, and
    ``.replaced`` copies whose checkpoint is back in place."""
    current = set(checkpoint_dirs(run_dir))
    replaced = [p for p in run_dir.glob(f"checkpoint-*{REPLACED}") if p not in current]
    return [*run_dir.glob("checkpoint-*.tmp"), *run_dir.glob("checkpoint-*.deleting"), *replaced]


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG; return the trainer state.

    Every pickle is read with ``weights_only=True``. accelerate skips RNG states it cannot read with
    only a log line; here an unreadable RNG file is an error, and the restored torch RNG is checked."""
    from accelerate.utils.other import load as safe_load

    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint}: cannot read {STATE_FILE}: {exc}") from exc
    rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    try:
        rng = safe_load(rng_file, weights_only=True)
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except Exception as exc:  # unpickling, missing or mismatched files: name the checkpoint
        raise CheckpointError(
            f"{checkpoint}: cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            "trainer state is read with torch.load(weights_only=True) and objects that are not plain "
            "tensors and numbers are refused"
        ) from exc
    if not torch.equal(torch.get_rng_state(), rng["torch_manual_seed"]):
        raise CheckpointError(f"{checkpoint}: the random number generator state was not restored")
    return state


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
