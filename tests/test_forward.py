"""align_cli.forward, the one home of forward passes: summed and per-token log-probs at a temperature,
reward and per-token scores, batches moved to a device; every stage and scorer uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_cli import actor_critic, evaluate, forward, reference_cache, scoring
from align_cli.data.preference import collate_responses
from align_cli.models import load_causal_lm, load_reward_model, score_head
from align_cli.recipe import ModelSection
from align_cli.stages import dpo, reward, sft

EXAMPLES = [  # rows of 14, 6 and 5 tokens
    {"prompt_ids": [1, 5, 6, 7], "responses": [list(range(8, 18)), [18, 19]], "margin": None},
    {"prompt_ids": [1, 20], "responses": [[21, 22, 23]], "margin": None},
]
RESPONSE_STARTS = [(4, 10), (4, 2), (2, 3)]  # (prompt length, response length) of each row


@pytest.fixture(scope="module")
def policy(tiny_model: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_causal_lm(ModelSection(name_or_path=str(tiny_model))).eval()


def by_hand(model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float) -> float:
    """sum_t log softmax(z_t / T)[y_t] over the response, from the full logits."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_summed_logps_are_the_sums_by_hand_at_a_temperature(policy, temperature: float):
    batch = collate_responses(EXAMPLES, 0) | {"buckets": [([0], 14), ([1, 2], 6)]}  # two passes
    with torch.no_grad():
        got = forward.summed_logps(policy, batch, temperature)
    rows = [(e["prompt_ids"], r) for e in EXAMPLES for r in e["responses"]]
    want = torch.tensor([by_hand(policy, p, r, temperature) for p, r in rows])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert forward.response_lengths(batch).tolist() == [10, 2, 3]


def test_token_scores_read_the_head_where_response_tokens_are_predicted(tiny_model: Path):
    torch.manual_seed(0)
    model = load_reward_model(ModelSection(name_or_path=str(tiny_model)), 0).eval()
    batch = collate_responses(EXAMPLES, 0)
    with torch.no_grad():
        got = forward.token_scores(model, batch)
        per_position = score_head(model)(model.model(input_ids=batch["input_ids"])[0])[..., 0]
    want = torch.cat([per_position[row, s - 1 : s - 1 + n] for row, (s, n) in enumerate(RESPONSE_STARTS)])
    torch.testing.assert_close(got, want)


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "buckets": [([0, 1], 3)], "units": 2}
    moved = forward.to_device(batch, "meta")
    assert moved["input_ids"].device.type == "meta"
    assert moved["buckets"] is batch["buckets"] and moved["units"] == 2


def test_every_caller_uses_the_one_forward_module():
    """No second copy of the log-prob or scoring code: the stages, the cache, eval and the scorer hold
    forward.py's own functions."""
    assert sft.response_logprobs is forward.response_logprobs
    assert dpo.summed_logps is reference_cache.summed_logps is forward.summed_logps
    assert evaluate.summed_logps is forward.summed_logps
    assert reward.reward_scores is scoring.reward_scores is forward.reward_scores
    assert actor_critic.token_logprobs is forward.token_logprobs
    assert actor_critic.token_scores is forward.token_scores
    from align_cli import models

    for name in ("response_logprobs", "reward_scores", "per_token_by_bucket", "sequence_index"):
        assert not hasattr(models, name), name
