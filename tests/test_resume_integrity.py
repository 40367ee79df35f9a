"""Issue 15 items 4, 6, 7 and 8: checkpoints on by default, checksums on what a run reads back (DPO reference
cache entries, checkpoint files) and a resume that refuses a recipe deciding another data order or update.

Unit tests at the function that decides (save schedule, cache entry, manifest, recipe comparison), plus a
few tiny SFT runs (at most 4 steps) through the CLI for the flags."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.engine.checkpoint import MANIFEST, SaveSchedule, damaged_files, latest_checkpoint
from align_cli.engine.optim import apply_training_settings, build_optimizer, build_scheduler
from align_cli.engine.resume import recipe_changes, refused_changes
from align_cli.recipe import RecipeError, TrainingSection, load_recipe
from align_cli.reference_cache import attach_reference_logps
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, metric_rows, quiet_console, step_losses, write_jsonl

runner = CliRunner()
SFT = ["training.micro_batch_size=8", "training.lr=3e-3", "training.scheduler=constant"]


def sft_args(model: Path, data: Path, out: Path, *sets: str) -> list[str]:
    args = ["sft", "-m", str(model), "-d", str(data), "-o", str(out)]
    return args + [item for s in [*SFT, *sets] for item in ("--set", s)]


def invoke(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


# ----------------------------------------------------------------------------- item 4: default checkpoints


def test_default_save_schedule_every_tenth_of_the_run_or_every_n_minutes():
    """Issue 15 item 4: save_every unset (null) saves every 10% of the run's steps or every
    save_every_minutes, whichever comes first; an explicit save_every is the step interval; 0 is off."""
    default = SaveSchedule.for_run(None, 30.0, total_steps=50, now=0.0)
    assert [s for s in range(1, 50) if default.due(s, now=1.0)] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert [s for s in range(1, 3) if SaveSchedule.for_run(None, 30.0, 3, 0.0).due(s, 1.0)] == [1, 2]
    assert not default.due(7, now=30 * 60 - 1) and default.due(7, now=30 * 60)  # 30 minutes since start
    default.saved(now=30 * 60)
    assert not default.due(8, now=30 * 60 + 5)  # the clock restarts at every save
    explicit = SaveSchedule.for_run(7, 30.0, total_steps=50, now=0.0)
    assert [s for s in range(1, 50) if explicit.due(s, now=1.0)] == [7, 14, 21, 28, 35, 42, 49]
    steps_only = SaveSchedule.for_run(None, 0.0, total_steps=50, now=0.0)
    assert not steps_only.due(7, now=10**6)
    off = SaveSchedule.for_run(0, 30.0, total_steps=50, now=0.0)
    assert not any(off.due(s, now=10**6) for s in range(1, 50))
    with pytest.raises(RecipeError, match="(?s)save_every: must be >= 0.*save_every_minutes: must be >= 0"):
        load_recipe(None, sets=["training.save_every=-1", "training.save_every_minutes=-2"])


def test_a_run_without_save_every_checkpoints_by_default_and_resumes_exactly(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    """Issue 15 item 4: no save_every in the recipe still leaves checkpoints; a time-based checkpoint
    holds the step it completed, so a resume from it is exact."""
    data, steps = EXAMPLES / "alpaca.jsonl", ["training.max_steps=3", *SFT]
    run_sft(make_recipe("sft", tiny_model, data, tmp_path / "default", steps), console=quiet_console())
    assert latest_checkpoint(tmp_path / "default").name == "checkpoint-0000002"  # 10% of 3 steps: each step
    timed = tmp_path / "timed"  # a step interval longer than the run; a save every few milliseconds
    sets = [*steps, "training.save_every=1000", "training.save_every_minutes=1e-6"]
    run_sft(make_recipe("sft", tiny_model, data, timed, sets), console=quiet_console())
    assert json.loads((latest_checkpoint(timed) / "trainer_state.json").read_text())["step"] == 2
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(timed / "checkpoint-0000002", resumed / "checkpoint-0000002")
    run_sft(make_recipe("sft", tiny_model, data, resumed, sets), resume=True, console=quiet_console())
    assert step_losses(resumed)[3] == pytest.approx(step_losses(tmp_path / "default")[3], rel=0, abs=1e-6)


# ----------------------------------------------------------------------------- item 6: reference cache


def test_a_flipped_byte_in_a_reference_cache_entry_is_recomputed_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Issue 15 item 6: every cache entry carries a checksum of its numbers; an entry that does not match
    it (a flipped byte, a cut file) is no hit: it is recomputed, rewritten, counted and logged."""
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path))
    true = [[-1.25, -2.5], [-3.125, -4.0625]]
    calls = []

    def compute() -> list[list[float]]:
        calls.append(1)
        return [list(row) for row in true]

    def attach() -> tuple[dict, list]:
        examples = [
            {"prompt_ids": [1, 2], "responses": [[3], [4, 5]]},
            {"prompt_ids": [6], "responses": [[7], [8]]},
        ]
        return attach_reference_logps(examples, {"reference": "x"}, compute), [
            e["ref_logps"] for e in examples
        ]

    info, _ = attach()
    assert not info["hit"] and len(calls) == 1
    path = Path(info["path"])
    raw = bytearray(path.read_bytes())
    at = raw.index(b"-3.125") + 1
    raw[at] ^= 0x01  # '3' -> '2': still valid JSON, a plausible number
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="align"):
        info, values = attach()
    assert not info["hit"] and info["corrupt"] and len(calls) == 2
    assert values == true
    assert "does not match its checksum" in caplog.text and "recomputed" in caplog.text
    info, values = attach()  # the rewritten entry is good again
    assert info["hit"] and not info["corrupt"] and values == true and len(calls) == 2
    path.write_text(path.read_text()[:40])  # cut short: unreadable, also counted as corrupt
    info, values = attach()
    assert info["corrupt"] and values == true and len(calls) == 3


# ----------------------------------------------------------------------------- item 7: checkpoint manifest


def test_damaged_files_names_every_file_that_differs_from_the_manifest(tmp_path: Path):
    """Issue 15 item 7: the manifest's SHA-256 of each file, checked file by file."""
    from align_cli.engine.checkpoint import write_manifest

    (tmp_path / "model.safetensors").write_bytes(b"weights" * 100)
    (tmp_path / "optimizer.bin").write_bytes(b"moments" * 100)
    write_manifest(tmp_path)
    assert damaged_files(tmp_path) == []
    raw = bytearray((tmp_path / "optimizer.bin").read_bytes())
    raw[-1] ^= 0x10
    (tmp_path / "optimizer.bin").write_bytes(bytes(raw))
    (tmp_path / "model.safetensors").unlink()
    assert damaged_files(tmp_path) == ["model.safetensors (missing)", "optimizer.bin"]


def test_a_flipped_byte_in_a_checkpoint_is_refused_and_resume_from_previous_takes_the_one_before(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, caplog: pytest.LogCaptureFixture
):
    """Issue 15 item 7: --resume verifies the checkpoint's manifest; a mismatch names the file and offers
    the previous complete checkpoint, which --resume-from-previous takes. No manifest (older align): a
    log line, and it resumes."""
    out = tmp_path / "run"
    args = sft_args(
        tiny_model, EXAMPLES / "alpaca.jsonl", out, "training.max_steps=3", "training.save_every=1"
    )
    invoke(args)
    assert (out / "checkpoint-0000002" / MANIFEST).is_file()
    weights = out / "checkpoint-0000002" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x04  # a bit of the last tensor's data: safetensors loads it without complaint
    weights.write_bytes(bytes(raw))
    text = invoke([*args, "--resume"], code=2)
    assert f"{out / 'checkpoint-0000002'}: model.safetensors does not match" in text
    assert f"the previous complete checkpoint, {out / 'checkpoint-0000001'}, is intact" in text
    assert "--resume-from-previous" in text
    text = invoke([*args, "--resume-from-previous"])
    assert f"resumed from {out / 'checkpoint-0000001'} at step 1" in text
    assert (out / "checkpoint-0000002.damaged").is_dir()  # set aside, never loaded, never deleted
    assert sorted(step_losses(out)) == [1, 2, 3]
    (latest_checkpoint(out) / MANIFEST).unlink()  # as saved by an older version
    with caplog.at_level(logging.INFO, logger="align"):
        invoke([*args, "--resume"])
    assert "has no manifest" in caplog.text


# ----------------------------------------------------------------------------- item 8: resume with changes


def test_recipe_changes_name_what_decides_the_data_order_or_the_update():
    """Issue 15 item 8: the comparison of a run's saved recipe with the new one (pure)."""
    saved = load_recipe(None, sets=["training.lr=1e-3", "data.train=a.jsonl"], stage="sft").to_dict()
    same_but_longer = load_recipe(
        None,
        sets=["training.lr=0.001", "data.train=a.jsonl", "training.max_steps=99", "training.save_every=5"],
        stage="sft",
    ).to_dict()
    assert recipe_changes(saved, same_but_longer, "sft") == {}
    other = load_recipe(
        None,
        sets=[
            "training.lr=5e-4",
            "data.train=b.jsonl",
            "training.seed=1",
            "training.grad_accum=2",
            "training.optimizer=adamw_8bit",
        ],
        stage="sft",
    ).to_dict()
    other["dpo"] = {"beta": 0.5}  # another stage's section (an older run's recipe.yaml): not compared
    changes = recipe_changes(saved, other, "sft")
    assert changes == {
        "data.train": ("a.jsonl", "b.jsonl"),
        "training.grad_accum": (1, 2),
        "training.lr": (1e-3, 5e-4),
        "training.optimizer": ("adamw", "adamw_8bit"),
        "training.seed": (42, 1),
    }
    assert list(refused_changes(changes)) == ["training.optimizer"]  # even with --resume-with-changes
    del saved["training"]["lr"]  # a key an older version did not record is not compared
    assert "training.lr" not in recipe_changes(saved, other, "sft")


def test_training_settings_reach_the_optimizer_after_its_state_is_restored():
    """Issue 15 item 8: a new lr (and betas, eps, weight decay) replaces the restored one in every
    parameter group and in the scheduler's base, at the schedule's current position."""
    model = torch.nn.Linear(4, 4)
    old = TrainingSection(lr=1e-3, scheduler="linear", warmup_steps=0)
    optimizer = build_optimizer(model, old)
    scheduler = build_scheduler(optimizer, old, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = optimizer.state_dict(), scheduler.state_dict()
    new = TrainingSection(lr=5e-4, scheduler="linear", warmup_steps=0, adam_eps=1e-6, weight_decay=0.1)
    optimizer, scheduler = build_optimizer(model, new), None
    scheduler = build_scheduler(optimizer, new, total_steps=10)
    optimizer.load_state_dict(state[0])
    scheduler.load_state_dict(state[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 / 10)  # what a resume restores
    apply_training_settings(optimizer, scheduler, new)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4 * 6 / 10] * 2)
    assert scheduler.get_last_lr() == pytest.approx([5e-4 * 6 / 10] * 2)
    assert [g["eps"] for g in optimizer.param_groups] == [1e-6, 1e-6]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # none on biases
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 5 / 10)


def test_resume_with_another_recipe_is_refused_unless_resume_with_changes_which_applies_and_records_it(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, caplog: pytest.LogCaptureFixture
):
    """Issue 15 item 8: --resume with another lr or other data content is refused naming the keys, before
    recipe.yaml is touched; --resume-with-changes uses the new lr from the next step and records it."""
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [json.loads(s) for s in (EXAMPLES / "alpaca.jsonl").read_text().splitlines()[:64]],
    )
    out = tmp_path / "run"
    args = sft_args(tiny_model, data, out, "training.save_every=1")
    invoke([*args, "--max-steps", "2"])
    longer = [*args, "--max-steps", "3"]  # a longer run is not a change of the data order or update
    text = invoke([*longer, "--set", "training.lr=1e-3", "--resume"], code=2)
    assert "training.lr (0.003 -> 0.001)" in text and "--resume-with-changes" in text
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["lr"] == 0.003
    rows = (EXAMPLES / "alpaca.jsonl").read_text().splitlines()
    data.write_text("".join(line + "\n" for line in rows[64:128]))  # same path, other content
    text = invoke([*longer, "--resume"], code=2)
    assert "data.train (content of" in text
    text = invoke([*longer, "--set", "training.optimizer=adamw_8bit", "--resume-with-changes"], code=2)
    assert "training.optimizer cannot change on resume" in text
    with caplog.at_level(logging.WARNING, logger="align"):
        invoke([*longer, "--set", "training.lr=1e-3", "--resume-with-changes"])
    assert "resumed with changes: training.lr (0.003 -> 0.001), data.train (content of" in caplog.text
    lr = {r["step"]: r["lr"] for r in metric_rows(out) if "lr" in r}
    assert lr[1] == pytest.approx(3e-3) and lr[2] == pytest.approx(1e-3) and lr[3] == pytest.approx(1e-3)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["lr"] == 0.001
    recorded = [json.loads(line) for line in (out / "resume_changes.jsonl").read_text().splitlines()]
    assert recorded[-1]["step"] == 1 and recorded[-1]["changes"]["training.lr"] == [0.003, 0.001]
