"""Scoring sees what the reward model was trained on (issue 14, item 5).

A sample is rendered exactly as reward training rendered its records: a chat prompt's response as a chat
turn (decided per prompt, not by the recipe's template string), and the end marker only after a sample
that ended by itself. Rejection sampling prefers samples that ended, and writes a cut one (kept only
where nothing ended) without an end marker.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from align_cli.data.formats import Record
from align_cli.data.preference import collate_responses, encode_preference
from align_cli.data.prompts import Prompt
from align_cli.data.tokenize import tokenize_sft
from align_cli.forward import reward_scores
from align_cli.models import load_reward_model
from align_cli.recipe import ModelSection
from align_cli.scoring import score
from align_cli.stages.rejection_sampling import select, sft_record

CHAT = [{"role": "user", "content": "What did you think of the film?"}]
RESPONSE = "A wonderful, moving film with great acting."


@pytest.fixture(scope="module")
def scorer(review_models):
    tok = AutoTokenizer.from_pretrained(review_models["reward"])
    model = load_reward_model(
        ModelSection(name_or_path=str(review_models["reward"])), tok.pad_token_id
    ).eval()
    return model, tok


def trained_score(model, tok, prompt, response_ids=None) -> float:
    """The score of the row reward training builds for this prompt and response (encode_preference),
    optionally with other response token ids."""
    record = Record("x.jsonl", 1, "preference", {"prompt": prompt, "chosen": RESPONSE, "rejected": "bad."})
    example, _, _ = encode_preference(record, tok, "auto", 512, None)
    responses = [response_ids if response_ids is not None else example["responses"][0]]
    batch = collate_responses([{**example, "responses": responses}], tok.pad_token_id)
    with torch.no_grad():
        return reward_scores(model, batch).item()


@pytest.mark.parametrize("prompt", [CHAT, "What did you think of the film?\n"])
def test_a_finished_sample_scores_as_its_training_record(scorer, prompt):
    model, tok = scorer
    (got,) = score(model, tok, [Prompt("p:1", prompt)], [RESPONSE], "auto", [True])
    assert got == pytest.approx(trained_score(model, tok, prompt), abs=1e-5)


@pytest.mark.parametrize("prompt", [CHAT, "What did you think of the film?\n"])
def test_an_unfinished_sample_gets_no_end_marker(scorer, prompt):
    model, tok = scorer
    record = Record("x.jsonl", 1, "preference", {"prompt": prompt, "chosen": RESPONSE, "rejected": "bad."})
    full = encode_preference(record, tok, "auto", 512, None)[0]["responses"][0]
    end = tok.convert_tokens_to_ids("<|end|>") if isinstance(prompt, list) else tok.eos_token_id
    cut = full[: full.index(end)]  # the response as far as it went: no end-of-turn / EOS
    assert cut and len(cut) < len(full)
    (got,) = score(model, tok, [Prompt("p:1", prompt)], [RESPONSE], "auto", [False])
    assert got == pytest.approx(trained_score(model, tok, prompt, cut), abs=1e-5)
    assert got != pytest.approx(trained_score(model, tok, prompt), abs=1e-3)


def test_selection_prefers_samples_that_ended():
    rewards, ended = [9.0, 3.0, 5.0, 1.0], [False, True, True, False]
    assert select(rewards, "best", 1, None, ended) == [2]
    assert select(rewards, "top_k", 3, None, ended) == [2, 1]
    assert select(rewards, "threshold", 1, 2.0, ended) == [2, 1]
    assert select(rewards, "best", 1, None, [False] * 4) == [0]  # nothing ended: the best cut one


def test_a_cut_sample_is_written_and_trained_without_an_end_marker(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for prompt in (Prompt("p:1", "Review:"), Prompt("p:1", CHAT)):
        done, cut = sft_record(prompt, "great film", True), sft_record(prompt, "great film", False)
        assert "finished" not in done and cut["finished"] is False
        kind = "messages" if "messages" in done else "prompt_completion"
        (a,), _ = tokenize_sft([Record("b.jsonl", 1, kind, done)], tok, "auto", 512, "truncate")
        (b,), _ = tokenize_sft([Record("b.jsonl", 1, "prompt_completion", cut)], tok, "auto", 512, "truncate")
        end = a["input_ids"][-1] if kind == "prompt_completion" else tok.convert_tokens_to_ids("<|end|>")
        assert a["input_ids"][: len(b["input_ids"])] == b["input_ids"]  # the same text, only the end missing
        assert end in a["input_ids"][len(b["input_ids"]) :] and b["labels"][-1] != end
