"""Small helpers shared by the stage tests."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
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


def load_example_module(path: Path, name: str):
    """Import an example script under a unique module name: two scripts called make_data.py live
    in examples/ and examples/sentiment/, and a plain `import make_data` picks whichever came first."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(path.parent))  # the script's own sibling imports (e.g. reviews.py)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
