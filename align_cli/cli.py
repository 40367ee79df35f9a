"""The ``align`` command line: argument handling only. The training commands are generated from the stage
registry (``align_cli/stages/__init__.py``); the work itself lives in the modules the commands call."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from align_cli.engine.resume import Resume
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
    add_completion=False,
)
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
    """Our own progress bar is the one to watch (called once a recipe is valid: it imports transformers)."""
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
    from align_cli.runs import release_run_dirs

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
        release_run_dirs()  # the run folders this command held (CliRunner runs many in one process)


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
        from_previous, with_changes = given.get("resume_from_previous"), given.get("resume_with_changes")
        resume = (
            Resume(bool(from_previous), bool(with_changes))
            if from_previous or with_changes
            else given["resume"]
        )
        overrides = {key: given[name] for name, _, _, key in options if key}
        if overrides["output.dir"] is not None:
            overrides["output.dir"] = str(overrides["output.dir"])

        def run() -> None:
            recipe = load_recipe(given["recipe"], overrides, given["set_"], stage=stage.name)
            quiet_libraries()
            stage.load().run(recipe, resume=resume, console=console)

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


def _epilog(examples: tuple[str, ...]) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in examples)


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


@reward_app.command(
    "score",
    epilog=_epilog(
        (
            "align reward score -m runs/reward-tiny/final -d examples/data/prefs.jsonl -o scored.jsonl",
            "align reward score --data examples/data/ranked.jsonl | head -3      (the last reward model)",
        )
    ),
)
def reward_score(
    data: Annotated[
        str, typer.Option("--data", "-d", help="JSONL: pairs, rankings, prompt/completion or messages.")
    ],
    model: _option(
        str | None, "--model", "-m", help="Reward model directory; default: the last `align reward` output."
    ) = None,
    out: _option(Path | None, "--out", "-o", help="JSONL file to write; default: stdout.") = None,
    template: _option(
        str | None,
        "--template",
        help="auto, alpaca, chat or plain; default: what the model was trained with.",
    ) = None,
    max_length: _option(
        int | None, "--max-length", help="Token limit; default: what the model was trained with."
    ) = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Records per forward pass.")] = 16,
) -> None:
    """Write every record with its reward(s): `reward`, `reward_chosen`/`reward_rejected`, or `rewards`."""
    from align_cli.reward_score import run_score

    if template is not None and template not in ("auto", "alpaca", "chat", "plain"):
        _fail(f"--template {template!r}: choose one of auto, alpaca, chat, plain")
    _guarded(lambda: run_score(model, data, out, template, max_length, batch_size))


# ----------------------------------------------------------------------------- pipelines and evaluation

_AGAIN_PIPELINE = "run the same command again to continue (finished stages are kept)"
_CODE_WARNING = (
    "is code: align imports it and runs it as Python code with your rights; run only recipes whose code "
    "you trust."
)


@app.command(
    epilog=_epilog(
        (
            "align pipeline --recipe examples/sentiment/pipeline.yaml",
            "align pipeline -r examples/sentiment/pipeline.yaml --set output=runs/sentiment-b",
        )
    )
)
def pipeline(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Pipeline recipe: stages to run in order.")],
    set_: SetOpt = None,
) -> None:
    """Run the stages a pipeline recipe lists (e.g. sft -> reward -> dpo / ppo), chaining outputs.

    Each stage runs in its own directory under `output`; a finished stage is not run again and an
    interrupted one resumes from its last checkpoint. `@name` in a value means that stage's final model.

    A recipe's evaluate.ground_truth (`file.py:function`, used by `align frontier`)"""
    from align_cli.pipeline import load_pipeline, run_pipeline

    _guarded(lambda: run_pipeline(load_pipeline(recipe, set_), console), _AGAIN_PIPELINE)


pipeline.__doc__ += _CODE_WARNING


@app.command(
    epilog=_epilog(("align frontier --recipe examples/sentiment/frontier.yaml      (what `make demo` runs)",))
)
def frontier(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Pipeline recipe with an evaluate section.")],
    set_: SetOpt = None,
) -> None:
    """Run a pipeline, evaluate every method against the reference, write frontier.csv and frontier.png.

    As in the DPO paper's Figure 2 (left): ground-truth reward against KL(policy || reference) for DPO
    over several beta, PPO over several KL coefficients, best-of-N over several N, Preferred-FT and
    the SFT start.

    evaluate.ground_truth (`file.py:function` or `module:function`)"""
    from align_cli.pipeline import load_pipeline, run_frontier

    _guarded(lambda: run_frontier(load_pipeline(recipe, set_), console), _AGAIN_PIPELINE)


frontier.__doc__ += _CODE_WARNING


@app.command(
    "eval",
    epilog=_epilog(
        (
            "align eval -m runs/dpo/final --reference runs/sft/final --prompts prompts_eval.jsonl "
            "--ground-truth examples.sentiment.reviews:sentiment --reward-model runs/reward/final",
        )
    ),
)
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="The policy to evaluate.")],
    reference: Annotated[str, typer.Option("--reference", help="The reference policy (e.g. the SFT model).")],
    prompts: Annotated[str, typer.Option("--prompts", help="Held-out prompt JSONL.")],
    ground_truth: Annotated[
        str | None,
        typer.Option(
            "--ground-truth",
            help="module:function or file.py:function, text -> reward. This " + _CODE_WARNING,
        ),
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option("--reward-model", help="Reward model for scores and win rate.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Samples per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory for eval.json and eval.jsonl.")
    ] = None,
) -> None:
    """Sample from a policy and its reference: mean reward, RM score, KL(policy || reference), win rate."""
    from align_cli.evaluate import run_eval

    _guarded(
        lambda: run_eval(
            model, reference, prompts, ground_truth, reward_model, n, max_new_tokens, seed, out, console
        )
    )


# ----------------------------------------------------------------------------- planning and export


@app.command(
    epilog=_epilog(
        (
            "align plan --recipe recipes/zephyr-7b/dpo.yaml",
            "align plan -r recipes/llama2-hh/sft.yaml --processes 8 --shard zero3",
            "align plan -r recipes/sft-tiny.yaml --set model.lora.enabled=true",
        )
    )
)
def plan(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe of any training stage.")],
    model: ModelOpt = None,
    set_: SetOpt = None,
    processes: Annotated[int, typer.Option("--processes", help="Processes (GPUs) the run will use.")] = 1,
    shard: Annotated[
        str,
        typer.Option(
            "--shard", help="none (DDP), zero2 (gradients + optimizer), zero3 (also weights; FSDP)."
        ),
    ] = "none",
    device: Annotated[
        str, typer.Option("--device", help="cuda or cpu (CPU attention kernels keep the s x s scores).")
    ] = "cuda",
) -> None:
    """Resolve a recipe and estimate its memory per device, reading only the model's config (no weights).

    Weights, gradients, optimizer state (by optimizer), activations of one micro-batch, frozen models
    (reference, reward model) and the sampling KV cache, so you know before launching whether a run fits."""
    from align_cli.memory import print_plan

    _guarded(lambda: print_plan(recipe, model, set_, processes, shard, device, console))


@app.command(
    epilog=_epilog(
        (
            "align export --model runs/sft-lora/final --merge-lora --out models/sft-merged",
            "align export -m runs/dpo/final --out models/dpo-bf16 --dtype bfloat16",
        )
    )
)
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="A run's final model (e.g. RUN/final).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Merge a LoRA adapter into its base weights.")
    ] = False,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float32, bfloat16 or float16; default: as saved.")
    ] = None,
) -> None:
    """Write a model as a standalone directory (safetensors + tokenizer) that loads with from_pretrained.

    With --merge-lora a LoRA run's adapter is folded into its base model's weights (W + B A alpha / r):
    the result needs no peft and gives the same outputs as the adapter model."""
    from align_cli.engine.metrics import print_table
    from align_cli.export import export_model

    _guarded(
        lambda: print_table(
            "align export", list(export_model(model, out, merge_lora, dtype).items()), console
        )
    )


# ----------------------------------------------------------------------------- helpers


@app.command(
    "init-model",
    epilog=_epilog(
        (
            "align init-model --preset tiny --out examples/models/tiny",
            "align init-model --preset small --out /tmp/small --seed 1",
            "align init-model --preset tiny --base --out /tmp/tiny-base",
        )
    ),
)
def init_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the model and tokenizer to.")],
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="tiny (~1M params) or small (~25M).")
    ] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="Initialisation seed (same seed, same weights).")] = 0,
    corpus: Annotated[
        list[Path] | None,
        typer.Option("--corpus", help="Text/JSONL files to train the tokenizer on (repeatable)."),
    ] = None,
    base: Annotated[
        bool,
        typer.Option(
            "--base",
            help="A base model's tokenizer: no chat template, no chat markers (chat SFT then adds its own).",
        ),
    ] = False,
) -> None:
    """Write a random-init Llama-architecture model with an offline byte-level BPE tokenizer."""
    from align_cli.presets import init_model_command

    _guarded(
        lambda: console.print(
            f"wrote {preset} model to [bold]{init_model_command(preset, out, seed, corpus, base)}[/]"
        )
    )


@data_app.command(
    "check",
    epilog=_epilog(
        (
            "align data check examples/data/alpaca.jsonl --model examples/models/tiny",
            "align data check prefs.jsonl --recipe recipes/dpo-tiny.yaml",
            "align data check HuggingFaceH4/ultrafeedback_binarized:train_prefs --stage dpo",
        )
    ),
)
def data_check(
    file: Annotated[
        str, typer.Argument(help="A data file (.jsonl .json .parquet .csv .tsv), folder or hub id.")
    ],
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Override data.max_length.")] = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help=f"Check for this stage (default: the recipe's): {', '.join(STAGES)}."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Validate a data file as training reads it; show one record as the model sees it, token-length
    percentiles and what max length would cut."""
    from align_cli.data.check import check_file

    overrides = {"model.name_or_path": model, "data.max_length": max_length}
    _guarded(lambda: check_file(file, load_recipe(recipe, overrides, set_), console, stage))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
