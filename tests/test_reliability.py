"""Faults: kill -9 at a step, an evaluation or a checkpoint save (sft, reward, dpo, ppo), SIGTERM/SIGINT,
NaN/inf losses and gradients, a disk that fills up during a save, and unsafe model or trainer-state
files. Each killed or stopped run resumes to exactly the uninterrupted run's per-step losses and weights.

Kill points come from the engine's test hook ALIGN_FAULT (align_cli/engine/faults.py) so they are exact;
the CLI runs in a subprocess for SIGKILL and for a real external SIGTERM, in-process otherwise."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import align_cli.losses as losses_module
import align_cli.stages.sft as sft_stage
from align_cli.cli import app
from align_cli.engine import run as run_module
from align_cli.engine.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint, write_manifest
from align_cli.models import ModelError, load_causal_lm, load_reward_model
from align_cli.recipe import ModelSection, load_recipe
from align_cli.stages.dpo import run_dpo
from align_cli.stages.reward import run_reward
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import make_recipe, metric_rows, quiet_console, step_losses, weights

runner = CliRunner()
SFT_SETS = [
    "training.max_steps=8",
    "training.save_every=2",
    "training.keep_last=3",
    "training.lr=3e-3",
    "training.micro_batch_size=8",
    "data.eval_fraction=0.05",
    "training.eval_every=3",
]
PAIR_SETS = [*SFT_SETS[:5], "data.eval_fraction=0.1", "training.eval_every=3", "training.max_steps=6"]
PPO_SETS = [
    "training.max_steps=4",
    "training.save_every=2",
    "training.keep_last=5",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batch_size=2",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=8",
    "ppo.value_model=policy_head",
    "ppo.log_samples=2",
]


def cli_args(stage: str, model: Path, data: Path, out: Path, sets: list[str]) -> list[str]:
    args = [stage, "-m", str(model), "-d", str(data), "-o", str(out)]
    return args + [item for s in sets for item in ("--set", s)]


def ppo_args(models: dict, out: Path, sets: list[str]) -> list[str]:
    args = ["ppo", "-m", str(models["sft"]), "--reward-model", str(models["reward"])]
    args += ["--prompts", str(EXAMPLES / "prompts.jsonl"), "-o", str(out)]
    return args + [item for s in sets for item in ("--set", s)]


def align_subprocess(args: list[str], cwd: Path, fault: str | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ, ALIGN_FAULT=fault or "", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        [sys.executable, "-m", "align_cli.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def killed(args: list[str], cwd: Path, fault: str) -> None:
    """Run the CLI until the fault kills it with SIGKILL."""
    proc = align_subprocess(args, cwd, fault)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, output


def invoke(args: list[str], fault: str | None = None) -> str:
    env = {"COLUMNS": "250", "ALIGN_FAULT": fault or ""}
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def eval_rows(run_dir: Path) -> dict[tuple, float]:
    return {
        (r["step"], bool(r.get("final"))): r["eval/loss"] for r in metric_rows(run_dir) if "eval/loss" in r
    }


def assert_same_run(straight: Path, resumed: Path, weights_dir: str = "final") -> None:
    """Per-step losses, evaluations and final weights of a resumed run equal the uninterrupted run's."""
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(b) == sorted(a) and b == pytest.approx(a, rel=0, abs=1e-6)
    assert eval_rows(resumed) == pytest.approx(eval_rows(straight), rel=0, abs=1e-6)
    steps = [r["step"] for r in metric_rows(resumed) if "loss" in r]
    assert steps == sorted(set(steps))  # every step logged once, in order
    wa, wb = weights(straight / weights_dir), weights(resumed / weights_dir)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


def partial_saves(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint-*.tmp"))


@pytest.fixture(scope="module")
def straight(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted reference runs, in-process, with their own runs/ registry (and DPO reference cache)."""
    root = tmp_path_factory.mktemp("straight")
    previous = os.environ["ALIGN_RUNS_DIR"]
    os.environ["ALIGN_RUNS_DIR"] = str(root / "runs")
    try:
        prefs = EXAMPLES / "prefs.jsonl"
        run_sft(
            make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", root / "sft", SFT_SETS),
            console=quiet_console(),
        )
        run_reward(
            make_recipe("reward", tiny_model, prefs, root / "reward", PAIR_SETS), console=quiet_console()
        )
        run_dpo(make_recipe("dpo", tiny_model, prefs, root / "dpo", PAIR_SETS), console=quiet_console())
    finally:
        os.environ["ALIGN_RUNS_DIR"] = previous
    return {"sft": root / "sft", "reward": root / "reward", "dpo": root / "dpo", "runs": root / "runs"}


# ----------------------------------------------------------------------------- kill -9


def test_sft_killed_during_a_step_resumes_exactly(
    straight: dict, tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    out = tmp_path / "run"
    args = cli_args("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, SFT_SETS)
    killed(args, tmp_path, "kill:step=5")  # in step 5's backward pass, after checkpoint-4
    assert latest_checkpoint(out).name == "checkpoint-0000004"
    assert max(step_losses(out)) == 4  # rows up to the last completed step
    text = invoke([*args, "--resume"])
    assert f"resumed from {out / 'checkpoint-0000004'} at step 4" in text
    assert_same_run(straight["sft"], out)


def test_reward_killed_during_evaluation_resumes_exactly(
    straight: dict, tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    out = tmp_path / "run"
    args = cli_args("reward", tiny_model, EXAMPLES / "prefs.jsonl", out, PAIR_SETS)
    killed(args, tmp_path, "kill:eval=3")  # after the first eval batch at step 3; checkpoint-2 is complete
    assert latest_checkpoint(out).name == "checkpoint-0000002"
    invoke([*args, "--resume"])
    assert_same_run(straight["reward"], out)


def test_dpo_killed_during_a_checkpoint_save_resumes_exactly(
    straight: dict, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("ALIGN_RUNS_DIR", str(straight["runs"]))  # its reference cache is reused (a hit)
    out = tmp_path / "run"
    args = cli_args("dpo", tiny_model, EXAMPLES / "prefs.jsonl", out, PAIR_SETS)
    killed(args, tmp_path, "kill:save=4")  # the files of checkpoint 4 are half written
    assert [p.name for p in partial_saves(out)] == ["checkpoint-0000004.tmp"]
    assert not (out / "checkpoint-0000004.tmp" / STATE_FILE).exists()
    assert latest_checkpoint(out).name == "checkpoint-0000002"  # the partial one is never picked
    text = invoke([*args, "--resume"])
    assert f"resumed from {out / 'checkpoint-0000002'} at step 2" in text
    assert not partial_saves(out)  # removed by the next save
    assert_same_run(straight["dpo"], out)


def test_ppo_killed_mid_update_then_stopped_by_sigterm_resumes_exactly(
    review_models: dict, tmp_path: Path, runs_dir: Path
):
    reference = tmp_path / "straight"
    invoke(ppo_args(review_models, reference, PPO_SETS))
    out = tmp_path / "run"
    args = ppo_args(review_models, out, PPO_SETS)
    killed(args, tmp_path, "kill:step=3")  # iteration 3, after the first backward, before its update
    assert latest_checkpoint(out).name == "checkpoint-0000002"
    text = invoke([*args, "--resume"], fault="sigterm:step=3")  # the handler only sets a flag
    assert "stopped by SIGTERM at step 3" in text and "resume with: align ppo --recipe" in text
    assert latest_checkpoint(out).name == "checkpoint-0000003"  # iteration 3 finished, then saved
    invoke([*args, "--resume"])
    a, b = metric_rows(reference), metric_rows(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("score/mean", "objective/kl", "loss/policy", "loss/value"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    samples = [json.loads(line)["iteration"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples == [i for i in range(1, 5) for _ in range(2)]  # rows of redone iterations not doubled
    wa, wb = weights(reference / "final"), weights(out / "final")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


def test_signals_save_at_the_next_safe_point_and_exit_zero_with_the_resume_command(
    straight: dict, tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    out = tmp_path / "run"
    args = cli_args("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, SFT_SETS)
    # SIGTERM while step 5's batches are being loaded: stops before step 5 computes; checkpoint-4 exists
    text = invoke(args, fault="sigterm:data=5")
    resume = f"align sft --recipe {out / 'recipe.yaml'} --out {out} --resume"
    assert f"stopped by signal; resume with: {resume}" in text
    assert latest_checkpoint(out).name == "checkpoint-0000004"
    assert max(step_losses(out)) == 4
    # SIGINT during the evaluation at step 6: stops after that eval batch, the eval reruns on resume
    text = invoke(shlex.split(resume)[1:], fault="sigint:eval=6")
    assert "stopped by SIGINT at step 6" in text
    state = json.loads((latest_checkpoint(out) / STATE_FILE).read_text())
    assert state["step"] == 6 and state["pending_eval"] is True
    invoke(shlex.split(resume)[1:])  # the printed command, verbatim
    assert_same_run(straight["sft"], out)


def test_external_sigterm_stops_within_a_step_and_exits_zero(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    out = tmp_path / "run"
    sets = ["training.max_steps=2000", "training.micro_batch_size=8", "training.log_every=1"]
    proc = align_subprocess(cli_args("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, sets), tmp_path)
    deadline = time.monotonic() + 180
    while logged_steps(out) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    logged = logged_steps(out)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert time.monotonic() - sent < 30  # one step plus a checkpoint of the tiny model
    flat = " ".join(output.split())
    assert "stopped by signal; resume with: align sft --recipe" in flat
    step = json.loads((latest_checkpoint(out) / STATE_FILE).read_text())["step"]
    assert logged <= step <= logged + 20  # a few more steps ran while the signal was delivered, no more
    assert max(step_losses(out)) == step


def logged_steps(run_dir: Path) -> int:
    """Complete rows in metrics.jsonl while another process is still appending to it."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return text.count("\n")


# ----------------------------------------------------------------------------- NaN / inf


class NanGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poisoned_sft_loss(bad: dict[int, str]):
    """sft_loss with a NaN loss ("loss") or NaN gradients ("grad") at the given training steps."""
    real, calls = sft_stage.sft_loss, {"n": 0}

    def loss_fn(model, batch):
        loss, metrics = real(model, batch)
        if not torch.is_grad_enabled():  # evaluation
            return loss, metrics
        calls["n"] += 1
        kind = bad.get(calls["n"])
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":
            loss = NanGradient.apply(loss)
        return loss, metrics

    return loss_fn


def test_a_nan_loss_stops_with_a_clear_error_and_the_last_good_checkpoint_resumes(
    straight: dict, tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    out, real_loss = tmp_path / "run", sft_stage.sft_loss
    args = cli_args("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, SFT_SETS)
    monkeypatch.setattr(sft_stage, "sft_loss", poisoned_sft_loss({5: "loss"}))
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "step 5: non-finite loss (loss=nan" in flat and "the update was not applied" in flat
    assert f"the last good checkpoint, {out / 'checkpoint-0000004'}, is kept" in flat
    assert not (out / "final").exists()
    monkeypatch.setattr(sft_stage, "sft_loss", real_loss)
    invoke([*args, "--resume"])
    assert_same_run(straight["sft"], out)
    # a NaN gradient with a finite loss is caught too, before any checkpoint exists
    monkeypatch.setattr(sft_stage, "sft_loss", poisoned_sft_loss({1: "grad"}))
    result = runner.invoke(
        app, cli_args("sft", tiny_model, EXAMPLES / "alpaca.jsonl", tmp_path / "g", SFT_SETS)
    )
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "step 1: non-finite gradient norm" in flat
    assert "no checkpoint was saved before it" in flat


def test_nan_policy_skip_drops_the_update_and_counts_it(
    tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "run"
    sets = [
        "training.max_steps=6",
        "training.lr=3e-3",
        "training.micro_batch_size=8",
        "training.nan_policy=skip",
    ]
    monkeypatch.setattr(sft_stage, "sft_loss", poisoned_sft_loss({3: "loss", 5: "grad"}))
    console = quiet_console()
    summary = run_sft(make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, sets), console=console)
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    rows = {r["step"]: r for r in metric_rows(out)}
    assert rows[3]["skipped"] == 1 and rows[5]["skipped"] == 1 and rows[6]["skipped_steps"] == 2
    assert "loss" not in rows[3] and all(rows[s]["loss"] == rows[s]["loss"] for s in (1, 2, 4, 6))
    assert "skipped_steps" in (out / "metrics.csv").read_text().splitlines()[0]
    assert all(torch.isfinite(w).all() for w in weights(out / "final").values())
    assert "skipped steps (non-finite) │ 2" in " ".join(console.file.getvalue().split())


def test_ppo_nan_stops_or_is_skipped(review_models: dict, tmp_path: Path, runs_dir: Path, monkeypatch):
    real, calls = losses_module.ppo_policy_loss, {"n": 0}

    def nan_on_second_update(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), stats

    monkeypatch.setattr(losses_module, "ppo_policy_loss", nan_on_second_update)
    sets = ["training.max_steps=2", "ppo.rollout_batch_size=2", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1"]
    sets += ["ppo.max_new_tokens=4", "ppo.value_model=policy_head"]
    result = runner.invoke(app, ppo_args(review_models, tmp_path / "stop", sets), env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "ppo iteration 2: non-finite loss" in " ".join(result.output.split())
    calls["n"] = 0
    text = invoke(ppo_args(review_models, tmp_path / "skip", [*sets, "training.nan_policy=skip"]))
    assert "skipped updates (non-finite) │ 1" in text
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and metric_rows(tmp_path / "skip")[-1]["skipped_steps"] == 1


# ----------------------------------------------------------------------------- disk full


def test_disk_full_during_a_save_is_a_clear_error_and_the_previous_checkpoint_resumes(
    straight: dict, tiny_model: Path, tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    real_save = run_module.save_checkpoint

    def save_on_a_full_disk(accelerator, run_dir, step, state, keep_last, *rest):
        if step != 4:
            return real_save(accelerator, run_dir, step, state, keep_last, *rest)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # writes past 64 KB fail (EFBIG)
        try:
            return real_save(accelerator, run_dir, step, state, keep_last, *rest)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(run_module, "save_checkpoint", save_on_a_full_disk)
    out = tmp_path / "run"
    args = cli_args("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, SFT_SETS)
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "saving checkpoint at step 4 failed" in flat and "File too large" in flat
    assert f"the previous one, {out / 'checkpoint-0000002'}, is intact" in flat
    assert not partial_saves(out) and latest_checkpoint(out).name == "checkpoint-0000002"
    monkeypatch.setattr(run_module, "save_checkpoint", real_save)
    invoke([*args, "--resume"])
    assert_same_run(straight["sft"], out)


# ----------------------------------------------------------------------------- security


class RunsCode:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_trainer_state_is_loaded_with_weights_only(
    victim: str, straight: dict, tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    shutil.copytree(straight["sft"] / "checkpoint-0000004", out / "checkpoint-0000004")
    torch.save(RunsCode(marker), out / "checkpoint-0000004" / victim)
    write_manifest(out / "checkpoint-0000004")  # a forger rewrites the manifest too: the pickle still fails
    # accelerate alone would skip an unreadable RNG file with a log line; here it is an error
    with pytest.raises(CheckpointError, match="cannot be loaded.*weights_only=True"):
        recipe = make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", out, SFT_SETS)
        run_sft(recipe, resume=True, console=quiet_console())
    assert not marker.exists()


def test_weights_load_only_from_safetensors_and_remote_code_stays_off(tiny_model: Path, tmp_path: Path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    for load in (load_causal_lm, lambda section: load_reward_model(section, 0)):
        with pytest.raises(ModelError, match="align loads weights only from safetensors"):
            load(ModelSection(name_or_path=str(pickled)))

    remote, marker = tmp_path / "remote", tmp_path / "remote-code-ran"
    shutil.copytree(tiny_model, remote)
    config = json.loads((remote / "config.json").read_text())
    config |= {"model_type": "custom_llama", "auto_map": {"AutoConfig": "custom.Config"}}
    config["auto_map"]["AutoModelForCausalLM"] = "custom.Model"
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig as Config, LlamaForCausalLM as Model\n"
    )
    assert load_recipe(None, {}, []).model.trust_remote_code is False
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_causal_lm(ModelSection(name_or_path=str(remote)))
    assert not marker.exists()


def test_every_shipped_recipe_keeps_remote_code_off():
    for path in (ROOT / "recipes").glob("*.yaml"):
        assert load_recipe(path).model.trust_remote_code is False, path


# ----------------------------------------------------------------------------- small pieces


def test_the_signal_handler_only_sets_a_flag_and_is_restored():
    from align_cli.engine.signals import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: no exception, a flag
        assert flag.requested and flag.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal stops waiting for the safe point
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path: Path):
    from align_cli.engine.metrics import MetricsLog

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    log = MetricsLog(tmp_path, resume_step=2)
    assert [r["step"] for r in log.rows] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_the_reliability_table_names_tests_that_exist():
    import re

    table = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", table))
    source = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert len(named) >= 15 and all(f"def {name}(" in source for name in named)
