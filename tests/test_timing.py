"""Where on-policy iterations spend their time: ``SectionTimer`` rows, the run's ``time_split`` in
summary.json and the summary table, for PPO, GRPO, RLOO and online DPO (tiny model, one or two
iterations each)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from align_cli.engine.timing import SectionTimer, describe_split, time_split
from align_cli.recipe import load_recipe
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import metric_rows


def test_section_timer_accumulates_sections_and_the_rest():
    timer = SectionTimer()
    timer.begin()
    with timer("generation"):
        time.sleep(0.02)
    with timer("update"):
        time.sleep(0.01)
    with timer("generation"):  # entered twice: adds up
        time.sleep(0.02)
    time.sleep(0.01)  # no section: "other"
    row = timer.row()
    assert set(row) == {"time/generation_s", "time/update_s", "time/other_s", "time/iteration_s"}
    assert row["time/generation_s"] >= 0.04 and row["time/update_s"] >= 0.01 and row["time/other_s"] >= 0.01
    parts = row["time/generation_s"] + row["time/update_s"] + row["time/other_s"]
    assert parts == pytest.approx(row["time/iteration_s"], abs=1e-6)
    timer.begin()  # a new iteration starts empty
    assert set(timer.row()) == {"time/other_s", "time/iteration_s"}


def test_time_split_sums_rows_in_a_fixed_order():
    rows = [
        {"step": 1, "time/update_s": 1.0, "time/generation_s": 3.0, "time/other_s": 0, "time/iteration_s": 4},
        {"step": 2, "time/update_s": 1.0, "time/generation_s": 3.0, "time/reference_s": 2.0},
        {"step": 3, "loss": 1.0},
    ]
    split = time_split(rows)
    assert split["seconds"] == {"generation": 6.0, "reference": 2.0, "update": 2.0, "other": 0.0}
    assert split["fraction"]["generation"] == pytest.approx(0.6)
    assert describe_split(split) == "generation 60% / ref 20% / update 20% / other 0%"
    assert time_split([{"step": 1, "loss": 1.0}]) == {}


LENGTH = "def length(completions, **kwargs):\n    return [float(len(str(c))) for c in completions]\n"


def run_stage(stage: str, tiny_model: Path, out: Path) -> tuple[dict, str]:
    """One or two iterations of ``stage`` on the tiny model (reward: the tiny model as a reward model
    for PPO, a reward function otherwise); (summary, printed text)."""
    from align_cli.stages import stage_of

    key = stage.replace("-", "_")
    sets = ["training.max_steps=2", "training.save_every=0", f"{key}.max_new_tokens=8"]
    overrides = {"model.name_or_path": str(tiny_model), "output.dir": str(out)}
    overrides[f"{key}.prompts"] = str(EXAMPLES / "prompts.jsonl")
    if stage == "ppo":
        overrides["ppo.reward_model"] = str(tiny_model)
        sets += ["ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1"]
    else:
        (out.parent / "length.py").write_text(LENGTH)
        overrides[f"{key}.reward_functions"] = [f"{out.parent / 'length.py'}:length"]
        sets += [f"{key}.prompts_per_iteration=2", f"{key}.mini_batch_size=4"]
    tiny = "online-dpo-tiny" if stage == "online-dpo" else f"{stage}-tiny"
    recipe = load_recipe(ROOT / "recipes" / f"{tiny}.yaml", overrides, sets)
    text = io.StringIO()
    summary = stage_of(stage).load().run(recipe, console=Console(file=text, width=200))
    return summary, text.getvalue()


@pytest.mark.parametrize(
    "stage, sections",
    [
        ("ppo", {"generation", "reward", "old_policy", "reference", "update"}),
        ("grpo", {"generation", "reward", "old_policy", "reference", "update"}),
        ("rloo", {"generation", "reward", "old_policy", "reference", "update"}),
        ("online-dpo", {"generation", "reward", "reference", "update"}),
    ],
)
def test_each_iteration_logs_its_time_split(stage, sections, tiny_model, tmp_path, runs_dir):
    summary, text = run_stage(stage, tiny_model, tmp_path / "run")
    rows = metric_rows(tmp_path / "run")
    assert len(rows) == 2
    for row in rows:
        logged = {k[len("time/") : -2] for k in row if k.startswith("time/")}
        assert logged == sections | {"other", "iteration"}, logged
        parts = sum(row[f"time/{k}_s"] for k in sections | {"other"})
        assert parts == pytest.approx(row["time/iteration_s"], rel=1e-6)
        assert row["time/generation_s"] > 0 and row["time/update_s"] > 0
    split = summary["time_split"]
    assert set(split["seconds"]) == sections | {"other"}
    assert sum(split["fraction"].values()) == pytest.approx(1.0)
    total = sum(r["time/generation_s"] for r in rows)
    assert split["seconds"]["generation"] == pytest.approx(total)
    assert "time" in text and describe_split(split) in text  # the summary table's row
