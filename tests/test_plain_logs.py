"""Logs outside a terminal (SLURM, `> train.log`): one plain line per logged step and per evaluation,
and metrics.jsonl / metrics.csv written as each row comes, so a kill -9 loses no logged row."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from align_cli.engine.metrics import MetricsLog, read_rows
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import make_recipe

LINE = re.compile(r"^step (\d+)/6  loss [\d.]+  lr \d\.\de[-+]\d\d  tok/s \d+  eta \d+:\d\d:\d\d$")


def align(*args: str) -> list[str]:
    return [sys.executable, "-m", "align_cli.cli", *args]


def env(tmp: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "ALIGN_RUNS_DIR": str(tmp / "runs"), "OMP_NUM_THREADS": "1"}


def csv_steps(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def test_stdout_to_a_file_gets_a_line_per_logged_step_and_per_eval(tiny_model: Path, tmp_path: Path):
    sets = ["training.max_steps=6", "training.log_every=2", "training.eval_every=4", "data.eval_fraction=0.1"]
    sets += ["training.micro_batch_size=8", "training.save_every=0"]
    command = align(
        "sft", "-m", str(tiny_model), "-d", str(EXAMPLES / "alpaca.jsonl"), "-o", str(tmp_path / "r")
    )
    with (tmp_path / "train.log").open("w") as log:
        subprocess.run(
            command + [a for s in sets for a in ("--set", s)], stdout=log, env=env(tmp_path), check=True
        )
    lines = (tmp_path / "train.log").read_text().splitlines()
    steps = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert steps == [2, 4, 6], lines
    assert [line.split("  ")[0] for line in lines if "eval step" in line] == [
        "eval step 4",
        "final eval step 6",
    ]
    assert not any(line.startswith("sft ") for line in lines)  # no progress bar as well


def test_a_terminal_keeps_the_progress_bar_without_plain_lines(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    out = io.StringIO()
    sets = ["training.max_steps=2", "training.micro_batch_size=8", "training.save_every=0"]
    recipe = make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", tmp_path / "run", sets)
    run_sft(recipe, console=Console(file=out, force_terminal=True, width=120))
    assert "2/2" in out.getvalue() and not re.search(r"^step \d", out.getvalue(), re.M)


def test_a_kill_9_leaves_every_logged_row_in_metrics_csv(tiny_model: Path, tmp_path: Path):
    run = tmp_path / "r"
    sets = ["training.max_steps=2000", "training.micro_batch_size=2", "training.save_every=0"]
    command = align("sft", "-m", str(tiny_model), "-d", str(EXAMPLES / "alpaca.jsonl"), "-o", str(run))
    process = subprocess.Popen(
        command + [a for s in sets for a in ("--set", s)], stdout=subprocess.DEVNULL, env=env(tmp_path)
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (run / "metrics.jsonl").exists() and len(read_rows(run / "metrics.jsonl")) >= 5:
                break
            time.sleep(0.05)
        seen = [r["step"] for r in read_rows(run / "metrics.jsonl")]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(seen) >= 5 and process.returncode == -signal.SIGKILL
    logged = [r["step"] for r in read_rows(run / "metrics.jsonl")]
    in_csv = csv_steps(run)
    assert in_csv[: len(seen)] == seen  # every row logged before the kill
    assert in_csv == logged[: len(in_csv)] and len(logged) - len(in_csv) <= 1  # at most one row in flight


def test_metrics_csv_is_appended_and_rewritten_when_a_column_appears(tmp_path: Path):
    log = MetricsLog(tmp_path)
    log.add({"step": 1, "loss": 2.0})
    log.add({"step": 2, "loss": 1.5})
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "1,2.0", "2,1.5"]
    log.add({"step": 2, "eval/loss": 1.7})
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "step,loss,eval/loss",
        "1,2.0,",
        "2,1.5,",
        "2,,1.7",
    ]
    log.add({"step": 3, "loss": 1.2})
    resumed = MetricsLog(tmp_path, resume_step=2)  # rows after the checkpoint are dropped from both files
    assert [r["step"] for r in resumed.rows] == [1, 2, 2]
    assert csv_steps(tmp_path) == [1, 2, 2]
