"""`make bench`: the project's own throughput and memory benchmark (offline, deterministic).

Builds the `small` preset and synthetic data with a realistic length spread (prompts 20-60 tokens,
responses 20-120), then measures each stage's hot path in a fresh subprocess (so peak memory is the
stage's own): tokens/s of non-pad tokens, steps/s, peak memory, and achieved FLOP/s as a fraction of
this machine's plain matrix-multiply FLOP/s, measured in the same run. Several repetitions; the
median and the range are reported. Writes bench/results.json and prints a markdown table.

Usage: python bench/run.py [--stages sft] [--reps 3] [--steps 6] [--threads 2]
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
    return 2 * size**3 / statistics.median(times)


def bench_sft(model_dir: Path, steps: int, micro: int, threads: int) -> dict:
    """Time SFT optimizer steps through the real engine (Trainer.train_step + AdamW)."""
    import resource

    import torch

    from align_cli.engine.loop import StageSpec, Trainer, build_optimizer, make_accelerator
    from align_cli.models import load_causal_lm
    from align_cli.recipe import ModelSection, TrainingSection
    from align_cli.stages.sft import make_collate, sft_loss

    torch.set_num_threads(threads)
    model = load_causal_lm(ModelSection(name_or_path=str(model_dir)))
    vocab = model.config.vocab_size
    examples = synthetic_sft_examples(micro * (steps + 2), vocab)
    t = TrainingSection(micro_batch_size=micro, lr=1e-4, max_steps=steps + 2)
    accelerator = make_accelerator("fp32")
    spec = StageSpec("sft", model, examples, make_collate(0, packing=False), sft_loss)
    trainer = Trainer(spec, t, Path(tempfile.mkdtemp()), accelerator)
    optimizer = build_optimizer(model, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    plan = trainer._plan(0)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    tokens, padded, elapsed = 0, 0, 0.0
    for i, micro_batches in enumerate(plan[: steps + 2]):
        batches = trainer._micro_batches(micro_batches, examples)
        start = time.perf_counter()
        row = trainer.train_step(model, batches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:  # the first steps warm up allocators and kernels
            elapsed += time.perf_counter() - start
            tokens += row["tokens"]
            padded += sum(b["input_ids"].numel() for b in batches)
    return {
        "tokens_per_s": tokens / elapsed,
        "steps_per_s": steps / elapsed,
        "flops_per_s": 6 * non_embedding * tokens / elapsed,
        "padding_fraction": 1 - tokens / padded,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


STAGES = {"sft": bench_sft}


def child(args: argparse.Namespace) -> None:
    result = STAGES[args.child](Path(args.model), args.steps, args.micro, args.threads)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from align_cli.presets import init_model

    model_dir = Path(tempfile.mkdtemp()) / "small"
    init_model("small", model_dir, seed=0)
    peak = matmul_flops(args.threads)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
        "matmul_flops_per_s": peak,
        "stages": {},
    }
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    for stage in args.stages.split(","):
        runs = []
        for _ in range(args.reps):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                stage,
                "--model",
                str(model_dir),
                "--steps",
                str(args.steps),
                "--micro",
                str(args.micro),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            runs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
        summary = {}
        for key in runs[0]:
            values = [r[key] for r in runs]
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        summary["mfu"] = summary["flops_per_s"]["median"] / peak
        results["stages"][stage] = summary
    RESULTS.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    gflops, threads = results["matmul_flops_per_s"] / 1e9, results["machine"]["threads"]
    lines = [
        f"matmul: {gflops:.1f} GFLOP/s ({threads} threads)",
        "",
        "| stage | tokens/s (median, range) | steps/s | peak memory MB | padding | FLOP/s vs matmul |",
        "|---|---|---|---|---|---|",
    ]
    for stage, s in results["stages"].items():
        tps, steps, mem, pad = (
            s[k] for k in ("tokens_per_s", "steps_per_s", "peak_memory_mb", "padding_fraction")
        )
        lines.append(
            f"| {stage} | {tps['median']:.0f} ({tps['min']:.0f}-{tps['max']:.0f}) | {steps['median']:.2f} "
            f"| {mem['median']:.0f} | {pad['median']:.1%} | {s['mfu']:.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
