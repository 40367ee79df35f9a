"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, Trackio) through accelerate's tracking
integration: ``Accelerator(log_with=...)``, ``init_trackers``, ``log``, ``get_tracker``, ``end_training``.

``training.report_to`` names the trackers; each run logs its metrics rows (step = the row's step), its
resolved recipe (recipe.yaml, flattened) as the tracker's config, and the on-policy stages' samples as
a table where the tracker has one. Files go under the run folder unless the tracker's own environment
variable says otherwise: TensorBoard in RUN/tracking/<project>/, W&B in WANDB_DIR (default RUN/tracking),
MLflow at MLFLOW_TRACKING_URI (default a file store in RUN/tracking/mlruns).

The package check (``check_trackers``) is torch-free and runs before any model loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import yaml

from align_cli.errors import AlignError

# tracker -> (module to import, the align-cli extra that installs it); the names: sections.TRACKERS
TRACKERS = {
    "tensorboard": ("tensorboard", "tracking"),
    "wandb": ("wandb", "tracking"),
    "mlflow": ("mlflow", "tracking"),
    "trackio": ("trackio", "trackio"),
}
TRACKING_DIR = "tracking"  # under the run folder


class TrackingError(AlignError):
    """A tracker named in training.report_to cannot be used."""


def requested(t: Any) -> list[str]:
    """The trackers ``training.report_to`` names (a name or a list; ``none``: no tracker)."""
    names = [t.report_to] if isinstance(t.report_to, str) else list(t.report_to or [])
    return [n for n in dict.fromkeys(names) if n != "none"]


def check_trackers(t: Any) -> None:
    """One line naming the extra to install, for a requested tracker whose package is missing."""
    for name in requested(t):
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(
                f"training.report_to: {name} is not installed; pip install 'align-cli[{extra}]' "
                f"(or set training.report_to=none)"
            )


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe as {"training.lr": 2e-05, ...}: TensorBoard's hparams and MLflow's params take scalars
    only, so lists and mappings become their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flat_config(value, f"{prefix}{key}.")
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The values of a metrics row a tracker plots (numbers; not the step, not flags such as final)."""
    return {
        k: v
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def start_trackers(accelerator: Any, t: Any, run_dir: Path, step: int = 0) -> list[str]:
    """Start the run's trackers (every process calls it; accelerate starts them on the main one) with
    recipe.yaml as their config. ``step``: a resumed run's step (TensorBoard drops its later events,
    as metrics.jsonl drops its later rows). Returns the trackers started."""
    names = requested(t)
    project, run_name = t.project, t.run_name or run_dir.name  # read always: every stage honours them
    if not names:
        return []
    folder = run_dir / TRACKING_DIR
    # the run folder is known only after the accelerator exists (its processes agree on it)
    accelerator.project_configuration.logging_dir = str(folder)
    kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and step > 0:
        kwargs["tensorboard"] = {"purge_step": step + 1}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_name, "dir": os.environ.get("WANDB_DIR") or str(folder)}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": run_name}
        if accelerator.is_main_process:
            _mlflow_store(folder)
    if "trackio" in names:
        kwargs["trackio"] = {"name": run_name}
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if accelerator.is_main_process else {}
    accelerator.init_trackers(project, config=flat_config(recipe or {}), init_kwargs=kwargs)
    return names


def _mlflow_store(folder: Path) -> None:
    """MLFLOW_TRACKING_URI, else a file store in the run folder. MLflow 3 refuses a file store unless
    MLFLOW_ALLOW_FILE_STORE is set (it wants a database, which mlflow-skinny cannot open): a file store,
    named or the default, is allowed here."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or (folder / "mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)


def log_samples(accelerator: Any, names: list[str], rows: list[dict[str, Any]], step: int) -> None:
    """Sampled texts of one iteration as a table: a wandb.Table, an MLflow table (one artifact
    samples.json that grows by iteration), a markdown table in TensorBoard's text tab. Main process."""
    if not rows or not names or not accelerator.is_main_process:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    if "wandb" in names:
        import wandb

        table = wandb.Table(columns=columns, data=cells)
        accelerator.get_tracker("wandb", unwrap=True).log({"samples": table}, step=step)
    if "mlflow" in names:
        import mlflow

        data = {c: [cell[i] for cell in cells] for i, c in enumerate(columns)}
        mlflow.log_table(data=data, artifact_file="samples.json")
    if "tensorboard" in names:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_text("samples", _markdown(columns, cells), global_step=step)
        writer.flush()


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _markdown(columns: list[str], cells: list[list[Any]]) -> str:
    def text(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(text(v) for v in row) + " |" for row in cells])


def end_trackers(accelerator: Any) -> None:
    """End the trackers' runs with what was logged. Not ``accelerator.end_training()``: that also destroys
    the process group, and a multi-process run still synchronises after this (stop checks, barriers)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
