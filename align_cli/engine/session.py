"""What every training stage does around its algorithm: open the run, finish it, report it."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console

from align_cli.data.tokenize import DataStats
from align_cli.engine.checkpoint import checkpoint_step, latest_checkpoint, set_aside_damaged
from align_cli.engine.loop import make_accelerator
from align_cli.engine.metrics import MetricsLog, plot_metrics, print_table
from align_cli.engine.resume import Resume, check_resume, record_data_identity, resume_options
from align_cli.models import count_parameters, save_model
from align_cli.recipe import Recipe, RecipeError
from align_cli.runs import (
    FINAL,
    default_run_dir,
    peak_memory_mb,
    prepare_run_dir,
    record_output,
    write_summary,
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
    accelerator = make_accelerator(recipe.training.precision)
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
        prepare_run_dir(run_dir, options is not None, recipe.output.overwrite)
        if options is not None:
            check_resume(recipe, run_dir, options, checkpoint_step(latest_checkpoint(run_dir)))
        recipe.output.dir = str(run_dir)
        recipe.save(run_dir / "recipe.yaml")
        record_data_identity(recipe, run_dir)
    accelerator.wait_for_everyone()
    return run_dir, accelerator


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
    """Save the final model, write summary.json and a plot, print the summary table."""
    model = result["model"]
    state_dict = accelerator.get_state_dict(model)
    final_dir = run_dir / FINAL
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, final_dir, state_dict=state_dict)
    accelerator.wait_for_everyone()
    metrics: MetricsLog | None = result["metrics"]
    last = next((r for r in reversed(metrics.rows) if "loss" in r), {}) if metrics else {}
    trainable, total = count_parameters(accelerator.unwrap_model(model))
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
        "elapsed_s": result["elapsed_s"],
        "tokens_per_s": result["tokens_per_s"],
        "peak_memory_mb": peak_memory_mb(),
        "parameters_trainable": trainable,
        "parameters_total": total,
        "skipped_steps": result.get("skipped_steps", 0),
        "data": {name: stats.as_dict() for name, stats in data_stats.items()},
    }
    if accelerator.is_main_process:
        write_summary(run_dir, summary)
        if metrics:
            plot_metrics(metrics, list(plot_keys), run_dir / "metrics.png")
        record_output(stage, final_dir)
        rows = [
            ("steps", summary["steps"]),
            ("first loss", summary["first_loss"]),
            ("last loss", summary["last_loss"]),
            *[(k, v) for k, v in result["final_eval"].items()],
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
        print_table(f"align {stage}: summary", rows, console)
    return summary
