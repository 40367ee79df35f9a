"""`align eval`: what alignment did to a policy, measured against its reference.

For held-out prompts, sample from the policy (temperature 1, no truncation, so log-probs are those of
the sampling distribution) and report:
  - the mean ground-truth reward (a recipe-named ``module:function`` of the response text) and/or the
    mean reward-model score;
  - the mean sequence KL(pi || pi_ref) = E_{y~pi}[ sum_t log pi(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t) ];
  - the win rate against the reference's own samples, judged by the reward model.
Best-of-N from the reference is evaluated the same way, its KL measured from the empirical reward CDF
of a pool of samples: log (p_bon(y) / p(y)) = log N + (N - 1) log F(r(y)) for continuous rewards, whose
expectation is the analytic log N - (N - 1) / N.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from align_cli.best_of_n import best_of_n_weights
from align_cli.data.preference import collate_responses
from align_cli.data.prompts import Prompt
from align_cli.forward import summed_logps
from align_cli.generation import SamplingParams, sample
from align_cli.models import load_causal_lm, load_tokenizer
from align_cli.recipe import ModelSection, RecipeError
from align_cli.reference import load_reference
from align_cli.rewards import as_number, load_function
from align_cli.scoring import score


def load_reward_fn(spec: str) -> Callable[[str], float]:
    """``package.module:function`` or ``path/to/file.py:function`` -> the ground-truth reward of a
    response text (text -> float), loaded by ``rewards.load_function``: importing it runs that code with
    the user's rights. The function returned refuses, in one line naming ``spec`` and the sample, an
    exception of the function or a result that is not a finite number."""
    fn = load_function(spec, "ground truth")

    def checked(text: str) -> float:
        sample = repr(text if len(text) <= 80 else text[:77] + "...")
        try:
            value = fn(text)
        except Exception as exc:
            raise RecipeError(
                f"ground truth {spec} raised {type(exc).__name__}: {exc} on sample {sample}"
            ) from exc
        number = as_number(value)
        if number is None or not math.isfinite(number):
            raise RecipeError(
                f"ground truth {spec} returned {reprlib.repr(value)} for sample {sample}; expected a finite "
                "number"
            )
        return number

    return checked


# Samples are drawn from pi itself, and the KL is computed on the same distribution: one temperature,
# no truncation (top-p/top-k would make log pi the wrong density for the samples).
TEMPERATURE = 1.0


def _params(n: int, max_new_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        seed=seed,
        prompts_per_batch=16,
    )


@torch.no_grad()
def sequence_logprobs(
    model: Any, pad_id: int, prompt_ids: list[list[int]], responses: list[list[int]]
) -> torch.Tensor:
    """log pi(y|x) summed over response tokens, for each (prompt, response)."""
    out = []
    for start in range(0, len(responses), 32):
        examples = [
            {"prompt_ids": p, "responses": [r], "margin": None}
            for p, r in zip(prompt_ids[start : start + 32], responses[start : start + 32])
        ]
        out.append(summed_logps(model, collate_responses(examples, pad_id), TEMPERATURE))
    return torch.cat(out)


class Evaluator:
    """Samples and scores policies against one reference on one set of prompts."""

    def __init__(
        self,
        reference_dir: str,
        prompts: list[Prompt],
        template: str = "auto",
        n: int = 4,
        max_new_tokens: int = 32,
        seed: int = 0,
        ground_truth: Callable[[str], float] | None = None,
        reward_model: str | None = None,
    ) -> None:
        if ground_truth is None and reward_model is None:
            raise RecipeError("eval needs a ground-truth reward function and/or a reward model")
        self.prompts, self.template, self.n, self.max_new_tokens, self.seed = (
            prompts,
            template,
            n,
            max_new_tokens,
            seed,
        )
        self.ground_truth = ground_truth
        self.tokenizer = load_tokenizer(ModelSection(name_or_path=reference_dir))
        self.reference = load_reference(ModelSection(name_or_path=reference_dir))
        self.prompt_ids = [p.ids(template, self.tokenizer) for p in prompts]
        self.scorer = self.scorer_tok = None
        if reward_model:
            from align_cli.models import load_reward_model

            self.scorer_tok = load_tokenizer(ModelSection(name_or_path=reward_model))
            self.scorer = load_reward_model(
                ModelSection(name_or_path=reward_model), self.scorer_tok.pad_token_id
            )
        self._reference_samples: dict[str, Any] | None = None

    def _score(self, samples: list, texts: list[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        if self.ground_truth is not None:
            out["reward"] = [float(self.ground_truth(t)) for t in texts]
        if self.scorer is not None:
            prompts, finished = [self.prompts[s.prompt_index] for s in samples], [s.finished for s in samples]
            out["rm_score"] = score(self.scorer, self.scorer_tok, prompts, texts, self.template, finished)
        return out

    def _draw(self, model: Any, n: int, seed: int) -> tuple[list, list[str]]:
        samples = sample(model, self.tokenizer, self.prompt_ids, _params(n, self.max_new_tokens, seed))
        return samples, [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]

    def reference_samples(self) -> dict[str, Any]:
        if self._reference_samples is None:
            samples, texts = self._draw(self.reference, self.n, self.seed + 1)
            self._reference_samples = {"samples": samples, "texts": texts, **self._score(samples, texts)}
        return self._reference_samples

    def evaluate(self, policy_dir: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Summary figures and per-sample rows for the policy in ``policy_dir``."""
        policy = load_causal_lm(ModelSection(name_or_path=policy_dir)).eval()
        samples, texts = self._draw(policy, self.n, self.seed)
        scores = self._score(samples, texts)
        pad = self.tokenizer.pad_token_id
        prompts, responses = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
        kl = sequence_logprobs(policy, pad, prompts, responses) - sequence_logprobs(
            self.reference, pad, prompts, responses
        )
        summary = {"kl": kl.mean().item(), "response_length": sum(map(len, responses)) / len(responses)}
        for key, values in scores.items():
            summary[key] = sum(values) / len(values)
        if "rm_score" in scores:
            ref = self.reference_samples()["rm_score"]
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores["rm_score"], ref)]
            summary["win_rate"] = sum(wins) / len(wins)
        rows = [
            {
                "prompt": self.prompts[s.prompt_index].prompt,
                "response": texts[i],
                "kl": kl[i].item(),
                **{k: v[i] for k, v in scores.items()},
            }
            for i, s in enumerate(samples)
        ]
        return summary, rows

    def best_of_n(self, ns: list[int], pool_factor: int = 4) -> list[dict[str, float]]:
        """Best-of-N from the reference, selected by the reward model, for each N in ``ns``.

        Each prompt gets a pool of M = max(ns) * pool_factor samples, sorted by RM score ascending. The
        expected value of any quantity of the RM-selected best of n samples drawn from the pool is the
        weighted sum over the sorted pool with the unbiased best-of-n weights
        w_i = C(i-1, n-1) / C(M, n) (``best_of_n_weights``): for the RM score, the ground-truth reward
        of the selected sample, and its KL term log n + (n - 1) log F_i, with F_i = (i - 1/2) / M the
        empirical CDF at the i-th smallest RM score. Rows average these over prompts."""
        if self.scorer is None:
            raise RecipeError("best-of-N evaluation needs a reward model to select with")
        pool_size = max(ns) * pool_factor
        samples, texts = self._draw(self.reference, pool_size, self.seed + 2)
        scores = self._score(samples, texts)
        per_prompt: list[list[int]] = [[] for _ in self.prompts]
        for i, s in enumerate(samples):
            per_prompt[s.prompt_index].append(i)
        rm = scores["rm_score"]
        rows = []
        for n in ns:
            gt, kl_terms, rm_best = [], [], []
            for idx in per_prompt:
                ranked = sorted(idx, key=lambda i: rm[i])  # ascending RM score
                weights = best_of_n_weights(len(ranked), n)
                cdf = [(r + 0.5) / len(ranked) for r in range(len(ranked))]  # empirical CDF F(r)
                rm_best.append(sum(w * rm[i] for w, i in zip(weights, ranked)))
                kl_terms.append(sum(w * (math.log(n) + (n - 1) * math.log(f)) for w, f in zip(weights, cdf)))
                if "reward" in scores:
                    gt.append(sum(w * scores["reward"][i] for w, i in zip(weights, ranked)))
            row = {
                "n": n,
                "kl": sum(kl_terms) / len(kl_terms),
                "kl_analytic": math.log(n) - (n - 1) / n,
                "rm_score": sum(rm_best) / len(rm_best),
            }
            if gt:
                row["reward"] = sum(gt) / len(gt)
            rows.append(row)
        return rows


def run_eval(
    model: str,
    reference: str,
    prompts: str,
    ground_truth: str | None,
    reward_model: str | None,
    n: int,
    max_new_tokens: int,
    seed: int,
    out: Path | None,
    console: Console,
) -> dict[str, Any]:
    """`align eval`: evaluate ``model`` against ``reference``, print the table, write eval.json/.jsonl."""
    from align_cli.data.prompts import load_prompts
    from align_cli.engine.metrics import print_table

    fn = load_reward_fn(ground_truth) if ground_truth else None
    evaluator = Evaluator(
        reference,
        load_prompts(prompts),
        n=n,
        max_new_tokens=max_new_tokens,
        seed=seed,
        ground_truth=fn,
        reward_model=reward_model,
    )
    summary, rows = evaluator.evaluate(model)
    print_table(f"align eval: {model} vs {reference}", list(summary.items()), console)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(summary, indent=1))
        (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return summary
