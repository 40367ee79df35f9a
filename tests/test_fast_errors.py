"""Fast, helpful errors: `import align_cli.cli` is torch-free, recipe and data mistakes are reported before
torch loads (in about a second), unknown keys suggest the valid one, --resume alone finds the run,
--version, shell completion and the vLLM extra."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT

# loose bounds: the test machine is shared; the real figures are about 0.7 s (see the branch's report)
FAST_S = 4.0


# `align ARGS` with torch and transformers unimportable: an error reported before they load still reads
# as itself, one that comes later is an ImportError
_NO_TORCH = (
    "import sys; sys.modules.update(torch=None, transformers=None); sys.argv[0] = 'align'; "
    "from align_cli.cli import main; main()"
)


def _align(
    *args: str, env: dict[str, str] | None = None, torch: bool = False
) -> tuple[subprocess.CompletedProcess, float]:
    """`align ARGS` in a fresh interpreter (what a user waits for), and its wall time; without torch
    unless ``torch``."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *(["-m", "align_cli.cli"] if torch else ["-c", _NO_TORCH]), *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=120,
    )
    return done, time.perf_counter() - start


def test_importing_the_cli_does_not_import_torch():
    code = "import align_cli.cli, sys; assert not {'torch', 'transformers'} & set(sys.modules)"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr


def test_help_is_fast():
    done, seconds = _align("sft", "--help")
    assert done.returncode == 0, done.stderr
    assert "Examples:" in done.stdout and seconds < FAST_S, seconds


def test_a_recipe_error_is_reported_before_torch_loads(tmp_path: Path):
    done, seconds = _align("sft", "-d", str(EXAMPLES / "alpaca.jsonl"), "--set", "training.lrr=1e-3")
    assert done.returncode == 2
    assert "training.lrr: unknown key" in done.stderr and seconds < FAST_S, (seconds, done.stderr)


ALPACA = '{"instruction": "a", "output": "b"}\n'
PAIR = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'


@pytest.mark.parametrize(
    ("stage", "flag", "text", "expected"),
    [
        ("sft", "-d", ALPACA + '{"instruction": "a", "output": \n', ":2: malformed"),
        ("sft", "-d", ALPACA + '{"instruction": "a"}\n', ":2: output: missing"),
        ("dpo", "-d", PAIR + '{"prompt": "a", "chosen": "b"}\n', ":2:"),
        ("ppo", "--prompts", '{"prompt": "a"}\n{"prompt": 3}\n', ":2:"),
    ],
)
def test_a_data_error_is_reported_before_torch_loads(
    stage: str, flag: str, text: str, expected: str, tmp_path: Path
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    # a model path that does not exist: the data error must come first, before anything loads
    run = tmp_path / "run"
    done, seconds = _align(stage, "-m", str(tmp_path / "no-model"), flag, str(bad), "-o", str(run))
    assert done.returncode == 2, done.stderr
    assert f"{bad}{expected}" in done.stderr, done.stderr
    assert seconds < FAST_S, seconds
    assert not run.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["plan", "-r", "RECIPE"], "training.lrr: unknown key; did you mean training.lr?"),
        (["data", "check", "DATA"], "DATA:2: malformed JSON"),
        (["reward", "score", "-m", "no-model", "-d", "DATA"], "DATA:2: malformed JSON"),
        (["pipeline", "-r", "PIPELINE"], "stages[0].stage: 'sftt' is not one of"),
    ],
)
def test_the_helper_commands_report_input_errors_before_torch_loads(
    args: list[str], expected: str, tmp_path: Path
):
    files = {
        "RECIPE": ("r.yaml", "stage: dpo\ntraining:\n  lrr: 1\n"),
        "DATA": ("d.jsonl", ALPACA + '{"instruction": \n'),
        "PIPELINE": ("p.yaml", "output: x\nstages:\n  - {name: a, stage: sftt}\n"),
    }
    for placeholder, (name, text) in files.items():
        (tmp_path / name).write_text(text)
        args = [str(tmp_path / name) if a == placeholder else a for a in args]
        expected = expected.replace(placeholder, str(tmp_path / name))
    done, seconds = _align(*args)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert seconds < FAST_S, seconds


def test_the_precheck_kinds_match_the_stages():
    from align_cli.data.formats import PREFERRED_FT_KINDS, SFT_KINDS
    from align_cli.data.precheck import RECORD_KINDS
    from align_cli.stages import dpo, kto, reward

    assert RECORD_KINDS == {
        "sft": SFT_KINDS + PREFERRED_FT_KINDS,
        "reward": reward.REWARD_KINDS,
        "dpo": dpo.PREFERENCE_KINDS,
        "kto": kto.UNPAIRED_KINDS,
    }


@pytest.mark.parametrize(
    ("stage", "sets", "expected"),
    [
        ("sft", ["training.lrr=1e-3"], "training.lrr: unknown key; did you mean training.lr?"),
        ("sft", ["lr=1e-3"], "lr: unknown key; did you mean training.lr?"),
        ("sft", ["trainng.lr=1e-3"], "trainng: unknown key; did you mean training?"),
        ("sft", ["model.lora.rr=4"], "model.lora.rr: unknown key; did you mean model.lora.r?"),
        ("sft", ["learning_rate=1e-3"], "learning_rate: unknown key; did you mean training.lr?"),
        ("sft", ["training.num_train_epochs=2"], "did you mean training.epochs?"),
        ("sft", ["per_device_train_batch_size=2"], "did you mean training.micro_batch_size?"),
        ("sft", ["gradient_accumulation_steps=2"], "did you mean training.grad_accum?"),
        ("sft", ["model_name_or_path=m"], "did you mean model.name_or_path (or --model)?"),
        ("sft", ["max_seq_length=64"], "did you mean data.max_length?"),
        ("sft", ["bf16=true"], "bf16: unknown key; did you mean training.precision=bf16?"),
        ("sft", ["output_dir=x"], "did you mean output.dir (or --out)?"),
        ("dpo", ["beta=0.2"], "beta: unknown key; did you mean dpo.beta?"),
        ("kto", ["beta=0.2"], "beta: unknown key; did you mean kto.beta?"),
    ],
)
def test_an_unknown_key_suggests_the_valid_one(stage: str, sets: list[str], expected: str):
    from align_cli.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as caught:
        load_recipe(None, None, sets, stage=stage)
    assert expected in str(caught.value)


def test_an_unknown_key_in_a_recipe_file_suggests_too(tmp_path: Path):
    from align_cli.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  learning_rate: 1.0e-5\n  warmup_ratoi: 0.1\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, stage="sft")
    assert "training.learning_rate: unknown key; did you mean training.lr?" in str(caught.value)
    assert "training.warmup_ratoi: unknown key; did you mean training.warmup_ratio?" in str(caught.value)


def test_nothing_close_lists_the_allowed_keys():
    from align_cli.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"output.zzzzzz: unknown key \(allowed: dir, overwrite\)"):
        load_recipe(None, None, ["output.zzzzzz=1"], stage="sft")


def test_resume_alone_continues_the_newest_unfinished_run(tiny_model: Path, runs_dir: Path):
    import shutil

    from typer.testing import CliRunner

    from align_cli.cli import app

    runner = CliRunner(env={"COLUMNS": "400"})
    base = ["sft", "-m", str(tiny_model), "-d", str(EXAMPLES / "alpaca.jsonl"), "--set", "data.max_length=64"]
    nothing = runner.invoke(app, [*base, "--resume"])
    assert nothing.exit_code == 2
    assert f"no unfinished sft run in {runs_dir / 'sft'}" in nothing.output, nothing.output
    first = runner.invoke(app, [*base, "--max-steps", "2", "--set", "training.save_every=1"])
    assert first.exit_code == 0, first.output
    (run,) = (runs_dir / "sft").iterdir()
    shutil.rmtree(run / "final")  # as a run killed after its checkpoint at step 2
    (run / "summary.json").unlink()
    resumed = runner.invoke(app, [*base, "--max-steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run}" in resumed.output
    assert list((runs_dir / "sft").iterdir()) == [run] and (run / "final").is_dir()
    again = runner.invoke(app, [*base, "--resume"])  # finished now: nothing left to resume
    assert again.exit_code == 2 and "no unfinished sft run" in again.output


def test_version_and_completion():
    from importlib.metadata import version

    done, seconds = _align("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"align {version('align-cli')}", done
    assert seconds < FAST_S, seconds
    done, _ = _align("--show-completion", "bash")
    assert done.returncode == 0 and "complete" in done.stdout, done
    assert "--install-completion" in _align("--help")[0].stdout


def _without_vllm(monkeypatch: pytest.MonkeyPatch, found: bool = False) -> None:
    import importlib.util

    real = importlib.util.find_spec
    fake = object() if found else None
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: fake if name == "vllm" else real(name, *a)
    )


def test_vllm_backend_without_vllm_is_a_recipe_error(monkeypatch: pytest.MonkeyPatch):
    from align_cli.recipe import RecipeError, load_recipe

    _without_vllm(monkeypatch)
    with pytest.raises(
        RecipeError, match=r"rejection.backend: vllm is not installed \(pip install 'align-cli\[vllm\]'\)"
    ):
        load_recipe(None, None, ["rejection.backend=vllm"], stage="rejection-sample")
    load_recipe(None, None, ["rejection.backend=auto"], stage="rejection-sample")


def test_vllm_backend_without_a_gpu_fails_before_models_load(monkeypatch: pytest.MonkeyPatch):
    import torch

    from align_cli.errors import AlignError
    from align_cli.generation import choose_backend

    _without_vllm(monkeypatch, found=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AlignError, match="vLLM needs a CUDA GPU"):
        choose_backend("vllm")
    assert choose_backend("transformers") == "transformers"
