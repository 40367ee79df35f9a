"""RLOO on the tiny review models: the reward rises (plain and with REINFORCE++ normalisation), the KL
penalty is in the reward, beta 0 loads no reference model, and a resumed run equals an uninterrupted
one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from align_cli import group_core, group_stage, losses
from align_cli.recipe import RecipeError, load_recipe
from align_cli.stages.rloo import run_rloo
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import metric_rows, quiet_console, weights

LEARN = [  # 8 prompts x 4 samples per iteration, two passes of two mini-batches
    "rloo.prompts_per_iteration=8",
    "rloo.mini_batch_size=16",
    "rloo.num_iterations=2",
    "rloo.max_new_tokens=24",
    "training.lr=5e-4",
    "training.save_every=0",
]


def rloo(models: dict, out: Path, *sets: str, resume: bool = False) -> dict:
    overrides = {
        "model.name_or_path": str(models["sft"]),
        "rloo.reward_model": str(models["reward"]),
        "rloo.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(out),
    }
    recipe = load_recipe(ROOT / "recipes" / "rloo-tiny.yaml", overrides, list(sets))
    return run_rloo(recipe, resume=resume, console=quiet_console())


@pytest.mark.parametrize("normalize", ["none", "reinforce_pp"])
def test_rloo_raises_the_reward(review_models, tmp_path: Path, normalize: str):
    summary = rloo(
        review_models, tmp_path / "run", *LEARN, "training.max_steps=12", f"rloo.normalize={normalize}"
    )
    rows = metric_rows(tmp_path / "run")
    start = sum(r["reward/mean"] for r in rows[:2]) / 2
    end = sum(r["reward/mean"] for r in rows[-2:]) / 2
    print(
        f"\nRLOO (normalize {normalize}) reward (first / last 2 of 12 iterations): {start:.2f} -> {end:.2f}"
    )
    assert end > start + 2.0, (start, end)  # reward-model scores; pairs in the data differ by ~5-20
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first samples: policy == reference
    for r in rows:  # the KL penalty is in the reward: R = r - beta * KL
        assert r["objective/rlhf_reward"] == pytest.approx(
            r["reward/mean"] - 0.05 * r["objective/kl"], abs=1e-4
        )
    for key in ("loss", "policy/clipfrac", "policy/approx_kl", "policy/entropy", "response/eos_rate"):
        assert key in rows[-1], key
    assert summary["last_reward"] == rows[-1]["reward/mean"]


def test_rloo_first_update_is_reinforce_with_the_leave_one_out_baseline(review_models, tmp_path, monkeypatch):
    """One mini-batch: the loss sees ratio 1 (log-probs of the sampling policy) and the advantages of
    the KL-shaped rewards, R_i - mean of the other k - 1 of its prompt, which sum to 0 in each group."""
    captured: dict = {}
    real_loo, real_loss = losses.leave_one_out_advantages, losses.rloo_loss

    def spy_loo(rewards, k):
        captured["rewards"], captured["advantages"] = rewards.clone(), real_loo(rewards, k)
        return captured["advantages"]

    def spy_loss(logps, old, *args):
        captured.setdefault("log_ratio", ((logps.detach() - old) * args[1]).sum(-1))
        return real_loss(logps, old, *args)

    monkeypatch.setattr(losses, "leave_one_out_advantages", spy_loo)
    monkeypatch.setattr(losses, "rloo_loss", spy_loss)
    one = ["training.max_steps=1", "rloo.prompts_per_iteration=2", "rloo.mini_batch_size=8"]
    rloo(review_models, tmp_path / "run", *one, "rloo.max_new_tokens=12", "rloo.temperature=0.7")
    r, a = captured["rewards"].tolist(), captured["advantages"].tolist()
    expected = [r[i] - (sum(r[4 * (i // 4) : 4 * (i // 4) + 4]) - r[i]) / 3 for i in range(8)]
    assert a == pytest.approx(expected, abs=1e-5)
    assert sum(a[:4]) == pytest.approx(0.0, abs=1e-5) and sum(a[4:]) == pytest.approx(0.0, abs=1e-5)
    # the old log-probs come from the shared-prompt pass (the prompt's KV cache reused by its group),
    # equal to the update's full forward up to float rounding (~2e-6); a wrong temperature or model
    # differs by 1e-2 or more
    torch.testing.assert_close(captured["log_ratio"], torch.zeros(8), atol=1e-5, rtol=0)
    (row,) = metric_rows(tmp_path / "run")
    assert row["policy/clipfrac"] == 0.0 and row["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9)


def test_beta_zero_loads_no_reference(review_models, tmp_path: Path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("beta 0 must not load or run a reference")

    monkeypatch.setattr(group_stage, "frozen_reference", refuse)
    monkeypatch.setattr(group_core, "LiveReference", refuse)
    rloo(review_models, tmp_path / "run", "training.max_steps=2", "training.save_every=0", "rloo.beta=0")
    rows = metric_rows(tmp_path / "run")
    assert len(rows) == 2 and all("objective/kl" not in r and "objective/rlhf_reward" not in r for r in rows)


def test_rloo_refuses_bad_groups_and_unknown_normalisation():
    path = ROOT / "recipes" / "rloo-tiny.yaml"
    for override in ("rloo.k=1", "rloo.top_p=0.5", "rloo.normalize=group"):
        with pytest.raises(RecipeError, match=override.split("=")[0]):
            load_recipe(path, sets=[override])


def test_rloo_resume_is_exact(review_models, tmp_path: Path, runs_dir: Path):
    sets = [
        "training.max_steps=4",
        "training.save_every=2",
        "rloo.prompts_per_iteration=4",
        "rloo.mini_batch_size=8",
        "rloo.num_iterations=2",
        "rloo.max_new_tokens=12",
        "rloo.normalize=reinforce_pp",
    ]
    straight = tmp_path / "straight"
    rloo(review_models, straight, *sets)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-0000002", resumed / "checkpoint-0000002")
    lines = (straight / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    rloo(review_models, resumed, *sets, resume=True)
    a, b = metric_rows(straight), metric_rows(resumed)
    assert len(b) == 4
    for key in ("reward/mean", "objective/kl", "loss", "policy/clipfrac", "policy/approx_kl"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    wa, wb = weights(straight / "final"), weights(resumed / "final")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_the_plan_holds_a_reference_only_when_beta_is_positive(tiny_model: Path, stage: str):
    from align_cli.memory import plan, read_config

    config = read_config(str(tiny_model))

    def held(*sets: str) -> list[str]:
        recipe = load_recipe(None, {"model.name_or_path": str(tiny_model)}, list(sets), stage=stage)
        return [c.name for c in plan(recipe, config, processes=2).components]

    assert "reference (frozen)" in held() and "reward model (frozen)" in held()
    assert "reference (frozen)" not in held(f"{stage}.beta=0")
    lora = ["model.lora.enabled=true"]  # the adapters-off policy is the reference
    assert "reference (frozen)" not in held(*lora)
    group = "num_generations" if stage == "grpo" else "k"
    recipe = load_recipe(
        None,
        {"model.name_or_path": str(tiny_model)},
        [f"{stage}.prompts_per_iteration=8", f"{stage}.{group}=4"],
        stage=stage,
    )
    (sampling,) = [
        c.detail for c in plan(recipe, config, processes=2).components if c.name == "KV cache (sampling)"
    ]
    assert sampling.startswith("16 x "), sampling  # 8 prompts over 2 processes, 4 samples each
