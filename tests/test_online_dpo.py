"""Online DPO on the tiny review models: pairs are the best vs the worst sample of each prompt by the
reward (ties give none, counted), pi_ref is the starting policy, and the reward rises over iterations."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from align_cli.online_dpo_core import make_pairs
from align_cli.recipe import RecipeError, load_recipe
from align_cli.stages.online_dpo import run_online_dpo
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import metric_rows, quiet_console, weights

LEARN = [
    "online_dpo.prompts_per_iteration=8",
    "online_dpo.num_generations=4",
    "online_dpo.mini_batch_size=4",
    "online_dpo.max_new_tokens=24",
    "training.lr=5e-4",
    "training.save_every=0",
]


def online_dpo(models: dict, out: Path, *sets: str, resume: bool = False) -> dict:
    overrides = {
        "model.name_or_path": str(models["sft"]),
        "online_dpo.reward_model": str(models["reward"]),
        "online_dpo.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(out),
    }
    recipe = load_recipe(ROOT / "recipes" / "online-dpo-tiny.yaml", overrides, list(sets))
    return run_online_dpo(recipe, resume=resume, console=quiet_console())


def test_pairs_are_best_against_worst_of_each_prompt_and_ties_are_counted():
    # prompt 0: samples 0-2, best 1, worst 2; prompt 1: a tie; prompt 2: two equal texts; prompt 3: 6 > 5
    group_of = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    scores = [0.5, 2.0, -1.0, 0.3, 0.3, 0.1, 0.9, 5.0, 6.0]
    texts = ["a", "b", "c", "d", "e", "same", "same", "f", "g"]
    pairs, ties = make_pairs(group_of, scores, texts, 4)
    assert pairs == [(1, 2), (8, 7)] and ties == 2


def test_online_dpo_raises_the_reward_and_labels_pairs_by_it(review_models, tmp_path: Path):
    summary = online_dpo(review_models, tmp_path / "run", *LEARN, "training.max_steps=10")
    rows = metric_rows(tmp_path / "run")
    start = sum(r["reward/mean"] for r in rows[:2]) / 2
    end = sum(r["reward/mean"] for r in rows[-2:]) / 2
    print(f"\nonline DPO reward (mean of first / last 2 of 10 iterations): {start:.2f} -> {end:.2f}")
    assert end > start + 2.0, (start, end)  # reward-model scores; pairs in the data differ by ~5-20
    # pi_ref stays the starting policy: the implicit reward beta * log(pi / pi_ref) now orders the pairs
    assert rows[-1]["dpo/rewards/margin"] > 0 and rows[-1]["dpo/rewards/accuracy"] > 0.5
    assert all(r["pairs"] + r["pairs/skipped_tied"] == 8 for r in rows)
    assert all(r["reward/chosen"] > r["reward/rejected"] for r in rows)
    logged = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert logged and all(p["chosen_reward"] > p["rejected_reward"] for p in logged)
    assert (
        summary["first_reward"] == rows[0]["reward/mean"]
        and summary["last_reward"] == rows[-1]["reward/mean"]
    )
    assert summary["pairs"] == sum(r["pairs"] for r in rows)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_first_step_starts_at_the_reference(review_models, tmp_path: Path):
    """One iteration, one optimizer step: policy == pi_ref, so each implicit reward is 0, the loss log 2."""
    online_dpo(
        review_models, tmp_path / "run", *LEARN, "online_dpo.mini_batch_size=8", "training.max_steps=1"
    )
    (row,) = metric_rows(tmp_path / "run")
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["dpo/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert row["dpo/rewards/rejected"] == pytest.approx(0.0, abs=1e-6)


def test_online_dpo_resume_is_exact(review_models, tmp_path: Path, runs_dir: Path):
    sets = [*LEARN, "training.max_steps=4", "training.save_every=2", "online_dpo.max_new_tokens=12"]
    straight = tmp_path / "straight"
    online_dpo(review_models, straight, *sets)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-0000002", resumed / "checkpoint-0000002")
    lines = (straight / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    online_dpo(review_models, resumed, *sets, resume=True)
    a, b = metric_rows(straight), metric_rows(resumed)
    assert len(b) == 4
    for key in ("reward/mean", "pairs", "loss", "dpo/rewards/margin"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    wa, wb = weights(straight / "final"), weights(resumed / "final")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


def test_online_dpo_needs_two_samples_per_prompt(tmp_path: Path):
    with pytest.raises(RecipeError, match="online_dpo.num_generations"):
        load_recipe(ROOT / "recipes" / "online-dpo-tiny.yaml", None, ["online_dpo.num_generations=1"])


def test_several_processes_are_refused_before_any_model_loads(
    review_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="one process"):
        online_dpo(review_models, tmp_path / "run", *LEARN)
    assert not (tmp_path / "run").exists()
