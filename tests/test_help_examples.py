"""Every example in `--help` (the registry's examples, the helper commands' epilogs) and in README.md
names files that exist and parses as a valid command: flags, recipe and data, through the real CLI with
the work itself stubbed out. A representative subset runs for real on the tiny model (one step each)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import shlex
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from align_cli.cli import app
from tests.conftest import ROOT
from tests.helpers import load_example_module

# files the examples name that a step makes first (ignored by git): the step that makes them
GENERATED = {
    "examples/models/": "align init-model --preset tiny --out examples/models/tiny",
    "examples/sentiment/data/": "python examples/sentiment/make_data.py",
    "examples/verifiable/data/": "python examples/verifiable/make_prompts.py",
}
# run for real, in this order (later ones chain from earlier outputs), with these extra arguments
REAL = {
    "align sft --recipe recipes/sft-tiny.yaml": ["--max-steps", "1"],
    "align reward --recipe recipes/reward-tiny.yaml": ["--max-steps", "1"],
    "align dpo --recipe recipes/dpo-tiny.yaml --set dpo.beta=0.5 --set dpo.loss_type=ipo": [
        "--max-steps",
        "1",
    ],
    "align reward score -d examples/data/prefs.jsonl | head -3": [],
    "align data check examples/data/alpaca.jsonl --model examples/models/tiny --max-length 128": [],
    "align rejection-sample -r recipes/rejection-tiny.yaml --rounds 2 --then sft": [
        "--set",
        "rejection.max_prompts=4",
        "--max-steps",
        "1",
    ],
}
_COMMAND = re.compile(r"^(?:align\s|.*-m align_cli\.cli\s)")


def _epilogs(command: Any, path: str = "align") -> Iterator[tuple[str, str]]:
    if command.epilog:
        yield f"{path} --help", command.epilog
    for name, sub in getattr(command, "commands", {}).items():
        yield from _epilogs(sub, f"{path} {name}")


def help_examples() -> list[tuple[str, str]]:
    """(where, line) of every example line in every command's --help."""
    found = []
    for where, epilog in _epilogs(typer.main.get_command(app)):
        for line in epilog.replace("\\[", "[").splitlines():
            if line.strip().startswith("align "):
                found.append((where, line.strip()))
    return found


def readme_examples() -> list[tuple[str, str]]:
    """(where, line) of every align command in README.md's code blocks (continued lines joined)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if _COMMAND.match(line.strip()):
                found.append(("README.md", " ".join(line.split())))
    return found


EXAMPLES = help_examples() + readme_examples()


def argv(line: str) -> list[str]:
    """The align arguments of an example line, without its comment, pipe or output redirection."""
    line = re.split(r"\s{2,}[(#]|\s#\s|\s\|\s|\s2?>>?\s?\S", line)[0]
    line = re.sub(r"^.*-m align_cli\.cli\s", "", line)
    if line.count("'") % 2:  # the end of a quoted launcher command (srun bash -c '... align_cli.cli ...')
        line = line.rstrip("'")
    tokens = shlex.split(line)
    return tokens[1:] if tokens[0] == "align" else tokens


def test_examples_are_found():
    wheres = {where for where, _ in EXAMPLES}
    assert {"align sft --help", "align reward score --help", "align pipeline --help", "README.md"} <= wheres
    assert len(EXAMPLES) > 50
    lines = {line for _, line in EXAMPLES}
    assert set(REAL) <= lines, set(REAL) - lines  # an example run for real was renamed: update REAL


@pytest.mark.parametrize(("where", "line"), EXAMPLES, ids=[line for _, line in EXAMPLES])
def test_every_file_an_example_names_exists(where: str, line: str):
    for path in re.findall(r"(?:examples|recipes)/[\w./-]*\w", line.split("  #")[0]):
        made_by = next((step for prefix, step in GENERATED.items() if path.startswith(prefix)), None)
        if made_by is None:
            assert (ROOT / path).exists(), f"{where}: {line}: {path} does not exist"


@pytest.fixture(scope="module")
def sandbox(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ and recipes/ with the generated files made (the tiny model linked in)."""
    root = tmp_path_factory.mktemp("examples_sandbox")
    ignore = shutil.ignore_patterns("models", "data", "__pycache__")
    for name in ("examples", "recipes"):
        shutil.copytree(ROOT / name, root / name, ignore=ignore)
    shutil.copytree(ROOT / "examples" / "data", root / "examples" / "data")
    (root / "examples" / "models").mkdir()
    (root / "examples" / "models" / "tiny").symlink_to(tiny_model)
    sentiment = load_example_module(ROOT / "examples/sentiment/make_data.py", "sentiment_make_data")
    sentiment.main(["--out", str(root / "examples/sentiment/data")])
    verifiable = load_example_module(ROOT / "examples/verifiable/make_prompts.py", "verifiable_make_prompts")
    verifiable.main(["--out", str(root / "examples/verifiable/data")])
    return root


# the function each helper command hands its work to: (module, name); a module not in this tree is skipped
WORK = (
    ("align_cli.pipeline", "run_pipeline"),
    ("align_cli.pipeline", "run_frontier"),
    ("align_cli.reward_score", "run_score"),
    ("align_cli.evaluate", "run_eval"),
    ("align_cli.presets", "init_model_command"),
    ("align_cli.data.check", "check_file"),
    ("align_cli.generate", "run_generate"),
    ("align_cli.chat", "run_chat"),
)


def _stub_the_work(monkeypatch: pytest.MonkeyPatch, ran: list[str]) -> None:
    """Every command's work replaced by a note of it: what remains is parsing and validation."""
    import align_cli.export
    import align_cli.memory
    from align_cli.recipe import load_recipe
    from align_cli.stages import Stage

    def stage_module(stage: Stage) -> Any:
        return types.SimpleNamespace(run=lambda recipe, resume=False, console=None: ran.append(stage.name))

    def plan(recipe: Path, model: str | None, sets: list[str] | None, *rest: Any) -> None:
        load_recipe(recipe, {"model.name_or_path": model}, sets)
        ran.append("plan")

    monkeypatch.setattr(Stage, "load", stage_module)
    monkeypatch.setattr(align_cli.memory, "print_plan", plan)
    for module, name in WORK:
        if importlib.util.find_spec(module) is not None:
            stub = functools.partial(lambda name, *a, **k: ran.append(name), name)
            monkeypatch.setattr(importlib.import_module(module), name, stub)
    monkeypatch.setattr(align_cli.export, "export_model", lambda *a, **k: ran.append("export") or {})


@pytest.mark.parametrize(("where", "line"), EXAMPLES, ids=[line for _, line in EXAMPLES])
def test_every_example_parses_and_validates(
    where: str, line: str, sandbox: Path, monkeypatch: pytest.MonkeyPatch
):
    ran: list[str] = []
    _stub_the_work(monkeypatch, ran)
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("ALIGN_RUNS_DIR", str(sandbox / "runs"))
    result = CliRunner().invoke(app, argv(line), env={"COLUMNS": "300"})
    assert result.exit_code == 0, f"{where}: {line}\n{result.output}"
    assert ran, f"{where}: {line}: nothing would run"


def test_a_subset_of_the_examples_runs_for_real(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    work = tmp_path / "work"
    shutil.copytree(sandbox, work, symlinks=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("ALIGN_RUNS_DIR", str(work / "runs"))
    for line, extra in REAL.items():
        result = CliRunner().invoke(app, argv(line) + extra, env={"COLUMNS": "300"})
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert (work / "runs/dpo-tiny/final").is_dir() and (work / "runs/rejection-tiny/summary.json").is_file()
