"""The lean decode loop (align_cli/decode.py): shared prompt prefill, preallocated cache, finished rows
dropped. It must sample the distribution transformers' generate samples, and the log-probs it returns
must be those of a plain full forward over prompt + response."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_cli.errors import AlignError
from align_cli.generation import SamplingParams, sample

TEXTS = ["The film was", "I think the acting in this long movie was", "Plot:"]


@pytest.fixture(scope="module")
def lm(tiny_model: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def eos_prone(tiny_model: Path):
    """EOS likely enough that rows finish at different steps: the loop drops them from the batch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 4.5
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model, tok


def prompts(tok, texts=TEXTS):
    return [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]


def plain_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of the response tokens from one unpadded, uncached forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.2, 50, 0.95)])
def test_shared_prefill_logprobs_equal_a_plain_forward(
    eos_prone, temperature: float, top_k: int, top_p: float
):
    model, tok = eos_prone
    ps = prompts(tok)  # different lengths: left padding
    params = SamplingParams(n=6, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    out = sample(model, tok, ps, params)
    lengths = {len(s.response_ids) for s in out}
    assert len(lengths) > 2 and any(s.finished for s in out)  # rows did finish early and were dropped
    for s in out:
        expected = plain_logprobs(model, s.prompt_ids, s.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-5, rtol=0)


def test_lean_greedy_equals_generate_token_for_token(eos_prone):
    model, tok = eos_prone
    ps = prompts(tok)
    lean = sample(model, tok, ps, SamplingParams(n=1, max_new_tokens=20, temperature=0))
    old = sample(model, tok, ps, SamplingParams(n=1, max_new_tokens=20, temperature=0, decoder="generate"))
    assert [(s.response_ids, s.finished) for s in lean] == [(s.response_ids, s.finished) for s in old]
    assert old[0].logprobs is None and len(lean[0].logprobs) == len(lean[0].response_ids)
    # greedy n > 1 (generate refuses it): n copies of the greedy response
    three = sample(model, tok, ps, SamplingParams(n=3, max_new_tokens=20, temperature=0))
    assert [s.response_ids for s in three] == [s.response_ids for s in lean for _ in range(3)]


def test_lean_samples_what_generate_samples(lm):
    """Same seed, same warpers in the same order (temperature, top-k, top-p) on the same logits, the same
    random draws: while no row finishes, the lean loop and generate draw identical tokens. Identical
    draws on every step are the distribution equality a statistical test could only approximate."""
    model, tok = lm
    ps = prompts(tok)
    for t, k, p in ((1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 5, 1.0), (0.8, 0, 0.5)):
        params = SamplingParams(n=4, max_new_tokens=12, temperature=t, top_k=k, top_p=p, seed=11)
        lean = sample(model, tok, ps, params)
        old = sample(model, tok, ps, SamplingParams(**{**vars(params), "decoder": "generate"}))
        # fewer than a quarter of the rows finished: the lean loop drew on the full batch each step too
        assert sum(s.finished for s in old) < 3
        assert [s.response_ids for s in lean] == [s.response_ids for s in old], (t, k, p)


def test_lean_sampling_is_deterministic_and_ordered(eos_prone):
    model, tok = eos_prone
    ps = prompts(tok)
    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=7, prompts_per_batch=2)
    a, b = sample(model, tok, ps, params), sample(model, tok, ps, params)
    c = sample(model, tok, ps, SamplingParams(**{**vars(params), "seed": 8}))
    assert [(s.response_ids, s.logprobs) for s in a] == [(s.response_ids, s.logprobs) for s in b]
    assert [s.response_ids for s in a] != [s.response_ids for s in c]
    assert [(s.prompt_index, s.sample_index) for s in a] == [(p, k) for p in range(3) for k in range(4)]
    # one process's share (first_batch) draws what the same batch draws in the whole list
    tail = sample(model, tok, ps[2:], params, first_batch=1)
    assert [s.response_ids for s in tail] == [s.response_ids for s in a[8:]]


def test_peft_model_takes_the_lean_loop(tiny_model: Path):
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ps = prompts(tok)
    lean = sample(model, tok, ps, SamplingParams(n=1, max_new_tokens=10, temperature=0))
    old = sample(model, tok, ps, SamplingParams(n=1, max_new_tokens=10, temperature=0, decoder="generate"))
    assert [s.response_ids for s in lean] == [s.response_ids for s in old]
    assert lean[0].logprobs is not None


def test_unknown_decoder_is_a_clear_error(lm):
    model, tok = lm
    with pytest.raises(AlignError, match="decoder"):
        sample(model, tok, prompts(tok), SamplingParams(decoder="fast"))


def test_which_models_take_the_lean_loop(lm):
    from transformers import MistralConfig, MistralForCausalLM

    from align_cli.generation import use_lean_loop

    model, _ = lm
    assert use_lean_loop(model, SamplingParams(), synced_gpus=False)
    assert not use_lean_loop(model, SamplingParams(), synced_gpus=True)  # ZeRO-3 / FSDP: every process steps
    assert not use_lean_loop(model, SamplingParams(decoder="generate"), synced_gpus=False)
    tiny = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    sliding = MistralForCausalLM(MistralConfig(**tiny, sliding_window=16))
    assert not use_lean_loop(sliding, SamplingParams(), synced_gpus=False)


def test_a_streamer_sees_what_generate_shows_it(eos_prone):
    """``align chat`` streams a reply through sample(streamer=...): the lean loop feeds the streamer as
    generate does (the prompt, each new token, then end)."""

    class Recorder:
        def __init__(self):
            self.seen, self.ended = [], False

        def put(self, value):
            self.seen.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model, tok = eos_prone
    ps = prompts(tok)[1:2]
    seen = {}
    for decoder in ("lean", "generate"):
        rec = Recorder()
        params = SamplingParams(n=1, max_new_tokens=20, temperature=0, decoder=decoder)
        out = sample(model, tok, ps, params, streamer=rec)
        assert rec.ended and sum(rec.seen[1:], []) == out[0].response_ids
        seen[decoder] = rec.seen
    assert seen["lean"] == seen["generate"] and seen["lean"][0] == ps[0]
