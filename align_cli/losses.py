"""Alignment losses as pure functions on tensors.

This module is the reference implementation of the objectives used by the stages of ``align_cli``:
reward modelling (Bradley-Terry, InstructGPT K-way rankings, Llama 2 margins), the DPO family (DPO,
conservative DPO, IPO, hinge/SLiC, SimPO, ORPO, Plackett-Luce), KTO on unpaired data, and PPO for RLHF
(score shaping, KL-shaped per-token rewards, GAE, clipped surrogate and value losses, adaptive KL
coefficient), and the critic-free on-policy methods on groups of samples per prompt (GRPO and Dr. GRPO
group advantages and loss, RLOO's leave-one-out baseline and loss, REINFORCE++ batch normalisation).

Every function takes tensors and plain numbers and returns tensors: no models, no config objects, no
global state. Each docstring states the formula in the notation of the papers:

    x prompt, y response, pi the policy, pi_ref the frozen reference (SFT) model, sigma the logistic
    function, log pi(y|x) = sum of the token log-probs over the response tokens only,
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)).

Token-level PPO tensors are [B, T] with a ``mask`` [B, T] (float or bool) marking response tokens; the
mask of each row is a contiguous run of ones from position 0 (responses are right-padded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bradley_terry_loss",
    "ranking_pairs",
    "pairwise_reward_loss",
    "reward_centering_loss",
    "PreferenceParams",
    "sigmoid_loss",
    "ipo_loss",
    "hinge_loss",
    "simpo_loss",
    "odds_ratio_loss",
    "PreferenceLoss",
    "PREFERENCE_LOSSES",
    "DPO_LOSS_TYPES",
    "preference_loss_type",
    "preference_beta",
    "uses_reference",
    "log_ratios",
    "response_scores",
    "dpo_loss",
    "plackett_luce_dpo_loss",
    "kto_loss",
    "masked_mean",
    "masked_var",
    "whiten",
    "KL_ESTIMATORS",
    "kl_penalty",
    "shape_scores",
    "per_token_rewards",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "group_advantages",
    "leave_one_out_advantages",
    "normalize_batch",
    "GRPO_LOSS_TYPES",
    "grpo_loss",
    "kl_shaped_scores",
    "rloo_loss",
    "entropy_from_logits",
    "FixedKLController",
    "AdaptiveKLController",
]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3", "abs", "mse")


# ---------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry reward-model loss per pair, with the optional Llama 2 margin.

    Bradley-Terry: p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)), so the negative log-likelihood is

        loss = -log sigma(r(x, y_c) - r(x, y_r) - m(r))

    where m(r) is the Llama 2 margin, a discrete function of the preference rating (e.g. the "small"
    table {significantly better: 1, better: 2/3, slightly better: 1/3, negligibly better / unsure: 0}).
    m = 0 when ``margin`` is None, which is the plain Bradley-Terry loss.

    Args:
        r_chosen: r(x, y_c), scores of the preferred responses, shape [B].
        r_rejected: r(x, y_r), scores of the rejected responses, shape [B].
        margin: m(r), shape [B] (or broadcastable), or None for m = 0.

    Returns:
        Per-pair losses, shape [B] (computed with logsigmoid for numerical stability).
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def ranking_pairs(k: int) -> list[tuple[int, int]]:
    """All C(k, 2) (better, worse) index pairs of a ranking of k responses given best first.

    For a ranking y_0 > y_1 > ... > y_{k-1}, returns [(i, j) for 0 <= i < j < k] in lexicographic order,
    e.g. ranking_pairs(3) == [(0, 1), (0, 2), (1, 2)]. k < 2 gives no pairs.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def pairwise_reward_loss(
    rewards: Tensor,
    better: Tensor,
    worse: Tensor,
    pair_weight: Tensor,
    margin: Tensor | None = None,
) -> Tensor:
    """Weighted sum of Bradley-Terry losses over pairs of responses that are each scored once.

    InstructGPT (K = 4..9 ranked responses per prompt, all C(K,2) pairs of a prompt in one batch, so
    each response gets a single forward pass):

        loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l) ~ D}[ log sigma(r(x, y_w) - r(x, y_l)) ]

    This function computes, over the P pairs of a batch,

        sum_p  w_p * -log sigma(r[better_p] - r[worse_p] - m_p)

    With w_p = 1 for a plain (chosen, rejected) record and w_p = 1/C(K,2) for each pair of a K-ranked
    prompt, every prompt contributes one unit of weight, so plain pairs and K-way rankings can share a
    batch; the caller divides the sum by the number of prompts to get the expectation. m_p is the
    optional Llama 2 margin (0 when None).

    Args:
        rewards: r(x, y), one score per response in the batch, flat shape [N].
        better: indices into ``rewards`` of the preferred response of each pair, shape [P].
        worse: indices into ``rewards`` of the dispreferred response of each pair, shape [P].
        pair_weight: w_p, shape [P].
        margin: m_p, shape [P], or None.

    Returns:
        Scalar: the weighted sum over pairs (not the mean).
    """
    losses = bradley_terry_loss(rewards[better], rewards[worse], margin)
    return (pair_weight.to(losses.dtype) * losses).sum()


def reward_centering_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Reward-centering auxiliary term per pair (Eisenstein et al. 2023).

        aux = (r(x, y_c) + r(x, y_r))^2

    The Bradley-Terry loss only sees reward differences, so the reward is defined up to a constant per
    prompt; this term pulls the pair's scores to sum to zero. The caller multiplies it by a small
    coefficient (e.g. 0.01) and adds it to the Bradley-Terry loss.

    Returns:
        Per-pair values, shape [B].
    """
    return (r_chosen + r_rejected) ** 2


# ---------------------------------------------------------------------------------------------------
# DPO family: pairwise losses as a table of functions of h
# ---------------------------------------------------------------------------------------------------


class PreferenceParams(NamedTuple):
    """The numbers a pairwise preference loss may read; each variant reads its own."""

    beta: float
    label_smoothing: float = 0.0  # eps of conservative DPO ("sigmoid")
    simpo_gamma: float = 0.0  # SimPO's target reward margin gamma


def sigmoid_loss(h: Tensor, p: PreferenceParams) -> Tensor:
    """DPO (Rafailov et al. 2023) and conservative DPO: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).

    eps = ``label_smoothing``: eps = 0 is DPO, -log sigma(beta h); eps > 0 assumes the labels are flipped
    with probability eps."""
    eps = p.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(p.beta * h) - eps * F.logsigmoid(-p.beta * h)


def ipo_loss(h: Tensor, p: PreferenceParams) -> Tensor:
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2, h on per-token mean log-ratios."""
    return (h - 1.0 / (2.0 * p.beta)) ** 2


def hinge_loss(h: Tensor, p: PreferenceParams) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 - beta h)."""
    return torch.relu(1.0 - p.beta * h)


def simpo_loss(h: Tensor, p: PreferenceParams) -> Tensor:
    """SimPO (Meng et al. 2024): -log sigma(beta h - gamma), h = log pi(y_w|x)/|y_w| - log pi(y_l|x)/|y_l|
    (reference-free, per-token mean log-probs), gamma the target reward margin."""
    return -F.logsigmoid(p.beta * h - p.simpo_gamma)


def odds_ratio_loss(h: Tensor, p: PreferenceParams) -> Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024): L_OR = -log sigma(h), h = log odds(y_w) - log odds(y_l)
    (no beta; ``dpo_loss`` adds the NLL of the chosen responses and weighs L_OR by lambda)."""
    return -F.logsigmoid(h)


@dataclass(frozen=True)
class PreferenceLoss:
    """One pairwise variant: its loss as a function of h = s(y_w) - s(y_l), and how s(y) is read from the
    summed log-probs (``response_scores``)."""

    loss: Callable[[Tensor, PreferenceParams], Tensor]
    score: str  # "sum": log-ratio; "mean": per-token log-ratio; "log_odds": ORPO's log odds of P(y|x)
    reference: bool  # reads log pi_ref; False: no reference model at all (log pi_ref taken as 0)
    default_beta: float | None  # beta when the recipe gives none; None: the variant has no beta


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(sigmoid_loss, "sum", reference=True, default_beta=0.1),
    "ipo": PreferenceLoss(ipo_loss, "mean", reference=True, default_beta=0.1),
    "hinge": PreferenceLoss(hinge_loss, "sum", reference=True, default_beta=0.1),
    "simpo": PreferenceLoss(simpo_loss, "mean", reference=False, default_beta=2.0),
    "orpo": PreferenceLoss(odds_ratio_loss, "log_odds", reference=False, default_beta=None),
}
# the values of dpo.loss_type (recipe.py reads them from here)
DPO_LOSS_TYPES: tuple[str, ...] = tuple(PREFERENCE_LOSSES)


def preference_loss_type(loss_type: str) -> PreferenceLoss:
    """The table entry of ``loss_type``. Raises ValueError naming the known ones."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    return PREFERENCE_LOSSES[loss_type]


def preference_beta(loss_type: str, beta: float | None) -> float | None:
    """The beta a run uses: the given one, else the variant's default (0.1; SimPO 2.0; ORPO: none)."""
    return beta if beta is not None else preference_loss_type(loss_type).default_beta


def uses_reference(loss_type: str, reference_free: bool = False) -> bool:
    """Whether the loss reads log pi_ref (else no reference model is loaded and nothing is cached)."""
    return preference_loss_type(loss_type).reference and not reference_free


def log_ratios(policy_logps: Tensor, ref_logps: Tensor | None) -> Tensor:
    """log pi(y|x) - log pi_ref(y|x); ``ref_logps`` None (reference-free): log pi_ref is taken as 0.

    The one place where reference-free losses drop the reference."""
    return policy_logps if ref_logps is None else policy_logps - ref_logps


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def response_scores(
    policy_logps: Tensor, ref_logps: Tensor | None, lengths: Tensor | None, score: str
) -> Tensor:
    """s(y) of each response, from log-probs summed over its |y| response tokens:

        "sum":       log pi(y|x) - log pi_ref(y|x)
        "mean":      (log pi(y|x) - log pi_ref(y|x)) / |y|
        "log_odds":  log(P / (1 - P)) = m - log(1 - exp(m)),   m = log pi(y|x) / |y|, P = exp(m)   (ORPO)

    ``ref_logps`` None: log pi_ref = 0 (ORPO never reads it). ORPO's m is capped just below 0 (P < 1): a
    response predicted with certainty has infinite odds."""
    if score == "sum":
        return log_ratios(policy_logps, ref_logps)
    if lengths is None:
        raise ValueError(f"per-token scores ({score!r}) need the responses' lengths (token counts)")
    if score == "mean":
        return log_ratios(policy_logps, ref_logps) / lengths
    m = (policy_logps / lengths).clamp(max=-torch.finfo(policy_logps.dtype).eps)
    return m - _log1mexp(m)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float | None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.0,
    orpo_lambda: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """The pairwise DPO family (``PREFERENCE_LOSSES``), per pair.

    Inputs are log pi(y|x) summed over the response tokens, shape [B], and (for the per-token variants)
    the number of response tokens |y_w|, |y_l| of each pair, shape [B]. Each variant reads a score s(y)
    of every response (``response_scores``) and is a function of

        h = s(y_w) - s(y_l)

    With ``reference_free`` (and for SimPO and ORPO, which have no reference) log pi_ref is taken as 0.

        "sigmoid":  s = log pi - log pi_ref;   -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
                    (eps = label_smoothing: 0 is DPO, > 0 conservative DPO)
        "ipo":      s = (log pi - log pi_ref) / |y|;   (h - 1/(2 beta))^2              (Azar et al. 2023)
        "hinge":    s = log pi - log pi_ref;   max(0, 1 - beta h)                  (SLiC, Zhao et al. 2023)
        "simpo":    s = log pi / |y|;   -log sigma(beta h - gamma)                  (Meng et al. 2024)
        "orpo":     s = log odds P(y|x), P = exp(log pi / |y|);                     (Hong et al. 2024)
                    L_SFT(y_w) + lambda * -log sigma(h)

    IPO uses per-token means as its authors recommend and as TRL and torchtune do (this supersedes the
    summed form of ALGORITHMS.md: with sums h grows with the responses' length, the target 1/(2 beta)
    does not). ORPO's L_SFT is the NLL of the chosen tokens averaged over the batch's chosen tokens, as
    the SFT loss: pair i carries -log pi(y_w,i|x_i) * B / sum_j |y_w,j|, so the mean over the B pairs is

        L_ORPO = sum_i -log pi(y_w,i|x_i) / sum_i |y_w,i|  +  lambda * mean_i L_OR,i

    Implicit reward (logged): r_hat(x, y) = beta * s(y) (ORPO, which has no beta: s(y)). The DPO
    gradient is -beta * sigma(r_hat(y_l) - r_hat(y_w)) * (grad log pi(y_w) - grad log pi(y_l)): pairs the
    implicit reward orders wrongly get more weight.

    Returns:
        (losses [B], chosen implicit rewards [B], rejected implicit rewards [B]); rewards detached.

    Raises:
        ValueError: for an unknown ``loss_type``, or a per-token variant without the response lengths.
    """
    variant = preference_loss_type(loss_type)
    if variant.score != "sum" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"DPO loss_type {loss_type!r} needs chosen_lengths and rejected_lengths (token counts)"
        )
    if reference_free or not variant.reference:
        ref_chosen_logps = ref_rejected_logps = None
    chosen = response_scores(policy_chosen_logps, ref_chosen_logps, chosen_lengths, variant.score)
    rejected = response_scores(policy_rejected_logps, ref_rejected_logps, rejected_lengths, variant.score)
    beta = preference_beta(loss_type, beta)
    params = PreferenceParams(beta if beta is not None else 1.0, label_smoothing, simpo_gamma)
    losses = variant.loss(chosen - rejected, params)
    if loss_type == "orpo":  # + the chosen tokens' NLL, averaged over the batch's chosen tokens
        share = policy_chosen_logps.shape[0] / chosen_lengths.sum()
        losses = -policy_chosen_logps * share + orpo_lambda * losses
    return losses, (params.beta * chosen).detach(), (params.beta * rejected).detach()


def plackett_luce_dpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    beta: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DPO under the Plackett-Luce ranking model (Rafailov et al. 2023, appendix A.3), per record.

    For K responses ranked tau(1) (best) ... tau(K) (worst) and r_hat(x, y) = beta log(pi(y|x)/pi_ref(y|x)):

        loss = -log prod_{k=1..K} exp(r_hat(x, y_tau(k))) / sum_{j=k..K} exp(r_hat(x, y_tau(j)))
             = -sum_{k=1..K} [ r_hat_k - log sum_{j>=k} exp(r_hat_j) ]

    The last factor (k = K) is 1. For K = 2 this is -log sigma(r_hat_1 - r_hat_2) = -log sigma(beta h),
    the DPO loss.

    Args:
        policy_logps: log pi(y|x) summed over response tokens, shape [B, K], best response first.
        ref_logps: log pi_ref(y|x), shape [B, K]; None: reference-free (log pi_ref = 0).
        beta: the KL coefficient beta.
        mask: [B, K] bool, True for real responses; records with fewer responses are padded at the end.
            None means all entries are real.

    Returns:
        (losses [B], implicit rewards r_hat [B, K] detached, zero at padded entries).
    """
    r_hat = beta * log_ratios(policy_logps, ref_logps)
    if mask is None:
        mask = torch.ones_like(r_hat, dtype=torch.bool)
    else:
        mask = mask.to(torch.bool)
    # Padded entries get a very negative *finite* score: exp(.) = 0 in the sums, and no -inf - -inf = nan
    # in the forward or backward pass.
    very_negative = torch.finfo(r_hat.dtype).min
    scores = torch.where(mask, r_hat, torch.full_like(r_hat, very_negative))
    # log sum_{j>=k} exp(r_hat_j): cumulative logsumexp over the reversed order, reversed back.
    log_denominators = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    log_terms = torch.where(mask, scores - log_denominators, torch.zeros_like(scores))
    losses = -log_terms.sum(dim=-1)
    rewards = torch.where(mask, r_hat, torch.zeros_like(r_hat)).detach()
    return losses, rewards


# ---------------------------------------------------------------------------------------------------
# KTO: unpaired desirable / undesirable completions
# ---------------------------------------------------------------------------------------------------


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024), per completion, as TRL computes it.

        r(x, y) = log pi(y|x) - log pi_ref(y|x)                       (summed over completion tokens)
        z_ref   = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])     (no gradient)
        desirable y:    lambda_D * (1 - sigma(beta * (r(x, y) - z_ref)))
        undesirable y:  lambda_U * (1 - sigma(beta * (z_ref - r(x, y))))

    z_ref estimates KL(pi || pi_ref) from mismatched pairs: completion y'_j of another example of the
    batch after prompt x_j (the batch's own completions, each after another prompt). It is a baseline,
    not optimised: detached, and clamped at 0 like the KL it estimates. An empty mismatched set gives
    z_ref = 0.

    Args:
        policy_logps, ref_logps: log pi(y|x), log pi_ref(y|x) of each completion, shape [B].
        desirable: [B] bool, True for a desirable completion (label true).
        policy_kl_logps, ref_kl_logps: the same for the mismatched pairs, shape [M].
        beta: beta; desirable_weight, undesirable_weight: lambda_D, lambda_U.

    Returns:
        (losses [B], implicit rewards beta * r [B] detached, z_ref (a scalar)).
    """
    if policy_kl_logps.numel():
        z_ref = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    else:
        z_ref = policy_logps.new_zeros(())
    r = policy_logps - ref_logps
    desirable = desirable.to(torch.bool)
    gain = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z_ref)))
    loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z_ref - r)))
    losses = torch.where(desirable, gain, loss)
    return losses, (beta * r).detach(), z_ref


# ---------------------------------------------------------------------------------------------------
# PPO for RLHF: masked statistics
# ---------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the entries where mask is set: sum(x * mask) / sum(mask).

    With ``dim`` None the mean is over all masked entries (a scalar); otherwise along ``dim``. Values of x
    at unmasked positions are ignored (even nan/inf). The mask must select at least one entry.
    """
    m = mask.to(torch.bool)
    values = torch.where(m, x, torch.zeros_like(x))
    count = m.to(x.dtype)
    if dim is None:
        return values.sum() / count.sum()
    return values.sum(dim=dim) / count.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked entries (a scalar).

        var = sum(mask * (x - mean)^2) / n,  n = sum(mask);  times n / (n - 1) when unbiased (Bessel).

    With a single masked entry the unbiased correction is undefined; the (zero) biased variance is
    returned.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(torch.bool).sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Whiten x over the masked entries (e.g. per-batch advantage normalisation in PPO).

        whiten(x) = (x - mean) / sqrt(var + 1e-8)           mean, var (unbiased) over masked entries

    With ``shift_mean`` False the mean is added back: mean + (x - mean) / sqrt(var + 1e-8), i.e. only
    the scale is normalised. Padded (unmasked) positions of the output are zero.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.to(torch.bool), out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------------
# PPO for RLHF: KL-shaped rewards and advantages
# ---------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples a_t ~ pi, elementwise.

    With log r = log pi_ref(a_t|s_t) - log pi(a_t|s_t) (ratio = pi_ref / pi):

        "k1":  log pi - log pi_ref = -log r                unbiased, can be negative
        "k3":  (r - 1) - log r                             unbiased, always >= 0 (Schulman 2020)
        "abs": |log pi - log pi_ref|
        "mse": 0.5 * (log pi - log pi_ref)^2               (k2)

    Raises:
        ValueError: for an unknown ``estimator``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = logprobs - ref_logprobs  # log pi - log pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        log_r = -log_ratio  # log(pi_ref / pi)
        return torch.expm1(log_r) - log_r
    if estimator == "abs":
        return log_ratio.abs()
    return 0.5 * log_ratio**2  # "mse"


def shape_scores(
    scores: Tensor,
    finished: Tensor,
    missing_eos_penalty: float | None = None,
    clip: float | None = None,
    normalize: bool = False,
) -> Tensor:
    """The reward-model scores r(x, y) of a PPO rollout batch, shaped before the KL penalty, in order:

        r <- r - p            for responses that did not finish (no EOS), p = ``missing_eos_penalty``
        r <- clip(r, -c, c)   c = ``clip``
        r <- (r - mean(r)) / (std(r) + 1e-8)     with ``normalize``, over the batch (unbiased std; a
                                                 batch of one is left as it is)

    Each step is skipped when its setting is None / False.

    Args:
        scores: r(x, y), shape [B].
        finished: [B] bool, True for responses that ended with EOS.

    Returns:
        The shaped scores, shape [B] (a new tensor).
    """
    shaped = scores.clone()
    if missing_eos_penalty is not None:
        shaped = torch.where(finished.to(torch.bool), shaped, shaped - missing_eos_penalty)
    if clip is not None:
        shaped = shaped.clamp(-clip, clip)
    if normalize and shaped.numel() > 1:
        shaped = (shaped - shaped.mean()) / (shaped.std() + 1e-8)
    return shaped


def _last_token_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the last response token of each row of a right-padded mask, and whether the row has one."""
    lengths = mask.to(torch.bool).sum(dim=-1)
    return (lengths - 1).clamp(min=0), lengths > 0


def per_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """KL-shaped per-token rewards for PPO (Ziegler et al. 2019; InstructGPT; Llama 2).

    The RLHF objective E[r(x, y) - beta log(pi(y|x) / pi_ref(y|x))] is spread over the response tokens:

        r_t = -beta * KL_t                     for every response token t
        r_T += r(x, y)                         at the last response token T

    with KL_t = kl_penalty(log pi(a_t|s_t), log pi_ref(a_t|s_t), estimator) and beta = ``kl_coef``.

    Args:
        scores: r(x, y), the reward-model score of each response, shape [B].
        logprobs, ref_logprobs: per-token log-probs of the sampled tokens, shape [B, T].
        mask: [B, T] response-token mask, contiguous ones from position 0 in each row.
        kl_coef: beta.
        estimator: KL estimator, see ``kl_penalty``.

    Returns:
        (rewards [B, T], kl [B, T]), both zero on padding.
    """
    m = mask.to(torch.bool)
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    kl = torch.where(m, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    last, has_tokens = _last_token_index(m)
    score_at_last = torch.where(
        has_tokens, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype)
    )
    rewards = rewards.scatter_add(-1, last.unsqueeze(-1), score_at_last.unsqueeze(-1))
    return rewards, kl


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) over response tokens.

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
        A_t     = sum_{l>=0} (gamma lambda)^l delta_{t+l} = delta_t + gamma lambda A_{t+1}
        R_t     = A_t + V(s_t)                          (value targets, "returns")

    The episode ends after the last response token: V(s_{T+1}) = 0 and A_{T+1} = 0. Computed backwards
    over T, vectorised over B, without gradient.

    Args:
        rewards: r_t, shape [B, T] (e.g. from ``per_token_rewards``).
        values: V(s_t), shape [B, T].
        mask: [B, T] response-token mask, contiguous ones from position 0 in each row.
        gamma: discount gamma.
        lam: GAE lambda.

    Returns:
        (advantages [B, T], returns [B, T]), zero on padding.
    """
    m = mask.to(rewards.dtype)
    rewards = rewards * m
    values = values * m
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[..., 0])
    next_advantage = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(T)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        next_advantage = (delta + gamma * lam * next_advantage) * m[..., t]
        advantages[..., t] = next_advantage
        next_value = values[..., t]
    returns = (advantages + values) * m
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# PPO for RLHF: policy and value losses
# ---------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), averaged over response tokens.

        rho_t = pi(a_t|s_t) / pi_old(a_t|s_t) = exp(log pi - log pi_old)
        L     = -E_t[ min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ]
              = masked_mean( max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) )

    Returns:
        (scalar loss, stats) with detached stats
            "clipfrac":  fraction of response tokens where the clipped term is the active (strictly
                         greater) term of the max, i.e. the gradient is cut off;
            "approx_kl": masked_mean(0.5 * (log pi - log pi_old)^2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss, averaged over response tokens.

        V_clip = clip(V, V_old - eps_v, V_old + eps_v)
        L_V    = 0.5 * E_t[ max((V - R)^2, (V_clip - R)^2) ]

    Returns:
        (scalar loss, stats) with detached stat "vf_clipfrac": fraction of response tokens where the
        clipped term is strictly greater.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------
# Critic-free policy gradients on groups of samples: GRPO, Dr. GRPO, RLOO, REINFORCE++
# ---------------------------------------------------------------------------------------------------
#
# A batch holds G (or k) samples of each prompt, consecutive: rows [0, G) are the first prompt's group,
# [G, 2G) the second's, and so on. Advantages are per sequence ([B]); the losses spread them over the
# response tokens of [B, T] tensors with a right-padded ``mask``.


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 samples for a baseline, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath): every sample of a group of G samples
    of one prompt is compared with its group,

        A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)       std unbiased (Bessel), as TRL

    and with ``scale`` False (Dr. GRPO, Liu et al. 2025: the std division favours prompts that are too
    easy or too hard) A_i = r_i - mean(r_1..r_G). A group whose rewards are all equal gets A = 0.

    Args:
        rewards: [B] with B = number of prompts * ``group_size``, each group's samples consecutive.
    Returns:
        [B] advantages.
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: Tensor, k: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, after Kool et al. 2019): each of the k samples of a prompt is
    baselined by the mean reward of the other k - 1,

        b_i = (sum_j r_j - r_i) / (k - 1),      A_i = r_i - b_i  ( = k / (k - 1) * (r_i - mean(r)) )

    an unbiased baseline, since b_i does not depend on sample i.

    Args:
        rewards: [B] with B = number of prompts * k, each prompt's samples consecutive.
    Returns:
        [B] advantages.
    """
    groups = _groups(rewards, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def normalize_batch(advantages: Tensor, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ (Hu 2025) global advantage normalisation, over the whole batch rather than a group:

    A_i <- (A_i - mean(A)) / (std(A) + eps)        std unbiased; a batch of one is returned centred
    """
    centred = advantages - advantages.mean()
    if advantages.numel() < 2:
        return centred
    return centred / (advantages.std() + eps)


# grpo_loss's normalisations (the names of TRL's GRPOTrainer loss_type)
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dapo", "dr_grpo")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float,
    beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective (Shao et al. 2024) as a loss, per response token t of sample i:

        rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
        l_it   = -min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) + beta * KL_it
        KL_it  = exp(ref - logp) - (ref - logp) - 1        k3 (Schulman 2020), ref = log pi_ref(o_it)

    reduced over the batch's tokens as ``loss_type`` says (TRL's names):

        "grpo":    (1/B) sum_i (1/|o_i|) sum_t l_it         the paper's: each sequence's mean, then mean
        "bnpo":    sum_it l_it / sum_i |o_i|                every token of this batch counts the same
        "dapo":    sum_it l_it / num_tokens                 DAPO (Yu et al. 2025): tokens of the whole
                                                            optimizer step, over every process
        "dr_grpo": sum_it l_it / (B * max_completion_length)  Dr. GRPO: a constant, no length bias

    Args:
        logprobs, old_logprobs: [B, T] log pi and log pi_old of the sampled tokens (same temperature).
        advantages: [B], one per sequence (``group_advantages``).
        mask: [B, T] response tokens, contiguous from position 0.
        epsilon: the clip range eps.
        beta: KL coefficient; 0 needs no ``ref_logprobs`` (no reference model at all).
        num_tokens: for "dapo": the normaliser (default this batch's token count: then "dapo" = "bnpo").

    Returns:
        (scalar loss, detached stats) with "clipfrac" (fraction of tokens whose clipped term is the
        active one, the gradient cut off) and, when beta > 0, "kl" (mean k3 per token).

    Raises:
        ValueError: an unknown ``loss_type``, "dr_grpo" without ``max_completion_length``, beta > 0
            without ``ref_logprobs``.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(
            f"unknown GRPO loss type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}"
        )
    if beta > 0 and ref_logprobs is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logprobs")
    m = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    per_token = torch.maximum(unclipped, clipped)
    kl = None
    if beta > 0:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
    per_token = torch.where(m.bool(), per_token, torch.zeros_like(per_token))
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dapo":
        loss = per_token.sum() / (num_tokens if num_tokens is not None else m.sum().clamp(min=1.0))
    else:
        if max_completion_length is None:
            raise ValueError("grpo_loss: loss_type dr_grpo needs max_completion_length")
        loss = per_token.sum() / (per_token.shape[0] * max_completion_length)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask)}
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask)
    return loss, stats


def kl_shaped_scores(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """RLOO's sequence reward with the KL penalty in it (Ahmadian et al. 2024, as TRL's RLOO trainer):

        R(x, y) = r(x, y) - beta * sum_t (log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t))
                = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))

    Args:
        scores: r(x, y), [B].  logprobs, ref_logprobs: [B, T] of the sampled tokens.  mask: [B, T].
    Returns:
        (R [B], sequence KL log(pi(y|x) / pi_ref(y|x)) [B]).
    """
    m = mask.to(torch.bool)
    log_ratio = torch.where(m, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    seq_kl = log_ratio.sum(-1)
    return scores.to(seq_kl.dtype) - beta * seq_kl, seq_kl


def rloo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's policy-gradient loss on whole sequences (Ahmadian et al. 2024 treat the completion as one
    action), with a PPO-style clip of the sequence ratio for the passes after the first (as TRL's RLOO
    trainer does):

        rho_i = pi(y_i|x) / pi_old(y_i|x) = exp(sum_t log pi(y_it) - log pi_old(y_it))
        L     = (1/B) sum_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps))

    On the samples' own policy (rho = 1, the first update of a batch) its gradient is exactly REINFORCE
    with the leave-one-out baseline: -(1/B) sum_i A_i grad log pi(y_i|x).

    Returns:
        (scalar loss, detached stats) with "clipfrac" (fraction of sequences whose clipped term is
        active) and "approx_kl" (mean of 0.5 * (log rho_i)^2).
    """
    m = mask.to(torch.bool)
    log_ratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs)).sum(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clipfrac": (clipped > unclipped).to(ratio.dtype).mean(),
            "approx_kl": (0.5 * log_ratio**2).mean(),
        }
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, per position.

        H(p) = -sum_i p_i log p_i = logsumexp(z) - sum_i p_i z_i,    p = softmax(z)

    Entries with logit -inf (masked vocabulary) contribute 0.
    """
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # p log p -> 0 as p -> 0; replace log p = -inf before the product so neither pass produces 0 * inf.
    log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    return -(p * log_p).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient beta (e.g. Llama 2: 0.01 for 7B/13B, 0.005 for 34B/70B)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019), steering the observed KL towards a target.

    e_t    = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta  <- beta * (1 + K_beta e_t),   K_beta = n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply one update after ``n_steps`` samples with mean KL ``current_kl``."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = int(d.get("horizon", self.horizon))
