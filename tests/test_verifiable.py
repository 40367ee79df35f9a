"""Issue 18: a reward-function run on the verifiable parity task (examples/verifiable). GRPO scored by
``right_parity`` alone (no reward model) raises the mean reward on held-out prompts from its SFT start,
and GRPO / RLOO log each reward source's mean per iteration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align_cli.data.prompts import load_prompts
from align_cli.recipe import Recipe, load_recipe
from align_cli.rewards import load_reward_source
from align_cli.sample_and_score import sample_and_score
from align_cli.stages import STAGES
from align_cli.stages.grpo import run_grpo
from align_cli.stages.sft import run_sft
from tests.conftest import ROOT
from tests.helpers import load_example_module, metric_rows, quiet_console

VERIFIABLE = ROOT / "examples" / "verifiable"
PARITY = f"{VERIFIABLE / 'rewards.py'}:right_parity"
make_prompts = load_example_module(VERIFIABLE / "make_prompts.py", "verifiable_make_prompts")

SFT_START = [  # a tiny model taught the answer's form (" 37" and the end), of random parity
    "training.lr=3e-3",
    "training.max_steps=100",
    "training.micro_batch_size=16",
    "training.warmup_steps=2",
    "training.save_every=0",
]
HELDOUT_SAMPLES = 8  # per held-out prompt: 64 prompts x 8 = 512 samples, a standard error of ~0.02


def heldout_reward(policy: Path, data: Path, grpo: Recipe, seed: int = 1234) -> float:
    """The mean ``right_parity`` reward of the policy on the held-out prompts, sampled as GRPO samples (its
    template, temperature and token budget; no truncation), a fixed seed."""
    g = grpo.grpo
    sampling = load_recipe(
        None,
        sets=[
            f"data.template={grpo.data.template}",
            f"rejection.temperature={g.temperature}",
            f"rejection.max_new_tokens={g.max_new_tokens}",
            "rejection.prompts_per_batch=16",
        ],
        stage="rejection-sample",
    )
    source = load_reward_source(None, [PARITY], None, grpo.data.template)
    prompts = load_prompts(str(data / "heldout.jsonl"))
    _, _, rewards = sample_and_score(
        str(policy), source, prompts, sampling, seed, HELDOUT_SAMPLES, "transformers", quiet_console()
    )
    return sum(rewards.total) / len(rewards.total)


def test_grpo_with_a_reward_function_raises_the_heldout_reward_from_the_sft_start(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    data = tmp_path / "data"
    make_prompts.main(["--out", str(data)])
    start = {"model.name_or_path": str(tiny_model), "data.train": str(data / "sft.jsonl")}
    sft = load_recipe(None, start | {"output.dir": str(tmp_path / "sft")}, SFT_START, stage="sft")
    run_sft(sft, console=quiet_console())
    recipe = load_recipe(
        ROOT / "recipes" / "grpo-verifiable.yaml",
        {
            "grpo.prompts": str(data / "train.jsonl"),
            "grpo.reward_functions": [PARITY],  # the recipe's own, made independent of the cwd
            "output.dir": str(tmp_path / "grpo"),
        },
        ["training.save_every=0"],
    )
    assert load_recipe(ROOT / "recipes" / "grpo-verifiable.yaml").grpo.reward_functions == [
        "examples/verifiable/rewards.py:right_parity"
    ]
    before = heldout_reward(tmp_path / "sft" / "final", data, recipe)
    summary = run_grpo(recipe, console=quiet_console())  # the policy: the last `align sft` output
    after = heldout_reward(tmp_path / "grpo" / "final", data, recipe)
    rows = metric_rows(tmp_path / "grpo")
    first, last = rows[0]["reward/mean"], rows[-1]["reward/mean"]
    print(
        f"\nparity task, held-out mean reward: SFT {before:.3f} -> GRPO {after:.3f} "
        f"(training reward, first / last iteration: {first:.2f} / {last:.2f})"
    )
    assert "reward model" not in str(summary) and len(rows) == 40
    # Observed, held-out mean reward SFT -> GRPO by training.seed (SFT and GRPO): 42 (this test)
    # 0.471 -> 0.939; 0: 0.467 -> 0.955, 1: 0.461 -> 0.971, 2: 0.461 -> 0.973, 3: 0.473 -> 0.947,
    # 4: 0.467 -> 0.975, 5: 0.473 -> 0.932, 6: 0.465 -> 0.969, 7: 0.473 -> 0.828: a rise of 0.36-0.51,
    # so a margin of 0.25 (the sampling noise of a mean of 512 samples is ~0.02). The held-out prompts are
    # phrasings and ranges GRPO never saw: the policy learnt the parity word, not the training prompts.
    # The SFT start knows no parity (its answers have random parity): about half right.
    assert before < 0.6, before
    assert after > before + 0.25, (before, after)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_group_stages_log_each_reward_sources_mean(tiny_model: Path, tmp_path: Path, runs_dir: Path, stage):
    """reward/<function>: each function's mean over the samples it applied to (one returns None for the
    odd prompts), equal to the mean of the values written in samples.jsonl; reward/mean is the total's."""
    data = tmp_path / "data"
    make_prompts.main(["--out", str(data)])
    code = tmp_path / "digits.py"
    code.write_text(
        "def digits(completions, parity, **kwargs):\n"
        "    counts = [float(sum(ch.isdigit() for ch in c)) for c in completions]\n"
        "    return [None if p == 'odd' else n for n, p in zip(counts, parity)]\n"
    )
    group = "num_generations" if stage == "grpo" else "k"
    recipe = load_recipe(
        None,
        {
            "model.name_or_path": str(tiny_model),
            f"{stage}.prompts": str(data / "train.jsonl"),
            "output.dir": str(tmp_path / stage),
        },
        [
            f"{stage}.reward_functions=[{PARITY}, {code}:digits]",
            f"{stage}.reward_weights=[1, 0.5]",
            f"{stage}.prompts_per_iteration=4", f"{stage}.{group}=4", f"{stage}.mini_batch_size=16",
            f"{stage}.max_new_tokens=6", f"{stage}.log_samples=16", f"{stage}.beta=0",
            "training.max_steps=2", "training.save_every=0",
        ],
        stage=stage,
    )  # fmt: skip
    STAGES[stage].load().run(recipe, console=quiet_console())
    rows = metric_rows(tmp_path / stage)
    samples = [json.loads(line) for line in (tmp_path / stage / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(samples) == 2 * 16
    for row in rows:
        mine = [s for s in samples if s["iteration"] == row["step"]]
        parity = [s["reward_sources"]["right_parity"] for s in mine]
        digits = [s["reward_sources"]["digits"] for s in mine if s["reward_sources"]["digits"] is not None]
        assert digits and len(digits) < len(mine)  # the function applied to some samples only
        assert row["reward/right_parity"] == pytest.approx(sum(parity) / len(parity))
        assert row["reward/digits"] == pytest.approx(sum(digits) / len(digits))
        assert row["reward/mean"] == pytest.approx(sum(s["reward"] for s in mine) / len(mine))
        for s in mine:  # the total: weighted, over the sources that applied
            values = s["reward_sources"]
            assert s["reward"] == pytest.approx(values["right_parity"] + 0.5 * (values["digits"] or 0))
