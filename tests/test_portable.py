"""Outputs that behave the same outside align: tokenization follows the tokenizer's own special tokens,
so a reward model or policy used with plain transformers gives align's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.data.tokenize import encode_segments, special_prefix
from align_cli.forward import summed_logps
from align_cli.presets import init_model
from align_cli.stages.reward import run_reward
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
