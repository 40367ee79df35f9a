"""`align generate` (one JSONL row per prompt, seeded, greedy at temperature 0, prompts rendered as in
training) and `align chat` (driven through a real terminal: streamed replies, kept history, /reset, EOF)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from align_cli.chat import ChatSession
from align_cli.cli import app
from align_cli.data.prompts import Prompt
from align_cli.generate import GenerateError, load_policy, prompt_text, resolve_template
from align_cli.generation import SamplingParams
from align_cli.models import load_tokenizer
from align_cli.recipe import ModelSection
from tests.helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

PROMPTS = [
    {"prompt": "The film was"},
    {"instruction": "Name a colour.", "input": ""},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]},
]


def generate(*args: str) -> list[dict]:
    result = runner.invoke(app, ["generate", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_generate_writes_one_row_per_prompt_and_a_seed_reproduces(tiny_model: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    common = ["-m", str(tiny_model), "--prompts", str(prompts), "--prompt", "Hello", "--max-new-tokens", "6"]
    out = tmp_path / "out.jsonl"
    generate(*common, "--out", str(out), "--seed", "3", "--batch-size", "2")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The film was", "Name a colour.", PROMPTS[2]["messages"], "Hello"]
    assert rows[1]["instruction"] == "Name a colour."
    assert all(isinstance(r["completion"], str) and 0 < r["tokens"] <= 6 for r in rows)
    assert all(r["finished"] or r["tokens"] == 6 for r in rows)  # unfinished: cut at the limit
    again = generate(*common, "--seed", "3", "--batch-size", "2")  # to stdout this time
    assert again == rows
    other = generate(*common, "--seed", "4", "--batch-size", "2")
    assert [r["completion"] for r in other] != [r["completion"] for r in rows]
    several = generate(*common, "--n", "3")
    assert len(several) == 4 and all(len(r["completions"]) == len(r["finished"]) == 3 for r in several)


def test_temperature_zero_is_greedy(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    text = "The film was"
    rows = [
        generate(
            "-m",
            str(tiny_model),
            "--prompt",
            text,
            "--no-template",
            "-t",
            "0",
            "--max-new-tokens",
            "8",
            "--seed",
            s,
        )
        for s in ("0", "1")
    ]
    assert rows[0] == rows[1]  # no randomness left
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny_model)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert rows[0][0]["completion"] == tok.decode(ids[-8:], skip_special_tokens=True)


def test_generate_refuses_a_bad_file_with_its_line_and_field(tiny_model: Path, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": 5}])
    result = runner.invoke(app, ["generate", "-m", str(tiny_model), "--prompts", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:2: prompt: expected a string" in " ".join(result.output.split())
    result = runner.invoke(app, ["generate", "-m", str(tiny_model)])
    assert result.exit_code == 2 and "no prompts" in result.output


def test_prompts_render_as_the_model_was_trained(tiny_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny_model)))
    # a model without a run: its tokenizer's chat template
    assert resolve_template(str(tiny_model), tok, None)[0] == "chat"
    # a run's model: the data.template its run rendered prompts with (RUN/recipe.yaml beside RUN/final)
    final = tmp_path / "run" / "final"
    shutil.copytree(tiny_model, final)
    (final.parent / "recipe.yaml").write_text("data:\n  template: alpaca\n")
    assert resolve_template(str(final), tok, None)[0] == "alpaca"
    assert resolve_template(str(final), tok, "plain")[0] == "plain"
    alpaca = Prompt("f:2", "Name a colour.", "Name a colour.")
    assert prompt_text(alpaca, "alpaca", tok, None, False).endswith(
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )
    chat = Prompt("f:3", PROMPTS[2]["messages"])
    assert (
        prompt_text(chat, "auto", tok, None, False)
        == "<|system|>\nBe kind.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    )
    # --system replaces a chat's own system turn and makes a text prompt a chat
    assert prompt_text(chat, "chat", tok, "Be brief.", False).startswith(
        "<|system|>\nBe brief.<|end|>\n<|user|>"
    )
    assert (
        prompt_text(Prompt("x", "Hi"), "chat", tok, "S", False)
        == "<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    with pytest.raises(GenerateError, match="--system needs a chat template"):
        prompt_text(alpaca, "alpaca", tok, "S", False)
    with pytest.raises(GenerateError, match="f:3: messages: a chat prompt needs a template"):
        prompt_text(chat, "chat", tok, None, True)
    assert prompt_text(Prompt("x", "Once"), "chat", tok, None, True) == "Once"


def test_generate_from_a_lora_run_output(tiny_model: Path, tmp_path: Path) -> None:
    """A LoRA output (adapter_config.json + adapter) samples as its base with the adapter merged; a fresh
    adapter (B = 0) changes nothing, so greedy output equals the base model's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapter = tmp_path / "lora"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    load_tokenizer(ModelSection(name_or_path=str(tiny_model))).save_pretrained(adapter)
    args = ("--prompt", "The film was", "-t", "0", "--max-new-tokens", "6")
    assert generate("-m", str(adapter), *args) == generate("-m", str(tiny_model), *args)


# ----------------------------------------------------------------------------- align chat


@pytest.fixture(scope="module")
def policy_and_tokenizer(tiny_model: Path):
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny_model)))
    return load_policy(str(tiny_model), tok), tok


def test_chat_streams_keeps_history_and_trims_the_oldest_turns(policy_and_tokenizer) -> None:
    policy, tok = policy_and_tokenizer
    params = SamplingParams(max_new_tokens=8, temperature=0)
    session = ChatSession(policy, tok, params, system="Be kind.", context=70)
    pieces: list[str] = []
    prompts: list[tuple[str, int]] = []
    first = session.reply("hello there", pieces.append, lambda text, dropped: prompts.append((text, dropped)))
    assert len(pieces) > 1 and "".join(pieces).strip() == first  # streamed piece by piece
    session.reply("second message", on_prompt=lambda text, dropped: prompts.append((text, dropped)))
    assert "hello there" in prompts[1][0] and first in prompts[1][0] and "Be kind." in prompts[1][0]
    for i in range(4):
        session.reply(f"message number {i} of several", on_prompt=lambda t, d: prompts.append((t, d)))
    assert any(dropped for _, dropped in prompts)  # the oldest turns went to fit 70 tokens
    assert "hello there" not in prompts[-1][0] and prompts[-1][0].startswith("<|system|>\nBe kind.")
    assert len(session.prompt()[1]) <= 70 - 8
    before = list(session.history)
    with pytest.raises(GenerateError, match="at most 62 fit"):
        session.reply("word " * 100)
    assert session.history == before  # an oversized message costs nothing

    def stop(_: str) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the reply streams

    with pytest.raises(KeyboardInterrupt):
        session.reply("never answered", stop)
    assert session.history == before  # the interrupted message is not kept
    session.reset()
    assert session.history == []


def _read_until(fd: int, marker: str, buffer: list[str], timeout: float = 90) -> str:
    """Read the terminal until ``marker`` appears after what was read before; return the new text."""
    start, deadline = len("".join(buffer)), time.monotonic() + timeout
    while marker not in "".join(buffer)[start:]:
        assert time.monotonic() < deadline, f"no {marker!r} in {''.join(buffer)[start:]!r}"
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                buffer.append(os.read(fd, 4096).decode(errors="replace").replace("\r\n", "\n"))
            except OSError:  # the other end closed
                break
    return "".join(buffer)[start:]


def _shown_prompt(text: str) -> str:
    return re.search(r"--- prompt ---\n(.*?)\n--- end of prompt ---", text, re.S).group(1)


def test_chat_in_a_terminal(tiny_model: Path) -> None:
    master, slave = pty.openpty()
    env = os.environ | {"PYTHONPATH": str(ROOT), "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "300"}
    command = [sys.executable, "-m", "align_cli.cli", "chat", "-m", str(tiny_model), "-t", "0"]
    proc = subprocess.Popen(
        [*command, "--max-new-tokens", "8", "--show-prompt"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=ROOT,
    )
    os.close(slave)
    out: list[str] = []
    try:
        assert "/reset" in _read_until(master, "you> ", out)  # the banner says how to use it
        os.write(master, b"hello there\n")
        turn = _read_until(master, "you> ", out)
        reply = turn.split("--- end of prompt ---", 1)[1].rsplit("you> ", 1)[0].strip()
        assert reply  # the answer appeared
        os.write(master, b"second message\n")
        second = _shown_prompt(_read_until(master, "you> ", out))
        assert "hello there" in second and reply in second and "second message" in second
        os.write(master, b"/reset\n")
        assert "cleared" in _read_until(master, "you> ", out)
        os.write(master, b"third\n")
        third = _shown_prompt(_read_until(master, "you> ", out))
        assert "hello there" not in third and "third" in third
        os.write(master, b"\x04")  # Ctrl-D: end of input
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    # the reply is what `align generate` gives for the same prompt: one rendering for both
    (row,) = generate("-m", str(tiny_model), "--prompt", "hello there", "-t", "0", "--max-new-tokens", "8")
    assert row["completion"].strip() == reply
