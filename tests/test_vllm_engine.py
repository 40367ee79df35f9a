"""vLLM for the on-policy stages (vllm_engine.py), without vLLM or a GPU: the backend choice, its errors
(raised before any model loads), and the weight sync into a fake engine. The engine itself and its
sampling are not exercised here (no GPU, no vLLM in CI)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from align_cli import vllm_engine
from align_cli.errors import AlignError
from align_cli.vllm_engine import VllmRollouts, resolve_backend, weights_for_vllm


def test_backend_choice(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    assert resolve_backend("auto", "ppo") == "transformers"
    assert resolve_backend("transformers", "ppo") == "transformers"
    with pytest.raises(AlignError, match="ppo.backend is vllm but vLLM is not installed"):
        resolve_backend("vllm", "ppo")
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "grpo") == "transformers"
    with pytest.raises(AlignError, match="grpo.backend is vllm but no GPU"):
        resolve_backend("vllm", "grpo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "rloo") == "vllm"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_backend("auto", "rloo") == "transformers"
    with pytest.raises(AlignError, match="one process"):
        resolve_backend("vllm", "rloo")
    with pytest.raises(AlignError, match="must be one of"):
        resolve_backend("sglang", "online_dpo")


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo", "online-dpo"])
def test_vllm_without_vllm_or_gpu_fails_before_models_load(
    stage: str, tiny_model: Path, runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """One clear line, and no model is loaded first (it would take minutes on a real checkpoint): a
    missing vLLM is a recipe error (before torch loads), a missing GPU stops the stage before its models."""
    import importlib.util

    import transformers

    loaded = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: loaded.append(a) or 1 / 0)
    from align_cli.recipe import RecipeError, load_recipe
    from align_cli.stages import STAGES

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The film was"}\n')
    key = stage.replace("-", "_")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"model: {{name_or_path: {tiny_model}}}\n"
        f"{key}: {{backend: vllm, reward_model: {tiny_model}, prompts: {prompts}}}\n"
    )
    spec = STAGES[stage]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    with pytest.raises(
        RecipeError, match=rf"{key}.backend: vllm is not installed \(pip install 'align-cli\[vllm\]'\)"
    ):
        load_recipe(recipe_file, stage=spec.name)

    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)  # vLLM "installed", no GPU
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("align_cli.recipe._backend_problems", lambda r: [])
    recipe = load_recipe(recipe_file, stage=spec.name)
    with pytest.raises(AlignError, match=f"{key}.backend is vllm but no GPU is visible"):
        getattr(spec.load(), f"run_{spec.module}")(recipe)
    assert not loaded


class FakeLLM:
    """The part of vLLM's LLM that VllmRollouts.sync uses; collective_rpc runs the function on one fake
    worker whose model records what load_weights received."""

    def __init__(self, **kwargs):
        self.kwargs, self.loaded, self.calls = kwargs, {}, []
        model = types.SimpleNamespace(load_weights=lambda weights: self.loaded.update(dict(weights)))
        self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))

    def collective_rpc(self, fn, args=()):
        self.calls.append("rpc")
        return [fn(self.worker, *args)]

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def sleep(self, level=1):
        self.calls.append("sleep")

    def wake_up(self):
        self.calls.append("wake")


def test_weight_sync_pushes_the_current_weights(tiny_model: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    engine = VllmRollouts(str(tiny_model), None, seed=0, make_llm=FakeLLM)
    assert engine.llm.kwargs["enable_sleep_mode"] and engine.llm.kwargs["model"] == str(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # an update
    assert engine.sync(model) == len(model.state_dict())
    assert set(engine.llm.loaded) == set(model.state_dict())
    torch.testing.assert_close(engine.llm.loaded["lm_head.weight"], model.lm_head.weight)
    assert engine.llm.calls[-2:] == ["rpc", "reset"]  # the prefix cache is stale after new weights


def test_weight_sync_of_a_lora_policy_pushes_merged_base_names(tiny_model: Path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    engine = VllmRollouts(str(tiny_model), None, seed=0, make_llm=FakeLLM)
    engine.sync(model)
    assert set(engine.llm.loaded) == set(plain)  # checkpoint names, no lora_ tensors
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(engine.llm.loaded[q], plain[q])  # the adapters were merged in ...
    base_q = model.get_base_model().state_dict()[q.replace(".weight", ".base_layer.weight")]
    torch.testing.assert_close(base_q, plain[q])
    assert set(dict(weights_for_vllm(model))) == set(plain)  # ... and unmerged after the push
