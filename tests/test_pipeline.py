"""The whole pipeline, CI-sized: SFT -> reward model -> DPO and rejection sampling on the offline
sentiment task; both must raise the hidden ground-truth reward over the SFT start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align_cli.pipeline import load_pipeline, run_frontier, run_pipeline
from align_cli.recipe import RecipeError
from tests.conftest import ROOT
from tests.helpers import load_example_module, quiet_console

make_data = load_example_module(ROOT / "examples" / "sentiment" / "make_data.py", "sentiment_make_data")


def pipeline_recipe(tmp: Path, tiny_model: Path) -> Path:
    data = tmp / "data"
    make_data.main(["--out", str(data), "--reviews", "1200", "--pairs", "800"])
    sentiment = ROOT / "examples" / "sentiment"
    stages = [
        {
            "name": "sft",
            "stage": "sft",
            "recipe": str(sentiment / "sft.yaml"),
            "set": [f"model.name_or_path={tiny_model}", f"data.train={data / 'sft.jsonl'}"],
        },
        {
            "name": "reward",
            "stage": "reward",
            "recipe": str(sentiment / "reward.yaml"),
            "set": ["model.name_or_path=@sft", f"data.train={data / 'prefs.jsonl'}"],
        },
        {
            "name": "dpo",
            "stage": "dpo",
            "recipe": str(sentiment / "dpo.yaml"),
            "set": ["model.name_or_path=@sft", f"data.train={data / 'prefs.jsonl'}"],
        },
        {
            "name": "rs",
            "stage": "rejection-sample",
            "set": [
                "model.name_or_path=@sft",
                "rejection.reward_model=@reward",
                f"rejection.prompts={data / 'prompts.jsonl'}",
                "rejection.n=8",
                "rejection.max_prompts=96",
                "rejection.max_new_tokens=32",
                "rejection.then=sft",
                "rejection.eval_n=1",
                "data.template=plain",
                "training.lr=1e-3",
                "training.epochs=3",
                "training.micro_batch_size=16",
            ],
        },
    ]
    evaluate = {
        "reference": "@sft",
        "prompts": str(data / "prompts_eval.jsonl"),
        "ground_truth": str(sentiment / "reviews.py") + ":sentiment",
        "reward_model": "@reward",
        "n": 4,
        "methods": {"SFT": ["sft"], "DPO": ["dpo"], "Rejection sampling": ["rs"]},
        "best_of_n": [1, 8],
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp / "out"), "stages": stages, "evaluate": evaluate}))
    return path


def test_dpo_and_rejection_sampling_raise_the_ground_truth_reward(tiny_model: Path, tmp_path: Path):
    recipe = load_pipeline(pipeline_recipe(tmp_path, tiny_model))
    rows = {r["run"]: r for r in run_frontier(recipe, quiet_console())}
    start = rows["sft"]["reward"]
    assert rows["dpo"]["reward"] > start + 0.1, (start, rows["dpo"])
    assert rows["rs"]["reward"] > start + 0.05, (start, rows["rs"])
    assert rows["sft"]["kl"] == pytest.approx(0.0, abs=1e-4)  # the reference against itself
    assert rows["best-of-8"]["kl"] == pytest.approx(rows["best-of-8"]["kl_analytic"], abs=0.35)
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "frontier.csv").read_text().count("\n") == 1 + len(rows)
    # a second run re-runs nothing: every stage is found finished
    before = {p: p.stat().st_mtime for p in (tmp_path / "out").glob("*/summary.json")}
    run_pipeline(recipe, quiet_console())
    assert {p: p.stat().st_mtime for p in (tmp_path / "out").glob("*/summary.json")} == before


def test_pipeline_recipe_errors_are_listed(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps({"stages": [{"name": "a", "stage": "train"}, {"name": "a", "stage": "sft"}], "extra": 1})
    )
    with pytest.raises(RecipeError) as info:
        load_pipeline(bad)
    text = str(info.value)
    assert "'train' is not one of" in text and "'a' is used twice" in text and "extra: unknown key" in text


def test_frontier_reports_the_best_reward_of_each_method_within_each_kl_budget():
    """Issue 18: the comparison at equal KL is a table. Per method and budget B: the highest reward among
    its runs with KL <= B (ground truth when measured, else the RM score), and which run; none below B."""
    from align_cli.pipeline import best_within_kl

    rows = [
        {"method": "SFT", "run": "sft", "reward": 0.50, "kl": 0.0},
        {"method": "DPO", "run": "dpo-1", "reward": 0.90, "kl": 9.7},
        {"method": "DPO", "run": "dpo-0.2", "reward": 0.96, "kl": 14.1},
        {"method": "PPO", "run": "ppo-0.2", "reward": 0.84, "kl": 5.6},
        {"method": "PPO", "run": "ppo-0.5", "reward": 0.70, "kl": 1.5},
        {"method": "PPO", "run": "ppo-1", "reward": 0.75, "kl": 0.9},  # higher reward at lower KL wins
        {"method": "Best-of-N", "run": "best-of-4", "reward": 0.74, "kl": 0.66},
        {"method": "Best-of-N", "run": "best-of-16", "reward": 0.85, "kl": 1.95},
    ]
    table = {(r["method"], r["budget"]): (r["reward"], r["run"]) for r in best_within_kl(rows, [1, 2, 5, 10])}
    assert table[("SFT", 1)] == (0.50, "sft") and table[("SFT", 10)] == (0.50, "sft")
    assert table[("DPO", 5)] == (None, None) and table[("DPO", 10)] == (0.90, "dpo-1")
    assert table[("PPO", 1)] == (0.75, "ppo-1") and table[("PPO", 2)] == (0.75, "ppo-1")
    assert table[("PPO", 5)] == (0.75, "ppo-1") and table[("PPO", 10)] == (0.84, "ppo-0.2")
    assert table[("Best-of-N", 1)] == (0.74, "best-of-4") and table[("Best-of-N", 2)] == (0.85, "best-of-16")
    rm_only = [{"method": "DPO", "run": "dpo-1", "rm_score": 6.7, "kl": 9.7}]
    assert best_within_kl(rm_only, [10]) == [
        {"method": "DPO", "budget": 10, "reward": 6.7, "run": "dpo-1", "kl": 9.7, "metric": "rm_score"}
    ]


def test_offline_dpo_pipeline_trains_on_the_pairs_rejection_sampling_wrote(review_models, tmp_path: Path):
    """sampled pairs -> DPO, chained by @pairs/pairs.jsonl (examples/sentiment/offline-dpo.yaml's shape)."""
    stages = [
        {
            "name": "pairs",
            "stage": "rejection-sample",
            "set": [
                f"model.name_or_path={review_models['sft']}",
                f"rejection.reward_model={review_models['reward']}",
                f"rejection.prompts={ROOT / 'examples' / 'data' / 'prompts.jsonl'}",
                "rejection.n=4",
                "rejection.max_prompts=16",
                "rejection.max_new_tokens=24",
            ],
        },
        {
            "name": "dpo",
            "stage": "dpo",
            "set": [
                f"model.name_or_path={review_models['sft']}",
                "data.train=@pairs/pairs.jsonl",
                "training.max_steps=2",
                "training.micro_batch_size=4",
            ],
        },
    ]
    path = tmp_path / "offline-dpo.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "stages": stages}))
    run_pipeline(load_pipeline(path), quiet_console())
    pairs = (tmp_path / "out" / "01-pairs" / "pairs.jsonl").read_text().splitlines()
    dpo = json.loads((tmp_path / "out" / "02-dpo" / "summary.json").read_text())
    assert pairs and dpo["data"]["train"]["kept"] == len(pairs)
    resolved = yaml.safe_load((tmp_path / "out" / "02-dpo" / "recipe.yaml").read_text())
    assert resolved["data"]["train"] == str(tmp_path / "out" / "01-pairs" / "pairs.jsonl")


def test_shipped_offline_dpo_recipe_names_the_pairs_of_its_rejection_stage(tmp_path: Path):
    from align_cli.pipeline import _resolve_sets, expand

    recipe = load_pipeline(ROOT / "examples" / "sentiment" / "offline-dpo.yaml")
    runs = {name: sets for name, _, sets, _ in expand(recipe.stages)}
    assert list(runs) == ["sft", "pairs", "dpo", "online-dpo"]
    finals = {"sft": tmp_path / "sft" / "final", "pairs": tmp_path / "pairs" / "final"}
    dirs = {"sft": tmp_path / "sft", "pairs": tmp_path / "pairs"}
    assert f"data.train={tmp_path / 'pairs' / 'pairs.jsonl'}" in _resolve_sets(runs["dpo"], finals, dirs)
    with pytest.raises(RecipeError, match="inside that stage's run folder"):
        _resolve_sets(["data.train=@pairs/../x.jsonl"], finals, dirs)
