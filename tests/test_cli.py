"""The command line: help, helpers, and bad input refused before any run directory exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.cli import app
from tests.conftest import EXAMPLES

runner = CliRunner()
COMMON_FLAGS = ("--recipe", "--model", "--data", "--out", "--set", "--resume", "--seed", "--max-steps")


@pytest.mark.parametrize(
    "command", ["sft", "reward", "dpo", "rejection-sample", "ppo", "grpo", "rloo", "online-dpo"]
)
def test_every_training_command_takes_the_common_flags(command: str):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in COMMON_FLAGS:
        assert flag in result.output, (command, flag)


def test_sft_help_is_example_led():
    result = runner.invoke(app, ["sft", "--help"], env={"COLUMNS": "200"})
    assert "Examples:" in result.output and "align sft --recipe" in result.output


def test_init_model_and_data_check(tmp_path: Path):
    out = tmp_path / "m"
    result = runner.invoke(app, ["init-model", "--preset", "tiny", "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    result = runner.invoke(
        app,
        ["data", "check", str(EXAMPLES / "alpaca.jsonl"), "--model", str(out), "--max-length", "32"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "600 valid records" in result.output and "p50" in result.output
    over = int(result.output.split("│")[-3].strip()) if "│" in result.output else None
    assert over is not None and over > 0  # at 32 tokens some Alpaca prompts do not fit
    result = runner.invoke(app, ["init-model", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "tiny" in result.output


BAD_RECORDS = {
    "malformed_json": (
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
        2,
        "malformed JSON",
    ),
    "missing_field": ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', 2, "output: missing"),
    "wrong_type": (
        '{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n',
        2,
        "instruction: expected a string",
    ),
    "empty_response": (
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "  "}\n',
        2,
        "output: empty",
    ),
    "bad_role": (
        '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        1,
        "role",
    ),
    "empty_file": ("", None, "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_input_is_refused_with_file_and_line(case: str, tmp_path: Path, tiny_model: Path, runs_dir: Path):
    text, line, fragment = BAD_RECORDS[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_text(text)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["sft", "-m", str(tiny_model), "-d", str(data), "-o", str(out)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 2, result.output
    where = f"{data}:{line}" if line else str(data)
    flat = " ".join(result.output.split())
    assert where in flat and fragment in flat, result.output
    assert not out.exists()  # refused before any run directory was made


def test_non_utf8_bytes_name_the_line(tmp_path: Path, tiny_model: Path, runs_dir: Path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    result = runner.invoke(
        app,
        ["sft", "-m", str(tiny_model), "-d", str(data), "-o", str(tmp_path / "run")],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert f"{data}:2: not valid UTF-8" in " ".join(result.output.split())


def test_recipe_errors_and_missing_values_exit_nonzero(tmp_path: Path, runs_dir: Path):
    result = runner.invoke(
        app, ["sft", "--set", "training.lr=fast", "--set", "nope.x=1"], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 2
    assert "training.lr: expected float" in result.output and "nope: unknown key" in result.output
    result = runner.invoke(app, ["sft"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "model.name_or_path (--model)" in result.output


def test_sft_cli_end_to_end_and_refuses_to_overwrite(tmp_path: Path, tiny_model: Path, runs_dir: Path):
    out = tmp_path / "run"
    args = [
        "sft",
        "-m",
        str(tiny_model),
        "-d",
        str(EXAMPLES / "chat.jsonl"),
        "-o",
        str(out),
        "--max-steps",
        "3",
        "--set",
        "training.save_every=2",
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["train"]["read"] == 200
    assert json.loads((runs_dir / "latest.json").read_text())["sft"] == str((out / "final").resolve())
    again = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 2 and "--resume" in again.output
