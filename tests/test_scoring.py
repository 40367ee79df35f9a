"""Scoring sees what the reward model was trained on (issue 14, item 5).

A sample is rendered exactly as reward training rendered its records: a chat prompt's response as a chat
turn (decided per prompt, not by the recipe's template string), and the end marker only after a sample
that ended by itself. Rejection sampling prefers samples that ended, and writes a cut one (kept only
where nothing ended) without an end marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from align_cli.best_of_n import select
from align_cli.data.formats import Record
from align_cli.data.preference import collate_responses, encode_preference, fit_lengths
from align_cli.data.prompts import Prompt
from align_cli.data.templates import settle_chat_template
from align_cli.data.tokenize import tokenize_sft
from align_cli.forward import reward_scores
from align_cli.models import load_reward_model
from align_cli.recipe import LoraSection, ModelSection
from align_cli.scoring import score, scored_row, scoring_lengths
from align_cli.stages.rejection_sampling import sft_record

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


# ----------------------------------------------------------------------------- one length rule


def test_fit_lengths_by_hand():
    prompt, responses = list(range(100, 110)), [list(range(20)), [7, 8]]
    # cap max_length // 2 = 8: the first prompt token (BOS) and the last 7; room 16 - 8 = 8 per response
    assert fit_lengths(prompt, responses, 16, None) == (
        [100, *range(103, 110)],
        [list(range(8)), [7, 8]],
        True,
    )
    # max_prompt_length 4: the prompt keeps [100, 107, 108, 109]; the responses get 12 tokens
    assert fit_lengths(prompt, responses, 16, 4) == ([100, 107, 108, 109], [list(range(12)), [7, 8]], True)
    assert fit_lengths([1, 2], [[3]], 16, None) == ([1, 2], [[3]], False)


LONG = "A wonderful, moving film with great acting. " * 8


@pytest.mark.parametrize(("prompt", "response"), [("Review:", LONG), (LONG, "Great."), (CHAT, LONG)])
def test_a_long_sample_is_cut_as_reward_training_cuts_it(tiny_model, prompt, response):
    """Before, scorers kept at most half of the limit for the response, whatever the prompt left: a long
    response after a short prompt was scored on fewer tokens than reward training gave it."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    settle_chat_template(tok, None, True)
    record = Record("x.jsonl", 1, "preference", {"prompt": prompt, "chosen": response, "rejected": "bad."})
    for max_length, max_prompt_length in ((48, None), (48, 12)):
        trained, _, _ = encode_preference(record, tok, "auto", max_length, max_prompt_length)
        row = scored_row(Prompt("p:1", prompt), response, "auto", tok, True, max_length, max_prompt_length)
        assert row["prompt_ids"] == trained["prompt_ids"]
        assert row["responses"][0] == trained["responses"][0]
        if len(response) > len(prompt):  # the response fills what the prompt leaves
            assert len(row["prompt_ids"]) + len(row["responses"][0]) == max_length
        else:  # the prompt keeps its end, cut to its cap
            assert len(row["prompt_ids"]) == (max_prompt_length or max_length // 2)


@pytest.fixture()
def short_trained_scorer(tiny_model, tmp_path):
    """A reward model saved in a run folder whose recipe.yaml trained it on 24 tokens (12 of prompt)."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    final = tmp_path / "run" / "final"
    load_reward_model(ModelSection(name_or_path=str(tiny_model)), tok.pad_token_id).save_pretrained(final)
    tok.save_pretrained(final)
    (tmp_path / "run" / "recipe.yaml").write_text("stage: reward\ndata:\n  max_length: 24\n")
    model = load_reward_model(ModelSection(name_or_path=str(final)), tok.pad_token_id).eval()
    return model, tok


def test_score_cuts_samples_to_the_reward_models_trained_length(short_trained_scorer):
    model, tok = short_trained_scorer
    assert scoring_lengths(model) == (24, None)
    prompts, texts = [Prompt("p:1", "Review:")] * 2, [LONG, "Great."]
    got = score(model, tok, prompts, texts, "auto")
    assert got == score(model, tok, prompts, texts, "auto", max_length=24)
    assert got[0] != pytest.approx(score(model, tok, prompts, texts, "auto", max_length=512)[0], abs=1e-4)
    assert got[1] == pytest.approx(score(model, tok, prompts, texts, "auto", max_length=512)[1], abs=1e-6)


def test_a_lora_reward_model_is_known_by_its_own_folder(tiny_model, tmp_path):
    lora = LoraSection(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = tmp_path / "run" / "final"
    load_reward_model(ModelSection(name_or_path=str(tiny_model), lora=lora), 0).save_pretrained(adapter)
    (tmp_path / "run" / "recipe.yaml").write_text(
        "stage: reward\ndata:\n  max_length: 40\n  max_prompt_length: 9\n"
    )
    merged = load_reward_model(ModelSection(name_or_path=str(adapter)), 0)
    assert Path(merged.config.name_or_path) == adapter.resolve()  # not its base model's folder
    assert scoring_lengths(merged) == (40, 9)
