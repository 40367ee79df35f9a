"""Best-of-N: selection raises the reward, more samples raise it more, seeds reproduce, SFT rounds help."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.best_of_n import (
    best_of_n_kl,
    best_of_n_table,
    best_of_n_weights,
    best_worst_pair,
    expected_best_of_n,
    select,
)
from align_cli.cli import app
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
    # unbiased over all 4 samples: sorted 0 1 2 3 and -1 0 4 5; best of 2 weights 0, 1/6, 2/6, 3/6
    assert table[0]["reward_best_of_n"] == pytest.approx((1.5 + 2.0) / 2)  # best of 1 = the mean
    assert table[1]["reward_best_of_n"] == pytest.approx((14 / 6 + 23 / 6) / 2)  # (1+4+9)/6, (0+8+15)/6
    assert table[2]["reward_best_of_n"] == pytest.approx(4.0)  # best of all four: 3 and 5
    for row in table:
        assert row["reward_mean_of_n"] == pytest.approx((1.5 + 2.0) / 2)  # the mean of all N
        assert row["reward_sample_1"] == pytest.approx((1.5 + 2.0) / 2)  # E[one sample] = the mean too
        assert row["gain_per_prompt"] == pytest.approx(row["reward_best_of_n"] - 1.75)
    assert select([1.0, 3.0, 2.0], "best", 1, None) == [1]
    assert select([1.0, 3.0, 2.0], "top_k", 2, None) == [1, 2]
    assert select([1.0, 3.0, 2.0], "threshold", 1, 1.5) == [1, 2]


def test_expected_best_of_n_by_hand():
    """E[max of n of the N rewards, drawn without replacement] = sum_{i=n..N} C(i-1, n-1)/C(N, n) r_(i)."""
    rewards = [3.0, 1.0, 4.0, 2.0]  # sorted: 1 2 3 4
    assert expected_best_of_n(rewards, 2) == pytest.approx((1 * 2 + 2 * 3 + 3 * 4) / 6)  # 20/6
    assert expected_best_of_n(rewards, 1) == pytest.approx(2.5)  # the mean
    assert expected_best_of_n(rewards, 3) == pytest.approx((1 * 3 + 3 * 4) / 4)  # C(2,2)/4, C(3,2)/4
    assert expected_best_of_n(rewards, 4) == pytest.approx(4.0)  # the max
    assert best_of_n_weights(4, 2) == pytest.approx([0.0, 1 / 6, 2 / 6, 3 / 6])
    assert sum(best_of_n_weights(64, 16)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n=5"):
        expected_best_of_n(rewards, 5)


def test_best_of_n_table_uses_all_samples_not_the_first_n():
    """The first samples are not representative here: the best one comes first. An estimate from the
    first n samples says best of 1 = best of 2 = 10; the unbiased one over all 4 says 2.5 and 5."""
    table = {r["n"]: r for r in best_of_n_table([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]])}
    assert table[1]["reward_best_of_n"] == pytest.approx(2.5)
    assert table[2]["reward_best_of_n"] == pytest.approx(5.0)  # sorted 0 0 0 10: 3/6 * 10 for both prompts
    assert table[4]["reward_best_of_n"] == pytest.approx(10.0)
    assert table[2]["reward_mean_of_n"] == pytest.approx(2.5)
    assert table[1]["reward_sample_1"] == pytest.approx(2.5)


def test_frontier_best_of_n_weights_the_rm_sorted_pool():
    """Evaluator.best_of_n: the ground-truth reward, RM score and empirical-CDF KL of the RM-selected best
    of n, averaged with the best-of-n weights over the whole pool sorted by RM score (no models: the
    sampler and scorers are replaced by fixed numbers)."""
    from align_cli.evaluate import Evaluator
    from align_cli.generation import Sample

    ev = Evaluator.__new__(Evaluator)
    ev.prompts, ev.scorer, ev.reference, ev.seed = ["p"], object(), None, 0
    samples = [Sample(0, k, [1], [2], True) for k in range(4)]
    rm, gt = [0.3, 0.1, 0.4, 0.2], [1.0, 5.0, 2.0, 7.0]
    ev._draw = lambda model, n, seed: (samples, ["t"] * 4)
    ev._score = lambda s, texts: {"rm_score": rm, "reward": gt}
    one, two = ev.best_of_n([1, 2], pool_factor=2)
    # n = 1: the plain means, KL 0
    assert one["rm_score"] == pytest.approx(0.25) and one["reward"] == pytest.approx(3.75)
    assert one["kl"] == pytest.approx(0.0)
    # n = 2: by RM score the samples sort as 1, 3, 0, 2 (gt 5, 7, 1, 2) with weights 0, 1/6, 2/6, 3/6
    assert two["rm_score"] == pytest.approx((0.2 * 1 + 0.3 * 2 + 0.4 * 3) / 6)
    assert two["reward"] == pytest.approx((7.0 * 1 + 1.0 * 2 + 2.0 * 3) / 6)
    kl = math.log(2) + (math.log(1.5 / 4) * 1 + math.log(2.5 / 4) * 2 + math.log(3.5 / 4) * 3) / 6
    assert two["kl"] == pytest.approx(kl)
    assert two["kl_analytic"] == pytest.approx(math.log(2) - 0.5)
    assert set(two) == {"n", "kl", "kl_analytic", "rm_score", "reward"}


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


def test_best_worst_pair_by_hand():
    assert best_worst_pair([0.2, 0.9, -0.1, 0.5], ["a", "b", "c", "d"]) == (1, 2)
    assert best_worst_pair([0.3, 0.3, 0.3], ["a", "b", "c"]) is None  # a tie states no preference
    assert best_worst_pair([0.1, 0.4], ["same", "same"]) is None  # nor do two equal texts
    assert best_worst_pair([0.7], ["a"]) is None


def test_pairs_are_best_vs_worst_of_each_prompts_finished_samples(
    review_models, tmp_path: Path, runs_dir: Path
):
    summary = run_rs(review_models, tmp_path / "rs", "rejection.n=4")
    samples, pairs = rows(tmp_path / "rs" / "samples.jsonl"), rows(tmp_path / "rs" / "pairs.jsonl")
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        if s["finished"] and s["response"].strip():
            by_prompt.setdefault(s["prompt_id"], []).append(s)
    assert pairs
    for pair in pairs:
        group = by_prompt[pair["prompt_id"]]
        top, bottom = max(s["reward"] for s in group), min(s["reward"] for s in group)
        assert pair["chosen_reward"] == top and pair["rejected_reward"] == bottom
        assert pair["chosen_reward"] > pair["rejected_reward"]
        assert pair["margin"] == pytest.approx(top - bottom)
        assert {s["response"] for s in group if s["reward"] == top} >= {pair["chosen"]}
        assert {s["response"] for s in group if s["reward"] == bottom} >= {pair["rejected"]}
    figures = summary["rounds"][0]
    assert figures["pairs"] == len(pairs)
    # every prompt has a pair, or is counted under one reason for having none
    tied = sum(len(g) >= 2 and len({s["reward"] for s in g}) == 1 for g in by_prompt.values())
    too_few = 24 - sum(len(g) >= 2 for g in by_prompt.values())
    assert figures["pairs_skipped_tied"] == tied
    assert figures["pairs_skipped_too_few_finished"] == too_few
    assert figures["pairs"] + tied + too_few == 24


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
