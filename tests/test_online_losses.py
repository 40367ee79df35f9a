"""GRPO, Dr. GRPO, RLOO and REINFORCE++ losses (align_cli.losses) against hand computations.

Every expected value is written out with ``math`` from the papers' formulas, independently of the code
under test; float64 tensors so the comparisons can be tight.
"""

from __future__ import annotations

import math

import pytest
import torch

from align_cli.losses import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    kl_shaped_scores,
    leave_one_out_advantages,
    normalize_batch,
    rloo_loss,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def assert_close(actual, expected) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64), t(expected), rtol=1e-9, atol=1e-9
    )


# ------------------------------------------------------------------ advantages


def test_group_advantages_by_hand():
    # groups [1, 2] and [3, 6]: means 1.5 and 4.5, unbiased stds sqrt(0.5) and sqrt(4.5)
    rewards = t([1.0, 2.0, 3.0, 6.0])
    s1, s2 = math.sqrt(0.5), math.sqrt(4.5)
    expected = [-0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), -1.5 / (s2 + 1e-4), 1.5 / (s2 + 1e-4)]
    assert_close(group_advantages(rewards, 2), expected)
    # G = 3: [0, 0, 3] has mean 1 and std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    assert_close(
        group_advantages(t([0.0, 0.0, 3.0]), 3, eps=0.0),
        [-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)],
    )


def test_dr_grpo_advantages_are_not_scaled():
    assert_close(group_advantages(t([1.0, 2.0, 3.0, 6.0]), 2, scale=False), [-0.5, 0.5, -1.5, 1.5])


def test_a_group_of_equal_rewards_has_no_advantage():
    assert_close(
        group_advantages(t([2.0, 2.0, 2.0, 0.0, 1.0, 2.0]), 3), [0, 0, 0, -1 / 1.0001, 0, 1 / 1.0001]
    )


def test_groups_are_consecutive_samples_not_strided():
    # [1, 2 | 10, 20]: strided groups ([1, 10], [2, 20]) would give other numbers
    assert_close(group_advantages(t([1.0, 2.0, 10.0, 20.0]), 2, scale=False), [-0.5, 0.5, -5.0, 5.0])


def test_leave_one_out_advantages_by_hand():
    # prompt 1: [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5; prompt 2: all equal
    rewards = t([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    assert_close(leave_one_out_advantages(rewards, 3), [1 - 4, 2 - 3.5, 6 - 1.5, 0, 0, 0])
    # k = 2: each sample's baseline is the other sample
    assert_close(leave_one_out_advantages(t([1.0, 4.0]), 2), [-3.0, 3.0])


def test_reinforce_pp_normalises_over_the_whole_batch():
    advantages = t([-3.0, -1.5, 4.5, 0.0])  # mean 0
    std = math.sqrt((9 + 2.25 + 20.25 + 0) / 3)
    assert_close(normalize_batch(advantages), [a / (std + 1e-8) for a in (-3.0, -1.5, 4.5, 0.0)])
    shifted = normalize_batch(t([1.0, 3.0]))  # mean 2, std sqrt(2)
    assert_close(shifted, [-1 / (math.sqrt(2) + 1e-8), 1 / (math.sqrt(2) + 1e-8)])


@pytest.mark.parametrize("function", [group_advantages, leave_one_out_advantages])
def test_groups_must_have_two_samples_and_divide_the_batch(function):
    with pytest.raises(ValueError, match="at least 2"):
        function(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="do not split"):
        function(t([1.0, 2.0, 3.0]), 2)


# ------------------------------------------------------------------ GRPO loss

# two samples, three and two response tokens (the third of row 1 is padding, with junk values)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
OLD = t([[-1.0, -2.0, -1.5], [-0.5, -1.0, 0.0]])
LOG_RHO = t([[0.0, math.log(1.5), math.log(0.5)], [math.log(1.1), math.log(0.7), 7.0]])
NEW = OLD + LOG_RHO
D = t([[0.0, 0.5, -1.0], [0.2, 0.0, 9.0]])  # log pi_ref - log pi
REF = NEW + D
ADV = t([1.0, -2.0])
EPS = 0.2


def k3(d: float) -> float:
    return math.exp(d) - d - 1


# per-token -min(rho A, clip(rho) A): row 0 (A = 1): rho 1, 1.5 (clipped to 1.2), 0.5 (0.5 < 0.8 kept);
# row 1 (A = -2): rho 1.1 (-2.2 either way), 0.7 (clipped to 0.8: -1.6 < -1.4)
SURROGATE = [[-1.0, -1.2, -0.5], [2.2, 1.6]]


def per_token(beta: float) -> list[list[float]]:
    d = D.tolist()
    return [[s + beta * k3(d[i][j]) for j, s in enumerate(row)] for i, row in enumerate(SURROGATE)]


def test_grpo_loss_sequence_mean_then_batch_mean():
    loss, stats = grpo_loss(NEW, OLD, ADV, MASK, EPS)
    assert_close(loss, ((-1.0 - 1.2 - 0.5) / 3 + (2.2 + 1.6) / 2) / 2)  # = 0.5
    assert_close(stats["clipfrac"], 2 / 5)  # row 0 token 1, row 1 token 1
    assert "kl" not in stats  # beta 0: no reference


def test_grpo_loss_with_the_k3_penalty():
    loss, stats = grpo_loss(NEW, OLD, ADV, MASK, EPS, beta=0.1, ref_logprobs=REF)
    rows = per_token(0.1)
    assert_close(loss, (sum(rows[0]) / 3 + sum(rows[1]) / 2) / 2)
    assert_close(stats["kl"], (k3(0.0) + k3(0.5) + k3(-1.0) + k3(0.2) + k3(0.0)) / 5)


@pytest.mark.parametrize(
    ("loss_type", "extra", "denominator"),
    [
        ("bnpo", {}, 5),  # the batch's tokens
        ("dapo", {}, 5),  # no count given: this batch's tokens
        ("dapo", {"num_tokens": 10.0}, 10),  # the optimizer step's tokens over all processes
        ("dr_grpo", {"max_completion_length": 4}, 2 * 4),  # B x max_completion_length
    ],
)
def test_grpo_loss_token_normalisations(loss_type, extra, denominator):
    loss, _ = grpo_loss(NEW, OLD, ADV, MASK, EPS, beta=0.1, ref_logprobs=REF, loss_type=loss_type, **extra)
    total = sum(sum(row) for row in per_token(0.1))
    assert_close(loss, total / denominator)


def test_grpo_gradient_on_policy_is_the_advantage_per_token():
    """At pi = pi_old (the first update), d loss / d log pi_t = -A_i / (|o_i| B) for "grpo", and
    -A_i / (B * L) for "dr_grpo"; beta adds beta * (1 - exp(ref - logp)) / (|o_i| B)."""
    logps = OLD.clone().requires_grad_(True)
    grpo_loss(logps, OLD, ADV, MASK, EPS, beta=0.1, ref_logprobs=OLD + D)[0].backward()
    d = D.tolist()
    expected = [[(-1.0 + 0.1 * (1 - math.exp(d[0][j]))) / (3 * 2) for j in range(3)]]
    expected.append([(2.0 + 0.1 * (1 - math.exp(d[1][j]))) / (2 * 2) for j in range(2)] + [0.0])
    assert_close(logps.grad, expected)
    logps.grad = None
    grpo_loss(logps, OLD, ADV, MASK, EPS, loss_type="dr_grpo", max_completion_length=4)[0].backward()
    assert_close(logps.grad, [[-1.0 / 8] * 3, [2.0 / 8, 2.0 / 8, 0.0]])


def test_grpo_loss_refuses_bad_settings():
    assert GRPO_LOSS_TYPES == ("grpo", "bnpo", "dapo", "dr_grpo")
    with pytest.raises(ValueError, match="unknown GRPO loss type"):
        grpo_loss(NEW, OLD, ADV, MASK, EPS, loss_type="sum")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(NEW, OLD, ADV, MASK, EPS, beta=0.04)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(NEW, OLD, ADV, MASK, EPS, loss_type="dr_grpo")


# ------------------------------------------------------------------ RLOO


def test_kl_shaped_scores_by_hand():
    logps = t([[-1.0, -2.0, -1.5], [-0.5, -1.0, 3.0]])
    ref = t([[-1.5, -1.0, -1.5], [-0.7, -1.0, -8.0]])  # padding of row 1 ignored
    shaped, seq_kl = kl_shaped_scores(t([1.0, 2.0]), logps, ref, MASK, beta=0.1)
    assert_close(seq_kl, [0.5 - 1.0 + 0.0, 0.2 + 0.0])
    assert_close(shaped, [1.0 - 0.1 * -0.5, 2.0 - 0.1 * 0.2])


# three sequences; sequence log-ratios 0, log 1.5 (split over two tokens), log 0.5
SEQ_MASK = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.float64)
SEQ_OLD = t([[-1.0, -2.0], [-0.5, -1.5], [-3.0, 0.0]])
SEQ_NEW = SEQ_OLD + t([[0.2, -0.2], [0.3, math.log(1.5) - 0.3], [math.log(0.5), 5.0]])


def test_rloo_loss_clips_the_sequence_ratio():
    loss, stats = rloo_loss(SEQ_NEW, SEQ_OLD, t([1.0, 1.0, -2.0]), SEQ_MASK, 0.2)
    # max(-A rho, -A clip(rho)): rho 1 -> -1; rho 1.5, A 1 -> max(-1.5, -1.2); rho 0.5, A -2 -> max(1, 1.6)
    assert_close(loss, (-1.0 - 1.2 + 1.6) / 3)
    assert_close(stats["clipfrac"], 2 / 3)
    assert_close(stats["approx_kl"], 0.5 * (0.0 + math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_rloo_gradient_on_policy_is_reinforce_with_the_leave_one_out_baseline():
    """rho = 1: d loss / d log pi(y_it) = -A_i / B on every token of sequence i (REINFORCE)."""
    rewards = t([1.0, 2.0, 6.0])
    advantages = leave_one_out_advantages(rewards, 3)  # [-3, -1.5, 4.5]
    logps = SEQ_OLD.clone().requires_grad_(True)
    rloo_loss(logps, SEQ_OLD, advantages, SEQ_MASK, 0.2)[0].backward()
    assert_close(logps.grad, [[3.0 / 3, 3.0 / 3], [1.5 / 3, 1.5 / 3], [-4.5 / 3, 0.0]])
