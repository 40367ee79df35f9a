"""The ``align`` command line: one thin function per subcommand, nothing but argument handling."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from align_cli.engine.resume import Resume
from align_cli.recipe import RecipeError, load_recipe

# Under torchrun / accelerate launch only the main process (RANK 0) prints tables and progress;
# errors and warnings still come from every process.
_RANK = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), "0")
_MAIN_PROCESS = int(_RANK) == 0
console = Console(quiet=not _MAIN_PROCESS)
err_console = Console(stderr=True)

app = typer.Typer(
    name="align",
    help="Align a language model: SFT, reward model, PPO, rejection sampling, DPO and KTO.\n\n"
    "Every training command reads a YAML recipe (--recipe), which flags and --set key=value override.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and validate data files.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# ----------------------------------------------------------------------------- common flags
RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", "-r", help="YAML recipe file.", show_default=False)
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id or local directory (model.name_or_path).", show_default=False),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", "-d", help="Training JSONL file or hub data set id (data.train).", show_default=False
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Run directory (output.dir); default runs/<stage>/<time>.", show_default=False
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe value, e.g. --set training.lr=1e-5 (repeatable).",
        show_default=False,
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last complete checkpoint.")
]
FromPreviousOpt = Annotated[
    bool,
    typer.Option(
        "--resume-from-previous",
        help="Like --resume; when the last checkpoint does not match its manifest (a damaged file), continue "
        "from the newest earlier one that does (the damaged one is kept as checkpoint-N.damaged).",
    ),
]
WithChangesOpt = Annotated[
    bool,
    typer.Option(
        "--resume-with-changes",
        help="Like --resume, with a recipe that differs in what decides the data order or the update "
        "(data, seed, batch sizes, lr, ...): the new values apply from the last checkpoint on and are "
        "recorded in RUN/resume_changes.jsonl.",
    ),
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Random seed (training.seed).", show_default=False)
]
MaxStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-steps", help="Stop after this many optimizer steps (training.max_steps).", show_default=False
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape  # "[...]" in a message (a YAML list, a key[0]) is text, not markup

    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _run_stage(
    stage: str,
    runner: Any,
    recipe: Path | None,
    model: str | None,
    data: str | None,
    out: Path | None,
    sets: list[str] | None,
    resume: bool | Resume,
    seed: int | None,
    max_steps: int | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Flags -> recipe overrides; run the stage; known errors become one red line and exit code 2."""
    from align_cli.engine.signals import StoppedBySignal
    from align_cli.runs import release_run_dirs

    _setup_logging()
    overrides = {
        "model.name_or_path": model,
        "data.train": data,
        "output.dir": str(out) if out else None,
        "training.seed": seed,
        "training.max_steps": max_steps,
        **(extra or {}),
    }
    try:
        parsed = load_recipe(recipe, overrides, sets, stage=stage)
        runner(parsed, resume=resume, console=console)
    except _known_errors() as exc:
        _fail(str(exc))
    except StoppedBySignal as stopped:  # a requested stop with a checkpoint saved is a clean exit
        console.print(f"[bold yellow]{stopped}[/]")
        if stopped.final_save:
            console.print("stopped by signal after the run finished; there is nothing to resume")
        else:
            console.print(f"stopped by signal; resume with: {resume_command(stopped.stage, stopped.run_dir)}")
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    finally:
        release_run_dirs()  # the run folders this command held (CliRunner runs many in one process)


def _known_errors() -> tuple[type[Exception], ...]:
    """Bad input or a known fault, each with a message that names what and where: one red line, exit 2."""
    from align_cli.data.formats import DataError
    from align_cli.data.templates import TemplateError
    from align_cli.engine.checkpoint import CheckpointError
    from align_cli.engine.loop import NonFiniteError
    from align_cli.models import ModelError
    from align_cli.runs import RunDirError

    return (RecipeError, DataError, TemplateError, ModelError, RunDirError, CheckpointError, NonFiniteError)


def _resume(resume: bool, from_previous: bool, with_changes: bool) -> bool | Resume:
    """The three resume flags as a stage's ``resume`` argument; either variant implies --resume."""
    return Resume(from_previous, with_changes) if from_previous or with_changes else resume


def resume_command(stage: str, run_dir: Path) -> str:
    """The command that continues a run: its saved, fully resolved recipe, its directory, --resume."""
    import shlex

    return shlex.join(
        ["align", stage, "--recipe", str(run_dir / "recipe.yaml"), "--out", str(run_dir), "--resume"]
    )


def _not_implemented(stage: str) -> None:
    _fail(f"`align {stage}` is not implemented yet in this version; see the README for what is.")


# ----------------------------------------------------------------------------- training stages


@app.command(
    epilog="Examples:\n\n"
    "  align sft --recipe recipes/sft-tiny.yaml\n\n"
    "  align sft -m examples/models/tiny -d examples/data/alpaca.jsonl \\\n\n"
    "      --set training.lr=1e-3 --max-steps 50\n\n"
    "  align sft -r recipes/sft-tiny.yaml -o runs/sft-a --resume",
)
def sft(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    resume_from_previous: FromPreviousOpt = False,
    resume_with_changes: WithChangesOpt = False,
    seed: SeedOpt = None,
    max_steps: MaxStepsOpt = None,
) -> None:
    """Supervised fine-tuning: loss on response tokens only (Alpaca, prompt/completion, chat, text)."""
    from align_cli.stages.sft import run_sft

    _run_stage(
        "sft",
        run_sft,
        recipe,
        model,
        data,
        out,
        set_,
        _resume(resume, resume_from_previous, resume_with_changes),
        seed,
        max_steps,
    )


def _placeholder(stage: str, summary: str) -> None:
    def command(
        recipe: RecipeOpt = None,
        model: ModelOpt = None,
        data: DataOpt = None,
        out: OutOpt = None,
        set_: SetOpt = None,
        resume: ResumeOpt = False,
        seed: SeedOpt = None,
        max_steps: MaxStepsOpt = None,
    ) -> None:
        _not_implemented(stage)

    command.__doc__ = f"{summary} [not implemented yet]"
    app.command(name=stage)(command)


reward_app = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False)
app.add_typer(reward_app, name="reward")


@reward_app.callback(
    invoke_without_command=True,
    epilog="Examples:\n\n"
    "  align reward --recipe recipes/reward-tiny.yaml\n\n"
    "  align reward -d examples/data/prefs.jsonl      (starts from the last `align sft` output)\n\n"
    "  align reward -m runs/sft-tiny/final -d examples/data/ranked.jsonl      (K-way rankings)\n\n"
    "  align reward -r recipes/reward-tiny.yaml --set reward.use_margin=false \\\n\n"
    "      --set reward.center_coef=0.01\n\n"
    "  align reward score -m runs/reward-tiny/final -d examples/data/prefs.jsonl -o scored.jsonl",
)
def reward(
    ctx: typer.Context,
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    resume_from_previous: FromPreviousOpt = False,
    resume_with_changes: WithChangesOpt = False,
    seed: SeedOpt = None,
    max_steps: MaxStepsOpt = None,
) -> None:
    """Train a reward model on pairwise, rated or ranked preferences; `align reward score` applies one.

    Pairs (prompt/chosen/rejected, or HH-style conversations) with an optional Llama 2 margin or rating,
    and rankings (prompt + responses best first, or with scores; all C(K,2) pairs, one forward pass per
    response). Defaults as Llama 2: 1 epoch, lr 1e-5, cosine to 10%, warmup 3% (at least 5 steps)."""
    if ctx.invoked_subcommand is not None:
        resumes = resume or resume_from_previous or resume_with_changes
        if recipe or model or data or out or set_ or resumes or seed is not None or max_steps is not None:
            _fail(f"`align reward {ctx.invoked_subcommand}` takes its own flags, after its name")
        return
    from align_cli.stages.reward import run_reward

    _run_stage(
        "reward",
        run_reward,
        recipe,
        model,
        data,
        out,
        set_,
        _resume(resume, resume_from_previous, resume_with_changes),
        seed,
        max_steps,
    )


@reward_app.command(
    "score",
    epilog="Examples:\n\n"
    "  align reward score -m runs/reward-tiny/final -d examples/data/prefs.jsonl -o scored.jsonl\n\n"
    "  align reward score --data examples/data/ranked.jsonl | head -3      (the last reward model; stdout)",
)
def reward_score(
    data: Annotated[
        str, typer.Option("--data", "-d", help="JSONL: pairs, rankings, prompt/completion or messages.")
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Reward model directory; default: the last `align reward` output."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="JSONL file to write; default: stdout.", show_default=False),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template", help="auto, alpaca, chat or plain; default: what the model was trained with."
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", help="Token limit; default: what the model was trained with."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Records per forward pass.")] = 16,
) -> None:
    """Write every record with its reward(s): `reward`, `reward_chosen`/`reward_rejected`, or `rewards`."""
    from align_cli.stages.reward import run_score

    if template is not None and template not in ("auto", "alpaca", "chat", "plain"):
        _fail(f"--template {template!r}: choose one of auto, alpaca, chat, plain")
    _guarded(lambda: run_score(model, data, out, template, max_length, batch_size))


@app.command(
    epilog="Examples:\n\n"
    "  align dpo --data examples/data/prefs.jsonl      (policy and reference: the last sft output)\n\n"
    "  align dpo --recipe recipes/dpo-tiny.yaml --set dpo.beta=0.5 --set dpo.loss_type=ipo\n\n"
    "  align dpo -m runs/sft-tiny/final -d examples/data/ranked.jsonl      (Plackett-Luce rankings)\n\n"
    "  align dpo -r recipes/dpo-tiny.yaml --set dpo.reference_cache=false      (live reference model)\n\n"
    "  align dpo -m BASE_MODEL -d examples/data/prefs.jsonl --set dpo.loss_type=orpo      (ORPO, no SFT)\n\n"
    "  align sft -m MODEL -d examples/data/prefs.jsonl      (Preferred-FT baseline: SFT on the chosen)",
)
def dpo(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    resume_from_previous: FromPreviousOpt = False,
    resume_with_changes: WithChangesOpt = False,
    seed: SeedOpt = None,
    max_steps: MaxStepsOpt = None,
) -> None:
    """Direct Preference Optimization and its family (cDPO, IPO, hinge, SimPO, ORPO, Plackett-Luce)."""
    from align_cli.stages.dpo import run_dpo

    _run_stage(
        "dpo",
        run_dpo,
        recipe,
        model,
        data,
        out,
        set_,
        _resume(resume, resume_from_previous, resume_with_changes),
        seed,
        max_steps,
    )


@app.command(
    epilog="Examples:\n\n"
    "  align kto --data examples/data/unpaired.jsonl      (policy and reference: the last sft output)\n\n"
    "  align kto --recipe recipes/kto-tiny.yaml --set kto.undesirable_weight=1.5",
)
def kto(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    resume_from_previous: FromPreviousOpt = False,
    resume_with_changes: WithChangesOpt = False,
    seed: SeedOpt = None,
    max_steps: MaxStepsOpt = None,
) -> None:
    """KTO on unpaired completions labelled desirable or undesirable (prompt, completion, label)."""
    from align_cli.stages.kto import run_kto

    _run_stage(
        "kto",
        run_kto,
        recipe,
        model,
        data,
        out,
        set_,
        _resume(resume, resume_from_previous, resume_with_changes),
        seed,
        max_steps,
    )


@app.command(
    "rejection-sample",
    epilog="Examples:\n\n"
    "  align rejection-sample --n 16 --prompts examples/data/prompts.jsonl      (last sft + last reward)\n\n"
    "  align rejection-sample -r recipes/rejection-tiny.yaml --rounds 2 --then sft\n\n"
    "  align rejection-sample -m runs/sft/final --reward-model runs/reward/final --prompts p.jsonl \\\n\n"
    "      --set rejection.select=top_k --set rejection.keep=2",
)
def rejection_sample(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    seed: SeedOpt = None,
    max_steps: MaxStepsOpt = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Samples per prompt (rejection.n).", show_default=False)
    ] = None,
    prompts: Annotated[
        str | None, typer.Option("--prompts", help="Prompt JSONL (rejection.prompts).", show_default=False)
    ] = None,
    reward_model: Annotated[
        str | None,
        typer.Option(
            "--reward-model",
            help="Reward model (default: the last `align reward` output).",
            show_default=False,
        ),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Sample/select rounds.", show_default=False)
    ] = None,
    then: Annotated[
        str | None, typer.Option("--then", help="'sft': fine-tune on the selected samples after each round.")
    ] = None,
) -> None:
    """Best-of-N (Llama 2 rejection sampling): sample N per prompt, score, keep the best, optionally SFT.

    Writes samples.jsonl (every sample and its reward), best.jsonl (SFT-ready), pairs.jsonl (best vs
    worst, ready for `align dpo` / `align reward`) and a table of reward by N with the analytic KL."""
    from align_cli.stages.rejection_sampling import run_rejection_sampling

    extra = {
        "rejection.n": n,
        "rejection.prompts": prompts,
        "rejection.reward_model": reward_model,
        "rejection.rounds": rounds,
        "rejection.then": then,
    }
    _run_stage(
        "rejection-sample",
        run_rejection_sampling,
        recipe,
        model,
        data,
        out,
        set_,
        resume,
        seed,
        max_steps,
        extra,
    )


@app.command(
    epilog="Examples:\n\n"
    "  align ppo --prompts examples/data/prompts.jsonl      (policy: last sft; reward model: last reward)\n\n"
    "  align ppo -r recipes/ppo-tiny.yaml --set ppo.kl_coef=0.2 --set ppo.adaptive_kl=true\n\n"
    "  align ppo -r recipes/ppo-tiny.yaml --set ppo.ptx_data=reviews.jsonl --set ppo.ptx_coef=1.0",
)
def ppo(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    resume_from_previous: FromPreviousOpt = False,
    resume_with_changes: WithChangesOpt = False,
    seed: SeedOpt = None,
    max_steps: MaxStepsOpt = None,
    prompts: Annotated[
        str | None, typer.Option("--prompts", help="Prompt JSONL (ppo.prompts).", show_default=False)
    ] = None,
    reward_model: Annotated[
        str | None,
        typer.Option(
            "--reward-model",
            help="Reward model (default: the last `align reward` output).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """RLHF with PPO (InstructGPT): per-token KL penalty to the SFT model, value model, GAE, PPO-ptx.

    --max-steps counts PPO iterations (rollout + updates). Metrics per iteration in metrics.csv; a few
    generations per iteration in samples.jsonl."""
    from align_cli.stages.ppo import run_ppo

    extra = {"ppo.prompts": prompts, "ppo.reward_model": reward_model}
    _run_stage(
        "ppo",
        run_ppo,
        recipe,
        model,
        data,
        out,
        set_,
        _resume(resume, resume_from_previous, resume_with_changes),
        seed,
        max_steps,
        extra,
    )


# ----------------------------------------------------------------------------- pipelines and evaluation


@app.command(
    epilog="Examples:\n\n"
    "  align pipeline --recipe examples/sentiment/pipeline.yaml\n\n"
    "  align pipeline -r examples/sentiment/pipeline.yaml --set output=runs/sentiment-b",
)
def pipeline(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Pipeline recipe: stages to run in order.")],
    set_: SetOpt = None,
) -> None:
    """Run the stages a pipeline recipe lists (e.g. sft -> reward -> dpo / ppo), chaining outputs.

    Each stage runs in its own directory under `output`; a finished stage is not run again and an
    interrupted one resumes from its last checkpoint. `@name` in a value means that stage's final model.

    A recipe's evaluate.ground_truth (`file.py:function`, used by `align frontier`) is code: align imports
    it and runs it as Python code with your rights; run only recipes whose code you trust."""
    from align_cli.pipeline import load_pipeline, run_pipeline

    _guarded(lambda: run_pipeline(load_pipeline(recipe, set_), console))


@app.command(
    epilog="Examples:\n\n"
    "  align frontier --recipe examples/sentiment/frontier.yaml      (what `make demo` runs)",
)
def frontier(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Pipeline recipe with an evaluate section.")],
    set_: SetOpt = None,
) -> None:
    """Run a pipeline, evaluate every method against the reference, write frontier.csv and frontier.png.

    As in the DPO paper's Figure 2 (left): ground-truth reward against KL(policy || reference) for DPO
    over several beta, PPO over several KL coefficients, best-of-N over several N, Preferred-FT and
    the SFT start.

    evaluate.ground_truth (`file.py:function` or `module:function`) is code: align imports it and runs it
    as Python code with your rights; run only recipes whose code you trust."""
    from align_cli.pipeline import load_pipeline, run_frontier

    _guarded(lambda: run_frontier(load_pipeline(recipe, set_), console))


@app.command(
    "eval",
    epilog="Examples:\n\n"
    "  align eval -m runs/dpo/final --reference runs/sft/final --prompts prompts_eval.jsonl \\\n\n"
    "      --ground-truth examples.sentiment.reviews:sentiment --reward-model runs/reward/final",
)
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="The policy to evaluate.")],
    reference: Annotated[str, typer.Option("--reference", help="The reference policy (e.g. the SFT model).")],
    prompts: Annotated[str, typer.Option("--prompts", help="Held-out prompt JSONL.")],
    ground_truth: Annotated[
        str | None,
        typer.Option(
            "--ground-truth",
            help="module:function or file.py:function, text -> reward. This is code: align imports it and "
            "runs it as Python code with your rights; name only code you trust.",
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
    from align_cli.data.prompts import load_prompts
    from align_cli.engine.metrics import print_table
    from align_cli.evaluate import Evaluator, load_reward_fn

    def run() -> None:
        fn = load_reward_fn(ground_truth) if ground_truth else None
        evaluator = Evaluator(
            reference,
            load_prompts(prompts),
            n=n,
            max_new_tokens=max_new_tokens,
            seed=seed,
            ground_truth=fn,
            reward_model=reward_model,
        )
        summary, rows = evaluator.evaluate(model)
        print_table(f"align eval: {model} vs {reference}", list(summary.items()), console)
        if out:
            import json

            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps(summary, indent=1))
            (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    _guarded(run)


def _guarded(action: Any) -> None:
    """Run ``action``; known errors become one red line and exit code 2."""
    from align_cli.engine.signals import StoppedBySignal
    from align_cli.runs import release_run_dirs

    _setup_logging()
    try:
        action()
    except _known_errors() as exc:
        _fail(str(exc))
    except StoppedBySignal as stopped:
        console.print(f"[bold yellow]{stopped}[/]")
        console.print("stopped by signal; run the same command again to continue (finished stages are kept)")
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    finally:
        release_run_dirs()


# ----------------------------------------------------------------------------- planning and export


@app.command(
    epilog="Examples:\n\n"
    "  align plan --recipe recipes/zephyr-7b/dpo.yaml\n\n"
    "  align plan -r recipes/llama2-hh/sft.yaml --processes 8 --shard zero3\n\n"
    "  align plan -r recipes/sft-tiny.yaml --set model.lora.enabled=true",
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
    from align_cli.memory import SHARDING, plan_recipe

    if shard not in SHARDING:
        _fail(f"--shard {shard!r}: choose one of {', '.join(SHARDING)}")
    if processes < 1:
        _fail("--processes: must be >= 1")
    if device not in ("cuda", "cpu"):
        _fail(f"--device {device!r}: choose cuda or cpu")

    def run() -> None:
        parsed = load_recipe(recipe, {"model.name_or_path": model}, set_)
        if not parsed.stage:
            raise RecipeError(
                f"recipe {recipe}: no `stage:`; add one (sft, reward, dpo, kto, ppo, rejection-sample)"
            )
        estimate = plan_recipe(parsed, processes, shard, device)
        t, name = parsed.training, parsed.model.name_or_path or "(chained)"
        console.print(
            f"[bold]plan[/] {recipe}: stage {parsed.stage}, model {name}, "
            f"global batch {t.micro_batch_size} x {t.grad_accum} accumulation x {processes} process(es) = "
            f"{t.micro_batch_size * t.grad_accum * processes}"
        )
        console.print(estimate.table())

    _guarded(run)


@app.command(
    epilog="Examples:\n\n"
    "  align export --model runs/sft-lora/final --merge-lora --out models/sft-merged\n\n"
    "  align export -m runs/dpo/final --out models/dpo-bf16 --dtype bfloat16",
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
    epilog="Examples:\n\n  align init-model --preset tiny --out examples/models/tiny\n\n"
    "  align init-model --preset small --out /tmp/small --seed 1\n\n"
    "  align init-model --preset tiny --base --out /tmp/tiny-base",
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
    from align_cli.presets import PRESETS
    from align_cli.presets import init_model as build

    _setup_logging()
    if preset not in PRESETS:
        _fail(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    texts = None
    if corpus:
        missing = [str(p) for p in corpus if not p.is_file()]
        if missing:
            _fail(f"--corpus: no such file(s): {', '.join(missing)}")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in corpus]
    path = build(preset, out, seed=seed, corpus=texts, chat=not base)
    console.print(f"wrote {preset} model to [bold]{path}[/]")


@data_app.command(
    "check",
    epilog="Examples:\n\n  align data check examples/data/alpaca.jsonl --model examples/models/tiny\n\n"
    "  align data check prefs.jsonl --recipe recipes/dpo-tiny.yaml\n\n"
    "  align data check HuggingFaceH4/ultrafeedback_binarized:train_prefs --stage dpo",
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
        typer.Option(
            "--stage", help="Check for this stage (default: the recipe's): sft, reward, dpo, ppo, ..."
        ),
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
