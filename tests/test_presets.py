"""Offline presets (tokenizer, tiny Llama init) and the synthetic example data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from align_cli import presets
from align_cli.presets import (
    CHAT_MARKERS,
    PRESETS,
    SPECIAL_TOKENS,
    build_tokenizer,
    default_corpus,
    init_model,
)
from tests.helpers import load_example_module

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


make_data = load_example_module(ROOT / "examples" / "make_data.py", "instruct_make_data")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(default_corpus(), PRESETS["tiny"]["vocab_size"], model_max_length=1024)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("tiny") / "model", seed=0)


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        "\n\n### Response:\n",
        "日本語のテキスト 中文 한국어",
        "emoji 😀🎉👩‍👩‍👧 and accents: café naïve Ångström",
        "  leading and trailing spaces  \t\r\n\x00\x7f\u200b",
        "<|user|>\nhi<|end|>\n<|assistant|>\n",
        "Below is an instruction that describes a task. Write a response",
    ],
)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_random_unicode(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(
            chr(rng.choice([rng.randint(32, 0x2FF), rng.randint(0x4E00, 0x9FFF), 0x1F600])) for _ in range(20)
        )
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    for token, idx in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [idx]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    }
    assert set(CHAT_MARKERS) <= set(tokenizer.all_special_tokens)
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 1024
    assert len(tokenizer) == PRESETS["tiny"]["vocab_size"]


def test_encode_adds_bos_like_llama(tokenizer):
    # like a Llama tokenizer: BOS first, no EOS; add_special_tokens=False gives the text alone
    text = "Name the color of the sky."
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=True)["input_ids"] == [tokenizer.bos_token_id, *plain]
    assert not set(plain) & set(tokenizer.all_special_ids)


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Repeat the word.\n\ncat"},
        {"role": "assistant", "content": "cat cat"},
    ]
    expected = (
        "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n5<|end|>\n"
        "<|user|>\nRepeat the word.\n\ncat<|end|>\n<|assistant|>\ncat cat<|end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n"


def test_bpe_training_is_deterministic():
    corpus = ["the cat sat on the mat", "the dog ate the cake", "café 😀"] * 3
    first = presets._train_bpe(corpus, 300).to_str()
    assert presets._train_bpe(corpus, 300).to_str() == first


# ------------------------------------------------------------------------------------------------- models


def test_init_model_is_deterministic(tmp_path, tiny_dir):
    same = init_model("tiny", tmp_path / "same", seed=0)
    other = init_model("tiny", tmp_path / "other", seed=1)
    weights = (tiny_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert (same / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_init_model_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_model("tiny", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_init_model_loads_back_offline(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert cfg.vocab_size == len(tok)
    assert tok.model_max_length == PRESETS["tiny"]["max_position_embeddings"]
    assert tok.chat_template == presets.CHAT_TEMPLATE
    text = "Review of the movie Night Train:\nThe acting was wonderful 😀"
    assert tok(text)["input_ids"] == [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

    batch = tok(["What is 2 plus 3?", "hi"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, -1].item() == tok.pad_token_id  # right padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == len(tok)

    reward = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, local_files_only=True)
    with torch.no_grad():
        scores = reward(**batch).logits
    assert scores.shape == (2, 1)


def _n_params(config: LlamaConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_parameter_counts(tiny_dir):
    assert 2e5 < _n_params(LlamaConfig(**PRESETS["tiny"])) < 1.5e6
    assert 2e5 < _n_params(LlamaConfig.from_pretrained(tiny_dir)) < 1.5e6
    assert 20e6 < _n_params(LlamaConfig(**PRESETS["small"])) < 30e6


# --------------------------------------------------------------------------------------------- example data


def test_positivity_rule():
    assert make_data.positivity("The acting was great, the story was wonderful and I loved it.") == 1.0
    assert make_data.positivity("Awful, boring and TERRIBLE.") == -1.0
    assert make_data.positivity("The acting was okay.") == 0.0
    assert make_data.positivity("great but boring") == 0.0
    assert make_data.positivity("great great great great") == 1.0
    assert [make_data.margin_for_gap(g) for g in range(1, 7)] == [0, 1 / 3, 2 / 3, 1, 1, 1]


def test_example_files_are_small_and_regenerate_identically(tmp_path):
    paths = make_data.write_datasets(tmp_path, seed=0)
    assert set(paths) == {"alpaca", "chat", "prompt_completion", "prefs", "ranked", "prompts"}
    for name, path in paths.items():
        committed = DATA / f"{name}.jsonl"
        assert committed.stat().st_size < 300_000
        assert committed.read_bytes() == path.read_bytes(), f"{name}: rerun examples/make_data.py"


def test_alpaca_chat_prompt_completion_data():
    alpaca = _read_jsonl(DATA / "alpaca.jsonl")
    assert len(alpaca) == 600
    assert all(
        set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in alpaca
    )
    n_with_input = sum(bool(r["input"]) for r in alpaca)
    assert 0.2 * len(alpaca) < n_with_input < 0.8 * len(alpaca)

    chats = _read_jsonl(DATA / "chat.jsonl")
    assert len(chats) == 200
    for record in chats:
        roles = [m["role"] for m in record["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(m["content"] for m in record["messages"])

    pairs = _read_jsonl(DATA / "prompt_completion.jsonl")
    assert len(pairs) == 200
    assert all(r["prompt"].endswith("Answer:") and r["completion"].startswith(" ") for r in pairs)


def test_preference_data_follows_positivity_rule():
    prefs = _read_jsonl(DATA / "prefs.jsonl")
    assert len(prefs) == 600
    margins = set()
    for r in prefs:
        assert set(r) == {"prompt", "chosen", "rejected", "margin"}
        assert r["chosen"] != r["rejected"]
        assert make_data.positivity(r["chosen"]) > make_data.positivity(r["rejected"])
        assert make_data.dominates(r["chosen"], r["rejected"])
        gap = round(3 * (make_data.positivity(r["chosen"]) - make_data.positivity(r["rejected"])))
        assert r["margin"] == make_data.margin_for_gap(gap)
        margins.add(r["margin"])
    assert margins == {0, 1 / 3, 2 / 3, 1}

    ranked = _read_jsonl(DATA / "ranked.jsonl")
    assert len(ranked) == 150
    for r in ranked:
        scores = [make_data.positivity(x) for x in r["responses"]]
        assert 3 <= len(scores) <= 5
        assert all(a > b for a, b in zip(scores, scores[1:], strict=False))

    prompts = _read_jsonl(DATA / "prompts.jsonl")
    assert len(prompts) == 100 and all(set(r) == {"prompt"} and r["prompt"] for r in prompts)
    assert all(make_data.positivity(r["prompt"]) == 0 for r in prompts)


def test_tokenizer_covers_example_data(tokenizer):
    texts = [v for r in _read_jsonl(DATA / "alpaca.jsonl") for v in r.values()]
    texts += [r[k] for r in _read_jsonl(DATA / "prefs.jsonl") for k in ("prompt", "chosen", "rejected")]
    n_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    assert n_tokens / sum(len(t) for t in texts) < 0.3
