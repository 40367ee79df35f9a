"""align_cli.reference, the one home of the frozen reference: loaded with the policy's settings and no
adapters, or the LoRA policy with its adapters disabled; DPO and PPO both build and score it there."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from align_cli import ppo_core as ppo  # PPO builds and scores its reference in ppo_core
from align_cli import reference as R
from align_cli.data.preference import collate_responses
from align_cli.forward import response_logprobs, summed_logps
from align_cli.models import load_causal_lm
from align_cli.recipe import LoraSection, ModelSection
from align_cli.stages import dpo, kto

EXAMPLES = [
    {"prompt_ids": [1, 5, 6], "responses": [[8, 9, 10, 11], [12, 13]], "margin": None},
    {"prompt_ids": [1, 20, 21, 22], "responses": [[23, 24, 25]], "margin": None},
]
LORA = LoraSection(enabled=True, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])


def policy_section(path: Path, **settings) -> ModelSection:
    return ModelSection(
        name_or_path=str(path),
        dtype="bfloat16",
        attn_implementation="eager",
        gradient_checkpointing=True,
        lora=LORA,
        load_in_4bit=True,
        trust_remote_code=True,
        disable_dropout=False,
        **settings,
    )


def test_the_reference_section_keeps_every_loading_setting_and_drops_adapters(tmp_path: Path):
    policy = policy_section(tmp_path / "sft")
    section = R.reference_section(policy)
    assert section == replace(policy, lora=LoraSection(), gradient_checkpointing=False)
    assert (section.dtype, section.attn_implementation, section.load_in_4bit) == ("bfloat16", "eager", True)
    assert section.trust_remote_code and not section.disable_dropout
    named = R.reference_section(policy, str(tmp_path / "other"))
    assert named == replace(section, name_or_path=str(tmp_path / "other"))
    assert R.reference_section(policy, "") == section  # an empty dpo.reference_model is the policy's start


def with_dropout(model_dir: Path, target: Path) -> Path:
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_the_loaded_reference_is_frozen_in_eval_mode_with_the_policys_dropout_setting(
    tiny_model: Path, tmp_path: Path, disable_dropout: bool
):
    model_dir = with_dropout(tiny_model, tmp_path / "dropout")
    section = ModelSection(name_or_path=str(model_dir), lora=LORA, disable_dropout=disable_dropout)
    ref = R.load_reference(section, str(model_dir))  # a named reference: loaded even under LoRA
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert not hasattr(ref, "peft_config")  # no adapters
    assert ref.model.layers[0].self_attn.attention_dropout == (0.0 if disable_dropout else 0.1)
    assert R.frozen_reference(section) is None  # LoRA, the policy's start: the policy with adapters off
    assert R.frozen_reference(replace(section, lora=LoraSection())) is not None


@pytest.fixture()
def lora_policy(tiny_model: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A LoRA policy whose adapters change its outputs, in train mode, and its base model."""
    torch.manual_seed(0)
    base = load_causal_lm(ModelSection(name_or_path=str(tiny_model))).eval()
    policy = load_causal_lm(ModelSection(name_or_path=str(tiny_model), lora=LORA))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy.train(), base


def test_live_reference_is_the_policy_with_adapters_off_at_the_temperature(lora_policy):
    policy, base = lora_policy
    batch = collate_responses(EXAMPLES, 0)
    acc = Accelerator(cpu=True)
    live = R.LiveReference(acc, None, temperature=0.7)
    got_sums, got_tokens = live(policy, batch), live.token_logprobs(policy, batch)
    with torch.no_grad():
        torch.testing.assert_close(got_sums, summed_logps(base, batch, 0.7))
        torch.testing.assert_close(got_tokens, response_logprobs(base, batch, 0.7)[0])
        assert policy.training  # its mode is restored, and its adapters are on again
        assert not torch.allclose(summed_logps(policy.eval(), batch, 0.7), got_sums, atol=1e-3)
    frozen = R.LiveReference(acc, base, temperature=0.7)  # a frozen model scores the same numbers
    torch.testing.assert_close(frozen(policy, batch), got_sums)


def test_dpo_and_ppo_build_and_score_the_reference_in_one_place():
    # DPO and KTO open theirs through reference.open_live_reference (frozen_reference + LiveReference)
    assert dpo.open_live_reference is kto.open_live_reference is R.open_live_reference
    assert ppo.frozen_reference is R.frozen_reference
    assert ppo.LiveReference is R.LiveReference
    for stage in (dpo, ppo):
        for name in ("load_reference", "live_reference", "reference_cache_material", "cache_reference_logps"):
            assert getattr(stage, name, R.__dict__.get(name)) is R.__dict__.get(name), (stage.__name__, name)
