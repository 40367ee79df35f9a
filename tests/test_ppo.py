"""PPO on the tiny review models: the score rises with bounded KL, a larger KL coefficient keeps the
policy closer, PPO-ptx keeps the LM loss on its data, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_cli.actor_critic import to_padded
from align_cli.data.collate import pad_collate
from align_cli.data.formats import load_records
from align_cli.data.tokenize import tokenize_sft
from align_cli.forward import response_logprobs
from align_cli.recipe import load_recipe
from align_cli.stages.ppo import run_ppo
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import metric_rows, quiet_console, weights


def ppo(models: dict, out: Path, *sets: str, resume: bool = False) -> dict:
    overrides = {
        "model.name_or_path": str(models["sft"]),
        "ppo.reward_model": str(models["reward"]),
        "ppo.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(out),
    }
    recipe = load_recipe(ROOT / "recipes" / "ppo-tiny.yaml", overrides, ["ppo.max_new_tokens=24", *sets])
    return run_ppo(recipe, resume=resume, console=quiet_console())


def nll(model_dir: Path, data: Path, n: int = 96) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples, _ = tokenize_sft(load_records(str(data))[:n], tok, "auto", 128, "truncate")
    with torch.no_grad():
        logps, _ = response_logprobs(model, pad_collate(examples, tok.pad_token_id))
    return -logps.mean().item()


def test_to_padded_keeps_row_order():
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert to_padded(flat, torch.tensor([2, 3])).tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]


@pytest.fixture(scope="module")
def ppo_runs(review_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo")
    common = ["training.max_steps=8", "training.save_every=0"]
    ppo(review_models, root / "low", *common, "ppo.kl_coef=0.05")
    ppo(review_models, root / "high", *common, "ppo.kl_coef=1.0")
    ppo(
        review_models,
        root / "ptx",
        *common,
        "ppo.kl_coef=0.05",
        f"ppo.ptx_data={review_models['reviews']}",
        "ppo.ptx_coef=1.0",
    )
    return {"low": root / "low", "high": root / "high", "ptx": root / "ptx"}


def test_ppo_raises_the_score_with_bounded_kl(ppo_runs):
    rows = metric_rows(ppo_runs["low"])
    start = sum(r["score/mean"] for r in rows[:2]) / 2
    end = sum(r["score/mean"] for r in rows[-2:]) / 2
    assert end > start + 2.0, (start, end)  # reward-model scores; pairs in the data differ by ~5-20
    assert all(r["objective/kl"] < 15 for r in rows)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout: policy == reference
    for key in (
        "policy/entropy",
        "loss/policy",
        "loss/value",
        "policy/clipfrac",
        "policy/approx_kl",
        "value/explained_variance",
        "response/length",
        "response/eos_rate",
        "kl_coef",
    ):
        assert key in rows[-1]
    assert (ppo_runs["low"] / "samples.jsonl").read_text().count("\n") == 8 * 4


def test_a_larger_kl_coefficient_ends_closer_to_the_reference(ppo_runs):
    low = metric_rows(ppo_runs["low"])[-2:]
    high = metric_rows(ppo_runs["high"])[-2:]
    assert sum(r["objective/kl"] for r in high) < sum(r["objective/kl"] for r in low)


def test_ptx_keeps_the_language_model_loss_closer_to_its_start(review_models, ppo_runs):
    data = review_models["reviews"]
    start = nll(review_models["sft"], data)
    without = nll(ppo_runs["low"] / "final", data)
    with_ptx = nll(ppo_runs["ptx"] / "final", data)
    assert abs(with_ptx - start) < abs(without - start), (start, without, with_ptx)


def test_ppo_resume_is_exact(review_models, tmp_path: Path, runs_dir: Path):
    sets = [
        "training.max_steps=4",
        "training.save_every=2",
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=2",
        "ppo.value_model=policy_head",
        "ppo.adaptive_kl=true",
        "ppo.kl_target=1.0",
    ]
    straight = tmp_path / "straight"
    ppo(review_models, straight, *sets)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-0000002", resumed / "checkpoint-0000002")
    lines = (straight / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    ppo(review_models, resumed, *sets, resume=True)
    a, b = metric_rows(straight), metric_rows(resumed)
    assert len(b) == 4
    for key in ("score/mean", "objective/kl", "loss/policy", "loss/value", "kl_coef"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    assert a[-1]["kl_coef"] != 0.05  # the adaptive controller moved, and its state was resumed
    wa, wb = weights(straight / "final"), weights(resumed / "final")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
