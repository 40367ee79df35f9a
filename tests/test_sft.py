"""SFT on the tiny model: it learns, prompt loss is really masked, batches and resumes are exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_cli.data.collate import pad_collate
from align_cli.data.formats import load_records
from align_cli.data.tokenize import tokenize_sft
from align_cli.forward import response_logprobs
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, quiet_console, step_losses, weights, write_jsonl


def mean_response_logprob(model_dir: Path, data: Path, n: int = 64) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples, _ = tokenize_sft(load_records(str(data))[:n], tok, "alpaca", 256, "truncate")
    with torch.no_grad():
        logps, _ = response_logprobs(model, pad_collate(examples, tok.pad_token_id))
    return logps.mean().item()


def test_sft_learns_the_responses(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    data = EXAMPLES / "alpaca.jsonl"
    recipe = make_recipe(
        "sft",
        tiny_model,
        data,
        tmp_path / "run",
        [
            "training.lr=3e-3",
            "training.epochs=8",
            "training.micro_batch_size=16",
            "data.eval_fraction=0.1",
            "training.warmup_ratio=0.05",
        ],
    )
    summary = run_sft(recipe, console=quiet_console())
    losses = step_losses(tmp_path / "run")
    first, last = losses[1], losses[max(losses)]
    assert last < 0.3 * first, (first, last)
    before = mean_response_logprob(tiny_model, data)
    after = mean_response_logprob(tmp_path / "run" / "final", data)
    assert after > before + 2.0, (before, after)
    assert summary["eval/loss"] < 0.5 * first
    # the run directory holds everything the design promises
    for name in ("recipe.yaml", "metrics.csv", "metrics.jsonl", "summary.json", "final/model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name


def _p_next_is(model_dir: Path, token: int, length: int = 20) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([[tok.bos_token_id] + [token] * length])
    with torch.no_grad():
        probs = model(ids).logits[0, 1:].softmax(-1)[:, token]
    return probs.mean().item()


def test_prompt_tokens_are_not_learned(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    word = next(w for w in (" the", " and", " of") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    (x,) = tok(word, add_special_tokens=False)["input_ids"]
    prompt = word.strip() + word * 30
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "seven"]
    rows = [{"prompt": prompt, "completion": f" {words[i % 8]} {words[(3 * i + 1) % 8]}"} for i in range(64)]
    masked = write_jsonl(tmp_path / "masked.jsonl", rows)
    unmasked = write_jsonl(
        tmp_path / "unmasked.jsonl", [{"text": r["prompt"] + r["completion"]} for r in rows]
    )
    sets = ["training.lr=3e-3", "training.max_steps=40", "training.micro_batch_size=8"]
    run_sft(make_recipe("sft", tiny_model, masked, tmp_path / "a", sets), console=quiet_console())
    run_sft(make_recipe("sft", tiny_model, unmasked, tmp_path / "b", sets), console=quiet_console())
    start = _p_next_is(tiny_model, x)
    with_mask = _p_next_is(tmp_path / "a" / "final", x)
    without_mask = _p_next_is(tmp_path / "b" / "final", x)
    assert without_mask > 0.5, without_mask  # the control run does learn the repeated token...
    assert with_mask < max(10 * start, 0.05), (start, with_mask)  # ...the masked run does not


def test_micro_batch_times_accumulation_gives_the_same_update(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    # A large Adam eps makes the first update proportional to the gradient, so any error in the loss
    # normalisation across micro-batches would show (plain Adam's first step is ~lr * sign(g)).
    common = [
        "training.max_steps=1",
        "training.lr=1.0",
        "training.adam_eps=10.0",
        "training.max_grad_norm=null",
    ]
    data = EXAMPLES / "alpaca.jsonl"
    run_sft(
        make_recipe(
            "sft",
            tiny_model,
            data,
            tmp_path / "a",
            common + ["training.micro_batch_size=4", "training.grad_accum=2"],
        ),
        console=quiet_console(),
    )
    run_sft(
        make_recipe(
            "sft",
            tiny_model,
            data,
            tmp_path / "b",
            common + ["training.micro_batch_size=8", "training.grad_accum=1"],
        ),
        console=quiet_console(),
    )
    a, b, start = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final"), weights(tiny_model)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the update is not trivially zero
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert step_losses(tmp_path / "a")[1] == pytest.approx(step_losses(tmp_path / "b")[1], rel=1e-6)


def test_resume_is_exact(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    data = EXAMPLES / "alpaca.jsonl"
    sets = [
        "training.max_steps=8",
        "training.save_every=4",
        "training.keep_last=5",
        "training.lr=3e-3",
        "data.eval_fraction=0.05",
        "training.eval_every=4",
    ]
    straight = tmp_path / "straight"
    run_sft(make_recipe("sft", tiny_model, data, straight, sets), console=quiet_console())
    # "kill" after step 4: a fresh run directory holding only what existed at that point
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-0000004", resumed / "checkpoint-0000004")
    shutil.copy(straight / "recipe.yaml", resumed / "recipe.yaml")
    (resumed / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (straight / "metrics.jsonl").read_text().splitlines()[:4])
    )
    run_sft(make_recipe("sft", tiny_model, data, resumed, sets), resume=True, console=quiet_console())
    assert step_losses(resumed) == pytest.approx(step_losses(straight), rel=0, abs=1e-6)
    assert len(step_losses(resumed)) == 8
    a, b = weights(straight / "final"), weights(resumed / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_packing_matches_padding(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    """Padding-free packing computes the same loss as padded batches (no cross-example attention)."""
    sets = ["training.max_steps=2", "training.lr=1e-3", "training.micro_batch_size=4"]
    data = EXAMPLES / "alpaca.jsonl"
    run_sft(make_recipe("sft", tiny_model, data, tmp_path / "pad", sets), console=quiet_console())
    run_sft(
        make_recipe("sft", tiny_model, data, tmp_path / "pack", sets + ["data.packing=true"]),
        console=quiet_console(),
    )
    assert step_losses(tmp_path / "pack") == pytest.approx(step_losses(tmp_path / "pad"), rel=1e-4)


def test_gradient_checkpointing_gives_the_same_losses(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    sets = ["training.max_steps=3", "training.lr=1e-3", "training.micro_batch_size=4"]
    data = EXAMPLES / "alpaca.jsonl"
    run_sft(make_recipe("sft", tiny_model, data, tmp_path / "plain", sets), console=quiet_console())
    run_sft(
        make_recipe("sft", tiny_model, data, tmp_path / "ckpt", sets + ["model.gradient_checkpointing=true"]),
        console=quiet_console(),
    )
    assert step_losses(tmp_path / "ckpt") == pytest.approx(step_losses(tmp_path / "plain"), rel=1e-5)
