"""Small helpers shared by the stage tests."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file

from align_cli.recipe import Recipe, load_recipe


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=120)


def make_recipe(
    stage: str, model: Path | str, data: Path | str, out: Path, sets: list[str] | None = None
) -> Recipe:
    overrides = {"model.name_or_path": str(model), "data.train": str(data), "output.dir": str(out)}
    return load_recipe(None, overrides, sets or [], stage=stage)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run_dir) if "loss" in r}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))
