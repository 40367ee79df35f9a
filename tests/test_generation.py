"""Batched sampling: left padding is invisible, seeds reproduce, N samples per prompt, stop at EOS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_cli.generation import SamplingParams, sample, stop_token_ids


@pytest.fixture(scope="module")
def lm(tiny_model: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


def prompts(tok, texts):
    return [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]


TEXTS = ["The film was", "I think the acting in this long movie was", "Plot:"]


def test_left_padding_does_not_change_greedy_output(lm):
    model, tok = lm
    ps = prompts(tok, TEXTS)
    params = SamplingParams(n=1, max_new_tokens=12, temperature=0)
    together = sample(model, tok, ps, params)
    alone = [sample(model, tok, [p], params)[0] for p in ps]
    assert [s.response_ids for s in together] == [s.response_ids for s in alone]
    # and greedy decoding equals the argmax of a plain forward pass for the first new token
    with torch.no_grad():
        first = model(torch.tensor([ps[1]])).logits[0, -1].argmax().item()
    assert together[1].response_ids[0] == first


def test_seed_reproduces_and_n_samples_are_grouped(lm):
    model, tok = lm
    ps = prompts(tok, TEXTS)
    params = SamplingParams(n=4, max_new_tokens=10, temperature=1.0, seed=7, prompts_per_batch=2)
    a, b = sample(model, tok, ps, params), sample(model, tok, ps, params)
    c = sample(
        model, tok, ps, SamplingParams(n=4, max_new_tokens=10, temperature=1.0, seed=8, prompts_per_batch=2)
    )
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.response_ids for s in a] != [s.response_ids for s in c]
    assert [(s.prompt_index, s.sample_index) for s in a] == [(p, k) for p in range(3) for k in range(4)]
    assert all(s.prompt_ids == ps[s.prompt_index] for s in a)
    assert len({tuple(s.response_ids) for s in a if s.prompt_index == 0}) > 1  # samples differ


def test_responses_stop_at_the_stop_token(tiny_model: Path):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    stops = stop_token_ids(tok)
    assert tok.eos_token_id in stops and tok.convert_tokens_to_ids("<|end|>") in stops
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 4.5  # EOS likely enough that most, not all, samples stop within 40 tokens
    model.lm_head.bias = torch.nn.Parameter(bias)
    out = sample(model, tok, prompts(tok, TEXTS), SamplingParams(n=8, max_new_tokens=40, temperature=1.0))
    assert any(s.finished for s in out)
    for s in out:
        if s.finished:
            assert s.response_ids[-1] in stops and not any(t in stops for t in s.response_ids[:-1])
        else:
            assert len(s.response_ids) == 40 and not any(t in stops for t in s.response_ids)


def test_samples_ignore_the_checkpoints_generation_config(tiny_model: Path):
    """Issue 14 item 2: a checkpoint's generation_config (repetition penalty, n-gram bans, min length, bad
    words) must not change the distribution samples come from: the log-probs PPO and eval compute are
    those of the plain policy."""
    from transformers import GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    shaped = AutoModelForCausalLM.from_pretrained(tiny_model)
    shaped.generation_config = GenerationConfig(
        repetition_penalty=5.0,
        no_repeat_ngram_size=1,
        min_new_tokens=20,
        bad_words_ids=[[tok.convert_tokens_to_ids("<|end|>")]],
        suppress_tokens=list(range(10, 200)),
        temperature=0.3,
        top_k=5,
        do_sample=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    before = shaped.generation_config.to_dict()
    params = SamplingParams(n=4, max_new_tokens=20, temperature=1.0, seed=3)
    a = sample(plain, tok, prompts(tok, TEXTS), params)
    b = sample(shaped, tok, prompts(tok, TEXTS), params)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert shaped.generation_config.to_dict() == before  # the model's own config is left as it was
