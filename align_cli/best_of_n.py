"""Best-of-N as statistics: which samples are kept, the expected reward of the best of n drawn from N,
and the analytic KL of best-of-N selection (Llama 2 rejection sampling; Stiennon et al. 2020):

    KL(best-of-N || pi) = log N - (N - 1) / N
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from align_cli.engine.metrics import fmt


def best_of_n_kl(n: int) -> float:
    """Analytic KL of best-of-n selection from the sampling policy: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


# ----------------------------------------------------------------------------- selection and tables


def select(
    rewards: list[float], how: str, keep: int, threshold: float | None, finished: list[bool] | None = None
) -> list[int]:
    """Indices of the samples of one prompt that are kept, best first. Only samples that ended by
    themselves compete while there is one (``finished``): a sample cut at max_new_tokens is kept only when
    no sample of the prompt finished."""
    pool = [i for i in range(len(rewards)) if finished is None or not any(finished) or finished[i]]
    order = sorted(pool, key=lambda i: -rewards[i])
    if how == "best":
        return order[:1]
    if how == "top_k":
        return order[:keep]
    return [i for i in order if rewards[i] >= threshold]


def best_worst_pair(rewards: list[float], texts: list[str]) -> tuple[int, int] | None:
    """A DPO pair from one prompt's samples: (index of the highest reward, index of the lowest), the
    first of equals; None when the two tie (same reward, or the same text): such a pair states no
    preference. The caller passes only samples fit for a pair and counts the ties."""
    if len(rewards) < 2:
        return None
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    worst = min(range(len(rewards)), key=lambda i: rewards[i])
    if not rewards[best] > rewards[worst] or texts[best] == texts[worst]:
        return None
    return best, worst


def best_of_n_weights(total: int, n: int) -> list[float]:
    """Weights w_1..w_N of the ascending-sorted rewards r_(1) <= ... <= r_(N) of N samples such that
    sum_i w_i r_(i) is the expected best of n samples drawn from them without replacement:

        w_i = C(i - 1, n - 1) / C(N, n)    (the chance that r_(i) is the largest of the n; 0 for i < n)

    the unbiased estimate of E[max of n] from all N samples; n = 1 gives the mean, n = N the max."""
    if not 1 <= n <= total:
        raise ValueError(f"best of n={n} needs 1 <= n <= N={total} samples")
    return [math.comb(i - 1, n - 1) / math.comb(total, n) for i in range(1, total + 1)]


def expected_best_of_n(rewards: list[float], n: int) -> float:
    """E[max of n of ``rewards``] = sum_{i=n..N} C(i-1, n-1) / C(N, n) * r_(i), r sorted ascending."""
    return sum(w * r for w, r in zip(best_of_n_weights(len(rewards), n), sorted(rewards)))


def best_of_n_table(per_prompt: list[list[float]]) -> list[dict[str, float]]:
    """For n = 1, 2, 4, ..., N: means over prompts of the reward of one sample, the mean of n and the best
    of n, each estimated without bias from all N samples of a prompt (not from its first n samples):

        best of n:  expected_best_of_n(rewards, n) = sum_{i=n..N} C(i-1, n-1) / C(N, n) * r_(i)
        mean of n:  the mean of all N (the expected mean of n samples, the same for every n)
        sample 1:   also the mean of all N (the expected reward of one sample, = best of 1)

    and the gain best - mean per prompt. N is the smallest number of samples of any prompt."""
    n_max = min(len(r) for r in per_prompt)
    ks = sorted({1, *[2**i for i in range(1, int(math.log2(n_max)) + 1)], n_max})
    means = [sum(r) / len(r) for r in per_prompt]
    mean = sum(means) / len(means)
    rows = []
    for k in ks:
        best_k = [expected_best_of_n(r, k) for r in per_prompt]
        rows.append(
            {
                "n": k,
                "reward_sample_1": mean,
                "reward_mean_of_n": mean,
                "reward_best_of_n": sum(best_k) / len(best_k),
                "gain_per_prompt": sum(b - m for b, m in zip(best_k, means)) / len(best_k),
                "kl_analytic": best_of_n_kl(k),
            }
        )
    return rows


def print_round_table(title: str, rows: list[dict[str, float]], console: Console) -> None:
    table = Table(title=title)
    for column in ("N", "reward: sample 1", "mean of N", "best of N", "gain per prompt", "KL log N-(N-1)/N"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["n"]),
            *[
                fmt(r[k])
                for k in (
                    "reward_sample_1",
                    "reward_mean_of_n",
                    "reward_best_of_n",
                    "gain_per_prompt",
                    "kl_analytic",
                )
            ],
        )
    console.print(table)
