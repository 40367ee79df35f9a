"""Issue 15, second reliability pass: nothing outside a run is touched, interrupted pipelines and
rejection-sampling rounds resume, checkpoints and final models are published by rename, full disks and
read-only folders are one clear line, and concurrent runs never share a run folder or lose an update."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import align_cli.engine.checkpoint as checkpoint_module
import align_cli.engine.run as run_module
import align_cli.engine.session as session_module
import align_cli.stages.ppo as ppo_module
import align_cli.stages.rejection_sampling as rs_module
from align_cli.cli import app
from align_cli.engine.checkpoint import STATE_FILE, latest_checkpoint, save_checkpoint
from align_cli.engine.distributed import make_accelerator
from align_cli.engine.signals import StoppedBySignal
from align_cli.pipeline import _final_of, load_pipeline, run_pipeline
from align_cli.recipe import RecipeError, load_recipe
from align_cli.reference_cache import attach_reference_logps
from align_cli.runs import RunDirError, default_run_dir, prepare_run_dir, record_output, release_run_dirs
from tests.conftest import EXAMPLES
from tests.helpers import quiet_console, step_losses

runner = CliRunner()
TINY_SFT = ["training.max_steps=2", "training.micro_batch_size=8", "training.save_every=1"]


def sft_args(model: Path, out: Path, sets: list[str] = TINY_SFT) -> list[str]:
    args = ["sft", "-m", str(model), "-d", str(EXAMPLES / "alpaca.jsonl"), "-o", str(out)]
    return args + [item for s in sets for item in ("--set", s)]


def invoke(args: list[str]):
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    return result, " ".join(result.output.split())


def is_complete_final(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after the raise point runs, no `except Exception` sees it."""


# ----------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("name", ["../../../victim", "a/b", "..", ".", "x..y", "", "sp ace"])
def test_issue15_item1_stage_names_are_plain_names(name: str, tmp_path: Path):
    recipe = tmp_path / "pipeline.yaml"
    output = tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"output": str(output), "stages": [{"name": name, "stage": "sft"}]}))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.name"):
        load_pipeline(recipe)
    assert not output.exists()


def test_issue15_item1_overwrite_deletes_only_a_run_directory(tmp_path: Path):
    """A folder that holds no align run (no recipe.yaml) is never emptied by output.overwrite."""
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    with pytest.raises(RunDirError, match="not an align run"):
        prepare_run_dir(folder, resume=False, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "years of work"
    release_run_dirs()


# ----------------------------------------------------------------------------- item 2


def test_issue15_item2_an_interrupted_pipeline_stage_resumes_from_its_checkpoint(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    recipe = tmp_path / "pipeline.yaml"
    sets = [
        f"model.name_or_path={tiny_model}",
        f"data.train={EXAMPLES / 'alpaca.jsonl'}",
        "training.max_steps=4",
        "training.save_every=2",
        "training.micro_batch_size=8",
    ]
    stages = [{"name": "sft", "stage": "sft", "set": sets}]
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "stages": stages}))
    monkeypatch.setenv("ALIGN_FAULT", "sigterm:data=4")  # stops before step 4: checkpoint-3 is saved
    with pytest.raises(StoppedBySignal):
        run_pipeline(load_pipeline(recipe), quiet_console())
    run_dir = tmp_path / "out" / "01-sft"
    assert latest_checkpoint(run_dir).name == "checkpoint-0000003"
    monkeypatch.delenv("ALIGN_FAULT")
    console = quiet_console()
    finals = run_pipeline(load_pipeline(recipe), console)
    assert f"resumed from {run_dir / 'checkpoint-0000003'} at step 3" in " ".join(
        console.file.getvalue().split()
    )
    assert sorted(step_losses(run_dir)) == [1, 2, 3, 4] and finals["sft"] == run_dir / "final"


# ----------------------------------------------------------------------------- item 3


def test_issue15_item3_rejection_sampling_resumes_after_its_finished_rounds(
    review_models: dict, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "rs"
    overrides = {
        "model.name_or_path": str(review_models["sft"]),
        "rejection.reward_model": str(review_models["reward"]),
        "rejection.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(out),
    }
    sets = [
        "rejection.max_prompts=8",
        "rejection.n=2",
        "rejection.max_new_tokens=8",
        "rejection.rounds=2",
        "rejection.then=sft",
        "rejection.eval_n=1",
        "training.max_steps=1",
    ]
    real_round, sampled_from = rs_module.run_round, []

    def round_then_killed(round_dir, policy_dir, *args, **kwargs):
        if round_dir.name == "round-2":
            raise Killed
        return real_round(round_dir, policy_dir, *args, **kwargs)

    def recording_round(round_dir, policy_dir, *args, **kwargs):
        sampled_from.append((round_dir.name, policy_dir))
        return real_round(round_dir, policy_dir, *args, **kwargs)

    monkeypatch.setattr(rs_module, "run_round", round_then_killed)
    with pytest.raises(Killed):
        rs_module.run_rejection_sampling(load_recipe(None, overrides, sets, stage="rejection-sample"))
    first_final = out / "round-1" / "sft" / "final"
    assert is_complete_final(first_final)
    kept = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    monkeypatch.setattr(rs_module, "run_round", recording_round)
    recipe = load_recipe(None, overrides, sets, stage="rejection-sample")
    summary = rs_module.run_rejection_sampling(recipe, resume=True, console=quiet_console())
    assert sampled_from == [("round-2", str(first_final))]  # round 1 is not sampled again
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nor its files rewritten
    assert [r["policy_after"] for r in summary["rounds"]] == [
        str(first_final),
        str(out / "round-2/sft/final"),
    ]


def test_issue15_item3_overwrite_names_the_finished_rounds_it_deletes(tmp_path: Path, caplog):
    run = tmp_path / "rs"
    (run / "round-1").mkdir(parents=True)
    (run / "recipe.yaml").write_text("stage: rejection-sample\n")
    (run / "round-1" / "best.jsonl").write_text("{}\n")
    with caplog.at_level(logging.WARNING, logger="align"):
        prepare_run_dir(run, resume=False, overwrite=True)
    assert f"output.overwrite: deleting the previous run in {run}" in caplog.text and "round-1" in caplog.text
    assert not (run / "round-1").exists()
    release_run_dirs()


# ----------------------------------------------------------------------------- item 5


def test_issue15_item5_resaving_a_step_renames_the_new_checkpoint_in_before_deleting_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    accelerator = make_accelerator("fp32")
    accelerator.prepare(torch.nn.Linear(4, 4))
    save_checkpoint(accelerator, tmp_path, 2, {"pending_eval": False}, keep_last=1)
    real_replace = os.replace

    def killed_before_the_new_one_is_renamed_in(src, dst):
        if str(src).endswith(".tmp"):
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed_before_the_new_one_is_renamed_in)
    with pytest.raises(Killed):
        save_checkpoint(accelerator, tmp_path, 2, {"pending_eval": True}, keep_last=1)
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    survivor = latest_checkpoint(tmp_path)
    assert survivor is not None and json.loads((survivor / STATE_FILE).read_text())["step"] == 2
    save_checkpoint(accelerator, tmp_path, 4, {}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000004"]


# ----------------------------------------------------------------------------- item 10


def test_issue15_item10_a_stage_whose_final_is_incomplete_is_not_finished(tmp_path: Path):
    final = tmp_path / "final"
    (tmp_path / "summary.json").write_text(json.dumps({"final_model": str(final)}))
    (tmp_path / "final.tmp").mkdir()  # written, never renamed in
    assert _final_of(tmp_path) is None
    final.mkdir()
    (final / "config.json").write_text("{}")
    assert _final_of(tmp_path) is None  # no weights
    (final / "model.safetensors").write_bytes(b"weights")
    assert _final_of(tmp_path) == final
    (final / "config.json").unlink()
    assert _final_of(tmp_path) is None  # no config
    (tmp_path / "summary.json").write_text('{"final_mod')  # cut by a kill
    assert _final_of(tmp_path) is None


# ----------------------------------------------------------------------------- item 12


def test_issue15_item12_a_signal_during_the_final_save_finishes_it_then_stops(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_save = session_module.save_model

    def save_then_sigint(model, tokenizer, out_dir, state_dict=None):
        real_save(model, tokenizer, out_dir, state_dict=state_dict)
        assert Path(out_dir).name != "final"  # written aside, renamed in once complete
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(session_module, "save_model", save_then_sigint)
    out = tmp_path / "run"
    result, text = invoke(sft_args(tiny_model, out))
    assert result.exit_code == 0, result.output
    assert "stopped by SIGINT during the final save at step 2" in text
    assert f"the final model is complete: {out / 'final'}" in text
    assert is_complete_final(out / "final") and not list(out.glob("final.*"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_issue15_item12_ppo_saves_its_final_models_aside_and_a_signal_lets_them_finish(
    review_models: dict, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_save = ppo_module.save_model

    def save_then_sigterm(model, tokenizer, out_dir, state_dict=None):
        real_save(model, tokenizer, out_dir, state_dict=state_dict)
        assert Path(out_dir).name == "final.tmp"
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler only sets a flag

    monkeypatch.setattr(ppo_module, "save_model", save_then_sigterm)
    out = tmp_path / "ppo"
    args = ["ppo", "-m", str(review_models["sft"]), "--reward-model", str(review_models["reward"])]
    args += ["--prompts", str(EXAMPLES / "prompts.jsonl"), "-o", str(out), "--max-steps", "1"]
    sets = ["ppo.rollout_batch_size=2", "ppo.mini_batch_size=2", "ppo.max_new_tokens=4"]
    result, text = invoke(
        args + [item for s in [*sets, "ppo.value_model=policy_head"] for item in ("--set", s)]
    )
    assert result.exit_code == 0, result.output
    assert "ppo: stopped by SIGTERM during the final save at step 1" in text
    assert is_complete_final(out / "final") and (out / "final-value" / "value_head.pt").is_file()
    assert sorted(p.name for p in out.glob("final*")) == ["final", "final-value"]


# ----------------------------------------------------------------------------- item 13


def test_issue15_item13_a_full_disk_during_the_final_save_is_one_line_naming_what_was_kept(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    def disk_full(model, tokenizer, out_dir, state_dict=None):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(session_module, "save_model", disk_full)
    out = tmp_path / "run"
    result, text = invoke(sft_args(tiny_model, out))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"saving the final model to {out / 'final'} failed: No space left on device" in text
    assert f"kept: {out / 'checkpoint-0000001'}" in text
    assert not (out / "final").exists() and not list(out.glob("final.*"))


def test_issue15_item13_bookkeeping_after_the_final_save_only_warns(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    for name in ("write_summary", "record_output", "plot_metrics"):  # the run's end: engine/run.py
        monkeypatch.setattr(run_module, name, read_only)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="align"):
        result, text = invoke(sft_args(tiny_model, out))
    assert result.exit_code == 0, result.output
    assert is_complete_final(out / "final")
    for what in ("summary.json", "metrics.png", "latest.json"):
        assert f"could not write {what}" in caplog.text, caplog.text
    assert (
        "Read-only file system" in caplog.text
        and f"the final model in {out / 'final'} is complete" in caplog.text
    )


def test_issue15_item13_an_unwritable_run_folder_or_runs_root_is_one_line(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(
        RunDirError, match=f"cannot create the run folder {blocker / 'run'}: .*nothing was written"
    ):
        prepare_run_dir(blocker / "run", resume=False, overwrite=False)
    monkeypatch.setenv("ALIGN_RUNS_DIR", str(blocker / "runs"))
    no_out = ["sft", "-m", str(tiny_model), "-d", str(EXAMPLES / "alpaca.jsonl"), "--max-steps", "1"]
    result, text = invoke(no_out)  # the default run folder, under the runs root
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"cannot create the run folder {blocker / 'runs' / 'sft'}" in text


def test_issue15_item13_a_reference_cache_that_cannot_be_written_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(blocker / "cache"))
    examples = [{"prompt_ids": [1, 2], "responses": [[3], [4]]}]
    with caplog.at_level(logging.WARNING, logger="align"):
        info = attach_reference_logps(examples, {"model": "m"}, lambda: [[-1.0, -2.0]])
    assert examples[0]["ref_logps"] == [-1.0, -2.0] and info["hit"] is False
    assert f"cannot write the reference cache {blocker / 'cache'}" in caplog.text
    assert "used for this run, not cached" in caplog.text


# ----------------------------------------------------------------------------- item 15


def _record_many(root: str, worker: int) -> None:
    os.environ["ALIGN_RUNS_DIR"] = root
    for i in range(25):
        record_output(f"stage-{worker}-{i}", Path(root))


def test_issue15_item15_concurrent_latest_json_updates_are_all_kept(tmp_path: Path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(str(tmp_path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    known = json.loads((tmp_path / "latest.json").read_text())
    assert len(known) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latest.lock", "latest.json"]  # no temp left


def test_issue15_item15_default_run_folders_never_collide(runs_dir: Path):
    assert len({default_run_dir("sft") for _ in range(20)}) == 20


def _hold_run_dir(run: str, ready) -> None:
    prepare_run_dir(Path(run), resume=False, overwrite=False)
    ready.send("locked")
    signal.pause()


def test_issue15_item15_a_second_process_on_a_run_folder_is_refused_and_kill_9_leaves_no_stale_lock(
    tmp_path: Path,
):
    run = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    mine, theirs = context.Pipe()
    owner = context.Process(target=_hold_run_dir, args=(str(run), theirs))
    owner.start()
    try:
        assert mine.poll(30) and mine.recv() == "locked"
        (run / "recipe.yaml").write_text("stage: sft\n")
        (run / "checkpoint-0000001").mkdir()
        (run / "checkpoint-0000001" / STATE_FILE).write_text('{"step": 1}')
        with pytest.raises(
            RunDirError, match=f"{run} is in use by another align process \\(pid {owner.pid}\\)"
        ):
            prepare_run_dir(run, resume=False, overwrite=True)
        assert (run / "checkpoint-0000001").is_dir()  # the other run's files are untouched
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(30)
    prepare_run_dir(run, resume=True, overwrite=False)  # the kernel dropped the killed owner's lock
    release_run_dirs()
