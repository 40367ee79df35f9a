"""Tests of align_cli.losses against hand computations on fixed small numbers.

Every expected value is written out with ``math`` from the paper's formula, independently of the code under
test. Tensors are float64 so the comparisons can be tight.
"""

from __future__ import annotations

import math

import pytest
import torch

from align_cli.losses import (
    DPO_LOSS_TYPES,
    PREFERENCE_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    PreferenceParams,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    hinge_loss,
    ipo_loss,
    kl_penalty,
    kto_loss,
    masked_mean,
    masked_var,
    odds_ratio_loss,
    pairwise_reward_loss,
    per_token_rewards,
    plackett_luce_dpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_beta,
    ranking_pairs,
    response_scores,
    reward_centering_loss,
    shape_scores,
    sigmoid_loss,
    simpo_loss,
    uses_reference,
    whiten,
)

F64 = torch.float64


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-10, rtol: float = 1e-10) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_t, atol=atol, rtol=rtol)


def neg_log_sigmoid(z: float) -> float:
    """-log sigma(z), written from the definition sigma(z) = 1 / (1 + e^-z)."""
    return -math.log(1.0 / (1.0 + math.exp(-z)))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------


def test_bradley_terry_without_margin():
    r_c = T([2.0, 0.5, -1.0])
    r_r = T([1.0, 1.5, -1.0])
    # differences 1, -1, 0: -log sigma(d) = log(1 + e^-d)
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    out = bradley_terry_loss(r_c, r_r)
    assert out.shape == (3,)
    assert_close(out, expected)


def test_bradley_terry_with_llama2_margin():
    r_c = T([2.0, 0.5, -1.0])
    r_r = T([1.0, 1.5, -1.0])
    margin = T([0.5, 1.0, 1.0 / 3.0])  # e.g. large-table "slightly better", small-table values
    # d - m = 0.5, -2, -1/3
    expected = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(1.0 / 3.0))]
    assert_close(bradley_terry_loss(r_c, r_r, margin), expected)
    # a zero margin is the plain loss
    assert_close(bradley_terry_loss(r_c, r_r, torch.zeros(3, dtype=F64)), bradley_terry_loss(r_c, r_r))


def test_bradley_terry_is_stable_for_large_differences():
    out = bradley_terry_loss(T([0.0, 1000.0]), T([1000.0, 0.0]))
    assert torch.isfinite(out).all()
    assert_close(out, [1000.0, 0.0])


def test_ranking_pairs():
    assert ranking_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert ranking_pairs(2) == [(0, 1)]
    assert ranking_pairs(1) == []
    assert len(ranking_pairs(9)) == math.comb(9, 2)


def test_pairwise_reward_loss_four_way_ranking():
    # InstructGPT: 4 responses ranked best first, each scored once, 6 pairs weighted 1/C(4,2).
    rewards = T([3.0, 1.0, 0.5, -1.0])
    pairs = ranking_pairs(4)
    better = torch.tensor([b for b, _ in pairs])
    worse = torch.tensor([w for _, w in pairs])
    weight = torch.full((6,), 1.0 / 6.0, dtype=F64)
    # differences: (0,1) 2, (0,2) 2.5, (0,3) 4, (1,2) 0.5, (1,3) 2, (2,3) 1.5
    expected = (
        neg_log_sigmoid(2.0)
        + neg_log_sigmoid(2.5)
        + neg_log_sigmoid(4.0)
        + neg_log_sigmoid(0.5)
        + neg_log_sigmoid(2.0)
        + neg_log_sigmoid(1.5)
    ) / 6.0
    out = pairwise_reward_loss(rewards, better, worse, weight)
    assert out.dim() == 0
    assert_close(out, expected)


def test_pairwise_reward_loss_mixed_batch():
    # Prompt A: a plain (chosen, rejected) pair, responses 0 and 1, weight 1.
    # Prompt B: a K=3 ranking, responses 2 > 3 > 4, 3 pairs of weight 1/3.
    rewards = T([0.2, 0.7, 1.0, 0.0, 0.5]).requires_grad_(True)
    better = torch.tensor([0, 2, 2, 3])
    worse = torch.tensor([1, 3, 4, 4])
    weight = T([1.0, 1 / 3, 1 / 3, 1 / 3])
    # differences: 0.2 - 0.7 = -0.5; 1.0 - 0.0 = 1; 1.0 - 0.5 = 0.5; 0.0 - 0.5 = -0.5
    expected = (
        math.log(1 + math.exp(0.5))
        + (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 3.0
    )
    out = pairwise_reward_loss(rewards, better, worse, weight)
    assert_close(out, expected)
    # divided by the number of prompts (2) this is the per-prompt mean
    assert_close(out / 2, expected / 2)

    # Each response is scored once, so its gradient collects every pair it is in:
    # d/dr [-log sigma(r_b - r_w)] = -sigma(-(r_b - r_w)) for the better response,
    # +sigma(-(r_b - r_w)) for the worse one.
    out.backward()
    g = rewards.grad
    assert_close(g[0], -sigmoid(0.5))
    assert_close(g[1], sigmoid(0.5))
    assert_close(g[2], (-sigmoid(-1.0) - sigmoid(-0.5)) / 3)
    assert_close(g[3], (sigmoid(-1.0) - sigmoid(0.5)) / 3)
    assert_close(g[4], (sigmoid(-0.5) + sigmoid(0.5)) / 3)

    # with Llama 2 margins per pair
    margin = T([1.0, 0.0, 2 / 3, 1 / 3])
    expected_m = (
        math.log(1 + math.exp(1.5))
        + (
            math.log(1 + math.exp(-1.0))
            + math.log(1 + math.exp(-0.5 + 2 / 3))
            + math.log(1 + math.exp(0.5 + 1 / 3))
        )
        / 3.0
    )
    assert_close(pairwise_reward_loss(rewards.detach(), better, worse, weight, margin), expected_m)


def test_reward_centering_loss():
    out = reward_centering_loss(T([1.0, 0.5, 3.0]), T([-2.0, 1.0, -3.0]))
    assert_close(out, [1.0, 2.25, 0.0])


# ---------------------------------------------------------------------------------------------------
# DPO family
# ---------------------------------------------------------------------------------------------------

# Two pairs of summed log-probs, with log-ratios pc-rc = [1, -1], pr-rr = [-2, 2] so h = [3, -3];
# reference-free h = pc - pr = [2, -2].
PC = [-10.0, -20.0]
PR = [-12.0, -18.0]
RC = [-11.0, -19.0]
RR = [-10.0, -20.0]
BETA = 0.1


def _dpo(**kwargs):
    return dpo_loss(T(PC), T(PR), T(RC), T(RR), beta=kwargs.pop("beta", BETA), **kwargs)


def test_dpo_sigmoid():
    losses, chosen, rejected = _dpo()
    # -log sigma(beta h), beta h = 0.3, -0.3
    assert_close(losses, [math.log(1 + math.exp(-0.3)), math.log(1 + math.exp(0.3))])
    assert_close(chosen, [0.1 * 1.0, 0.1 * -1.0])
    assert_close(rejected, [0.1 * -2.0, 0.1 * 2.0])


def test_dpo_rewards_are_detached():
    pc = T(PC).requires_grad_(True)
    pr = T(PR).requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, pr, T(RC), T(RR), beta=BETA)
    assert losses.requires_grad
    assert not chosen.requires_grad
    assert not rejected.requires_grad


def test_conservative_dpo_label_smoothing():
    losses, _, _ = _dpo(label_smoothing=0.1)
    # -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    expected = [
        0.9 * math.log(1 + math.exp(-0.3)) + 0.1 * math.log(1 + math.exp(0.3)),
        0.9 * math.log(1 + math.exp(0.3)) + 0.1 * math.log(1 + math.exp(-0.3)),
    ]
    assert_close(losses, expected)


# response lengths (supervised tokens) of the chosen and rejected responses of the two pairs above
LC = [2.0, 4.0]
LR = [4.0, 5.0]


def test_ipo():
    """IPO on per-token mean log-probs: every log-prob (policy and reference) divided by its length."""
    losses, chosen, rejected = _dpo(loss_type="ipo", chosen_lengths=T(LC), rejected_lengths=T(LR))
    # pair 1: chosen (-10/2) - (-11/2) = 0.5, rejected (-12/4) - (-10/4) = -0.5, h = 1
    # pair 2: chosen (-20/4) - (-19/4) = -0.25, rejected (-18/5) - (-20/5) = 0.4, h = -0.65
    # (h - 1/(2 beta))^2, 1/(2 * 0.1) = 5: (1 - 5)^2 = 16, (-0.65 - 5)^2 = 31.9225
    assert_close(losses, [16.0, 31.9225])
    assert_close(chosen, [0.1 * 0.5, 0.1 * -0.25])  # implicit rewards on the same per-token log-ratios
    assert_close(rejected, [0.1 * -0.5, 0.1 * 0.4])
    # reference-free: h = pc/lc - pr/lr = (-5 + 3, -5 + 3.6) = (-2, -1.4)
    losses, _, _ = _dpo(loss_type="ipo", chosen_lengths=T(LC), rejected_lengths=T(LR), reference_free=True)
    assert_close(losses, [(-2.0 - 5.0) ** 2, (-1.4 - 5.0) ** 2])


def test_ipo_is_length_normalised_and_sigmoid_is_not():
    """Twice the response length at the same per-token log-probs: the summed log-probs double. IPO (per-token
    means) is unchanged; sigmoid DPO (sums) sees twice the log-ratio."""
    lengths = dict(chosen_lengths=T(LC), rejected_lengths=T(LR))
    doubled = dict(chosen_lengths=2 * T(LC), rejected_lengths=2 * T(LR))
    ipo, _, _ = dpo_loss(T(PC), T(PR), T(RC), T(RR), BETA, "ipo", **lengths)
    ipo2, _, _ = dpo_loss(2 * T(PC), 2 * T(PR), 2 * T(RC), 2 * T(RR), BETA, "ipo", **doubled)
    assert_close(ipo2, ipo)
    sigmoid, _, _ = dpo_loss(T(PC), T(PR), T(RC), T(RR), BETA, "sigmoid", **lengths)
    sigmoid2, _, _ = dpo_loss(2 * T(PC), 2 * T(PR), 2 * T(RC), 2 * T(RR), BETA, "sigmoid", **doubled)
    assert_close(sigmoid, [neg_log_sigmoid(0.3), neg_log_sigmoid(-0.3)])  # h = 3, -3: sums, lengths unused
    assert_close(sigmoid2, [neg_log_sigmoid(0.6), neg_log_sigmoid(-0.6)])
    hinge, _, _ = dpo_loss(T(PC), T(PR), T(RC), T(RR), BETA, "hinge", **lengths)
    assert_close(hinge, [0.7, 1.3])  # sums too
    with pytest.raises(ValueError, match="ipo.*lengths"):
        _dpo(loss_type="ipo")  # without lengths IPO cannot be computed


def test_hinge():
    losses, _, _ = _dpo(loss_type="hinge")
    # max(0, 1 - beta h): 1 - 0.3, 1 + 0.3
    assert_close(losses, [0.7, 1.3])
    losses, _, _ = _dpo(loss_type="hinge", beta=0.5)
    # 1 - 1.5 < 0 -> 0; 1 + 1.5
    assert_close(losses, [0.0, 2.5])


def test_dpo_reference_free():
    losses, chosen, rejected = _dpo(reference_free=True)
    # h = pc - pr = [2, -2]
    assert_close(losses, [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2))])
    assert_close(chosen, [0.1 * -10.0, 0.1 * -20.0])
    assert_close(rejected, [0.1 * -12.0, 0.1 * -18.0])


def test_dpo_policy_equal_reference():
    logps_c = T([-5.0, -7.5, -1.0])
    logps_r = T([-6.0, -2.0, -3.0])
    losses, chosen, rejected = dpo_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), beta=0.5)
    assert_close(losses, [math.log(2.0)] * 3)
    assert_close(chosen, [0.0] * 3)
    assert_close(rejected, [0.0] * 3)


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge"):
        _dpo(loss_type="kto")


def test_dpo_gradient_is_the_paper_weighting():
    pc = T(PC).requires_grad_(True)
    pr = T(PR).requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, pr, T(RC), T(RR), beta=BETA)
    losses.sum().backward()
    # d loss / d log pi(y_w) = -beta sigma(-beta h) = -beta sigma(r_hat_l - r_hat_w); h = 3, -3
    expected_c = [-BETA * sigmoid(-BETA * 3.0), -BETA * sigmoid(BETA * 3.0)]
    assert_close(pc.grad, expected_c)
    assert_close(pr.grad, [-g for g in expected_c])
    # the same weighting written with the returned implicit rewards
    for i in range(2):
        weight = sigmoid(rejected[i].item() - chosen[i].item())
        assert math.isclose(pc.grad[i].item(), -BETA * weight, rel_tol=1e-12)
    # the wrongly ordered pair (h < 0) gets the larger weight
    assert abs(pc.grad[1]) > abs(pc.grad[0])


def test_plackett_luce_k3_by_hand():
    beta = 0.5
    policy = T([[-1.0, -2.0, -4.0]])
    ref = T([[-2.0, -2.0, -2.0]])
    # r_hat = 0.5 * [1, 0, -2] = [0.5, 0, -1]
    r = [0.5, 0.0, -1.0]
    term1 = r[0] - math.log(math.exp(r[0]) + math.exp(r[1]) + math.exp(r[2]))
    term2 = r[1] - math.log(math.exp(r[1]) + math.exp(r[2]))
    term3 = r[2] - math.log(math.exp(r[2]))  # = 0
    losses, rewards = plackett_luce_dpo_loss(policy, ref, beta)
    assert losses.shape == (1,)
    assert_close(losses, [-(term1 + term2 + term3)])
    assert_close(rewards, [r])
    assert not rewards.requires_grad


def test_plackett_luce_k2_equals_dpo():
    beta = 0.1
    # by hand: r_hat = 0.1 * [1, -2], loss = -log sigma(0.3)
    losses, _ = plackett_luce_dpo_loss(T([[PC[0], PR[0]]]), T([[RC[0], RR[0]]]), beta)
    assert_close(losses, [math.log(1 + math.exp(-0.3))])

    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(8, generator=gen, dtype=F64) for _ in range(4))
    pl_losses, pl_rewards = plackett_luce_dpo_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta)
    dpo_losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    assert_close(pl_losses, dpo_losses)
    assert_close(pl_rewards, torch.stack([chosen, rejected], 1))


def test_plackett_luce_mixed_k_with_mask():
    beta = 0.5
    # row 0: K=3; row 1: K=2 padded with a junk third entry that must not matter
    policy = T([[-1.0, -2.0, -4.0], [-3.0, -1.0, 50.0]]).requires_grad_(True)
    ref = T([[-2.0, -2.0, -2.0], [-2.0, -2.0, -80.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    losses, rewards = plackett_luce_dpo_loss(policy, ref, beta, mask)

    alone0, r0 = plackett_luce_dpo_loss(policy[:1].detach(), ref[:1], beta)
    alone1, r1 = plackett_luce_dpo_loss(policy[1:, :2].detach(), ref[1:, :2], beta)
    assert_close(losses, torch.cat([alone0, alone1]))
    # row 1 by hand: r_hat = 0.5 * [-1, 1]; -log sigma(-1)
    assert_close(losses[1], math.log(1 + math.exp(1.0)))
    assert_close(rewards, [r0[0].tolist(), [-0.5, 0.5, 0.0]])

    losses.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert policy.grad[1, 2].item() == 0.0
    # d/d log pi(y_w) of -log sigma(r_w - r_l) = -beta sigma(r_l - r_w)
    assert_close(policy.grad[1, 0], -beta * sigmoid(1.0))


def test_the_table_of_preference_losses_by_hand():
    """Each entry of PREFERENCE_LOSSES is a function of h alone; dpo_loss dispatches on the table."""
    assert DPO_LOSS_TYPES == tuple(PREFERENCE_LOSSES) == ("sigmoid", "ipo", "hinge", "simpo", "orpo")
    h = T([3.0, -3.0])
    p = PreferenceParams(beta=0.1, label_smoothing=0.1, simpo_gamma=0.5)
    assert_close(sigmoid_loss(h, PreferenceParams(0.1)), [neg_log_sigmoid(0.3), neg_log_sigmoid(-0.3)])
    assert_close(
        sigmoid_loss(h, p),
        [0.9 * neg_log_sigmoid(0.3) + 0.1 * neg_log_sigmoid(-0.3),
         0.9 * neg_log_sigmoid(-0.3) + 0.1 * neg_log_sigmoid(0.3)],
    )  # fmt: skip
    assert_close(ipo_loss(h, p), [(3.0 - 5.0) ** 2, (-3.0 - 5.0) ** 2])
    assert_close(hinge_loss(h, p), [0.7, 1.3])
    assert_close(simpo_loss(h, p), [neg_log_sigmoid(0.3 - 0.5), neg_log_sigmoid(-0.3 - 0.5)])
    assert_close(odds_ratio_loss(h, p), [neg_log_sigmoid(3.0), neg_log_sigmoid(-3.0)])  # no beta
    assert [v.reference for v in PREFERENCE_LOSSES.values()] == [True, True, True, False, False]
    assert preference_beta("sigmoid", None) == 0.1 and preference_beta("simpo", None) == 2.0
    assert preference_beta("orpo", None) is None and preference_beta("simpo", 2.5) == 2.5
    assert uses_reference("sigmoid") and not uses_reference("sigmoid", reference_free=True)
    assert not uses_reference("simpo") and not uses_reference("orpo")


def test_simpo_by_hand():
    """SimPO: reference-free, per-token mean log-probs, -log sigma(beta h - gamma)."""
    # per-token: chosen -10/2 = -5, -20/4 = -5; rejected -12/4 = -3, -18/5 = -3.6; h = -2, -1.4
    lengths = dict(chosen_lengths=T(LC), rejected_lengths=T(LR))
    losses, chosen, rejected = _dpo(loss_type="simpo", beta=2.0, simpo_gamma=1.0, **lengths)
    assert_close(losses, [neg_log_sigmoid(2.0 * -2.0 - 1.0), neg_log_sigmoid(2.0 * -1.4 - 1.0)])
    assert_close(chosen, [2.0 * -5.0, 2.0 * -5.0])  # r_hat = beta * log pi(y|x) / |y|
    assert_close(rejected, [2.0 * -3.0, 2.0 * -3.6])
    # the reference log-probs are never read; beta defaults to 2
    other_ref, _, _ = dpo_loss(T(PC), T(PR), T([0.0, 0.0]), None, None, "simpo", simpo_gamma=1.0, **lengths)
    assert_close(other_ref, losses)
    with pytest.raises(ValueError, match="simpo.*lengths"):
        _dpo(loss_type="simpo")


def log_odds(mean_logp: float) -> float:
    """log(P / (1 - P)) with P = exp(mean log-prob), from the definition."""
    prob = math.exp(mean_logp)
    return math.log(prob / (1.0 - prob))


def test_orpo_by_hand():
    """ORPO: the chosen tokens' NLL averaged over the batch's chosen tokens + lambda * -log sigma(h), h the
    difference of the log odds of the per-token mean probabilities; no reference."""
    pc, pr, lc, lr = [-1.0, -3.0], [-4.0, -1.0], [2.0, 3.0], [2.0, 4.0]
    # per-token means: chosen -0.5, -1.0; rejected -2.0, -0.25
    h = [log_odds(-0.5) - log_odds(-2.0), log_odds(-1.0) - log_odds(-0.25)]
    odds_ratio = [neg_log_sigmoid(h[0]), neg_log_sigmoid(h[1])]
    nll = [1.0 * 2 / 5, 3.0 * 2 / 5]  # -log pi(y_w|x) * B / sum |y_w|: B = 2 pairs, 5 chosen tokens
    policy_c = T(pc).requires_grad_(True)
    losses, chosen, rejected = dpo_loss(
        policy_c, T(pr), T(RC), T(RR), None, "orpo", chosen_lengths=T(lc), rejected_lengths=T(lr),
        orpo_lambda=0.2,
    )  # fmt: skip
    assert_close(losses, [nll[0] + 0.2 * odds_ratio[0], nll[1] + 0.2 * odds_ratio[1]])
    # the batch mean is the SFT loss (chosen NLL over chosen tokens) + lambda * mean L_OR
    assert math.isclose(losses.mean().item(), 4.0 / 5.0 + 0.2 * sum(odds_ratio) / 2, rel_tol=1e-12)
    assert_close(chosen, [log_odds(-0.5), log_odds(-1.0)])  # no beta: the rewards are the log odds
    assert_close(rejected, [log_odds(-2.0), log_odds(-0.25)])
    losses.sum().backward()
    assert (policy_c.grad < 0).all()  # raising log pi(y_w|x) lowers the loss


def test_orpo_log_odds_are_finite_near_certainty_and_far_from_it():
    scores = response_scores(T([-1e-20, -400.0]), None, T([1.0, 1.0]), "log_odds")
    assert torch.isfinite(scores).all()
    assert_close(scores[1], -400.0, atol=1e-12)  # P tiny: log odds = log P
    assert_close(response_scores(T([-1.0]), None, T([2.0]), "log_odds"), [log_odds(-0.5)])
    assert_close(response_scores(T([-1.0]), T([-3.0]), T([2.0]), "mean"), [1.0])
    assert_close(response_scores(T([-1.0]), None, None, "sum"), [-1.0])


# ---------------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------------


def test_kto_by_hand():
    policy = T([-3.0, -5.0, -4.0]).requires_grad_(True)
    ref = T([-4.0, -4.0, -4.0])
    desirable = torch.tensor([True, False, True])
    policy_kl = T([-6.0, -2.0]).requires_grad_(True)
    ref_kl = T([-5.0, -4.0])
    losses, rewards, z = kto_loss(policy, ref, desirable, policy_kl, ref_kl, 0.5, 1.0, 2.0)
    # z_ref = max(0, mean(-1, 2)) = 0.5; r = 1, -1, 0
    assert z.item() == 0.5
    expected = [
        1 - sigmoid(0.5 * (1.0 - 0.5)),
        2.0 * (1 - sigmoid(0.5 * (0.5 + 1.0))),
        1 - sigmoid(0.5 * -0.5),
    ]
    assert_close(losses, expected)
    assert_close(rewards, [0.5, -0.5, 0.0])
    assert not rewards.requires_grad and not z.requires_grad
    losses.sum().backward()
    assert policy_kl.grad is None  # z_ref is a baseline: no gradient through it
    # d/dr of lambda (1 - sigma(beta (r - z))) = -lambda beta sigma (1 - sigma); undesirable: the opposite
    s0, s1 = sigmoid(0.25), sigmoid(0.75)
    assert_close(policy.grad[:2], [-0.5 * s0 * (1 - s0), 2.0 * 0.5 * s1 * (1 - s1)])


def test_kto_kl_baseline_is_clamped_at_zero_and_zero_without_mismatched_pairs():
    policy, ref, desirable = T([-3.0]), T([-4.0]), torch.tensor([True])
    _, _, z = kto_loss(policy, ref, desirable, T([-6.0, -7.0]), T([-5.0, -4.0]), 0.1)
    assert z.item() == 0.0  # mean -2 clamped
    losses, _, z = kto_loss(policy, ref, desirable, T([]), T([]), 0.1)
    assert z.item() == 0.0
    assert_close(losses, [1 - sigmoid(0.1 * 1.0)])


# ---------------------------------------------------------------------------------------------------
# PPO: masked statistics
# ---------------------------------------------------------------------------------------------------

X = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, 100.0]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


def test_masked_mean_and_var():
    x, mask = T(X), T(MASK)
    # masked values 1..5
    assert_close(masked_mean(x, mask), 3.0)
    assert_close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    assert_close(masked_mean(x, mask.bool()), 3.0)
    # squared deviations 4, 1, 0, 1, 4 -> sum 10
    assert_close(masked_var(x, mask), 10.0 / 4.0)
    assert_close(masked_var(x, mask, unbiased=False), 10.0 / 5.0)
    # junk (even nan) at padded positions is ignored
    x_nan = x.clone()
    x_nan[1, 3] = float("nan")
    assert_close(masked_mean(x_nan, mask), 3.0)


def test_whiten():
    x, mask = T(X), T(MASK)
    s = math.sqrt(2.5 + 1e-8)
    out = whiten(x, mask)
    expected = [[(1 - 3) / s, (2 - 3) / s, (3 - 3) / s, 0.0], [(4 - 3) / s, (5 - 3) / s, 0.0, 0.0]]
    assert_close(out, expected)
    assert abs(masked_mean(out, mask).item()) < 1e-12
    assert_close(masked_var(out, mask), 1.0, atol=1e-7, rtol=1e-7)

    kept = whiten(x, mask, shift_mean=False)
    expected_kept = [
        [3 + (1 - 3) / s, 3 + (2 - 3) / s, 3.0, 0.0],
        [3 + (4 - 3) / s, 3 + (5 - 3) / s, 0.0, 0.0],
    ]
    assert_close(kept, expected_kept)
    assert_close(masked_mean(kept, mask), 3.0)


# ---------------------------------------------------------------------------------------------------
# PPO: KL, rewards, GAE
# ---------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp = T([-1.0, -2.0, -0.5])
    ref = T([-1.5, -1.0, -0.5])
    assert_close(kl_penalty(logp, ref, "k1"), [0.5, -1.0, 0.0])
    assert_close(kl_penalty(logp, ref), [0.5, -1.0, 0.0])
    # k3 = (r - 1) - log r, log r = ref - logp = -0.5, 1, 0
    assert_close(kl_penalty(logp, ref, "k3"), [(math.exp(-0.5) - 1) + 0.5, (math.exp(1.0) - 1) - 1.0, 0.0])
    assert_close(kl_penalty(logp, ref, "abs"), [0.5, 1.0, 0.0])
    assert_close(kl_penalty(logp, ref, "mse"), [0.125, 0.5, 0.0])
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k2")


def test_k3_is_nonnegative():
    gen = torch.Generator().manual_seed(1)
    logp = -5 * torch.rand(1000, generator=gen, dtype=F64)
    ref = -5 * torch.rand(1000, generator=gen, dtype=F64)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_shape_scores_by_hand():
    scores = T([1.0, -3.0, 5.0, 0.5])
    finished = torch.tensor([True, False, True, False])
    assert_close(shape_scores(scores, finished), scores)  # nothing asked: unchanged
    assert_close(shape_scores(scores, finished, missing_eos_penalty=1.0), [1.0, -4.0, 5.0, -0.5])
    assert_close(shape_scores(scores, finished, clip=2.0), [1.0, -2.0, 2.0, 0.5])
    # penalty, then clip: [1, -2, 2, -0.5]; mean 0.125, unbiased var 9.1875 / 3 = 3.0625, std 1.75
    shaped = shape_scores(scores, finished, 1.0, 2.0, normalize=True)
    expected = [(x - 0.125) / (1.75 + 1e-8) for x in (1.0, -2.0, 2.0, -0.5)]
    assert_close(shaped, expected)
    assert_close(scores, [1.0, -3.0, 5.0, 0.5])  # the input is left alone
    assert_close(shape_scores(T([3.0]), torch.tensor([True]), normalize=True), [3.0])  # a batch of one


def test_per_token_rewards_score_at_last_token():
    # row 0: 4 response tokens; row 1: 2 response tokens, then padding with junk log-probs
    logp = T([[-1.0, -2.0, -0.5, -1.0], [-0.2, -3.0, -9.0, -9.0]])
    ref = T([[-1.5, -1.0, -0.5, -2.0], [-0.4, -2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = T([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref
    assert_close(kl, [[0.5, -1.0, 0.0, 1.0], [0.2, -1.0, 0.0, 0.0]])
    expected = [
        [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0, -0.1 * 1.0 + 2.0],
        [-0.1 * 0.2, -0.1 * -1.0 + -1.0, 0.0, 0.0],
    ]
    assert_close(rewards, expected)
    # the shaped rewards of a row sum to score - beta * sum_t KL_t
    assert_close(rewards.sum(1), [2.0 - 0.1 * 0.5, -1.0 - 0.1 * -0.8])

    rewards3, kl3 = per_token_rewards(scores, logp, ref, mask.float(), kl_coef=0.05, estimator="k3")

    def k3(lp: float, rp: float) -> float:
        return math.exp(rp - lp) - 1 - (rp - lp)

    expected_kl3 = [
        [k3(-1.0, -1.5), k3(-2.0, -1.0), 0.0, k3(-1.0, -2.0)],
        [k3(-0.2, -0.4), k3(-3.0, -2.0), 0.0, 0.0],
    ]
    assert_close(kl3, expected_kl3)
    assert_close(rewards3[0, 3], -0.05 * k3(-1.0, -2.0) + 2.0)
    assert_close(rewards3[1, 1], -0.05 * k3(-3.0, -2.0) - 1.0)
    assert_close(rewards3[1, 2:], [0.0, 0.0])


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    gl = gamma * lam
    rewards = T([[0.1, -0.2, 0.3, 1.0], [0.5, 2.0, 9.0, 9.0]])
    values = T([[0.5, 0.4, 0.6, 0.2], [1.0, 0.3, 7.0, 7.0]]).requires_grad_(True)
    mask = T([[1, 1, 1, 1], [1, 1, 0, 0]])

    # row 0: delta_t = r_t + gamma V_{t+1} - V_t, V after the last token = 0
    d = [
        0.1 + gamma * 0.4 - 0.5,
        -0.2 + gamma * 0.6 - 0.4,
        0.3 + gamma * 0.2 - 0.6,
        1.0 + gamma * 0.0 - 0.2,
    ]
    a0 = [
        d[0] + gl * d[1] + gl**2 * d[2] + gl**3 * d[3],
        d[1] + gl * d[2] + gl**2 * d[3],
        d[2] + gl * d[3],
        d[3],
    ]
    # row 1: length 2, the padded value 7.0 is not V_{t+1} of the last token
    e = [0.5 + gamma * 0.3 - 1.0, 2.0 + gamma * 0.0 - 0.3]
    a1 = [e[0] + gl * e[1], e[1], 0.0, 0.0]

    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert_close(adv, [a0, a1])
    assert math.isclose(a0[0], 0.1531904, rel_tol=1e-12)
    assert math.isclose(a1[0], 0.994, rel_tol=1e-12)
    v = values.detach().tolist()
    assert_close(ret, [[a0[i] + v[0][i] for i in range(4)], [a1[0] + v[1][0], a1[1] + v[1][1], 0.0, 0.0]])
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = T([[1.0, 2.0, 3.0]])
    values = T([[0.5, -1.0, 2.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(ret, [[6.0, 5.0, 3.0]])
    assert_close(adv, [[6.0 - 0.5, 5.0 + 1.0, 3.0 - 2.0]])


# ---------------------------------------------------------------------------------------------------
# PPO: policy and value losses, entropy
# ---------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_by_hand():
    eps = 0.2
    # tokens (rho, A): (1.5, 1) clipped at 1+eps; (0.5, -1) clipped at 1-eps; (1.1, 2) inside;
    # (1.5, -1) and (0.5, 1): outside the range but the unclipped term is the pessimistic one.
    rho = [[1.5, 0.5, 1.1], [1.5, 0.5, 3.0]]
    adv = T([[1.0, -1.0, 2.0], [-1.0, 1.0, 50.0]])
    old = T([[-1.0, -2.0, -0.5], [-1.2, -0.7, -1.0]])
    logp = (old + torch.log(T(rho))).requires_grad_(True)
    mask = T([[1, 1, 1], [1, 1, 0]])

    # max(-A rho, -A clip(rho)) per token
    per_token = [max(-1.5, -1.2), max(0.5, 0.8), max(-2.2, -2.2), max(1.5, 1.2), max(-0.5, -0.8)]
    assert per_token == [-1.2, 0.8, -2.2, 1.5, -0.5]
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    assert_close(loss, sum(per_token) / 5)
    assert_close(loss, -0.32)
    assert_close(stats["clipfrac"], 2 / 5)
    lr = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.5), math.log(0.5)]
    assert_close(stats["approx_kl"], sum(0.5 * x * x for x in lr) / 5)
    assert not stats["clipfrac"].requires_grad

    # gradient: 0 where the clipped term is active, -A rho / n elsewhere, 0 on padding
    loss.backward()
    assert_close(logp.grad, [[0.0, 0.0, -2.0 * 1.1 / 5], [1.5 / 5, -0.5 / 5, 0.0]])


def test_ppo_policy_loss_on_policy():
    # rho = 1: loss = -mean(A), nothing clipped, approx_kl 0
    logp = T([[-1.0, -2.0]])
    loss, stats = ppo_policy_loss(logp, logp.clone(), T([[0.5, -1.5]]), torch.ones(1, 2), 0.2)
    assert_close(loss, 0.5)
    assert_close(stats["clipfrac"], 0.0)
    assert_close(stats["approx_kl"], 0.0)


def test_ppo_value_loss_by_hand():
    eps = 0.2
    values = T([[1.0, 1.0, 0.3], [-0.5, 5.0, 5.0]])
    old = T([[0.5, 0.5, 0.4], [0.0, 0.0, 0.0]])
    returns = T([[1.2, 0.0, 1.0], [-1.0, -5.0, -5.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    # V_clip = [0.7, 0.7, 0.3, -0.2]
    # token 0: (1.0-1.2)^2 = 0.04 vs (0.7-1.2)^2 = 0.25 -> clipped
    # token 1: (1.0-0.0)^2 = 1.00 vs (0.7-0.0)^2 = 0.49 -> unclipped
    # token 2: (0.3-1.0)^2 = 0.49 vs the same -> not clipped
    # token 3: (-0.5+1.0)^2 = 0.25 vs (-0.2+1.0)^2 = 0.64 -> clipped
    loss, stats = ppo_value_loss(values, old, returns, mask, eps)
    assert_close(loss, 0.5 * (0.25 + 1.0 + 0.49 + 0.64) / 4)
    assert_close(stats["vf_clipfrac"], 2 / 4)


def test_entropy_from_logits():
    logits = T([[[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -1e9]]])
    out = entropy_from_logits(logits)
    assert out.shape == (1, 2)
    assert_close(out, [[math.log(4.0), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))]])
    # shift invariance and a masked (-inf) vocabulary entry
    masked = T([3.0, 3.0, float("-inf")]).requires_grad_(True)
    out = entropy_from_logits(masked)
    assert_close(out, math.log(2.0))
    out.backward()
    # uniform over the two live entries is the maximum: zero gradient, and no nan from the -inf entry
    assert_close(masked.grad, [0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert ctl.value == 0.1
    expected = 0.1

    ctl.update(current_kl=9.0, n_steps=256)  # e = 9/6 - 1 = 0.5 -> clipped to 0.2
    expected *= 1 + 0.2 * 256 / 10000
    assert math.isclose(ctl.value, expected, rel_tol=1e-12)

    ctl.update(current_kl=6.6, n_steps=512)  # e = 0.1, inside the clip range
    expected *= 1 + 0.1 * 512 / 10000
    assert math.isclose(ctl.value, expected, rel_tol=1e-12)

    ctl.update(current_kl=5.4, n_steps=512)  # e = -0.1
    expected *= 1 - 0.1 * 512 / 10000
    assert math.isclose(ctl.value, expected, rel_tol=1e-12)

    ctl.update(current_kl=0.0, n_steps=1000)  # e = -1 -> clipped to -0.2
    expected *= 1 - 0.2 * 1000 / 10000
    assert math.isclose(ctl.value, expected, rel_tol=1e-12)
    assert math.isclose(expected, 0.1 * 1.00512 * 1.00512 * 0.99488 * 0.98, rel_tol=1e-12)


def test_adaptive_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(7.5, 512)
    ctl.update(2.0, 512)

    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    assert resumed.target == 6.0 and resumed.horizon == 10000
    for kl in (8.0, 3.0, 6.1):
        ctl.update(kl, 256)
        resumed.update(kl, 256)
        assert resumed.value == ctl.value
