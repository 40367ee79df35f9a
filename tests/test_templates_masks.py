"""Prompt masking is exact: expected ids and label masks written out by hand per template."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from align_cli.data.formats import Record
from align_cli.data.templates import render_sft_record
from align_cli.data.tokenize import IGNORE_INDEX, encode_segments, tokenize_sft


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(tok, kind: str, fields: dict, template: str = "auto"):
    return encode_segments(render_sft_record(kind, fields, template, tok), tok)


def test_alpaca_with_input_mask(tok):
    prompt = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    got_ids, got_labels = encode(
        tok, "alpaca", {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    )
    p, r = ids(tok, prompt), ids(tok, "5")
    assert got_ids == [tok.bos_token_id, *p, *r, tok.eos_token_id]
    assert got_labels == [IGNORE_INDEX] * (1 + len(p)) + r + [tok.eos_token_id]


def test_alpaca_without_input_mask(tok):
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName the color of the sky.\n\n### Response:\n"
    )
    for empty in ("", "   "):  # whitespace-only input means the no-input template
        got_ids, got_labels = encode(
            tok, "alpaca", {"instruction": "Name the color of the sky.", "input": empty, "output": "blue"}
        )
        p, r = ids(tok, prompt), ids(tok, "blue")
        assert got_ids == [tok.bos_token_id, *p, *r, tok.eos_token_id]
        assert got_labels == [IGNORE_INDEX] * (1 + len(p)) + r + [tok.eos_token_id]


def test_two_turn_chat_mask_trains_only_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
    got_ids, got_labels = encode(tok, "messages", {"messages": messages})
    masked_1 = ids(tok, "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n")
    trained_1 = ids(tok, "Hello<|end|>\n")
    masked_2 = ids(tok, "<|user|>\nBye<|end|>\n<|assistant|>\n")
    trained_2 = ids(tok, "See you<|end|>\n")
    assert got_ids == [tok.bos_token_id, *masked_1, *trained_1, *masked_2, *trained_2]
    expected = [IGNORE_INDEX] * (1 + len(masked_1)) + trained_1 + [IGNORE_INDEX] * len(masked_2) + trained_2
    assert got_labels == expected
    # the markers are single special tokens, so the boundary is exact
    assert tok.convert_ids_to_tokens(trained_1[-2]) == "<|end|>"


def test_prompt_completion_plain_concatenation(tok):
    got_ids, got_labels = encode(tok, "prompt_completion", {"prompt": "2+2=", "completion": "4"})
    p, r = ids(tok, "2+2="), ids(tok, "4")
    assert got_ids == [tok.bos_token_id, *p, *r, tok.eos_token_id]
    assert got_labels == [IGNORE_INDEX] * (1 + len(p)) + r + [tok.eos_token_id]


def test_truncation_and_drops_are_counted(tok):
    long_prompt = {"instruction": "word " * 400, "input": "", "output": "yes"}
    short = {"instruction": "Say yes.", "input": "", "output": "yes"}
    records = [Record("f.jsonl", i + 1, "alpaca", r) for i, r in enumerate([short, long_prompt, short])]
    examples, stats = tokenize_sft(records, tok, "alpaca", max_length=64, on_too_long="truncate")
    assert len(examples) == 2 and all(e["length"] <= 64 for e in examples)
    assert stats.read == 3 and stats.kept == 2 and stats.dropped == {"no_response_tokens_left": 1}
    long_answer = {"instruction": "Say yes.", "input": "", "output": "yes " * 200}
    records = [Record("f.jsonl", 1, "alpaca", long_answer)]
    examples, stats = tokenize_sft(records, tok, "alpaca", max_length=64, on_too_long="truncate")
    assert stats.truncated == 1 and examples[0]["length"] == 64 and examples[0]["n_supervised"] > 0
    examples, stats = tokenize_sft(records, tok, "alpaca", max_length=64, on_too_long="drop")
    assert examples == [] and stats.dropped == {"too_long": 1}
