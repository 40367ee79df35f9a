"""Shared fixtures: one offline tiny model per test session, and helpers to run the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_runs_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stage chaining (runs/latest.json) never touches the working tree's runs/ during tests."""
    os.environ["ALIGN_RUNS_DIR"] = str(tmp_path_factory.mktemp("session_runs"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align_cli.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture()
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own runs/ registry so stage chaining never leaks between tests."""
    root = tmp_path / "runs"
    monkeypatch.setenv("ALIGN_RUNS_DIR", str(root))
    return root


@pytest.fixture()
def tiny_copy(tiny_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tiny"
    shutil.copytree(tiny_model, target)
    return target


@pytest.fixture(scope="session")
def review_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SFT policy that writes movie reviews of mixed sentiment, and a tiny reward model trained
    on the review preferences (rule: more positive words is better). Built once per test session and
    shared by the rejection-sampling, PPO and pipeline tests."""
    import io
    import json

    from rich.console import Console

    from align_cli.recipe import load_recipe
    from align_cli.stages.reward import run_reward
    from align_cli.stages.sft import run_sft

    root = tmp_path_factory.mktemp("review_models")
    previous = os.environ.get("ALIGN_RUNS_DIR")
    os.environ["ALIGN_RUNS_DIR"] = str(root / "runs")  # keep the test's own runs/ registry clean
    reviews = root / "reviews.jsonl"
    with reviews.open("w") as handle:
        for line in (EXAMPLES / "prefs.jsonl").read_text().splitlines():
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                handle.write(json.dumps({"prompt": row["prompt"], "completion": row[key]}) + "\n")
    quiet = Console(file=io.StringIO())
    sft = load_recipe(
        None,
        {"model.name_or_path": str(tiny_model), "data.train": str(reviews), "output.dir": str(root / "sft")},
        [
            "training.lr=3e-3",
            "training.max_steps=120",
            "training.micro_batch_size=16",
            "training.warmup_steps=5",
        ],
        stage="sft",
    )
    run_sft(sft, console=quiet)
    reward = load_recipe(
        ROOT / "recipes" / "reward-tiny.yaml",
        {"model.name_or_path": str(root / "sft" / "final"), "output.dir": str(root / "reward")},
        ["training.epochs=2", "training.eval_every=null"],
    )
    run_reward(reward, console=quiet)
    if previous is None:
        os.environ.pop("ALIGN_RUNS_DIR")
    else:
        os.environ["ALIGN_RUNS_DIR"] = previous
    return {"sft": root / "sft" / "final", "reward": root / "reward" / "final", "reviews": reviews}
