"""Experiment trackers (training.report_to) through accelerate: what each one writes is read back with
the tracker's own reader and matches metrics.jsonl; a missing package fails before anything loads."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.engine.tracking import TrackingError, flat_config
from align_cli.recipe import RecipeError, load_recipe
from align_cli.stages import STAGES
from align_cli.stages.grpo import run_grpo
from align_cli.stages.rejection_sampling import run_rejection_sampling
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import make_recipe, metric_rows, quiet_console

SHORT = ["training.max_steps=4", "training.micro_batch_size=8", "training.save_every=0"]
WITH_EVAL = ["data.eval_fraction=0.1", "training.eval_every=3", "training.log_every=2"]


def sft(tiny_model: Path, out: Path, *sets: str) -> Path:
    recipe = make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, [*SHORT, *sets])
    run_sft(recipe, console=quiet_console())
    return out


def logged_steps(run_dir: Path) -> dict[str, list[int]]:
    """metrics.jsonl as {metric: [steps it was logged at]} (numbers only, as the trackers get them)."""
    steps: dict[str, list[int]] = {}
    for row in metric_rows(run_dir):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.setdefault(key, []).append(row["step"])
    return steps


def test_tensorboard_events_hold_every_metric_at_its_step(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    pytest.importorskip("tensorboard", reason="the tracking extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sft(tiny_model, tmp_path / "run", *WITH_EVAL, "training.report_to=tensorboard")
    events = EventAccumulator(str(run / "tracking" / "align"))
    events.Reload()
    found = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = logged_steps(run)
    assert "eval/loss" in expected and "loss" in expected
    assert found == expected


def test_a_resumed_run_leaves_tensorboard_one_event_per_step(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    pytest.importorskip("tensorboard", reason="the tracking extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, data = tmp_path / "run", EXAMPLES / "alpaca.jsonl"
    sets = ["training.max_steps=6", "training.save_every=2", "training.report_to=tensorboard"]
    command = [
        sys.executable,
        "-m",
        "align_cli.cli",
        "sft",
        "-m",
        str(tiny_model),
        "-d",
        str(data),
        "-o",
        str(run),
    ]
    # killed in step 4: steps 1-3 logged, the checkpoint at 2; the resumed run redoes step 3
    env = os.environ | {"ALIGN_FAULT": "kill:step=4", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(command + [a for x in sets for a in ("--set", x)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL and [r["step"] for r in metric_rows(run)] == [1, 2, 3]
    run_sft(make_recipe("sft", tiny_model, data, run, sets), resume=True, console=quiet_console())
    events = EventAccumulator(str(run / "tracking" / "align"))
    events.Reload()
    logged = {r["step"]: r["loss"] for r in metric_rows(run)}
    assert {e.step: pytest.approx(e.value) for e in events.Scalars("loss")} == logged
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (run-ID.wandb): LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: checksum, length, type) after W&B's own 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, record, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(record))
    return out


def test_wandb_offline_writes_its_run_with_the_recipe(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("wandb", reason="the tracking extra (wandb) is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = sft(tiny_model, tmp_path / "run", "training.report_to=wandb", "training.run_name=tiny-sft")
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (started.display_name, started.project) == ("tiny-sft", "align")
    config = {
        i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update
    }
    assert config["training.max_steps"] == 4 and config["model.name_or_path"] == str(tiny_model)
    history = [r.history for r in records if r.HasField("history")]
    losses = {h.step.num: i.value_json for h in history for i in h.item if list(i.nested_key) == ["loss"]}
    assert sorted(losses) == logged_steps(run)["loss"] == [1, 2, 3, 4]
    assert not (run / "tracking" / "wandb").exists()  # WANDB_DIR wins over the run folder


def test_mlflow_file_store_holds_the_metrics_and_the_recipe(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # align allows the file store itself
    run = sft(tiny_model, tmp_path / "run", *WITH_EVAL, "training.report_to=mlflow", "training.project=p")
    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("p").experiment_id])
    assert found.info.run_name == "run"  # the run folder's name
    assert found.data.params["training.max_steps"] == "4"
    for key, steps in logged_steps(run).items():
        assert [m.step for m in client.get_metric_history(found.info.run_id, key)] == steps, key


def test_grpo_logs_its_samples_as_text_in_tensorboard(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    pytest.importorskip("tensorboard", reason="the tracking extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reward = tmp_path / "length.py"
    reward.write_text(
        "def length(prompts, completions, **columns):\n    return [len(c) / 10 for c in completions]\n"
    )
    overrides = {
        "model.name_or_path": str(tiny_model),
        "grpo.prompts": str(EXAMPLES / "prompts.jsonl"),
        "output.dir": str(tmp_path / "run"),
    }
    sets = [
        f"grpo.reward_functions=[{reward}:length]",
        "grpo.max_new_tokens=6",
        "grpo.prompts_per_iteration=2",
        "grpo.num_generations=2",
        "grpo.mini_batch_size=4",
        "grpo.log_samples=3",
        "training.max_steps=2",
        "training.save_every=0",
        "training.report_to=tensorboard",
    ]
    recipe = load_recipe(ROOT / "recipes" / "grpo-tiny.yaml", overrides, sets)
    console = quiet_console()  # not a terminal: a plain line per iteration, with the stage's figures
    run_grpo(recipe, console=console)
    lines = [line for line in console.file.getvalue().splitlines() if line.startswith("iteration ")]
    assert [line.split("  ")[0] for line in lines] == ["iteration 1/2", "iteration 2/2"]
    assert all(re.match(r"iteration \d/2  reward [-\d.]+  kl [-\d.e]+  lr [\d.e+-]+  eta ", x) for x in lines)
    events = EventAccumulator(str(tmp_path / "run" / "tracking" / "align"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert "| iteration | prompt | response | reward |" in table
    assert "reward/mean" in events.Tags()["scalars"]


def test_rejection_sampling_rounds_and_their_sft_are_separate_mlflow_runs(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reward = tmp_path / "length.py"
    reward.write_text(
        "def length(prompts, completions, **columns):\n    return [len(c) / 10 for c in completions]\n"
    )
    overrides = {"model.name_or_path": str(tiny_model), "output.dir": str(tmp_path / "bon")}
    sets = [
        f"rejection.prompts={EXAMPLES / 'prompts.jsonl'}",
        f"rejection.reward_functions=[{reward}:length]",
        "rejection.n=2",
        "rejection.max_prompts=4",
        "rejection.max_new_tokens=6",
        "rejection.eval_n=1",
        "rejection.then=sft",
        "training.max_steps=2",
        "training.save_every=0",
        "training.report_to=mlflow",
    ]
    run_rejection_sampling(load_recipe(None, overrides, sets, "rejection-sample"), console=quiet_console())
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("align").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["bon", "bon-round-1-sft"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert [m.step for m in client.get_metric_history(by_name["bon"].info.run_id, "mean_reward")] == [1]
    assert [m.step for m in client.get_metric_history(by_name["bon-round-1-sft"].info.run_id, "loss")] == [
        1,
        2,
    ]


def test_the_recipe_is_flattened_for_the_trackers():
    flat = flat_config({"training": {"lr": 1e-5, "adam_betas": [0.9, 0.95]}, "data": {"columns": {}}})
    assert flat == {"training.lr": 1e-5, "training.adam_betas": "[0.9, 0.95]", "data.columns": "{}"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_missing_tracker_package_is_one_line_naming_the_extra_before_any_model_loads(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    # nothing here exists: whatever loaded first (tokenizer, data, model) would fail with another error
    recipe = make_recipe(stage, tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "run")
    recipe.training.report_to = ["tensorboard", "wandb"]
    with pytest.raises(TrackingError) as caught:
        STAGES[stage].load().run(recipe, console=quiet_console())
    assert "\n" not in str(caught.value)
    assert "wandb is not installed; pip install 'align-cli[tracking]'" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_the_cli_prints_the_missing_tracker_as_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a)
    )
    result = CliRunner().invoke(
        app,
        ["sft", "-m", str(tmp_path / "none"), "-d", "x.jsonl", "--set", "training.report_to=trackio"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'align-cli[trackio]'" in lines[0], result.output


def test_report_to_names_known_trackers_only():
    with pytest.raises(
        RecipeError, match="training.report_to: 'tensorbored' is not one of none, tensorboard"
    ):
        load_recipe(None, sets=["training.report_to=tensorbored"], stage="sft")
    with pytest.raises(RecipeError, match="none cannot be listed with a tracker"):
        load_recipe(None, sets=["training.report_to=[none, wandb]"], stage="sft")
    assert load_recipe(None, sets=["training.report_to=[wandb, mlflow]"], stage="ppo").training.report_to
