"""What ``--resume`` checks before a run continues: that the recipe still describes the same run.

A checkpoint continues bit-exactly only under the recipe it was saved with, as far as that recipe decides
the data order (data files and their content, split, template, lengths, seed, batch sizes) or the update
(model, lr, schedule, optimizer settings, precision, the stage's own loss settings). A resume whose
recipe differs there from the run's saved ``recipe.yaml`` is refused, naming the keys. How long the run is
and how often it logs, evaluates and saves (``FREE``) may change freely (a cosine or linear schedule then
decays over the new length from the current step). ``--resume-with-changes`` allows
the rest: the new values are used from the next step (the optimizer and scheduler get the new lr, betas,
eps and weight decay after their state is restored) and recorded in ``resume_changes.jsonl``; the data
position stays the step count, so a new data order or batch size goes on from that step of the new
order. ``FIXED`` keys cannot change even then: the checkpoint holds state that belongs to the old value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align_cli.recipe import Recipe
from align_cli.runs import RunDirError

log = logging.getLogger("align")

RECIPE_FILE = "recipe.yaml"
DATA_IDENTITY_FILE = "data_identity.json"
CHANGES_FILE = "resume_changes.jsonl"

# the run's length and how often it logs, evaluates and saves: a resume may change these freely
FREE = {
    "training.epochs",
    "training.max_steps",
    "ppo.iterations",
    "rejection.rounds",
    "training.log_every",
    "training.eval_every",
    "training.save_every",
    "training.save_every_minutes",
    "training.keep_last",
    "training.nan_policy",
    "training.save_best",
    "training.early_stopping_patience",
    "model.gradient_checkpointing",
    "ppo.log_samples",
    "grpo.iterations",
    "grpo.log_samples",
    "rloo.iterations",
    "rloo.log_samples",
    "online_dpo.iterations",
    "online_dpo.log_samples",
}
# not even with --resume-with-changes: the checkpoint holds state that belongs to the old value
_WEIGHTS = "the checkpoint holds the weights of the model these keys describe"
FIXED = {
    "model.name_or_path": _WEIGHTS,
    "model.dtype": _WEIGHTS,
    "model.load_in_4bit": _WEIGHTS,
    "model.load_in_8bit": _WEIGHTS,
    "model.lora.": _WEIGHTS,  # every key of the section (adapter shapes and targets)
    "ppo.value_model": "the checkpoint holds that value model's weights",
    "training.optimizer": "the checkpoint's optimizer state is in that optimizer's format",
    "training.precision": "the checkpoint's loss-scaler state and numbers belong to that precision",
}
_STAGE_SECTION = {
    "sft": "sft",
    "reward": "reward",
    "dpo": "dpo",
    "ppo": "ppo",
    "rejection-sample": "rejection",
    "grpo": "grpo",
    "rloo": "rloo",
    "online-dpo": "online_dpo",
}
_DATA_FILES = (
    "data.train",
    "data.eval",
    "ppo.prompts",
    "ppo.ptx_data",
    "rejection.prompts",
    "grpo.prompts",
    "rloo.prompts",
    "online_dpo.prompts",
)


@dataclass(frozen=True)
class Resume:
    """``--resume`` and its variants; a stage's ``resume`` argument is False, True (plain) or one of these."""

    from_previous: bool = False  # the last checkpoint fails its manifest: go on from the newest that passes
    with_changes: bool = False  # allow recipe changes that decide the data order or the update


def resume_options(resume: bool | Resume) -> Resume | None:
    if isinstance(resume, Resume):
        return resume
    return Resume() if resume else None


def _leaves(cls: type, tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of the recorded keys of a recipe tree (sections walked, tables kept whole)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:  # not recorded (an older version): not compared
            continue
        value = tree[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            out |= _leaves(hints[f.name], value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def recipe_changes(saved: dict[str, Any], new: dict[str, Any], stage: str) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every key of the model, data and training sections and
    the stage's own section that differs, except the ``FREE`` ones."""
    sections = {"model", "data", "training", _STAGE_SECTION.get(stage, stage)}
    old = _leaves(Recipe, {k: v for k, v in saved.items() if k in sections})
    now = _leaves(Recipe, {k: v for k, v in new.items() if k in sections})
    return {k: (old[k], now[k]) for k in sorted(old) if k in now and k not in FREE and old[k] != now[k]}


def refused_changes(changes: dict[str, Any]) -> dict[str, str]:
    """{key: why} for the changed keys that cannot change on resume even with --resume-with-changes."""
    refused = {}
    for key in changes:
        reason = FIXED.get(key) or next(
            (why for p, why in FIXED.items() if p.endswith(".") and key.startswith(p)), None
        )
        if reason:
            refused[key] = reason
    return refused


def data_identity(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """{key: {path, bytes, sha256}} for the recipe's local data files (hub data sets are named only); a
    mixture's sources as ``data.train[i]``."""
    from align_cli.reference_cache import file_digest

    tree = _leaves(Recipe, recipe.to_dict())
    identity = {}
    for key in _DATA_FILES:
        value = tree.get(key)
        sources = value if isinstance(value, list) else [value]
        for i, source in enumerate(sources):
            name = source.get("path") if isinstance(source, dict) else source
            path = Path(name) if name else None
            if path is not None and path.is_file():
                where = f"{key}[{i}]" if isinstance(value, list) else key
                identity[where] = {
                    "path": str(path),
                    "bytes": path.stat().st_size,
                    "sha256": file_digest(path),
                }
    return identity


def _describe(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and "sha256" in old:  # a data file's content
        return f"{key} (content of {new['path']} changed)"
    return f"{key} ({old} -> {new})"


def check_resume(recipe: Recipe, run_dir: Path, options: Resume, step: int) -> None:
    """Compare ``recipe`` with the run's saved recipe.yaml and data identity before either is rewritten.
    Refuse differences in what decides the data order or the update (RunDirError naming the keys) unless
    ``options.with_changes``; then log them and append them to resume_changes.jsonl, and record the new
    data identity. ``step``: the checkpoint the run goes on from."""
    saved_file = run_dir / RECIPE_FILE
    if not saved_file.is_file():
        log.warning(
            "%s has no %s: the recipe of the run cannot be compared with this one", run_dir, RECIPE_FILE
        )
        return
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
        known = json.loads((run_dir / DATA_IDENTITY_FILE).read_text())
    except FileNotFoundError:
        known = {}  # a run of an older version: paths are compared, contents cannot be
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise RunDirError(f"--resume: cannot read the run's own recipe in {run_dir}: {exc}") from exc
    stage = recipe.stage or ""
    changes: dict[str, tuple[Any, Any]] = recipe_changes(saved, recipe.to_dict(), stage)
    current = data_identity(recipe)
    for key, was in known.items():
        now = current.get(key)
        if (
            key not in changes
            and now
            and now["path"] == was.get("path")
            and now["sha256"] != was.get("sha256")
        ):
            changes[key] = (was, now)
    if not changes:
        return
    described = ", ".join(_describe(k, *v) for k, v in changes.items())
    refused = refused_changes(changes)
    if refused:
        reasons = "; ".join(f"{k} cannot change on resume: {why}" for k, why in refused.items())
        raise RunDirError(
            f"--resume: {reasons}; resume with the run's own recipe ({saved_file}) or start a new run"
        )
    if not options.with_changes:
        raise RunDirError(
            f"--resume: the recipe differs from the run's {saved_file} in what decides the data order or "
            f"the update: {described}; resume with the run's own recipe (--recipe {saved_file}), or add "
            "--resume-with-changes to go on with the new values from the last checkpoint"
        )
    log.warning("resumed with changes: %s (from step %d; recorded in %s)", described, step, CHANGES_FILE)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step}
    record["changes"] = {k: [old, new] for k, (old, new) in changes.items()}
    with (run_dir / CHANGES_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def record_data_identity(recipe: Recipe, run_dir: Path) -> None:
    """What the run reads, for the next resume to compare with."""
    (run_dir / DATA_IDENTITY_FILE).write_text(json.dumps(data_identity(recipe), indent=1))
