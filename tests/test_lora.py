"""LoRA on every training stage: only the adapters train (counted against the model's linear layers),
DPO and PPO use the adapter-disabled base as reference (no second model: measured), QLoRA refuses a
CPU, and `align export --merge-lora` gives a plain model with the adapter model's outputs."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import align_cli.stages.dpo as dpo_stage
from align_cli.cli import app
from align_cli.models import ModelError, load_causal_lm
from align_cli.recipe import LoraSection, ModelSection, RecipeError, load_recipe
from align_cli.stages.dpo import run_dpo
from align_cli.stages.ppo import run_ppo
from align_cli.stages.rejection_sampling import run_rejection_sampling
from align_cli.stages.reward import run_reward
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, quiet_console, write_jsonl

R = 4
LORA = ["model.lora.enabled=true", f"model.lora.r={R}", "model.lora.alpha=8", "model.lora.dropout=0.0"]
FAST = ["training.max_steps=3", "training.micro_batch_size=8", "training.lr=1e-2", "data.max_length=128"]


def adapter_count(model_dir: Path, r: int = R) -> int:
    """r * (in + out) for every linear layer of the decoder blocks ("all-linear": not the LM head)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(layers) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    return sum(r * (m.in_features + m.out_features) for m in layers)


def saved_numel(final: Path) -> int:
    return sum(t.numel() for t in load_file(str(final / "adapter_model.safetensors")).values())


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(x) for x in (EXAMPLES / "prefs.jsonl").read_text().splitlines()[:48]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "prefs.jsonl", rows)


@pytest.fixture(scope="module")
def lora_runs(tiny_model: Path, prefs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SFT and reward with LoRA, a few steps each (shared by the count and export tests)."""
    root = tmp_path_factory.mktemp("lora_runs")
    sft = run_sft(
        make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", root / "sft", FAST + LORA),
        console=quiet_console(),
    )
    reward = run_reward(
        make_recipe("reward", tiny_model, prefs, root / "reward", FAST + LORA + ["training.warmup_steps=0"]),
        console=quiet_console(),
    )
    return {"root": root, "sft": sft, "reward": reward}


def test_every_stage_trains_only_the_adapters(
    tiny_model: Path, prefs: Path, lora_runs: dict, tmp_path: Path, runs_dir: Path
):
    adapters = adapter_count(tiny_model)
    hidden = AutoModelForCausalLM.from_pretrained(tiny_model).config.hidden_size
    root = lora_runs["root"]
    # a reward model to score with (an untrained scalar head is enough to run PPO / rejection sampling)
    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm_dir)

    dpo = run_dpo(
        make_recipe("dpo", tiny_model, prefs, tmp_path / "dpo", FAST + LORA), console=quiet_console()
    )
    ppo_sets = LORA + [
        "training.max_steps=2",
        "training.lr=1e-2",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=8",
        "ppo.value_model=reward_model",
    ]
    ppo_overrides = {
        "model.name_or_path": str(tiny_model),
        "ppo.reward_model": str(rm_dir),
        "ppo.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(tmp_path / "ppo"),
    }
    ppo = run_ppo(load_recipe(None, ppo_overrides, ppo_sets, stage="ppo"), console=quiet_console())
    rs_overrides = {
        "model.name_or_path": str(tiny_model),
        "rejection.reward_model": str(rm_dir),
        "rejection.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(tmp_path / "rs"),
    }
    rs_sets = LORA + [
        "rejection.n=2",
        "rejection.max_prompts=8",
        "rejection.max_new_tokens=8",
        "rejection.then=sft",
        "rejection.eval_n=1",
        "training.max_steps=2",
        "training.micro_batch_size=4",
    ]
    rs = run_rejection_sampling(
        load_recipe(None, rs_overrides, rs_sets, stage="rejection-sample"), console=quiet_console()
    )
    rs_sft = json.loads((tmp_path / "rs" / "round-1" / "sft" / "summary.json").read_text())

    counts = {
        "sft": (lora_runs["sft"]["parameters_trainable"], adapters),
        "reward": (lora_runs["reward"]["parameters_trainable"], adapters + hidden),  # + the scalar head
        "dpo": (dpo["parameters_trainable"], adapters),
        "ppo": (ppo["parameters_trainable"], 2 * adapters + hidden),  # policy + value model (+ head)
        "rejection-sample + sft": (rs_sft["parameters_trainable"], adapters),
    }
    print(
        f"\nLoRA r={R} trainable parameters (total {lora_runs['sft']['parameters_total']:,} with adapters):"
    )
    for stage, (got, expected) in counts.items():
        print(f"  {stage:24s} {got:>8,}  expected {expected:,}")
        assert got == expected, stage
    # only adapters are saved, and they trained (every B started at zero)
    for final in (root / "sft" / "final", tmp_path / "dpo" / "final", tmp_path / "ppo" / "final"):
        assert not (final / "model.safetensors").exists()
        assert saved_numel(final) == adapters
        tensors = load_file(str(final / "adapter_model.safetensors"))
        assert all(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k), final
    assert saved_numel(root / "reward" / "final") == adapters + hidden
    # PPO's reference is the policy with its adapters off: at the first rollout the two are equal
    first = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["objective/kl"] == 0.0
    assert rs["policy_mean_reward"]["final"] is not None  # the LoRA SFT output was sampled from


def live_parameter_bytes() -> int:
    """Bytes of every distinct parameter storage alive in this process."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def test_dpo_with_lora_holds_no_second_model(
    tiny_model: Path, prefs: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    model_bytes = sum(
        p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters()
    )
    measured: dict[str, int] = {}
    original = dpo_stage.make_compute_loss

    def measuring(cfg, reference=None):
        inner = original(cfg, reference)

        def compute_loss(model, batch):
            measured.setdefault("during", live_parameter_bytes())  # first training step
            return inner(model, batch)

        return compute_loss

    monkeypatch.setattr(dpo_stage, "make_compute_loss", measuring)
    extra = {}
    for name, sets in (("full", []), ("lora", LORA)):
        measured.clear()
        before = live_parameter_bytes()
        live = ["dpo.reference_cache=false", "training.max_steps=1"]  # measured at the first step
        recipe = make_recipe("dpo", tiny_model, prefs, tmp_path / name, FAST + sets + live)
        summary = run_dpo(recipe, console=quiet_console())
        extra[name] = measured["during"] - before
        extra[name + "_mode"] = summary["reference"]["mode"]
    print(
        f"\nDPO with a live reference, parameter memory during training (model: {model_bytes:,} bytes): "
        f"full fine-tuning {extra['full']:,} bytes ({extra['full'] / model_bytes:.2f} models, "
        f"{extra['full_mode']}); LoRA {extra['lora']:,} bytes ({extra['lora'] / model_bytes:.2f} models, "
        f"{extra['lora_mode']})"
    )
    assert extra["full_mode"] == "live (second model)"
    assert extra["lora_mode"] == "live (base model, adapters disabled)"
    assert extra["full"] == pytest.approx(2 * model_bytes, rel=0.02)
    assert model_bytes < extra["lora"] < 1.05 * model_bytes  # one copy of the weights + small adapters


def test_merge_lora_export_loads_plainly_and_matches_the_adapter_model(lora_runs: dict, tmp_path: Path):
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    root = lora_runs["root"]
    runner = CliRunner()
    ids = torch.tensor([[1, 17, 42, 99, 123, 7, 64, 5]])
    for kind, peft_auto, plain_auto, kwargs in (
        ("sft", AutoPeftModelForCausalLM, AutoModelForCausalLM, {}),
        (
            "reward",
            AutoPeftModelForSequenceClassification,
            AutoModelForSequenceClassification,
            {"num_labels": 1},
        ),
    ):
        out = tmp_path / f"{kind}-merged"
        result = runner.invoke(
            app, ["export", "--model", str(root / kind / "final"), "--merge-lora", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
        merged = plain_auto.from_pretrained(out).eval()  # plain transformers, no peft
        adapter = peft_auto.from_pretrained(root / kind / "final", **kwargs).eval()
        with torch.no_grad():
            a, b = merged(ids).logits, adapter(ids).logits
            with adapter.disable_adapter():
                c = adapter(ids).logits
        diff, effect = (a - b).abs().max().item(), (b - c).abs().max().item()
        print(f"\n{kind}: merged vs adapter max |logit diff| {diff:.2e} (the adapter's effect {effect:.2e})")
        assert diff < 1e-5 and effect > 1e-3
        assert AutoTokenizer.from_pretrained(out).eos_token_id is not None
    # an adapter cannot be exported without merging, nor a full model merged
    refused = runner.invoke(
        app, ["export", "--model", str(root / "sft" / "final"), "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "--merge-lora" in refused.output


def test_qlora_is_refused_on_a_cpu_and_needs_lora(tiny_model: Path):
    section = ModelSection(name_or_path=str(tiny_model), load_in_4bit=True, lora=LoraSection(enabled=True))
    with pytest.raises(ModelError, match="need a CUDA GPU"):
        load_causal_lm(section)
    with pytest.raises(RecipeError, match="quantized base weights cannot be trained"):
        load_recipe(None, {"model.name_or_path": "x", "model.load_in_8bit": True}, [], stage="sft")
    with pytest.raises(RecipeError, match="choose one"):
        load_recipe(None, {}, ["model.load_in_4bit=true", "model.load_in_8bit=true", *LORA], stage="sft")
