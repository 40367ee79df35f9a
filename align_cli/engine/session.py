"""What every training stage does around its algorithm: open the run, finish it, report it."""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console

from align_cli.data.tokenize import DataStats
from align_cli.engine.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_checkpoint,
    publish_dir,
    set_aside_damaged,
)
from align_cli.engine.distributed import make_accelerator
from align_cli.engine.metrics import MetricsLog
from align_cli.engine.resume import Resume, check_resume, record_data_identity, resume_options
from align_cli.engine.tracking import requested
from align_cli.models import count_parameters, save_model
from align_cli.recipe import Recipe, RecipeError
from align_cli.runs import (
    FINAL,
    default_run_dir,
    peak_memory_mb,
    prepare_run_dir,
    why,
)


def require(recipe: Recipe, *dotted: str) -> None:
    """Raise one RecipeError naming every required value that is missing."""
    missing = []
    for key in dotted:
        node: Any = recipe
        for part in key.split("."):
            node = getattr(node, part)
        if node in (None, ""):
            missing.append(key)
    if missing:
        flags = {"model.name_or_path": "--model", "data.train": "--data"}
        listed = ", ".join(f"{k} ({flags[k]})" if k in flags else k for k in missing)
        raise RecipeError(f"missing required value(s): {listed}")


def split_holdout(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A deterministic held-out split: (train, eval)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def open_run(recipe: Recipe, resume: bool | Resume) -> tuple[Path, Accelerator]:
    """Create (or reopen, with --resume) the run directory and the accelerator; save the recipe.

    A resume first sets damaged checkpoints aside (``Resume.from_previous``) and compares the recipe with
    the run's own (align_cli/engine/resume.py), before recipe.yaml is rewritten."""
    from accelerate.utils import broadcast_object_list

    options = resume_options(resume)
    accelerator = make_accelerator(recipe.training.precision, log_with=requested(recipe.training))
    chosen = [recipe.output.dir or str(default_run_dir(recipe.stage or "run"))]
    if accelerator.num_processes > 1:  # every process must agree on a timestamped default
        broadcast_object_list(chosen)
    run_dir = Path(chosen[0])
    if accelerator.is_main_process:
        if options is not None and options.from_previous:
            for damaged in set_aside_damaged(run_dir):
                logging.getLogger("align").warning(
                    "%s does not match its manifest: set aside as %s (not loaded; delete it when done)",
                    damaged.with_suffix(""),
                    damaged,
                )
        prepare_run_dir(run_dir, options is not None, recipe.output.overwrite, recipe.stage)
        if options is not None:
            latest = latest_checkpoint(run_dir)
            check_resume(recipe, run_dir, options, checkpoint_step(latest) if latest else 0)
        recipe.output.dir = str(run_dir)
        recipe.save(run_dir / "recipe.yaml")
        record_data_identity(recipe, run_dir)
    accelerator.wait_for_everyone()
    return run_dir, accelerator


def save_final(target: Path, write: Callable[[Path], Any]) -> None:
    """Write a final output (``final/``, PPO's ``final-value/``) with ``write(folder)`` into
    ``NAME.tmp``, renamed to ``NAME`` once complete: a kill leaves the previous state (the checkpoints),
    never a half-written model. A write failure (full disk, read-only folder) removes the partial folder
    and raises CheckpointError naming the path and what was kept. Callers hold SIGTERM/SIGINT off
    (``stop_on_signals``) meanwhile, so a signal lets the save finish."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        tmp.mkdir(parents=True)
        write(tmp)
        publish_dir(tmp, target)
    except Exception as exc:  # torch and safetensors report a full disk as RuntimeError too
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint = latest_checkpoint(target.parent)
        kept = (
            f"{checkpoint} (continue with --resume)"
            if checkpoint
            else "the run's metrics, but no checkpoint (training.save_every), so the run must start again"
        )
        raise CheckpointError(f"saving the final model to {target} failed: {why(exc)}; kept: {kept}") from exc


def finish_run(
    stage: str,
    recipe: Recipe,
    run_dir: Path,
    accelerator: Accelerator,
    result: dict[str, Any],
    tokenizer: Any,
    data_stats: dict[str, DataStats],
    console: Console,
    plot_keys: tuple[str, ...] = ("loss", "eval/loss", "lr", "grad_norm"),
) -> dict[str, Any]:
    """The end of a supervised run (engine/loop.py): the final model, summary.json, plot and the summary
    table, through the run's ``finish`` (a SIGTERM/SIGINT meanwhile lets it all finish)."""
    model = result["model"]

    def write_models(final_dir: Path) -> None:
        state_dict = accelerator.get_state_dict(model)  # every process joins: gathers sharded weights
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            save_final(
                final_dir, lambda folder: save_model(unwrapped, tokenizer, folder, state_dict=state_dict)
            )

    def summarize() -> tuple[dict[str, Any], list[tuple[str, Any]]]:
        return _summary(stage, recipe, run_dir, accelerator, result, data_stats)

    return result["run"].finish(write_models, summarize, list(plot_keys))


def _summary(
    stage: str,
    recipe: Recipe,
    run_dir: Path,
    accelerator: Accelerator,
    result: dict[str, Any],
    data_stats: dict[str, DataStats],
) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    final_dir = run_dir / FINAL
    metrics: MetricsLog | None = result["metrics"]
    last = next((r for r in reversed(metrics.rows) if "loss" in r), {}) if metrics else {}
    trainable, total = count_parameters(accelerator.unwrap_model(result["model"]))
    best = result.get("best")  # engine/best.py: training.save_best / early_stopping_patience
    for name, stats in data_stats.items():  # every record read is either trained on or counted as dropped
        if stats.read != stats.kept + sum(stats.dropped.values()):
            logging.getLogger("align").warning(
                "data accounting (%s) does not add up: %s", name, stats.describe()
            )
    summary = {
        "stage": stage,
        "run_dir": str(run_dir),
        "final_model": str(final_dir),
        "steps": result["steps"],
        "first_loss": result["first_loss"],
        "last_loss": last.get("loss"),
        **{k: v for k, v in result["final_eval"].items()},
        **(best.summary() if best else {}),
        "elapsed_s": result["elapsed_s"],
        "tokens_per_s": result["tokens_per_s"],
        "peak_memory_mb": peak_memory_mb(),
        "parameters_trainable": trainable,
        "parameters_total": total,
        "skipped_steps": result.get("skipped_steps", 0),
        "data": {name: stats.as_dict() for name, stats in data_stats.items()},
    }
    rows = [
        ("steps", summary["steps"]),
        ("first loss", summary["first_loss"]),
        ("last loss", summary["last_loss"]),
        *[(k, v) for k, v in result["final_eval"].items()],
        *(best.rows() if best else []),
        ("tokens/s (train)", summary["tokens_per_s"]),
        ("peak memory (MB)", summary["peak_memory_mb"]),
        ("trainable / total params", f"{trainable:,} / {total:,}"),
        *[(f"examples ({name})", stats.describe()) for name, stats in data_stats.items() if stats.read],
        *(
            [("skipped steps (non-finite)", summary["skipped_steps"])]
            if recipe.training.nan_policy == "skip" or summary["skipped_steps"]
            else []
        ),
        ("elapsed (s)", summary["elapsed_s"]),
        ("final model", str(final_dir)),
    ]
    return summary, rows
