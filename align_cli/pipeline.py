"""`align pipeline` and `align frontier`: several stages from one recipe, then their evaluation.

A pipeline recipe lists stages, each a stage recipe plus ``--set`` style overrides; ``@name`` in a
value stands for the final model of an earlier stage, and ``@name/FILE`` for a file of its run folder
(``@pairs/pairs.jsonl``: a rejection-sample stage's preference pairs), so outputs chain explicitly.
A stage may sweep one key over several values (e.g. dpo.beta), becoming one run per value. Every
stage runs in its own directory under ``output``, named after the stage (a plain name, so no stage
writes outside it); a stage whose directory already holds a finished run (summary and complete final
model) is not run again, and an interrupted one resumes from its last checkpoint (rejection sampling:
after its finished rounds). `align frontier` then evaluates every policy against the reference and
plots reward against KL, one series per method (DPO paper, Figure 2 left).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from align_cli.engine.metrics import fmt
from align_cli.engine.tracking import TrackingError, check_trackers
from align_cli.recipe import RecipeError, _build, load_recipe
from align_cli.runs import can_resume, is_complete_model
from align_cli.stages import STAGES


@dataclass
class SweepSection:
    key: str = ""
    values: list[float] = field(default_factory=list)


@dataclass
class StageEntry:
    name: str = ""
    stage: str = ""
    recipe: str | None = None
    set: list[str] = field(default_factory=list)
    sweep: SweepSection | None = None


@dataclass
class EvaluateSection:
    reference: str = "@sft"  # the policy every method is compared with (pi_ref = pi_SFT)
    prompts: str = ""
    ground_truth: str | None = None  # module:function, text -> float
    reward_model: str | None = None
    n: int = 4  # samples per prompt
    max_new_tokens: int = 32
    seed: int = 0
    methods: dict[str, list[str]] = field(default_factory=dict)  # series -> stage names (sweeps expand)
    best_of_n: list[int] = field(default_factory=list)
    # the comparison at equal KL: each method's best reward with KL(policy || reference) <= each budget
    kl_budgets: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0])


@dataclass
class PipelineRecipe:
    output: str = "runs/pipeline"
    stages: list[StageEntry] = field(default_factory=list)
    evaluate: EvaluateSection | None = None


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def load_pipeline(path: str | Path, sets: list[str] | None = None) -> PipelineRecipe:
    from align_cli.recipe import _apply, parse_override, range_problems, read_yaml_mapping

    p = Path(path)
    tree = read_yaml_mapping(p, "pipeline recipe")
    for item in sets or []:
        dotted, value = parse_override(item)
        _apply(tree, dotted, value)
    errors: list[str] = []
    recipe = _build(PipelineRecipe, tree, "", errors)
    names = set()
    for i, entry in enumerate(recipe.stages):
        if entry.stage not in STAGES:
            errors.append(f"stages[{i}].stage: {entry.stage!r} is not one of {', '.join(STAGES)}")
        if problem := name_problem(entry.name):
            errors.append(f"stages[{i}].name: {problem}")
        if entry.name in names:
            errors.append(f"stages[{i}].name: {entry.name!r} is used twice")
        names.add(entry.name)
        if entry.sweep is not None:
            errors += range_problems(f"stages[{i}].sweep.values", entry.sweep.values, "finite")
    ev = recipe.evaluate
    if ev is not None:
        errors += range_problems("evaluate.n", ev.n, "> 0")
        errors += range_problems("evaluate.max_new_tokens", ev.max_new_tokens, "> 0")
        errors += range_problems("evaluate.best_of_n", ev.best_of_n, "> 0")
    if errors:
        raise RecipeError(f"pipeline recipe {p}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    finals: dict[str, Path] = {}  # every stage's recipe is checked before any stage runs
    dirs: dict[str, Path] = {}
    for index, (name, entry, sets, _) in enumerate(expand(recipe.stages), start=1):
        try:
            stage_recipe = load_recipe(
                entry.recipe, None, _resolve_sets(sets, finals, dirs), stage=entry.stage
            )
            check_trackers(stage_recipe.training)  # a tracker package missing: before the first stage runs
        except (RecipeError, TrackingError) as exc:
            raise RecipeError(f"pipeline recipe {p}: stage {name}: {exc}") from None
        dirs[name] = stage_dir(Path(recipe.output), index, name)
        finals[name] = dirs[name] / "final"  # a stand-in for its output
    return recipe


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a stage (its run folder is ``NN-name`` under the pipeline's output), or
    None: a plain name, so no stage's folder can escape the output."""
    if not name:
        return "missing"
    if not _PLAIN_NAME.match(name) or ".." in name or name == ".":
        return f"{name!r} is not a plain name (letters, digits, '-', '_', '.'; no '/', no '..')"
    return None


def stage_dir(root: Path, index: int, name: str) -> Path:
    """The run folder of a stage: a child of ``root`` (checked here too, for recipes built in code)."""
    if problem := name_problem(name):
        raise RecipeError(f"pipeline stage name: {problem}")
    return root / f"{index:02d}-{name}"


def expand(entries: list[StageEntry]) -> list[tuple[str, StageEntry, list[str], float | None]]:
    """(run name, entry, overrides, swept value) for every run; sweeps become one run per value."""
    runs = []
    for entry in entries:
        if entry.sweep is None:
            runs.append((entry.name, entry, list(entry.set), None))
            continue
        for value in entry.sweep.values:
            shown = f"{value:g}"
            runs.append((f"{entry.name}-{shown}", entry, [*entry.set, f"{entry.sweep.key}={value}"], value))
    return runs


def _resolve_refs(value: str, finals: dict[str, Path], dirs: dict[str, Path] | None = None) -> str:
    """``@name``: the final model of the earlier stage ``name``; ``@name/FILE``: a file of its run folder
    (e.g. ``@pairs/pairs.jsonl``, the preference pairs a rejection-sample stage wrote)."""
    if value.startswith("@"):
        name, slash, rest = value[1:].partition("/")
        if name not in finals:
            raise RecipeError(f"{value}: no earlier stage is named {name!r}")
        if not slash:
            return str(finals[name])
        if not rest or ".." in Path(rest).parts or Path(rest).is_absolute():
            raise RecipeError(f"{value}: expected @{name}/FILE, a file inside that stage's run folder")
        if dirs is None:
            raise RecipeError(f"{value}: only a stage's settings can name a file of another stage")
        return str(dirs[name] / rest)
    return value


def _resolve_sets(sets: list[str], finals: dict[str, Path], dirs: dict[str, Path] | None = None) -> list[str]:
    """``key=@name`` -> ``key=<that stage's final model>``; ``key=@name/FILE`` -> a file of its folder."""
    resolved = []
    for item in sets:
        key, _, value = item.partition("=")
        resolved.append(f"{key}={_resolve_refs(value.strip(), finals, dirs)}")
    return resolved


def _final_of(run_dir: Path) -> Path | None:
    """The final model of a finished stage: its summary.json names it and it is complete (config and
    weights; a final.tmp never renamed in does not count). Else None: the stage is run (or resumed)."""
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):  # no summary yet, or one cut short by a kill
        return None
    if not isinstance(data, dict):
        return None
    final = data.get("final_model") or (data.get("rounds") or [{}])[-1].get("policy_after")
    return Path(final) if final and is_complete_model(Path(final)) else None


def run_pipeline(recipe: PipelineRecipe, console: Console) -> dict[str, Path]:
    """Run every stage in order (skipping finished ones); return run name -> final model directory."""
    root = Path(recipe.output)
    root.mkdir(parents=True, exist_ok=True)
    os.environ["ALIGN_RUNS_DIR"] = str(root / "runs")  # chaining by default stays inside the pipeline
    finals: dict[str, Path] = {}
    dirs: dict[str, Path] = {}
    for index, (name, entry, sets, _) in enumerate(expand(recipe.stages), start=1):
        run_dir = dirs[name] = stage_dir(root, index, name)
        done = _final_of(run_dir)
        if done is not None:
            console.print(f"[dim]pipeline: {name} already finished ({run_dir}); not run again[/]")
            finals[name] = done
            continue
        stage_recipe = load_recipe(
            entry.recipe,
            {"output.dir": str(run_dir)},
            [*_resolve_sets(sets, finals, dirs), "output.overwrite=true"],
            stage=entry.stage,
        )
        console.rule(f"pipeline: {name} ({entry.stage})")
        resume = can_resume(run_dir, entry.stage)  # interrupted: continue it (else it starts afresh)
        STAGES[entry.stage].load().run(stage_recipe, resume=resume, console=console)
        final = _final_of(run_dir)
        if final is None:
            raise RecipeError(f"pipeline: stage {name} finished without a final model in {run_dir}")
        finals[name] = final
    return finals


# ----------------------------------------------------------------------------- the frontier


def run_frontier(recipe: PipelineRecipe, console: Console) -> list[dict[str, Any]]:
    """Run the pipeline, evaluate each method's policies and best-of-N; write frontier.csv/png/jsonl."""
    from align_cli.data.prompts import load_prompts
    from align_cli.evaluate import Evaluator, load_reward_fn
    from align_cli.runs import read_json_object

    ev = recipe.evaluate
    if ev is None or not ev.prompts:
        raise RecipeError("frontier: the recipe needs an evaluate section with prompts")
    finals = run_pipeline(recipe, console)
    root = Path(recipe.output)
    swept = {name: (entry, value) for name, entry, _, value in expand(recipe.stages)}
    evaluator = Evaluator(
        _resolve_refs(ev.reference, finals),
        load_prompts(ev.prompts),
        n=ev.n,
        max_new_tokens=ev.max_new_tokens,
        seed=ev.seed,
        ground_truth=load_reward_fn(ev.ground_truth) if ev.ground_truth else None,
        reward_model=_resolve_refs(ev.reward_model, finals) if ev.reward_model else None,
    )
    cache_dir = root / "eval"
    cache_dir.mkdir(exist_ok=True)
    rows = []
    for method, stage_names in ev.methods.items():
        for stage_name in stage_names:
            runs = [n for n, (entry, _) in swept.items() if n == stage_name or entry.name == stage_name]
            if not runs:
                raise RecipeError(f"evaluate.methods.{method}: no stage named {stage_name!r}")
            for run in runs:
                cached = cache_dir / f"{run}.json"
                if cached.is_file():
                    summary = read_json_object(cached, f"delete it to evaluate {run} again")
                else:
                    console.print(f"evaluating {run} ...")
                    summary, samples = evaluator.evaluate(str(finals[run]))
                    with (cache_dir / f"{run}.samples.jsonl").open("w") as handle:
                        handle.writelines(json.dumps(s) + "\n" for s in samples)
                    cached.write_text(json.dumps(summary))
                rows.append({"method": method, "run": run, "param": swept[run][1], **summary})
    if ev.best_of_n:
        console.print(f"evaluating best-of-N for N in {ev.best_of_n} ...")
        for row in evaluator.best_of_n(ev.best_of_n):
            rows.append({"method": "Best-of-N", "run": f"best-of-{row['n']}", "param": row["n"], **row})
    write_frontier(rows, root, console, ev.kl_budgets)
    return rows


def best_within_kl(rows: list[dict[str, Any]], budgets: list[float]) -> list[dict[str, Any]]:
    """Per method and KL budget B (nats): the best reward among its runs with KL(policy || reference) <= B
    (the ground-truth reward when the frontier measured one, else the reward model's score), the run that
    reached it and its KL; None where no run of the method stays within B. The frontier as a table: which
    method gets the most reward for the same divergence from the reference (DPO paper, Figure 2)."""
    metric = "reward" if any(r.get("reward") is not None for r in rows) else "rm_score"
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [
            r for r in rows if r["method"] == method and r.get(metric) is not None and r.get("kl") is not None
        ]
        for budget in budgets:
            best = max((r for r in runs if r["kl"] <= budget), key=lambda r: r[metric], default=None)
            found = (best[metric], best["run"], best["kl"]) if best else (None, None, None)
            out.append(dict(zip(("method", "budget", "reward", "run", "kl"), (method, budget, *found))))
            out[-1]["metric"] = metric
    return out


def write_frontier(
    rows: list[dict[str, Any]], root: Path, console: Console, kl_budgets: list[float] | None = None
) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with (root / "frontier.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = Table(title="reward vs KL to the SFT reference")
    shown = [
        c for c in ("method", "run", "reward", "rm_score", "kl", "kl_analytic", "win_rate") if c in columns
    ]
    for column in shown:
        table.add_column(column, justify="left" if column in ("method", "run") else "right")
    for row in rows:
        table.add_row(*[fmt(row[c]) if c in row and row[c] is not None else "" for c in shown])
    console.print(table)
    if kl_budgets:
        write_kl_budgets(best_within_kl(rows, kl_budgets), kl_budgets, root, console)
    plot_frontier(rows, root / "frontier.png")
    console.print(f"wrote {root / 'frontier.csv'} and {root / 'frontier.png'}")


def write_kl_budgets(best: list[dict[str, Any]], budgets: list[float], root: Path, console: Console) -> None:
    """frontier_kl.csv and a table: a row per method, a column per KL budget, "reward (run)" in each cell."""
    with (root / "frontier_kl.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "budget", "metric", "reward", "run", "kl"])
        writer.writeheader()
        writer.writerows(best)
    metric = best[0]["metric"] if best else "reward"
    table = Table(title=f"best {metric} within a KL budget (nats; KL to the reference)")
    table.add_column("method")
    for budget in budgets:
        table.add_column(f"KL <= {budget:g}", justify="right")
    for method in dict.fromkeys(b["method"] for b in best):
        cells = {b["budget"]: b for b in best if b["method"] == method}
        shown = [cells[b] for b in budgets]
        table.add_row(method, *[f"{fmt(c['reward'])} ({c['run']})" if c["run"] else "-" for c in shown])
    console.print(table)


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_key = "reward" if any("reward" in r for r in rows) else "rm_score"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["kl"], r[y_key], r["run"]) for r in rows if r["method"] == method)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", label=method, linestyle="-" if len(points) > 1 else "none")
        for row in (r for r in rows if r["method"] == method and r.get("param") is not None):
            ax.annotate(
                f"{row['param']:g}",
                (row["kl"], row[y_key]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel("ground-truth reward" if y_key == "reward" else "reward-model score")
    ax.set_title("Reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
