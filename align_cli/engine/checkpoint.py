"""Atomic checkpoints with exact resume.

A checkpoint is written to ``checkpoint-NNNNNNN.tmp`` and renamed once complete, so a run killed
mid-save never leaves a directory that ``--resume`` would pick. accelerate saves the model
(safetensors), optimizer, scheduler and RNG states of every process, and the model's config and
tokenizer beside them make the checkpoint load with ``from_pretrained`` too (``hf_layout``);
``trainer_state.json`` holds the step (which fixes the data position, the batch plan being a function
of seed and epoch) and any stage state such as a KL controller. Saving a step again renames the old copy aside
(``checkpoint-NNNNNNN.replaced``, read while the new one is not in place) and deletes it only after
the new one is renamed in, so a kill at any point leaves one complete checkpoint. ``manifest.json``
holds the SHA-256 of every file, taken at save time; a load first checks it, so a flipped bit in the
weights or optimizer state is an error naming the file, never a silently different run (checkpoints of
older versions, without one, load with a log line).

Loading is safe by construction: weights come from safetensors, and the optimizer, scheduler and RNG
states (pickles written by torch) are read with ``torch.load(weights_only=True)``, which refuses any
pickle that would construct arbitrary objects or run code. A checkpoint that cannot be read is a
CheckpointError naming it, never a silent partial restore.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from align_cli.engine.faults import fault_point
from align_cli.errors import AlignError

STATE_FILE = "trainer_state.json"
REPLACED = ".replaced"
MANIFEST = "manifest.json"  # SHA-256 of every file, written at save time, checked before a load
log = logging.getLogger("align")
_NAME = re.compile(r"^checkpoint-(\d+)(\.replaced)?$")


class CheckpointError(AlignError, RuntimeError):
    pass


DEFAULT_SAVE_FRACTION = 0.1  # with training.save_every unset: a checkpoint every 10% of the run


@dataclass
class SaveSchedule:
    """When a periodic checkpoint is due: every ``every`` steps, or once ``seconds`` have passed since the
    last save (or the start), whichever comes first; None turns either off. The caller saves after a
    completed step, so a time-based checkpoint holds exactly that step, like a step-based one."""

    every: int | None
    seconds: float | None
    last: float

    @classmethod
    def for_run(
        cls, save_every: int | None, save_every_minutes: float, total_steps: int, now: float
    ) -> SaveSchedule:
        """training.save_every (null: 10% of ``total_steps``; 0: no periodic saves) and save_every_minutes
        (0: none by time)."""
        if save_every == 0:
            return cls(None, None, now)
        every = save_every or max(1, math.ceil(DEFAULT_SAVE_FRACTION * total_steps))
        return cls(every, save_every_minutes * 60 if save_every_minutes else None, now)

    def due(self, step: int, now: float) -> bool:
        by_steps = self.every is not None and step % self.every == 0
        return by_steps or (self.seconds is not None and now - self.last >= self.seconds)

    def due_now(self, step: int, accelerator: Accelerator) -> bool:
        """``due`` by the clock now; with several processes the main process's clock decides for all (a
        collective call: every process must reach it at the same step)."""
        due = self.due(step, time.monotonic())
        if accelerator.num_processes > 1 and self.seconds is not None:
            from accelerate.utils import broadcast

            due = bool(broadcast(torch.tensor([float(due)], device=accelerator.device)).item())
        return due

    def saved(self, now: float) -> None:
        self.last = now


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
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    hf_files: Callable[[Path], Any] | None = None,
) -> Path:
    """Save everything needed to resume at ``step``; prune to the newest ``keep_last``. ``hf_files(folder)``
    (main process) adds what ``from_pretrained`` needs (``hf_layout.write_hf_layout``).

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
            if hf_files is not None:
                hf_files(tmp)
            write_manifest(tmp)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Record the SHA-256 of every file of ``checkpoint`` in its manifest."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {p.relative_to(checkpoint).as_posix(): _sha256(p) for p in files}
    (checkpoint / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=1))


def damaged_files(checkpoint: Path) -> list[str]:
    """The files of ``checkpoint`` whose bytes differ from its manifest or that are gone; [] if none."""
    try:
        recorded = json.loads((checkpoint / MANIFEST).read_text())["sha256"]
        items = sorted(recorded.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST} (unreadable)"]
    damaged = []
    for name, digest in items:
        path = checkpoint / name
        if not path.is_file():
            damaged.append(f"{name} (missing)")
        elif _sha256(path) != digest:
            damaged.append(name)
    return damaged


def _intact(checkpoint: Path) -> bool:
    """Passes its manifest, or has none (saved by an older version of align: cannot be checked)."""
    return not (checkpoint / MANIFEST).is_file() or not damaged_files(checkpoint)


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise CheckpointError naming the files that differ from the manifest, and the previous complete
    checkpoint that is intact (which ``--resume-from-previous`` takes)."""
    if not (checkpoint / MANIFEST).is_file():
        log.info(
            "%s has no %s (saved by an older version of align): its files are not verified",
            checkpoint,
            MANIFEST,
        )
        return
    damaged = damaged_files(checkpoint)
    if not damaged:
        return
    earlier = [
        p for p in checkpoint_dirs(checkpoint.parent) if checkpoint_step(p) < checkpoint_step(checkpoint)
    ]
    previous = next((p for p in reversed(earlier) if _intact(p)), None)
    offer = (
        f"the previous complete checkpoint, {previous}, is intact: add --resume-from-previous to continue "
        "from it"
        if previous
        else "no earlier complete checkpoint is intact: start the run again (--set output.overwrite=true)"
    )
    verb = "does" if len(damaged) == 1 else "do"
    raise CheckpointError(
        f"{checkpoint}: {', '.join(damaged)} {verb} not match the SHA-256 recorded in {MANIFEST} when it was "
        f"saved, so it was not loaded; {offer}"
    )


def set_aside_damaged(run_dir: Path) -> list[Path]:
    """``--resume-from-previous``: rename the newest checkpoints that fail their manifest to
    ``NAME.damaged`` (kept for inspection, never loaded) until one passes; return the new paths."""
    moved = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        if _intact(checkpoint):
            break
        target = checkpoint.with_name(f"{checkpoint.name}.damaged")
        shutil.rmtree(target, ignore_errors=True)  # an older damaged copy of the same step
        os.replace(checkpoint, target)
        moved.append(target)
    return moved


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Check the manifest, restore model, optimizer, scheduler and RNG; return the trainer state.

    Every pickle is read with ``weights_only=True``. accelerate skips RNG states it cannot read with
    only a log line; here an unreadable RNG file is an error, and the restored torch RNG is checked."""
    from accelerate.utils import broadcast_object_list
    from accelerate.utils.other import load as safe_load

    problem = [None]
    if accelerator.is_main_process:  # one process hashes the files; every process gets its verdict
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as exc:
            problem = [str(exc)]
    if accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise CheckpointError(problem[0])
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
