"""DPO throughput and peak memory: cached reference log-probs vs a live reference model.

Builds the `small` preset and synthetic preference pairs with a realistic length spread (prompts 20-60
tokens, responses 20-120), then times DPO optimizer steps through the real stage code (the DPO
collate and compute_loss, Trainer.train_step, AdamW) in a fresh subprocess per mode, so peak memory
is the mode's own:

- cache: reference log-probs computed once before training (no grad, the policy's starting weights,
  the same path as ``dpo.reference_cache: true``); the one-time pass is timed separately;
- live: a second copy of the model scores every batch (``dpo.reference_cache: false``).

Usage: OMP_WAIT_POLICY=PASSIVE python bench/dpo_cache.py [--steps 8] [--micro 8] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def synthetic_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(10, vocab) for _ in range(rng.randint(20, 60))]
        responses = [[rng.randrange(10, vocab) for _ in range(rng.randint(20, 120))] for _ in range(2)]
        length = len(prompt) + max(map(len, responses))
        examples.append({"prompt_ids": prompt, "responses": responses, "margin": None, "length": length})
    return examples


def bench_dpo(model_dir: Path, steps: int, micro: int, threads: int, mode: str) -> dict:
    """Time DPO optimizer steps (after 2 warm-up steps) with the reference cached or live."""
    import resource

    import torch

    from align_cli.engine.loop import StageSpec, Trainer, build_optimizer, make_accelerator
    from align_cli.models import load_causal_lm
    from align_cli.recipe import DPOSection, ModelSection, TrainingSection
    from align_cli.reference_cache import compute_logps
    from align_cli.stages.dpo import live_reference, make_collate, make_compute_loss

    torch.set_num_threads(threads)
    model = load_causal_lm(ModelSection(name_or_path=str(model_dir)))
    examples = synthetic_pairs(micro * (steps + 2), model.config.vocab_size)
    accelerator = make_accelerator("fp32")
    reference, prepass_s = None, 0.0
    if mode == "cache":
        start = time.perf_counter()
        for e, values in zip(examples, compute_logps(model, examples, 0, 2 * micro)):
            e["ref_logps"] = values
        prepass_s = time.perf_counter() - start
    else:
        ref_model = load_causal_lm(ModelSection(name_or_path=str(model_dir))).requires_grad_(False).eval()
        reference = live_reference(accelerator, ref_model)
    t = TrainingSection(micro_batch_size=micro, lr=1e-5, max_steps=steps + 2)
    spec = StageSpec("dpo", model, examples, make_collate(0), make_compute_loss(DPOSection(), reference))
    trainer = Trainer(spec, t, Path(tempfile.mkdtemp()), accelerator)
    optimizer = build_optimizer(model, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    pairs, tokens, elapsed = 0, 0, 0.0
    for i, micro_batches in enumerate(trainer._plan(0)[: steps + 2]):
        batches = trainer._micro_batches(micro_batches, examples)
        start = time.perf_counter()
        row = trainer.train_step(model, batches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:  # the first steps warm up allocators and kernels
            elapsed += time.perf_counter() - start
            pairs += sum(b["units"] for b in batches)
            tokens += row["tokens"]
    return {
        "pairs_per_s": pairs / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reference_pass_s": prepass_s,
        "reference_pass_pairs_per_s": len(examples) / prepass_s if prepass_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("cache", "live"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = bench_dpo(Path(args.model), args.steps, args.micro, args.threads, args.child)
        print("RESULT " + json.dumps(result))
        return

    from align_cli.presets import init_model

    model_dir = init_model("small", Path(tempfile.mkdtemp()) / "small", seed=0)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    runs: dict[str, list[dict]] = {"cache": [], "live": []}
    for _ in range(args.reps):  # alternate the modes so drifting machine load hits both alike
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", mode, "--model", str(model_dir)]
            cmd += ["--steps", str(args.steps), "--micro", str(args.micro), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            runs[mode].append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
    print(f"small preset, {args.micro} pairs/step, {args.steps} timed steps, {args.threads} threads", end="")
    print(f", {args.reps} reps")
    print("| reference | pairs/s (median, range) | tokens/s | peak memory MB | one-time reference pass |")
    print("|---|---|---|---|---|")
    med = {}
    for mode, rs in runs.items():
        pps = [r["pairs_per_s"] for r in rs]
        med[mode] = statistics.median(pps)
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        mem = statistics.median(r["peak_memory_mb"] for r in rs)
        once = f"{statistics.median(r['reference_pass_s'] for r in rs):.1f} s" if mode == "cache" else "-"
        print(
            f"| {mode} | {med[mode]:.2f} ({min(pps):.2f}-{max(pps):.2f}) | {tps:.0f} | {mem:.0f} | {once} |"
        )
    print(f"speed-up cache/live: {med['cache'] / med['live']:.2f}x")


if __name__ == "__main__":
    main()
