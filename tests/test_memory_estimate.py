"""The memory estimate printed before a run against the run's measured peak, on a CPU.

On a CPU the measured peak is the growth of the process's resident memory over the run (peak RSS
minus RSS after the libraries are loaded), in a fresh process so earlier tests do not count. The
`small` preset keeps the fixed costs of a process (allocator caches, library workspaces) small next
to what the estimate counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHILD = r"""
import io, json, os, random, resource, sys
import torch
from rich.console import Console
from align_cli.memory import plan_recipe
from align_cli.presets import init_model
from align_cli.recipe import load_recipe
from align_cli.stages.sft import run_sft

work, micro, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
init_model("small", f"{work}/small", seed=0)
rng = random.Random(0)  # texts longer than max_length: every row is max_length tokens
words = "the movie was great and the story was wonderful but the acting felt boring at times".split()
with open(f"{work}/long.jsonl", "w") as f:
    for _ in range(4 * micro):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(3 * length))}) + "\n")
recipe = load_recipe(overrides={
    "stage": "sft", "model.name_or_path": f"{work}/small", "data.train": f"{work}/long.jsonl",
    "data.max_length": length, "training.micro_batch_size": micro, "training.max_steps": 2,
    "output.dir": f"{work}/run",
})
estimate = plan_recipe(recipe, device="cpu")  # what `align plan --device cpu` and the run print
x = torch.randn(64, 64, requires_grad=True)
(x @ x).sum().backward()  # torch's first-use buffers are the process's, not the run's
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
run_sft(recipe, console=Console(file=io.StringIO()))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"estimate": estimate.total, "measured": peak - base}))
"""


@pytest.mark.parametrize("micro, length", [(8, 256), (4, 512)])
def test_estimate_is_within_30_percent_of_the_measured_peak(tmp_path: Path, micro: int, length: int):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(micro), str(length)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[7:])
    estimate, measured = result["estimate"] / 2**20, result["measured"] / 2**20
    print(f"micro-batch {micro} x {length}: estimate {estimate:.0f} MB, measured peak {measured:.0f} MB")
    assert abs(estimate - measured) <= 0.3 * measured, (estimate, measured)


def test_activation_line_names_what_it_counts(tiny_model: Path):
    from align_cli.memory import plan, read_config
    from align_cli.recipe import load_recipe

    config = read_config(str(tiny_model))

    def activations(stage: str, device: str) -> str:
        recipe = load_recipe(None, {"model.name_or_path": str(tiny_model)}, stage=stage)
        estimate = plan(recipe, config, device=device)
        return next(c.detail for c in estimate.components if c.name == "activations")

    assert "value model" not in activations("sft", "cpu") and "attention scores" in activations("sft", "cpu")
    assert "attention scores" not in activations("sft", "cuda")
    assert "policy and value model" in activations("ppo", "cuda")  # value model: a reward-model copy
