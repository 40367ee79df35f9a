"""GRPO on the tiny review models: the reward rises, log-probs are those of the sampling distribution
(ratio 1 and KL 0 at identical weights), beta 0 loads no reference model, Dr. GRPO and the token
normalisations run, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from align_cli import group_core, group_stage, losses
from align_cli.recipe import RecipeError, load_recipe
from align_cli.stages.grpo import run_grpo
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import metric_rows, quiet_console, weights

LEARN = [  # 8 prompts x 4 samples per iteration, two passes of two mini-batches
    "grpo.prompts_per_iteration=8",
    "grpo.mini_batch_size=16",
    "grpo.num_iterations=2",
    "grpo.max_new_tokens=24",
    "training.lr=5e-4",
    "training.save_every=0",
]


def grpo(models: dict, out: Path, *sets: str, resume: bool = False) -> dict:
    overrides = {
        "model.name_or_path": str(models["sft"]),
        "grpo.reward_model": str(models["reward"]),
        "grpo.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(out),
    }
    recipe = load_recipe(ROOT / "recipes" / "grpo-tiny.yaml", overrides, list(sets))
    return run_grpo(recipe, resume=resume, console=quiet_console())


def ends_higher(rows: list[dict], by: float) -> tuple[float, float]:
    start = sum(r["reward/mean"] for r in rows[:2]) / 2
    end = sum(r["reward/mean"] for r in rows[-2:]) / 2
    assert end > start + by, (start, end)  # reward-model scores; pairs in the data differ by ~5-20
    return start, end


def test_grpo_raises_the_reward(review_models, tmp_path: Path):
    summary = grpo(review_models, tmp_path / "run", *LEARN, "training.max_steps=12")
    rows = metric_rows(tmp_path / "run")
    start, end = ends_higher(rows, 2.0)
    print(f"\nGRPO reward (mean of first / last 2 of 12 iterations): {start:.2f} -> {end:.2f}")
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first samples: policy == reference
    assert all(r["objective/kl"] < 15 for r in rows)
    for key in (
        "reward/std",
        "reward/frac_zero_std",
        "loss",
        "policy/clipfrac",
        "policy/kl",
        "policy/entropy",
        "grad_norm",
        "response/length",
        "response/eos_rate",
    ):
        assert key in rows[-1], key
    assert (
        summary["first_reward"] == rows[0]["reward/mean"]
        and summary["last_reward"] == rows[-1]["reward/mean"]
    )
    assert (tmp_path / "run" / "samples.jsonl").read_text().count("\n") == 12 * 4
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "variant", [["grpo.scale_rewards=false", "grpo.loss_type=dr_grpo"], ["grpo.loss_type=dapo"]]
)
def test_dr_grpo_and_dapo_also_learn(review_models, tmp_path: Path, variant: list[str]):
    grpo(review_models, tmp_path / "run", *LEARN, "training.max_steps=10", "training.lr=1e-3", *variant)
    start, end = ends_higher(metric_rows(tmp_path / "run"), 1.5)
    print(f"\nGRPO {' '.join(variant)} reward (first / last 2 of 10): {start:.2f} -> {end:.2f}")


def test_grpo_log_probs_are_those_of_the_sampling_temperature(review_models, tmp_path, monkeypatch):
    """One iteration, one mini-batch at temperature 0.7: the old log-probs are log softmax(logits / 0.7)
    of the sampled tokens, the first update's ratio is exactly 1 and the k3 KL to the reference 0."""
    captured: dict = {}
    real_loss, real_sample = losses.grpo_loss, group_core.sample

    def spy_loss(logps, old, *args, **kwargs):
        captured.setdefault("logps", logps.detach().clone())
        captured.setdefault("old", old.clone())
        return real_loss(logps, old, *args, **kwargs)

    def spy_sample(*args, **kwargs):
        captured["samples"] = real_sample(*args, **kwargs)
        return captured["samples"]

    monkeypatch.setattr(losses, "grpo_loss", spy_loss)
    monkeypatch.setattr(group_core, "sample", spy_sample)
    one = ["training.max_steps=1", "grpo.prompts_per_iteration=2", "grpo.mini_batch_size=8"]
    grpo(review_models, tmp_path / "run", *one, "grpo.temperature=0.7", "grpo.max_new_tokens=12")
    policy = AutoModelForCausalLM.from_pretrained(review_models["sft"]).eval()
    samples = captured["samples"]
    assert [s.prompt_index for s in samples] == [0, 0, 0, 0, 1, 1, 1, 1]  # groups of consecutive samples
    for row, s in enumerate(samples):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = policy(ids).logits[0, len(s.prompt_ids) - 1 : -1].float()
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        n = len(s.response_ids)
        # mini-batch rows are shuffled; find this sample's row by its old log-probs
        match = [
            r for r in range(len(samples)) if torch.allclose(captured["old"][r, :n], expected, atol=1e-4)
        ]
        assert match, row
    # the old log-probs come from the shared-prompt pass (the prompt's KV cache reused by its group),
    # equal to the update's full forward up to float rounding (~2e-6); a wrong temperature or model
    # differs by 1e-2 or more
    torch.testing.assert_close(captured["logps"], captured["old"], atol=1e-5, rtol=0)
    (row,) = metric_rows(tmp_path / "run")
    assert row["policy/clipfrac"] == 0.0 and row["policy/kl"] == pytest.approx(0.0, abs=1e-7), row


def test_beta_zero_loads_no_reference(review_models, tmp_path: Path, monkeypatch):
    calls = {"frozen_reference": 0, "LiveReference": 0}
    real_frozen, real_live = group_stage.frozen_reference, group_core.LiveReference

    def counting(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(group_stage, "frozen_reference", counting("frozen_reference", real_frozen))
    monkeypatch.setattr(group_core, "LiveReference", counting("LiveReference", real_live))
    short = ["training.max_steps=2", "training.save_every=0", "grpo.max_new_tokens=8"]
    grpo(review_models, tmp_path / "zero", *short, "grpo.beta=0")
    assert calls == {"frozen_reference": 0, "LiveReference": 0}
    rows = metric_rows(tmp_path / "zero")
    assert all("objective/kl" not in r and "policy/kl" not in r for r in rows)
    grpo(review_models, tmp_path / "some", *short, "grpo.beta=0.04")  # the spies do see the reference path
    assert calls == {"frozen_reference": 1, "LiveReference": 2}


def test_grpo_refuses_bad_groups_and_truncated_sampling():
    path = ROOT / "recipes" / "grpo-tiny.yaml"
    for override in ("grpo.top_p=0.9", "grpo.top_k=50", "grpo.temperature=0", "grpo.num_generations=1"):
        with pytest.raises(RecipeError, match=override.split("=")[0]):
            load_recipe(path, sets=[override])
    with pytest.raises(RecipeError, match="grpo.mini_batch_size: must be <= the samples of an iteration"):
        load_recipe(path, sets=["grpo.mini_batch_size=17"])  # 4 prompts x 4 samples
    with pytest.raises(RecipeError, match="grpo.loss_type"):
        load_recipe(path, sets=["grpo.loss_type=sum"])


def test_grpo_resume_is_exact(review_models, tmp_path: Path, runs_dir: Path):
    sets = [
        "training.max_steps=4",
        "training.save_every=2",
        "grpo.prompts_per_iteration=4",
        "grpo.mini_batch_size=8",
        "grpo.num_iterations=2",
        "grpo.max_new_tokens=12",
    ]
    straight = tmp_path / "straight"
    grpo(review_models, straight, *sets)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-0000002", resumed / "checkpoint-0000002")
    lines = (straight / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    grpo(review_models, resumed, *sets, resume=True)
    a, b = metric_rows(straight), metric_rows(resumed)
    assert len(b) == 4
    for key in ("reward/mean", "objective/kl", "loss", "policy/clipfrac", "policy/kl"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    wa, wb = weights(straight / "final"), weights(resumed / "final")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
