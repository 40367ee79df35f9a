"""The ``align`` command line: argument handling only. The training commands are generated from the stage
registry (``align_cli/stages/__init__.py``); the work itself lives in the modules the commands call."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from align_cli.data.precheck import precheck_data
from align_cli.engine.tracking import check_trackers
from align_cli.errors import AlignError
from align_cli.recipe import load_recipe
from align_cli.stages import STAGES, Stage

# Under torchrun / accelerate launch only the main process (RANK 0) prints tables and progress;
# errors and warnings still come from every process.
_RANK = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), "0")
_MAIN_PROCESS = int(_RANK) == 0
console = Console(quiet=not _MAIN_PROCESS)
err_console = Console(stderr=True)

app = typer.Typer(
    name="align",
    help="Align a language model: SFT, reward model, PPO, rejection sampling and DPO.\n\n"
    "Every training command reads a YAML recipe (--recipe), which flags and --set key=value override.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=True,  # align --install-completion / --show-completion (bash, zsh, fish, PowerShell)
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"align {version('align-cli')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            console.print("align (not installed: version unknown)")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print align's version and exit."
        ),
    ] = False,
) -> None:
    """Align a language model: SFT, reward model, PPO, rejection sampling and DPO."""


data_app = typer.Typer(help="Inspect and validate data files.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _option(kind: Any, *names: str, help: str) -> Any:
    return Annotated[kind, typer.Option(*names, help=help, show_default=False)]


# ----------------------------------------------------------------------------- common options, once
RecipeOpt = _option(Path | None, "--recipe", "-r", help="YAML recipe file.")
ModelOpt = _option(str | None, "--model", "-m", help="Hub id or local directory (model.name_or_path).")
SetOpt = _option(
    list[str] | None, "--set", "-s", help="Override a recipe value, e.g. --set training.lr=1e-5 (repeatable)."
)
# name, annotation, default, recipe key: the options of every training command
COMMON: list[tuple[str, Any, Any, str | None]] = [
    ("recipe", RecipeOpt, None, None),
    ("model", ModelOpt, None, "model.name_or_path"),
    (
        "data",
        _option(str | None, "--data", "-d", help="Training data file or hub id (data.train)."),
        None,
        "data.train",
    ),
    (
        "out",
        _option(Path | None, "--out", "-o", help="Run directory (output.dir); default runs/<stage>/<time>."),
        None,
        "output.dir",
    ),
    ("set_", SetOpt, None, None),
    (
        "resume",
        _option(bool, "--resume", help="Continue the run in --out from its last complete checkpoint."),
        False,
        None,
    ),
    ("seed", _option(int | None, "--seed", help="Random seed (training.seed)."), None, "training.seed"),
    (
        "max_steps",
        _option(int | None, "--max-steps", help="Stop after this many optimizer steps (training.max_steps)."),
        None,
        "training.max_steps",
    ),
]
RESUME_VARIANTS: list[tuple[str, Any, Any, str | None]] = [
    (
        "resume_from_previous",
        _option(
            bool,
            "--resume-from-previous",
            help="Like --resume; when the last checkpoint does not match its manifest (a damaged file), "
            "continue from the newest earlier one that does (the damaged one is kept as "
            "checkpoint-N.damaged).",
        ),
        False,
        None,
    ),
    (
        "resume_with_changes",
        _option(
            bool,
            "--resume-with-changes",
            help="Like --resume, with a recipe that differs in what decides the data order or the update "
            "(data, seed, batch sizes, lr, ...): the new values apply from the last checkpoint on and are "
            "recorded in RUN/resume_changes.jsonl.",
        ),
        False,
        None,
    ),
]


def _setup_logging() -> None:
    level = os.environ.get("ALIGN_LOG_LEVEL", "INFO" if _MAIN_PROCESS else "WARNING")
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)]
    )
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional 4-bit CPU kernel package is
    # missing; align never runs 4-bit on a CPU (QLoRA needs CUDA)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Our own progress bar is the one to watch. transformers takes its progress-bar setting from
    huggingface_hub's when it is imported, so this imports neither it nor torch (errors stay fast)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if sys.modules.get("transformers") is not None:  # imported already: tell it too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape  # "[...]" in a message (a YAML list, a key[0]) is text, not markup

    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def resume_command(stage: str, run_dir: Path) -> str:
    """The command that continues a run: its saved, fully resolved recipe, its directory, --resume."""
    import shlex

    return shlex.join(
        ["align", stage, "--recipe", str(run_dir / "recipe.yaml"), "--out", str(run_dir), "--resume"]
    )


def _guarded(
    action: Callable[[], Any], again: str = "run the same command again to continue", quiet: bool = True
) -> None:
    """The one place errors are printed: an AlignError becomes one red line and exit code 2; a stop by
    signal (checkpoint saved) is a clean exit that says how to continue."""
    from align_cli.engine.signals import StoppedBySignal

    _setup_logging()
    try:
        if quiet:
            quiet_libraries()
        action()
    except AlignError as exc:
        _fail(str(exc))
    except StoppedBySignal as stopped:
        console.print(f"[bold yellow]{stopped}[/]")
        if stopped.final_save:
            console.print("stopped by signal after the run finished; there is nothing to resume")
        else:
            how = again or f"resume with: {resume_command(stopped.stage, stopped.run_dir)}"
            console.print(f"stopped by signal; {how}")
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    finally:
        if "align_cli.runs" in sys.modules:  # imported only once a run began (it imports torch)
            sys.modules["align_cli.runs"].release_run_dirs()  # CliRunner runs many in one process


# ----------------------------------------------------------------------------- training stages


def _stage_command(stage: Stage, group: bool = False) -> Callable[..., None]:
    """The `align <stage>` command: common options, the stage's own flags; each sets one recipe key."""
    options = COMMON + (RESUME_VARIANTS if stage.resume_variants else [])
    for flag in stage.flags:
        name = flag.name.lstrip("-").replace("-", "_")
        options.append((name, _option(flag.type | None, flag.name, help=flag.help), None, flag.key))

    def command(ctx: typer.Context | None = None, **given: Any) -> None:
        if ctx is not None and ctx.invoked_subcommand is not None:
            if any(value not in (None, False) for value in given.values()):
                _fail(f"`align {stage.name} {ctx.invoked_subcommand}` takes its own flags, after its name")
            return
        overrides = {key: given[name] for name, _, _, key in options if key}
        if overrides["output.dir"] is not None:
            overrides["output.dir"] = str(overrides["output.dir"])

        def run() -> None:
            # recipe and data are checked before torch is imported: a mistake is reported in a second
            recipe = load_recipe(given["recipe"], overrides, given["set_"], stage=stage.name)
            check_trackers(recipe.training)  # a tracker's missing package: one line, before the data
            precheck_data(recipe, stage.name)
            resume = _resume_mode(given)
            if resume and recipe.output.dir is None:  # --resume alone: the newest unfinished run
                from align_cli.runs import latest_unfinished_run

                recipe.output.dir = str(latest_unfinished_run(stage.name))
                console.print(f"resuming {recipe.output.dir}")
            quiet_libraries()
            try:
                stage.load().run(recipe, resume=resume, console=console)
            finally:
                _close_process_group()

        _guarded(run, again="", quiet=False)

    params = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
        for n, a, d, _ in options
    ]
    if group:
        params.insert(0, inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}  # what typer reads
    command.__doc__ = stage.help
    command.__name__ = stage.name.replace("-", "_")
    return command


def _resume_mode(given: dict[str, Any]) -> Any:
    """False, True (--resume) or a Resume with the variant flags; imported here: it imports torch."""
    from_previous, with_changes = given.get("resume_from_previous"), given.get("resume_with_changes")
    if not (from_previous or with_changes):
        return given["resume"]
    from align_cli.engine.resume import Resume

    return Resume(bool(from_previous), bool(with_changes))


def _epilog(examples: tuple[str, ...]) -> str:
    from rich.markup import escape  # "--set key=[a, b]" (a YAML list) is text, not markup

    return "Examples:\n\n" + "\n\n".join(f"  {escape(line)}" for line in examples)


reward_app = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False)
GROUPS = {"reward": reward_app}  # stages with helper subcommands (`align reward score`)
for _stage in STAGES.values():
    if _stage.name in GROUPS:
        GROUPS[_stage.name].callback(invoke_without_command=True, epilog=_epilog(_stage.examples))(
            _stage_command(_stage, group=True)
        )
        app.add_typer(GROUPS[_stage.name], name=_stage.name)
    else:
        app.command(_stage.name, epilog=_epilog(_stage.examples))(_stage_command(_stage))


# the helper commands (reward score, pipeline, frontier, eval, plan, export, init-model, data check)
import align_cli.cli_tools  # noqa: E402, F401


def _close_process_group() -> None:
    """Under torchrun / accelerate launch, leave the process group cleanly: torch's teardown at interpreter
    exit otherwise aborts now and then ("terminate called without an active exception")."""
    import sys

    if sys.modules.get("torch") is not None:  # imported by the stage (a None entry: blocked in tests)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    app()


if __name__ == "__main__":
    from align_cli.cli import main as _main  # the package's module, where every command is registered

    _main()
