"""Outputs that behave the same outside align: tokenization follows the tokenizer's own special tokens,
so a reward model or policy used with plain transformers gives align's numbers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.data.preference import fit_lengths
from align_cli.data.tokenize import encode_segments, special_prefix
from align_cli.forward import summed_logps
from align_cli.presets import init_model
from align_cli.recipe import RecipeError
from align_cli.stages.reward import run_reward
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, quiet_console

runner = CliRunner()


@pytest.fixture(scope="module", params=["adds_bos", "no_bos"])
def start_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer adds BOS (Llama-style, the preset) or adds none (GPT-2/Qwen-style:
    a base tokenizer that still has a BOS token, which align must not put in)."""
    folder = init_model("tiny", tmp_path_factory.mktemp(request.param) / "model", seed=0, chat=False)
    if request.param == "no_bos":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_bos_token = False
        tokenizer.save_pretrained(folder)
    return folder


def test_the_probe_finds_the_tokenizers_own_prefix(start_model: Path):
    tokenizer = AutoTokenizer.from_pretrained(start_model)
    own = tokenizer("Hello there")["input_ids"]
    text = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert special_prefix(tokenizer) == own[: len(own) - len(text)]
    assert tokenizer.bos_token_id is not None  # a BOS token exists either way
    assert (own[0] == tokenizer.bos_token_id) == start_model.parent.name.startswith("adds_bos")
    # a text that already starts with BOS (a chat template writing it) does not get a second one
    ids, _ = encode_segments([([tokenizer.bos_token_id], False), ("Hi", True)], tokenizer)
    assert ids.count(tokenizer.bos_token_id) == 1


def test_reward_score_equals_plain_transformers(start_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("ALIGN_RUNS_DIR", str(tmp_path / "runs"))
    lines = (EXAMPLES / "prefs.jsonl").read_text().splitlines(keepends=True)
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(lines[:32]))
    held.write_text("".join(lines[500:504]))
    sets = ["data.max_length=128", "training.max_steps=3", "training.lr=3e-3", "training.micro_batch_size=8"]
    run_reward(make_recipe("reward", start_model, train, tmp_path / "run", sets), console=quiet_console())
    final, out = tmp_path / "run" / "final", tmp_path / "scored.jsonl"
    result = runner.invoke(app, ["reward", "score", "-m", str(final), "-d", str(held), "-o", str(out)])
    assert result.exit_code == 0, result.output

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    for line in out.read_text().splitlines():
        row = json.loads(line)
        for key in ("chosen", "rejected"):
            # the text the reward model was trained on: prompt, response, EOS (the plain template)
            text = row["prompt"] + row[key] + tokenizer.eos_token
            with torch.no_grad():
                plain = model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
            assert row[f"reward_{key}"] == pytest.approx(plain, abs=1e-5), key
    header, body = _card(final)  # the reward model's card loads it as a sequence classifier
    assert {"align", "reward", "reward-trainer"} <= set(header["tags"])
    assert header["pipeline_tag"] == "text-classification" and "AutoModelForSequenceClassification" in body
    exec(_snippet(body), {})


def test_policy_logprob_equals_plain_transformers(start_model: Path):
    tokenizer = AutoTokenizer.from_pretrained(start_model)
    model = AutoModelForCausalLM.from_pretrained(start_model).eval()
    prompt, response = "What did you think of The Distant Star?\n", "The film felt great."
    ids, labels = encode_segments([(prompt, False), (response, True)], tokenizer)
    own = tokenizer(prompt + response, return_tensors="pt")["input_ids"]
    assert ids == own[0].tolist()
    batch = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "labels": torch.tensor([labels]),
    }
    n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        ours = summed_logps(model, batch).item()
        logps = model(own).logits[0, :-1].log_softmax(-1).gather(-1, own[0, 1:, None])[:, 0]
    assert ours == pytest.approx(logps[-n_response:].sum().item(), abs=1e-5)


def test_a_cut_prompt_keeps_only_the_tokenizers_own_prefix():
    # a tokenizer without BOS: the prompt's first token is text, and a long prompt keeps its end only
    assert fit_lengths([5, 6, 7, 8], [[1]], 16, 2, keep_first=0) == ([7, 8], [[1]], True)
    assert fit_lengths([1, 6, 7, 8], [[1]], 16, 2, keep_first=1) == ([1, 8], [[1]], True)


# ----------------------------------------------------------------------------- model cards, checkpoints, best


def _card(model_dir: Path) -> tuple[dict, str]:
    text = (model_dir / "README.md").read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def _snippet(body: str) -> str:
    return body.split("```python\n", 1)[1].split("```", 1)[0]


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def stopped_sft(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An SFT run with evals every 2 steps, save_best and patience 1. best_metric eval/loss with
    greater_is_better true makes the first eval the best and the second one (the loss falls) no better, so
    the run stops early at step 4 of 12, deterministically."""
    root = tmp_path_factory.mktemp("stopped")
    data = root / "alpaca.jsonl"
    data.write_text("".join((EXAMPLES / "alpaca.jsonl").read_text().splitlines(keepends=True)[:64]))
    sets = [
        "data.eval_fraction=0.25",
        "training.max_steps=12",
        "training.micro_batch_size=8",
        "training.lr=3e-3",
        "training.eval_every=2",
        "training.save_every=2",
        "training.keep_last=3",
        "training.save_best=true",
        "training.best_metric=eval_loss",  # HF's spelling of eval/loss
        "training.greater_is_better=true",
        "training.early_stopping_patience=1",
    ]
    output = io.StringIO()
    console = Console(file=output, width=200)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_RUNS_DIR", str(root / "runs"))
        summary = run_sft(make_recipe("sft", tiny_model, data, root / "run", sets), console=console)
    return {"summary": summary, "run": root / "run", "table": output.getvalue()}


def test_early_stopping_and_the_best_checkpoint(stopped_sft: dict):
    summary, run = stopped_sft["summary"], stopped_sft["run"]
    assert summary["steps"] == 4 and summary["early_stopped_at"] == 4, summary
    assert summary["best_step"] == 2 and "best_eval/loss" in summary
    assert "early stopped" in stopped_sft["table"] and "at step 4" in stopped_sft["table"]
    assert json.loads((run / "best" / "best.json").read_text())["best_step"] == 2
    best = AutoModelForCausalLM.from_pretrained(run / "best")
    assert _weights_equal(best, AutoModelForCausalLM.from_pretrained(run / "checkpoint-0000002"))
    assert not _weights_equal(best, AutoModelForCausalLM.from_pretrained(run / "final"))


def test_a_checkpoint_loads_with_from_pretrained(stopped_sft: dict):
    run = stopped_sft["run"]
    checkpoint = run / "checkpoint-0000004"  # the step the run ended at: the final model's weights
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    inputs = tokenizer("What is 2 plus 4?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, final(**inputs).logits)
    assert _weights_equal(model, final)
    # one copy of the weights: accelerate's, which from_pretrained reads; no second safetensors
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["model.safetensors"]


def test_final_model_card(stopped_sft: dict, tiny_model: Path):
    header, body = _card(stopped_sft["run"] / "final")
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert {"align", "sft"} <= set(header["tags"])
    assert "base_model" not in header  # a local start model is no Hub id
    assert (
        str(tiny_model) in body
        and "alpaca.jsonl" in body
        and "align sft --recipe recipe.yaml --set output.dir=" in body
    )
    assert "| best_step | 2 |" in body and "| early_stopped_at | 4 |" in body
    recipe = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["training"]["save_best"] is True and "ppo" not in recipe and "dpo" not in recipe
    exec(_snippet(body), {})  # the card's own loading code runs
    assert (stopped_sft["run"] / "best" / "README.md").is_file()


def test_lora_checkpoint_and_card(tiny_model: Path, tmp_path: Path, monkeypatch):
    from peft import PeftConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    monkeypatch.setenv("ALIGN_RUNS_DIR", str(tmp_path / "runs"))
    lora = ["model.lora.enabled=true", "model.lora.r=2", "model.lora.alpha=4", "model.lora.dropout=0.0"]
    sets = ["training.max_steps=2", "training.micro_batch_size=4", "training.save_every=1", *lora]
    run_sft(
        make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", tmp_path / "run", sets),
        console=quiet_console(),
    )
    run = tmp_path / "run"
    header, body = _card(run / "final")
    assert header["library_name"] == "peft" and {"align", "sft", "lora"} <= set(header["tags"])
    assert "PeftModel.from_pretrained" in body
    exec(_snippet(body), {})
    # the step-1 checkpoint holds peft's adapter files: loaded onto the base they give the model that
    # accelerate's state (what --resume loads) holds
    checkpoint = run / "checkpoint-0000001"
    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_model)  # noqa: E731
    resumed = get_peft_model(base(), PeftConfig.from_pretrained(checkpoint))
    resumed.load_state_dict(load_file(checkpoint / "model.safetensors"))
    loaded = PeftModel.from_pretrained(base(), checkpoint).merge_and_unload()
    assert _weights_equal(loaded, resumed.merge_and_unload())
    assert not _weights_equal(loaded, base())


def test_best_settings_need_evaluations(tiny_model: Path, tmp_path: Path):
    with pytest.raises(RecipeError, match="training.save_best: needs evaluations"):
        make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", tmp_path, ["training.save_best=true"])
    with pytest.raises(RecipeError, match="training.early_stopping_patience"):
        make_recipe(
            "ppo", tiny_model, EXAMPLES / "prompts.jsonl", tmp_path, ["training.early_stopping_patience=2"]
        )
    # no eval data: refused with the recipe, before a run folder exists
    sets = ["training.save_best=true", "training.eval_every=1", "training.max_steps=1"]
    with pytest.raises(RecipeError, match="no eval data; set data.eval or data.eval_fraction"):
        make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", tmp_path / "r", sets)
    assert not (tmp_path / "r").exists()


def test_an_unknown_best_metric_names_the_known_ones():
    from align_cli.engine.best import BestMetricError, BestTracker
    from align_cli.recipe import TrainingSection

    tracker = BestTracker.from_training(TrainingSection(save_best=True, eval_every=1, best_metric="accuracy"))
    assert tracker.metric == "eval/accuracy" and tracker.greater
    with pytest.raises(BestMetricError, match="eval/loss"):
        tracker.update(1, {"eval/loss": 1.0})


def test_card_metadata_names_hub_models_and_follows_a_chain(tmp_path: Path):
    from align_cli.model_card import base_model, hub_id

    assert hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf" and hub_id("gpt2") == "gpt2"
    assert hub_id("data/train.jsonl") is None and hub_id(str(tmp_path)) is None
    # a previous stage's output (a local folder) passes on the Hub model it came from
    (tmp_path / "README.md").write_text("---\nbase_model: Qwen/Qwen2.5-0.5B\n---\n# sft\n")
    assert base_model(str(tmp_path)) == "Qwen/Qwen2.5-0.5B" and base_model("gpt2") == "gpt2"


def test_an_on_policy_checkpoint_loads_with_from_pretrained(tiny_model: Path, tmp_path: Path, monkeypatch):
    from align_cli.recipe import load_recipe
    from align_cli.stages.grpo import run_grpo

    monkeypatch.setenv("ALIGN_RUNS_DIR", str(tmp_path / "runs"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"An even number, {i}:", "parity": "even"}) + "\n" for i in range(4))
    )
    parity = Path(__file__).resolve().parents[1] / "examples" / "verifiable" / "rewards.py"
    overrides = {
        "model.name_or_path": str(tiny_model),
        "grpo.prompts": str(prompts),
        "output.dir": str(tmp_path / "run"),
    }
    sets = [
        f"grpo.reward_functions=[{parity}:right_parity]",
        "grpo.prompts_per_iteration=2",
        "grpo.num_generations=2",
        "grpo.mini_batch_size=2",
        "grpo.max_new_tokens=4",
        "training.max_steps=2",
        "training.save_every=1",
    ]
    run_grpo(load_recipe(None, overrides, sets, stage="grpo"), console=quiet_console())
    checkpoint = tmp_path / "run" / "checkpoint-0000001"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert AutoTokenizer.from_pretrained(checkpoint)("x")["input_ids"][0] == model.config.bos_token_id
    assert not _weights_equal(model, AutoModelForCausalLM.from_pretrained(tiny_model))  # it trained
    header, _ = _card(tmp_path / "run" / "final")
    assert {"align", "grpo"} <= set(header["tags"])


def test_a_run_that_keeps_improving_is_not_stopped_early(tiny_model: Path, tmp_path: Path, monkeypatch):
    # the final evaluation repeats the last step's: it must not count as an eval without improvement
    monkeypatch.setenv("ALIGN_RUNS_DIR", str(tmp_path / "runs"))
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join((EXAMPLES / "alpaca.jsonl").read_text().splitlines(keepends=True)[:64]))
    sets = ["data.eval_fraction=0.25", "training.max_steps=4", "training.micro_batch_size=8"]
    sets += ["training.lr=3e-3", "training.eval_every=2", "training.early_stopping_patience=1"]
    summary = run_sft(make_recipe("sft", tiny_model, data, tmp_path / "run", sets), console=quiet_console())
    assert summary["steps"] == 4 and summary["best_step"] == 4 and "early_stopped_at" not in summary
