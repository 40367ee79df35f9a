"""The reference log-prob cache key changes with everything the numbers depend on: 4-/8-bit base weights
(and their bitsandbytes settings), and, for a LoRA reference, the base model behind the adapter.

Quantized loading needs CUDA, so the key is tested at the function that builds it from the recipe and
the model directories (``reference_cache_material`` + ``reference_key``); the directories hold small
stand-in files, since the key hashes file bytes and never loads a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align_cli.reference import reference_cache_material
from align_cli.reference_cache import reference_key
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe

EXAMPLES_IDS = [{"prompt_ids": [1, 2, 3], "responses": [[4, 5], [6]]}]


def model_dir(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def adapter_dir(path: Path, base: Path) -> Path:
    path.mkdir(parents=True)
    config = {"base_model_name_or_path": str(base), "peft_type": "LORA", "r": 4}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(b"adapter weights")
    return path


def key(model: Path, tmp_path: Path, *sets: str) -> str:
    recipe = make_recipe("dpo", model, EXAMPLES / "prefs.jsonl", tmp_path / "out", list(sets))
    return reference_key(reference_cache_material(recipe), EXAMPLES_IDS)


def test_quantization_changes_the_key(tmp_path: Path, runs_dir: Path):
    model = model_dir(tmp_path / "m", b"weights")
    lora = ("model.lora.enabled=true",)
    plain = key(model, tmp_path, *lora)
    four = key(model, tmp_path, *lora, "model.load_in_4bit=true")
    eight = key(model, tmp_path, *lora, "model.load_in_8bit=true")
    assert len({plain, four, eight}) == 3
    assert key(model, tmp_path, *lora) == plain  # same recipe, same key
    # the 4-bit compute dtype is the model dtype: a bfloat16 4-bit reference differs from a float32 one
    assert key(model, tmp_path, *lora, "model.load_in_4bit=true", "model.dtype=bfloat16") != four


def test_lora_reference_key_identifies_the_base_model(tmp_path: Path, runs_dir: Path):
    """An adapter directory as the reference (dpo.reference_model) or as the policy that, under LoRA with
    the adapters disabled, is the reference: a new base model behind unchanged adapter files is a miss."""
    base = model_dir(tmp_path / "base", b"base weights, version 1")
    adapter = adapter_dir(tmp_path / "adapter", base)
    policy = model_dir(tmp_path / "policy", b"policy weights")
    adapter_files = {p.name: p.read_bytes() for p in adapter.iterdir()}

    as_reference = key(policy, tmp_path, f"dpo.reference_model={adapter}")
    as_lora_policy = key(adapter, tmp_path, "model.lora.enabled=true")
    (base / "model.safetensors").write_bytes(b"base weights, version 2 (fine-tuned further)")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == adapter_files
    assert key(policy, tmp_path, f"dpo.reference_model={adapter}") != as_reference
    assert key(adapter, tmp_path, "model.lora.enabled=true") != as_lora_policy
    # the base model's config counts too
    before = key(adapter, tmp_path, "model.lora.enabled=true")
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    assert key(adapter, tmp_path, "model.lora.enabled=true") != before


def test_lora_policy_reference_key_identifies_the_base_weights(tmp_path: Path, runs_dir: Path):
    """LoRA on a plain model: the reference is that model with the adapters off, identified by its bytes."""
    model = model_dir(tmp_path / "m", b"weights")
    before = key(model, tmp_path, "model.lora.enabled=true")
    (model / "model.safetensors").write_bytes(b"other weights!")
    assert key(model, tmp_path, "model.lora.enabled=true") != before


def test_adapter_without_a_base_model_cannot_be_identified(tmp_path: Path, runs_dir: Path):
    from align_cli.models import ModelError

    adapter = adapter_dir(tmp_path / "adapter", tmp_path / "missing-base")
    with pytest.raises(ModelError, match="cannot identify"):
        key(adapter, tmp_path, "model.lora.enabled=true")
