"""`make bench`: the project's own throughput and memory benchmark (offline, deterministic).

Builds the `small` preset and synthetic data with a realistic length spread (prompts 20-60 tokens,
responses 20-120), then measures each stage through its real code (collate, compute_loss,
Trainer.train_step, AdamW; generation.sample; PPO's rollout and update) in a fresh subprocess, so
peak memory is the stage's own:

- sft, reward: optimizer steps of ``--micro`` sequences (reward: ``--micro`` / 2 pairs);
- dpo_cold: the reference log-prob pass over the step's pairs (a cache miss, written to a fresh
  cache directory) plus the training steps; dpo_warm: the same steps reading that cache (a hit);
  DPO micro-batches hold ``--micro`` / 2 pairs, i.e. ``--micro`` sequences, like SFT; dpo_live: the
  same steps with a live reference model scoring every batch (``dpo.reference_cache: false``);
- rs_generation: N = 16 samples of each prompt generated together by the lean decode loop (one
  ``sample`` call, shared prompt prefill), by transformers' generate (the old path) and one at a time
  (16 calls), timed in the same process, plus the decode-step upper bound (a tight loop of the model's
  decode step on the same batch and preallocated cache, no sampling); ratios are reported;
- rs_generation_long_prompt: the same best-of-16 with prompts 4 x ``--max-new-tokens`` long (lean vs
  generate and the bound; no one-at-a-time run);
- ppo_iteration: one PPO iteration (rollout: sampling, policy/reference/value log-probs, reward
  scores, GAE; then one epoch of mini-batch updates), value head on the policy;
- grpo_iteration: one GRPO iteration (``--grpo-prompts`` prompts x 4 samples, reward model, reference
  at beta 0.04, two mini-batches of updates). For both, a second table gives the iteration's time split
  (``time/<section>_s`` of its metrics row) and the update passes' own FLOP/s fraction, counted as sft's.

Reported: tokens/s of non-pad tokens, steps/s, peak memory (peak RSS of the process; on a GPU peak
allocated memory), the padding fraction of computed tokens, and achieved FLOP/s as a fraction of this
machine's plain matrix-multiply FLOP/s (a 1024^3 fp32 matmul, best of 10, measured in each stage's
process just before the stage, so a shared machine whose speed drifts is compared with itself).
FLOPs count 6 x body parameters per non-pad token plus 6 x LM-head parameters per supervised token (the
head only runs there); forward-only passes count 2 x instead of 6 x; attention score FLOPs are left
out. Several repetitions; the median and the range are reported. Writes bench/results.json and
prints a markdown table.

``--naive`` adds, for each stage that has one, a row with the log-prob hot path replaced by the naive
full-vocabulary computation (bench/baseline.py), measured in the same run. ``--before CHECKOUT`` adds a
row per stage for the package of another checkout (``git worktree add /tmp/old COMMIT``), so a change's
before and after are measured in one run, alternating.

Usage: python bench/run.py [--stages sft,dpo_warm] [--reps 3] [--steps 6] [--threads 2] [--naive]
                           [--before CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
WARMUP = 2  # untimed steps: allocators and kernels warm up
TRIES = 2  # generation: each prompt's lean / generate / bound runs, interleaved; the fastest counts


# ----------------------------------------------------------------------------- data


def synthetic_sft_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    from align_cli.data.tokenize import IGNORE_INDEX

    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt, response = rng.randint(20, 60), rng.randint(20, 120)
        ids = [rng.randrange(10, vocab) for _ in range(prompt + response)]
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append({"input_ids": ids, "labels": labels, "length": len(ids)})
    return examples


def synthetic_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(10, vocab) for _ in range(rng.randint(20, 60))]
        responses = [[rng.randrange(10, vocab) for _ in range(rng.randint(20, 120))] for _ in range(2)]
        length = len(prompt) + max(map(len, responses))
        examples.append({"prompt_ids": prompt, "responses": responses, "margin": None, "length": length})
    return examples


def synthetic_prompt_ids(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(10, vocab) for _ in range(rng.randint(20, 60))] for _ in range(n)]


# ----------------------------------------------------------------------------- measuring


def matmul_flops(threads: int, size: int = 1024, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)  # the best this process gets now: what the hardware can do


def peak_mb() -> float:
    from align_cli.runs import peak_memory_mb

    return peak_memory_mb()


def param_split(model) -> tuple[int, int]:
    """(body parameters, LM-head parameters); embeddings are lookups and count as no FLOPs."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    body = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and id(p) not in head_ids
    )
    return body, sum(p.numel() for p in head.parameters()) if head is not None else 0


def supervised(batch: dict) -> int:
    from align_cli.data.tokenize import IGNORE_INDEX

    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0


def computed_tokens(batch: dict) -> int:
    """Positions the model runs on: every row of each length bucket is padded to that bucket's width."""
    if batch.get("buckets"):
        return sum(len(rows) * width for rows, width in batch["buckets"])
    return batch["input_ids"].numel()


def time_train_steps(spec, t, steps: int, passes: int = 3) -> dict:
    """Time ``steps`` optimizer steps (after WARMUP) of a StageSpec through Trainer.train_step + AdamW.

    ``passes``: 3 for forward + backward (6 FLOPs per parameter and token)."""
    from align_cli.engine.distributed import make_accelerator
    from align_cli.engine.loop import Trainer
    from align_cli.engine.optim import build_optimizer

    accelerator = make_accelerator("fp32")
    trainer = Trainer(spec, t, Path(tempfile.mkdtemp()), accelerator)
    optimizer = build_optimizer(spec.model, t)
    model, optimizer = accelerator.prepare(spec.model, optimizer)
    body, head = param_split(spec.model)
    tokens = padded = sup = 0
    elapsed = 0.0
    for i, micro_batches in enumerate(trainer._plan(0)[: steps + WARMUP]):
        batches = trainer._micro_batches(micro_batches, spec.train_examples)
        start = time.perf_counter()
        row = trainer.train_step(model, batches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= WARMUP:
            elapsed += time.perf_counter() - start
            tokens += row["tokens"]
            padded += sum(computed_tokens(b) for b in batches)
            sup += sum(supervised(b) for b in batches)
    flops = 2 * passes * (body * tokens + head * sup)
    return {
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "steps_per_s": steps / elapsed,
        "flops_per_s": flops / elapsed,
        "padding_fraction": 1 - tokens / padded,
    }


# ----------------------------------------------------------------------------- stages


def _causal_lm(model_dir: Path):
    from align_cli.models import load_causal_lm
    from align_cli.recipe import ModelSection

    return load_causal_lm(ModelSection(name_or_path=str(model_dir)))


def bench_sft(model_dir: Path, a: argparse.Namespace) -> dict:
    from align_cli.engine.loop import StageSpec
    from align_cli.recipe import TrainingSection
    from align_cli.stages.sft import make_collate, sft_loss

    model = _causal_lm(model_dir)
    examples = synthetic_sft_examples(a.micro * (a.steps + WARMUP), model.config.vocab_size)
    t = TrainingSection(micro_batch_size=a.micro, lr=1e-4, max_steps=a.steps + WARMUP)
    spec = StageSpec("sft", model, examples, make_collate(0, packing=False), sft_loss)
    return time_train_steps(spec, t, a.steps) | {"peak_memory_mb": peak_mb()}


def bench_reward(model_dir: Path, a: argparse.Namespace) -> dict:
    from align_cli.engine.loop import StageSpec
    from align_cli.models import load_reward_model
    from align_cli.recipe import ModelSection, TrainingSection
    from align_cli.stages.reward import collate_pairs, make_compute_loss

    model = load_reward_model(ModelSection(name_or_path=str(model_dir)), 0)
    pairs = a.micro // 2
    examples = synthetic_pairs(pairs * (a.steps + WARMUP), model.config.vocab_size)
    t = TrainingSection(micro_batch_size=pairs, lr=1e-5, max_steps=a.steps + WARMUP)
    spec = StageSpec("reward", model, examples, lambda ex: collate_pairs(ex, 0), make_compute_loss())
    return time_train_steps(spec, t, a.steps) | {"peak_memory_mb": peak_mb()}


def _bench_dpo(model_dir: Path, a: argparse.Namespace, cold: bool) -> dict:
    """DPO steps reading reference log-probs from the disk cache (``ALIGN_CACHE_DIR``, set by the
    parent): cold computes them first (a miss, timed with the steps), warm finds them (a hit)."""
    from align_cli.engine.loop import StageSpec
    from align_cli.recipe import DPOSection, TrainingSection
    from align_cli.reference_cache import attach_reference_logps, compute_logps
    from align_cli.stages.dpo import make_collate, make_compute_loss

    model = _causal_lm(model_dir)
    body, head = param_split(model)
    pairs = a.micro // 2
    examples = synthetic_pairs(pairs * (a.steps + WARMUP), model.config.vocab_size)
    material = {"bench": "dpo", "model": str(model_dir)}
    start = time.perf_counter()
    info = attach_reference_logps(examples, material, lambda: compute_logps(model, examples, 0, 2 * a.micro))
    reference_s = time.perf_counter() - start
    if info["hit"] == cold:
        raise RuntimeError(f"dpo_{'cold' if cold else 'warm'}: expected a cache {'miss' if cold else 'hit'}")
    t = TrainingSection(micro_batch_size=pairs, lr=1e-5, max_steps=a.steps + WARMUP)
    spec = StageSpec("dpo", model, examples, make_collate(0), make_compute_loss(DPOSection()))
    row = time_train_steps(spec, t, a.steps)
    if cold:  # the reference pass covered every example; charge the timed steps their share
        share = reference_s * a.steps / (a.steps + WARMUP)
        rows = [r for e in examples[: pairs * a.steps] for r in e["responses"]]
        ref_tokens = sum(len(e["prompt_ids"]) * 2 for e in examples[: pairs * a.steps]) + sum(map(len, rows))
        ref_flops = 2 * (body * ref_tokens + head * sum(map(len, rows)))
        elapsed = row["elapsed_s"] + share
        row |= {
            "elapsed_s": elapsed,
            "tokens_per_s": row["tokens"] / elapsed,
            "steps_per_s": a.steps / elapsed,
            "flops_per_s": (row["flops_per_s"] * row["elapsed_s"] + ref_flops) / elapsed,
            "reference_pass_s": reference_s,
        }
    return row | {"peak_memory_mb": peak_mb()}


def bench_dpo_cold(model_dir: Path, a: argparse.Namespace) -> dict:
    return _bench_dpo(model_dir, a, cold=True)


def bench_dpo_warm(model_dir: Path, a: argparse.Namespace) -> dict:
    return _bench_dpo(model_dir, a, cold=False)


def bench_dpo_live(model_dir: Path, a: argparse.Namespace) -> dict:
    """The dpo_warm steps with a live reference model (``dpo.reference_cache: false``): a second copy of
    the model scores every batch, so it is in memory for the whole run."""
    from align_cli.engine.distributed import make_accelerator
    from align_cli.engine.loop import StageSpec
    from align_cli.recipe import DPOSection, TrainingSection
    from align_cli.reference import LiveReference
    from align_cli.stages.dpo import make_collate, make_compute_loss

    model = _causal_lm(model_dir)
    reference = LiveReference(make_accelerator("fp32"), _causal_lm(model_dir).requires_grad_(False).eval())
    pairs = a.micro // 2
    examples = synthetic_pairs(pairs * (a.steps + WARMUP), model.config.vocab_size)
    t = TrainingSection(micro_batch_size=pairs, lr=1e-5, max_steps=a.steps + WARMUP)
    cfg = DPOSection(reference_cache=False)
    spec = StageSpec("dpo", model, examples, make_collate(0), make_compute_loss(cfg, reference))
    # forward + backward of the policy (6 FLOPs per parameter and token) + the reference's forward (2)
    return time_train_steps(spec, t, a.steps, passes=4) | {"peak_memory_mb": peak_mb()}


def decode_bound(model, prompt: list[int], n: int, steps: int) -> tuple[float, int]:
    """The upper bound for generation speed: (seconds, tokens) of a tight loop of the model's decode step
    on the batch sampling runs (n rows sharing one prefilled prompt) with the same preallocated cache,
    feeding a fixed token: no sampling, no stop checks, no host syncs; the prefill is not timed."""
    import torch

    from align_cli.decode import prefill
    from align_cli.generation import left_pad

    with torch.no_grad():
        ids, mask = left_pad([prompt], 0, next(model.parameters()).device)
        cache, _, mask, pos = prefill(model, ids, mask, n, room=steps)
        token = torch.full((n, 1), 10, dtype=torch.long, device=ids.device)
        ones = torch.ones((n, 1), dtype=mask.dtype, device=ids.device)
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, ones], dim=1)
            model(input_ids=token, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            pos = pos + 1
        return time.perf_counter() - start, n * steps


def _generation_case(
    model_dir: Path, a: argparse.Namespace, prompts: list[list[int]], sequential: bool
) -> dict:
    """N = 16 samples of each prompt: the lean loop (``decoder="lean"``, the default) and transformers'
    generate (``decoder="generate"``, the old path), interleaved prompt by prompt so a drifting machine
    load hits both alike, plus the decode-step upper bound on the same batch, each the fastest of TRIES;
    optionally the 16 samples one call at a time."""
    from align_cli.generation import SamplingParams, sample
    from align_cli.models import load_tokenizer
    from align_cli.recipe import ModelSection

    n, max_new = 16, a.max_new_tokens
    model = _causal_lm(model_dir)
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(model_dir)))
    body, head = param_split(model)
    for decoder in ("lean", "generate"):  # warm-up
        sample(model, tokenizer, prompts[:1], SamplingParams(n=2, max_new_tokens=8, decoder=decoder))
    decode_bound(model, prompts[0], 2, 4)
    time_s = {"lean": 0.0, "generate": 0.0, "sequential": 0.0, "bound": 0.0}
    tokens = dict.fromkeys(time_s, 0)
    prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        best = {}  # each timed TRIES times, interleaved; the fastest kept (a shared machine only slows)
        for _ in range(TRIES):
            for decoder in ("generate", "lean"):
                start = time.perf_counter()
                sp = SamplingParams(n=n, max_new_tokens=max_new, seed=p, prompts_per_batch=1, decoder=decoder)
                out = sample(model, tokenizer, [prompt], sp)
                took, count = time.perf_counter() - start, sum(len(s.response_ids) for s in out)
                best[decoder] = min(best.get(decoder, (took, count)), (took, count))
            best["bound"] = min(best.get("bound", (1e9, 0)), decode_bound(model, prompt, n, max_new))
        for kind, (took, count) in best.items():
            time_s[kind] += took
            tokens[kind] += count
        prompt_tokens += len(prompt)
        if sequential:
            start = time.perf_counter()
            for k in range(n):
                sp = SamplingParams(n=1, max_new_tokens=max_new, seed=p * n + k)
                tokens["sequential"] += len(sample(model, tokenizer, [prompt], sp)[0].response_ids)
            time_s["sequential"] += time.perf_counter() - start
    rate = {k: tokens[k] / time_s[k] for k in time_s if time_s[k]}
    # forward only; the lean loop runs each prompt once (shared prefill), LM head on its last position
    flops = 2 * body * (tokens["lean"] + prompt_tokens) + 2 * head * tokens["lean"]
    result = {
        "tokens_per_s": rate["lean"],
        "steps_per_s": len(prompts) / time_s["lean"],  # prompts (each with its N samples) per second
        "flops_per_s": flops / time_s["lean"],
        "padding_fraction": None,
        "generate_tokens_per_s": rate["generate"],
        "lean_over_generate": rate["lean"] / rate["generate"],
        "bound_tokens_per_s": rate["bound"],
        "of_bound": rate["lean"] / rate["bound"],
        "generate_of_bound": rate["generate"] / rate["bound"],
        "peak_memory_mb": peak_mb(),
    }
    if sequential:
        result |= {
            "sequential_tokens_per_s": rate["sequential"],
            "batched_over_sequential": rate["lean"] / rate["sequential"],
        }
    return result


def bench_rs_generation(model_dir: Path, a: argparse.Namespace) -> dict:
    """N = 16 samples per prompt (prompts 20-60 tokens): lean loop vs generate vs one at a time."""
    prompts = synthetic_prompt_ids(a.gen_prompts, _vocab(model_dir), seed=1)
    return _generation_case(model_dir, a, prompts, sequential=True)


def bench_rs_generation_long_prompt(model_dir: Path, a: argparse.Namespace) -> dict:
    """Best-of-16 with prompts 4x as long as the responses (``--max-new-tokens``): where sharing the
    prompt's prefill pays most."""
    rng, vocab = random.Random(1), _vocab(model_dir)
    prompts = [
        [1] + [rng.randrange(10, vocab) for _ in range(4 * a.max_new_tokens - 1)]
        for _ in range(a.gen_prompts)
    ]
    return _generation_case(model_dir, a, prompts, sequential=False)


def _vocab(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


class IterationTimes:
    """The time split of timed on-policy iterations (the ``time/<section>_s`` their rows carry; a checkout
    from before they existed has none) and the update passes' own seconds, timed here around the
    object's ``update`` so that any checkout is measured alike."""

    def __init__(self, core) -> None:
        self.seconds: dict[str, float] = {}
        self.update_s = self.last_update_s = 0.0
        update = core.update

        def timed_update(*args, **kwargs):
            start = time.perf_counter()
            try:
                return update(*args, **kwargs)
            finally:
                self.last_update_s = time.perf_counter() - start

        core.update = timed_update

    def add(self, stats: dict) -> None:
        self.update_s += self.last_update_s
        for key, value in stats.items():
            if key.startswith("time/") and key != "time/iteration_s":
                self.seconds[key[5:-2]] = self.seconds.get(key[5:-2], 0.0) + value

    def result(self, update_flops: float, sft_same_rows_s: float) -> dict:
        """``update_vs_sft``: the last iteration's update speed over SFT steps' on its rows (1 = as fast)."""
        total = sum(self.seconds.values()) or 1.0
        split = {f"split/{k}": v / total for k, v in self.seconds.items()}
        speeds = {"update_flops_per_s": update_flops / self.update_s}
        return (
            split
            | speeds
            | {"update_s": self.update_s, "update_vs_sft": sft_same_rows_s / self.last_update_s}
        )


def sft_steps_on(model, ro: dict, mini: int) -> float:
    """Seconds of SFT-style steps (log-likelihood of the responses, forward + backward + AdamW, length
    buckets) over a rollout's own rows in mini-batches of ``mini``: what the update passes over the same
    rows would take at supervised speed, in the same process (so a drifting machine load cancels)."""
    import torch

    from align_cli.data.collate import length_buckets
    from align_cli.forward import per_token_by_bucket, token_logprobs

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    start = time.perf_counter()
    for first in range(0, len(ro["row_lengths"]), mini):
        rows = list(range(first, min(first + mini, len(ro["row_lengths"]))))
        lengths = [ro["row_lengths"][r] for r in rows]
        batch = {k: v[rows][:, : max(lengths)] for k, v in ro["batch"].items()}
        (logps,) = per_token_by_bucket(
            lambda sub: (token_logprobs(model, sub)[0],), batch, length_buckets(lengths)
        )
        (-logps.mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def count_padding(models) -> dict:
    """Real and computed tokens of the scoring and training passes (use_cache=False; generation's
    KV-cached steps and the shared-prompt scoring passes, which run on a KV cache, excluded)."""
    passes = {"real": 0, "computed": 0}

    def count(module, args, kwargs):
        if kwargs.get("use_cache") is False and kwargs.get("attention_mask") is not None:
            passes["real"] += int(kwargs["attention_mask"].sum())
            passes["computed"] += kwargs["input_ids"].numel()

    for m in models:
        m.register_forward_pre_hook(count, with_kwargs=True)
    return passes


def bench_prompts(tokenizer, vocab: int, n: int, rng: random.Random) -> list:
    from align_cli.data.prompts import Prompt

    lengths = (rng.randint(20, 60) for _ in range(n))
    texts = [tokenizer.decode([rng.randrange(10, vocab) for _ in range(length)]) for length in lengths]
    return [Prompt(f"bench:{i}", text) for i, text in enumerate(texts)]


def bench_ppo_iteration(model_dir: Path, a: argparse.Namespace) -> dict:
    """Whole PPO iterations (rollout + one epoch of updates) through the stage's own ``PPO`` object."""

    from rich.console import Console

    from align_cli.engine.distributed import make_accelerator
    from align_cli.engine.run import Run
    from align_cli.models import load_reward_model, load_tokenizer
    from align_cli.ppo_core import PPO, ActorCritic, PPOModels
    from align_cli.recipe import ModelSection, PPOSection, Recipe, TrainingSection

    section = ModelSection(name_or_path=str(model_dir))
    tokenizer = load_tokenizer(section)
    policy = _causal_lm(model_dir)
    reference = _causal_lm(model_dir).eval().requires_grad_(False)
    scorer = load_reward_model(section, tokenizer.pad_token_id).eval().requires_grad_(False)
    p = PPOSection(
        value_model="policy_head",
        rollout_batch_size=a.ppo_rollouts,
        mini_batch_size=a.ppo_rollouts // 2,
        ppo_epochs=1,
        max_new_tokens=a.max_new_tokens,
    )
    recipe = Recipe(training=TrainingSection(lr=1e-6), ppo=p)
    iterations = a.ppo_iterations + 1
    models = PPOModels(tokenizer, ActorCritic(policy, None), reference, scorer, tokenizer)
    run = Run(
        "ppo", recipe.training, Path(tempfile.mkdtemp()), make_accelerator("fp32"), Console(), iterations
    )
    ppo = PPO(recipe, models, run)
    passes_of = (policy, reference, scorer)
    return time_iterations(
        ppo, passes_of, tokenizer, p.rollout_batch_size, p.ppo_epochs, p.mini_batch_size, 2, a
    )


def time_iterations(
    core, passes_of: tuple, tokenizer, prompts_per_iteration: int, epochs: int, mini_batch: int, seed: int, a
) -> dict:
    """Run ``a.ppo_iterations`` + 1 iterations of an on-policy ``core`` (PPO or GroupPolicyGradient), the
    first a warm-up, and return tokens/s, FLOP/s, padding, memory and the per-iteration time split."""
    policy = passes_of[0]
    passes = count_padding(passes_of)
    times = IterationTimes(core)
    body, head = param_split(policy)
    rng = random.Random(seed)
    elapsed, tokens, flops, update_flops = 0.0, 0, 0, 0
    for it in range(a.ppo_iterations + 1):
        prompts = bench_prompts(tokenizer, policy.config.vocab_size, prompts_per_iteration, rng)
        start = time.perf_counter()
        ro, stats = core.iteration(prompts, it)
        took = time.perf_counter() - start
        if it == 0:  # warm-up
            passes.update(real=0, computed=0)
            continue
        elapsed += took
        times.add(stats)
        mask = ro["batch"]["attention_mask"]
        n_tok, n_resp = int(mask.sum()), int(ro["lengths"].sum())
        tokens += n_tok
        # generation, then old-policy + reference + reward forward passes, then forward + backward
        flops += 2 * body * n_tok + 2 * head * n_resp
        flops += 3 * 2 * body * n_tok + 2 * 2 * head * n_resp
        update_flops += epochs * (6 * body * n_tok + 6 * head * n_resp)  # as sft counts a step
    sft_s = sft_steps_on(policy, ro, mini_batch)
    return times.result(update_flops, sft_s) | {
        "tokens_per_s": tokens / elapsed,
        "steps_per_s": a.ppo_iterations / elapsed,
        "flops_per_s": (flops + update_flops) / elapsed,
        "padding_fraction": 1 - passes["real"] / passes["computed"],
        "peak_memory_mb": peak_mb(),
    }


def bench_grpo_iteration(model_dir: Path, a: argparse.Namespace) -> dict:
    """Whole GRPO iterations through the stage's own ``GroupPolicyGradient``: ``--grpo-prompts`` prompts x
    G = 4 samples, scored by a reward model, reference at beta 0.04, two mini-batches of updates."""
    from rich.console import Console

    from align_cli.engine.distributed import make_accelerator
    from align_cli.engine.run import Run
    from align_cli.group_core import GroupPolicyGradient
    from align_cli.models import load_reward_model, load_tokenizer
    from align_cli.recipe import GRPOSection, ModelSection, Recipe, TrainingSection
    from align_cli.rewards import RewardSource
    from align_cli.stages.grpo import settings

    section = ModelSection(name_or_path=str(model_dir))
    tokenizer = load_tokenizer(section)
    policy = _causal_lm(model_dir)
    reference = _causal_lm(model_dir).eval().requires_grad_(False)
    scorer = load_reward_model(section, tokenizer.pad_token_id).eval().requires_grad_(False)
    group, prompts_per_iteration = 4, a.grpo_prompts
    g = GRPOSection(
        num_generations=group,
        prompts_per_iteration=prompts_per_iteration,
        mini_batch_size=prompts_per_iteration * group // 2,
        num_iterations=1,
        max_new_tokens=a.max_new_tokens,
        beta=0.04,
    )
    recipe = Recipe(training=TrainingSection(lr=1e-6), grpo=g)
    shared, algorithm = settings(recipe)
    iterations = a.ppo_iterations + 1
    run = Run(
        "grpo", recipe.training, Path(tempfile.mkdtemp()), make_accelerator("fp32"), Console(), iterations
    )
    source = RewardSource(reward_model=scorer, tokenizer=tokenizer)
    core = GroupPolicyGradient(shared, algorithm, policy, reference, tokenizer, source, run)
    passes_of = (policy, reference, scorer)
    return time_iterations(
        core, passes_of, tokenizer, prompts_per_iteration, g.num_iterations, g.mini_batch_size, 3, a
    )


STAGES = {
    "sft": bench_sft,
    "reward": bench_reward,
    "dpo_cold": bench_dpo_cold,
    "dpo_warm": bench_dpo_warm,
    "dpo_live": bench_dpo_live,
    "rs_generation": bench_rs_generation,
    "rs_generation_long_prompt": bench_rs_generation_long_prompt,
    "ppo_iteration": bench_ppo_iteration,
    "grpo_iteration": bench_grpo_iteration,
}
# stages whose hot path has a naive twin
HAS_NAIVE = ("sft", "dpo_cold", "dpo_warm", "dpo_live", "ppo_iteration")


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.naive_child:
        sys.path.insert(0, str(ROOT / "bench"))
        import baseline

        baseline.install()
    # measured in the stage's own process just before it, so a machine whose speed drifts (shared
    # cores) is compared with itself
    matmul = matmul_flops(args.threads)
    result = STAGES[args.child](Path(args.model), args)
    result |= {"matmul_flops_per_s": matmul, "mfu": result["flops_per_s"] / matmul}
    if "update_flops_per_s" in result:  # on-policy stages: their update passes alone, as sft's steps
        result["update_mfu"] = result["update_flops_per_s"] / matmul
    print("RESULT " + json.dumps(result))


def run_child(stage: str, naive: bool, model_dir: Path, args: argparse.Namespace, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--model", str(model_dir)]
    for name in (
        "steps",
        "micro",
        "threads",
        "max_new_tokens",
        "gen_prompts",
        "ppo_rollouts",
        "ppo_iterations",
        "grpo_prompts",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if naive:
        cmd.append("--naive-child")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench: stage {stage} failed (exit {proc.returncode})")
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])


def machine(threads: int) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--micro", type=int, default=8, help="sequences per micro-batch (DPO/reward: pairs x 2)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="generation and PPO response length")
    parser.add_argument("--gen-prompts", type=int, default=2, help="prompts for rs_generation (N = 16 each)")
    parser.add_argument("--ppo-rollouts", type=int, default=8)
    parser.add_argument(
        "--ppo-iterations", type=int, default=2, help="timed PPO / GRPO iterations (after one warm-up)"
    )
    parser.add_argument("--grpo-prompts", type=int, default=4, help="grpo_iteration: prompts x G = 4 samples")
    parser.add_argument("--naive", action="store_true", help="also measure the naive log-prob path")
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="also measure the align_cli of another checkout (e.g. a git worktree of an older commit)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--naive-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from align_cli.presets import init_model

    work = Path(tempfile.mkdtemp(prefix="align-bench-"))
    model_dir = work / "small"
    init_model("small", model_dir, seed=0)
    results = {"machine": machine(args.threads), "settings": {}, "stages": {}}
    results["settings"] = {k: getattr(args, k) for k in ("reps", "steps", "micro", "max_new_tokens")}
    env = os.environ | {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
    }
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    # variants: "" (this code), "naive" (its naive log-prob path), "before" (the align_cli of --before)
    variants = [(s, "") for s in stages]
    if args.before:
        variants += [(s, "before") for s in stages]
    if args.naive:
        variants += [(s, "naive") for s in stages if s in HAS_NAIVE]
    runs: dict[str, list[dict]] = {}
    for rep in range(args.reps):  # alternate variants so drifting machine load hits all alike
        for stage, kind in variants:
            name = f"{stage} ({kind})" if kind else stage
            # dpo_cold fills the variant's cache, dpo_warm reads it
            run_env = env | {"ALIGN_CACHE_DIR": str(work / f"cache-{kind}-{rep}")}
            if kind == "before":  # another checkout's package first on the path
                run_env["PYTHONPATH"] = str(Path(args.before).resolve())
            if stage == "dpo_warm" and not any(s == "dpo_cold" and k == kind for s, k in variants):
                run_child("dpo_cold", kind == "naive", model_dir, args, run_env)  # fill the cache first
            runs.setdefault(name, []).append(run_child(stage, kind == "naive", model_dir, args, run_env))
            print(
                f"rep {rep + 1}/{args.reps} {name}: {runs[name][-1]['tokens_per_s']:.0f} tok/s",
                file=sys.stderr,
            )
    for name, rs in runs.items():
        summary = {}
        for key in rs[0]:
            values = [r[key] for r in rs if r[key] is not None]
            if values:
                summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        results["stages"][name] = summary
    every = [r["matmul_flops_per_s"] for rs in runs.values() for r in rs]
    results["matmul_flops_per_s"] = {"median": statistics.median(every), "min": min(every), "max": max(every)}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    m, mm = results["machine"], {k: v / 1e9 for k, v in results["matmul_flops_per_s"].items()}
    lines = [
        f"{m.get('cpu', m.get('processor'))}, {m['threads']} threads, torch {m.get('torch', '?')}; "
        f"matmul (1024^3 fp32, best of 10, in each stage's process): {mm['median']:.1f} GFLOP/s "
        f"(range {mm['min']:.1f}-{mm['max']:.1f})",
        "",
        "| stage | tokens/s (median, range) | steps/s | peak memory MB | padding | FLOP/s vs matmul |",
        "|---|---|---|---|---|---|",
    ]
    for stage, s in results["stages"].items():
        tps, steps, mem = (s[k] for k in ("tokens_per_s", "steps_per_s", "peak_memory_mb"))
        pad = f"{s['padding_fraction']['median']:.1%}" if "padding_fraction" in s else "-"
        lines.append(
            f"| {stage} | {tps['median']:.0f} ({tps['min']:.0f}-{tps['max']:.0f}) | {steps['median']:.3g} "
            f"| {mem['median']:.0f} | {pad} | {s['mfu']['median']:.1%} |"
        )
    stages = results["stages"]
    for warm, live in (("dpo_warm", "dpo_live"), ("dpo_warm (before)", "dpo_live (before)")):
        if warm in stages and live in stages:
            w, v = stages[warm], stages[live]
            pairs_per_step = results["settings"]["micro"] / 2
            cached, alive = (x["steps_per_s"]["median"] * pairs_per_step for x in (w, v))
            lines.append(
                f"\n{warm} vs {live}: cached reference {cached / alive:.2f}x the pairs/s of a live reference "
                f"model ({cached:.2f} vs {alive:.2f}); peak memory {w['peak_memory_mb']['median']:.0f} vs "
                f"{v['peak_memory_mb']['median']:.0f} MB"
            )
    for stage, s in results["stages"].items():
        if "lean_over_generate" in s:
            r, b, g = s["lean_over_generate"], s["of_bound"], s["generate_of_bound"]
            gen, bound = s["generate_tokens_per_s"]["median"], s["bound_tokens_per_s"]["median"]
            lines.append(
                f"\n{stage}: lean decode loop {r['median']:.2f}x transformers' generate (range "
                f"{r['min']:.2f}-{r['max']:.2f}x; generate {gen:.0f} tokens/s); {b['median']:.0%} of the "
                f"decode-step bound ({bound:.0f} tokens/s, range {b['min']:.0%}-{b['max']:.0%}; "
                f"generate {g['median']:.0%})"
            )
        if "batched_over_sequential" in s:
            r, seq = s["batched_over_sequential"], s["sequential_tokens_per_s"]["median"]
            lines.append(
                f"\n{stage}: N = 16 samples per prompt batched vs one at a time: {r['median']:.1f}x "
                f"(range {r['min']:.1f}-{r['max']:.1f}x; sequential {seq:.0f} tokens/s)"
            )
        if "reference_pass_s" in s:
            lines.append(f"\n{stage}: reference log-prob pass {s['reference_pass_s']['median']:.1f} s")
    lines += split_table(results)
    return "\n".join(lines)


def split_table(results: dict) -> list[str]:
    """The on-policy stages' iteration time split (medians of each section's share) and their update
    passes' FLOP/s fraction next to sft's."""
    stages = {k: s for k, s in results["stages"].items() if "update_mfu" in s}
    if not stages:
        return []
    from align_cli.engine.timing import ORDER

    seen = {k[6:] for s in stages.values() for k in s if k.startswith("split/")}
    sections = [k for k in ORDER if k in seen] + sorted(seen - set(ORDER))
    lines = [
        "",
        f"| on-policy stage | {' | '.join(sections)} | update FLOP/s vs matmul | sft's | update vs sft steps "
        "on its rows |",
        "|---|" + "---|" * (len(sections) + 3),
    ]
    for name, s in stages.items():
        shares = [f"{s[f'split/{k}']['median']:.0%}" if f"split/{k}" in s else "-" for k in sections]
        variant = name[name.index(" ") :] if " " in name else ""  # "(before)": that checkout's sft
        sft = results["stages"].get(f"sft{variant}", {}).get("mfu", {}).get("median")
        sft_text = f"{sft:.1%}" if sft is not None else "-"
        same = f"{s['update_vs_sft']['median']:.2f}x" if "update_vs_sft" in s else "-"
        lines.append(
            f"| {name} | {' | '.join(shares)} | {s['update_mfu']['median']:.1%} | {sft_text} | {same} |"
        )
    return lines


if __name__ == "__main__":
    main()
