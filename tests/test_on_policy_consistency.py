"""On-policy log-probs are those of the distribution that sampled (issue 14, items 1, 2, 4 and 9).

- PPO at temperature 0.7: rollout, update and reference log-probs are log softmax(logits / 0.7) of the
  sampled tokens (item 1); top-p / top-k are refused for PPO.
- At identical weights the PPO ratio is exactly 1 and the KL to the reference 0, also with a
  dropout-0.1 model (item 4) and under bf16 autocast (item 9).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from align_cli import losses, ppo_core
from align_cli.recipe import RecipeError, load_recipe
from align_cli.stages import ppo as ppo_stage
from align_cli.stages.dpo import run_dpo
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import make_recipe, metric_rows, quiet_console

ONE_UPDATE = [  # one iteration, one mini-batch, one epoch: its stats are those of the first mini-batch
    "training.max_steps=1",
    "training.save_every=0",
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=8",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=16",
]


def run_ppo(models: dict, out: Path, *sets: str) -> dict:
    overrides = {
        "model.name_or_path": str(models["sft"]),
        "ppo.reward_model": str(models["reward"]),
        "ppo.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(out),
    }
    recipe = load_recipe(ROOT / "recipes" / "ppo-tiny.yaml", overrides, [*ONE_UPDATE, *sets])
    return ppo_stage.run_ppo(recipe, console=quiet_console())


def with_dropout(model_dir: Path, target: Path, p: float = 0.1) -> Path:
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["attention_dropout"] = p
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_ppo_log_probs_are_those_of_the_sampling_temperature(review_models, tmp_path, monkeypatch):
    captured: dict = {}
    real_rewards, real_sample = losses.per_token_rewards, ppo_core.sample

    def spy_rewards(scores, logps, ref_logps, mask, *args):
        captured.update(logps=logps.clone(), ref=ref_logps.clone(), mask=mask.clone())
        return real_rewards(scores, logps, ref_logps, mask, *args)

    def spy_sample(*args, **kwargs):
        captured["samples"] = real_sample(*args, **kwargs)
        return captured["samples"]

    monkeypatch.setattr(losses, "per_token_rewards", spy_rewards)
    monkeypatch.setattr(ppo_core, "sample", spy_sample)
    run_ppo(review_models, tmp_path / "run", "ppo.temperature=0.7")
    policy = AutoModelForCausalLM.from_pretrained(review_models["sft"]).eval()
    for row, s in enumerate(captured["samples"]):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = policy(ids).logits[0, len(s.prompt_ids) - 1 : -1].float()
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        n = len(s.response_ids)
        assert int(captured["mask"][row].sum()) == n
        torch.testing.assert_close(captured["logps"][row, :n], expected, atol=1e-4, rtol=1e-4)
        # the reference scores at the same temperature: at identical weights, the same numbers
        torch.testing.assert_close(captured["ref"][row, :n], captured["logps"][row, :n], atol=1e-6, rtol=0)


def test_ppo_refuses_truncated_sampling():
    for override in ("ppo.top_p=0.9", "ppo.top_k=50", "ppo.temperature=0"):
        with pytest.raises(RecipeError, match=override.split("=")[0]):
            load_recipe(ROOT / "recipes" / "ppo-tiny.yaml", sets=[override])
    load_recipe(sets=["rejection.top_p=0.9"], stage="rejection-sample")  # truncation is fine there


def first_update(run_dir: Path) -> dict:
    (row,) = metric_rows(run_dir)
    return row


def test_ppo_ratio_is_one_and_kl_zero_at_identical_weights_with_dropout(review_models, tmp_path):
    models = {
        "sft": with_dropout(review_models["sft"], tmp_path / "sft"),
        "reward": with_dropout(review_models["reward"], tmp_path / "reward"),
    }
    run_ppo(models, tmp_path / "run", "ppo.temperature=0.7")
    row = first_update(tmp_path / "run")
    assert row["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9), row
    assert row["policy/clipfrac"] == 0.0, row
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6), row


def test_ppo_reference_runs_under_the_policys_autocast(review_models, tmp_path):
    run_ppo(review_models, tmp_path / "run", "training.precision=bf16")
    row = first_update(tmp_path / "run")
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6), row
    assert row["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9), row


@pytest.mark.parametrize("reference_cache", [True, False])
def test_dpo_first_loss_is_log_2_with_a_dropout_model(tiny_model, tmp_path, runs_dir, reference_cache):
    """Item 4: with dropout 0.1 in the model, the first DPO step still sees pi = pi_ref (loss log 2), with
    the reference cached (computed in eval mode) or live."""
    model = with_dropout(tiny_model, tmp_path / "dropout")
    sets = [
        "training.max_steps=1",
        "training.micro_batch_size=8",
        f"dpo.reference_cache={str(reference_cache).lower()}",
    ]
    run_dpo(
        make_recipe("dpo", model, EXAMPLES / "prefs.jsonl", tmp_path / "run", sets), console=quiet_console()
    )
    (row,) = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert row["loss"] == pytest.approx(math.log(2.0), abs=1e-5), row
    assert row["rewards/margin"] == pytest.approx(0.0, abs=1e-5), row


def test_model_disable_dropout_false_keeps_the_models_dropout(tiny_model, tmp_path):
    from align_cli.models import load_causal_lm
    from align_cli.recipe import ModelSection

    model = with_dropout(tiny_model, tmp_path / "dropout")
    on = load_causal_lm(ModelSection(name_or_path=str(model), disable_dropout=False))
    off = load_causal_lm(ModelSection(name_or_path=str(model)))
    assert on.model.layers[0].self_attn.attention_dropout == 0.1
    assert off.model.layers[0].self_attn.attention_dropout == 0.0
