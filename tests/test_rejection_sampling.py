"""Best-of-N: selection raises the reward, more samples raise it more, seeds reproduce, SFT rounds help."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.stages.rejection_sampling import best_of_n_kl, best_of_n_table, select
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import load_example_module, quiet_console

# the ground truth the reward model learned
positivity = load_example_module(ROOT / "examples" / "make_data.py", "instruct_make_data").positivity

runner = CliRunner()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_rs(models: dict, out: Path, *extra: str) -> dict:
    from align_cli.recipe import load_recipe
    from align_cli.stages.rejection_sampling import run_rejection_sampling

    sets = [
        "rejection.max_prompts=24",
        "rejection.max_new_tokens=32",
        "rejection.prompts_per_batch=8",
        *extra,
    ]
    overrides = {
        "model.name_or_path": str(models["sft"]),
        "rejection.reward_model": str(models["reward"]),
        "rejection.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(out),
    }
    return run_rejection_sampling(
        load_recipe(None, overrides, sets, stage="rejection-sample"), console=quiet_console()
    )


def test_analytic_kl_and_table_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    table = best_of_n_table([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    assert [r["n"] for r in table] == [1, 2, 4]
    assert table[0]["reward_best_of_n"] == 0.5  # first samples: 1 and 0
    assert table[1]["reward_best_of_n"] == 1.5  # best of first two: 3 and 0
    assert table[2]["reward_best_of_n"] == 4.0  # best of all four: 3 and 5
    assert table[2]["reward_mean_of_n"] == pytest.approx((1.5 + 2.0) / 2)
    assert select([1.0, 3.0, 2.0], "best", 1, None) == [1]
    assert select([1.0, 3.0, 2.0], "top_k", 2, None) == [1, 2]
    assert select([1.0, 3.0, 2.0], "threshold", 1, 1.5) == [1, 2]


def test_best_of_n_selects_higher_reward_and_more_samples_help(review_models, tmp_path: Path, runs_dir: Path):
    summary = run_rs(review_models, tmp_path / "rs", "rejection.n=16")
    samples, best = rows(tmp_path / "rs" / "samples.jsonl"), rows(tmp_path / "rs" / "best.jsonl")
    assert len(samples) == 24 * 16 and len(best) == 24
    mean_all = sum(s["reward"] for s in samples) / len(samples)
    mean_best = sum(b["reward"] for b in best) / len(best)
    assert mean_best > mean_all
    by_n = {r["n"]: r["reward_best_of_n"] for r in summary["rounds"][0]["table"]}
    assert by_n[1] < by_n[4] < by_n[16]
    # the ground truth agrees: the selected reviews are more positive than the average sample
    assert sum(positivity(b["completion"]) for b in best) / len(best) > sum(
        positivity(s["response"]) for s in samples
    ) / len(samples)
    pairs = rows(tmp_path / "rs" / "pairs.jsonl")
    assert pairs and all(p["chosen"] != p["rejected"] and p["margin"] > 0 for p in pairs)


def test_same_seed_same_samples_other_seed_other_samples(review_models, tmp_path: Path, runs_dir: Path):
    run_rs(review_models, tmp_path / "a", "rejection.n=4", "training.seed=1")
    run_rs(review_models, tmp_path / "b", "rejection.n=4", "training.seed=1")
    run_rs(review_models, tmp_path / "c", "rejection.n=4", "training.seed=2")
    a, b, c = (rows(tmp_path / x / "samples.jsonl") for x in "abc")
    assert a == b
    assert [s["response"] for s in a] != [s["response"] for s in c]


def test_a_round_of_sft_on_the_best_raises_the_policys_reward(review_models, tmp_path: Path, runs_dir: Path):
    summary = run_rs(
        review_models,
        tmp_path / "rs",
        "rejection.n=8",
        "rejection.then=sft",
        "rejection.eval_n=4",
        "training.lr=1e-3",
        "training.epochs=4",
        "training.micro_batch_size=8",
    )
    start, final = summary["policy_mean_reward"]["start"], summary["policy_mean_reward"]["final"]
    assert final > start + 0.5, (start, final)
    assert (tmp_path / "rs" / "round-1" / "sft" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "content, line, fragment",
    [
        ('{"prompt": "ok"}\n{"prompt": "   "}\n', 2, "prompt: empty"),
        ('{"prompt": "ok"}\n{"prompt": "a"\n', 2, "malformed JSON"),
        ('{"prompt": 3}\n', 1, "prompt: expected a string"),
    ],
)
def test_bad_prompt_files_name_file_and_line(
    content, line, fragment, review_models, tmp_path: Path, runs_dir: Path
):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(content)
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "rejection-sample",
            "-m",
            str(review_models["sft"]),
            "--reward-model",
            str(review_models["reward"]),
            "--prompts",
            str(bad),
            "-o",
            str(out),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"{bad}:{line}" in flat and fragment in flat
    assert not out.exists()
