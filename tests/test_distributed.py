"""Several processes (torchrun, gloo on the CPU): the same global batch gives the same losses as one
process, only the main process writes, checkpoints resume, and the reference cache is computed once.

Each launch starts two Python processes on a shared 2-core machine, so the runs are a few steps long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_cli.recipe import load_recipe
from align_cli.stages.dpo import run_dpo
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import make_recipe, metric_rows, quiet_console, step_losses

SFT_SETS = ["training.lr=1e-3", "training.scheduler=constant", "training.log_every=1"]


def launch(args: list[str], env: dict[str, str] | None = None) -> str:
    """`torchrun --nproc_per_node 2 -m align_cli.cli ARGS`; returns stdout (fails with both outputs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "align_cli.cli", *args]
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        cmd, cwd=ROOT, env=full_env | (env or {}), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_sft_two_processes_match_one_write_once_and_resume(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    data = EXAMPLES / "alpaca.jsonl"
    # one process, 8 examples per micro-batch, 6 steps
    run_sft(
        make_recipe(
            "sft",
            tiny_model,
            data,
            tmp_path / "one",
            SFT_SETS + ["training.micro_batch_size=8", "training.max_steps=6"],
        ),
        console=quiet_console(),
    )
    # two processes x 4 examples: 3 steps with a checkpoint at step 2, then --resume to step 6
    out = tmp_path / "two"
    common = ["sft", "-m", str(tiny_model), "-d", str(data), "-o", str(out)]
    common += sets(SFT_SETS + ["training.micro_batch_size=4", "training.save_every=2"])
    env = {"ALIGN_RUNS_DIR": str(runs_dir)}
    first = launch([*common, "--max-steps", "3"], env)
    assert first.count("align sft: summary") == 1  # rank 1 prints nothing
    assert sorted(p.name for p in out.iterdir()) == [
        ".align.lock",  # held by the main process while it runs
        "checkpoint-0000002",
        "data_identity.json",
        "final",
        "metrics.csv",
        "metrics.jsonl",
        "metrics.png",
        "recipe.yaml",
        "summary.json",
    ]
    ckpt = out / "checkpoint-0000002"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    second = launch([*common, "--max-steps", "6", "--resume"], env)
    assert "resumed" in second and second.count("align sft: summary") == 1

    one, two = step_losses(tmp_path / "one"), step_losses(out)
    print("\nSFT per-step loss, 1 process (micro 8) vs 2 processes (micro 4 each, resumed at step 2):")
    for step in sorted(one):
        print(f"  step {step}: {one[step]:.6f}  {two[step]:.6f}")
    assert [r["step"] for r in metric_rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # written once
    assert two == pytest.approx(one, rel=1e-5)
    assert one[6] < one[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert json.loads((runs_dir / "latest.json").read_text())["sft"] == str((out / "final").resolve())


def test_dpo_two_processes_match_one_and_cache_the_reference_once(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    data = tmp_path / "prefs.jsonl"  # a subset: the reference pass is part of what is timed here
    data.write_text("".join((EXAMPLES / "prefs.jsonl").read_text().splitlines(keepends=True)[:64]))
    dpo_sets = ["training.lr=1e-3", "data.max_length=128", "training.log_every=1"]
    cache_two, cache_one = tmp_path / "cache-two", tmp_path / "cache-one"
    out = tmp_path / "two"
    stdout = launch(
        ["dpo", "-m", str(tiny_model), "-d", str(data), "-o", str(out), "--max-steps", "4"]
        + sets(dpo_sets + ["training.micro_batch_size=4"]),
        {"ALIGN_RUNS_DIR": str(runs_dir), "ALIGN_CACHE_DIR": str(cache_two)},
    )
    assert stdout.count("cache miss") == 1 and "cache hit" not in stdout  # the main process computed it
    assert len(list((cache_two / "reference-logps").glob("*.json"))) == 1

    monkeypatch.setenv("ALIGN_CACHE_DIR", str(cache_one))
    recipe = make_recipe(
        "dpo", tiny_model, data, tmp_path / "one", dpo_sets + ["training.micro_batch_size=8"]
    )
    recipe.training.max_steps = 4
    run_dpo(recipe, console=quiet_console())
    # the cached reference log-probs are the same numbers either way
    (a,), (b,) = (list((c / "reference-logps").glob("*.json")) for c in (cache_one, cache_two))
    assert json.loads(a.read_text())["logps"] == json.loads(b.read_text())["logps"]

    one, two = metric_rows(tmp_path / "one"), metric_rows(out)
    print("\nDPO per-step loss / accuracy, 1 process (micro 8 pairs) vs 2 processes (micro 4 each):")
    for r1, r2 in zip(one, two):
        acc1, acc2 = r1["rewards/accuracy"], r2["rewards/accuracy"]
        print(f"  step {r1['step']}: {r1['loss']:.6f} {r2['loss']:.6f}   {acc1:.3f} {acc2:.3f}")
    assert len(two) == 4
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    ("stage", "variant"),
    [
        ("grpo", ["grpo.num_generations=2", "grpo.loss_type=dapo"]),
        ("rloo", ["rloo.k=2", "rloo.normalize=reinforce_pp"]),
    ],
)
def test_grpo_and_rloo_two_processes_match_one(
    review_models, tmp_path: Path, runs_dir: Path, stage: str, variant: list[str]
):
    """Each process samples whole groups of its own prompts, seeded by their global batch index, so two
    processes draw the samples one process draws; with one optimizer step per iteration over every
    sample, the update is the same too: dapo divides by the tokens of both processes, REINFORCE++
    whitens the advantages of both, and the statistics are reduced over both."""
    import torch

    from align_cli.stages import STAGES

    common = [
        f"{stage}.prompts_per_iteration=4",
        f"{stage}.prompts_per_batch=2",
        f"{stage}.mini_batch_size=8",  # every sample of the iteration: one optimizer step
        f"{stage}.max_new_tokens=8",
        "training.lr=1e-3",
        "training.save_every=0",
        *variant,
    ]
    models = ["-m", str(review_models["sft"]), "--reward-model", str(review_models["reward"])]
    prompts = ["--prompts", str(EXAMPLES / "prompts.jsonl")]
    out = tmp_path / "two"
    stdout = launch(
        [stage, *models, *prompts, "-o", str(out), "--max-steps", "3", *sets(common)],
        {"ALIGN_RUNS_DIR": str(runs_dir)},
    )
    assert stdout.count(f"align {stage}: summary") == 1
    overrides = {
        "model.name_or_path": str(review_models["sft"]),
        f"{stage}.reward_model": str(review_models["reward"]),
        f"{stage}.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(tmp_path / "one"),
    }
    recipe = load_recipe(None, overrides, [*common, "training.max_steps=3"], stage=stage)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): the same float sums
    try:
        STAGES[stage].load().run(recipe, console=quiet_console())
    finally:
        torch.set_num_threads(threads)
    one, two = metric_rows(tmp_path / "one"), metric_rows(out)
    print(f"\n{stage} per-iteration reward / loss, 1 process vs 2 processes (2 prompts each):")
    for r1, r2 in zip(one, two):
        rewards, losses = (r1["reward/mean"], r2["reward/mean"]), (r1["loss"], r2["loss"])
        print(f"  {r1['step']}: {rewards[0]:.5f} {rewards[1]:.5f}   {losses[0]:.6f} {losses[1]:.6f}")
    assert len(two) == 3
    # the same samples and rewards; KL and loss are differences of log-probs after updates whose gradients
    # were summed in another order (float32): equal to ~1e-5
    keys = ("reward/mean", "reward/std", "reward/reward_model", "response/length", "objective/kl", "loss")
    for key in (*keys, "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-3, abs=1e-4), key
