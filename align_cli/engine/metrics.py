"""Metric rows -> metrics.jsonl and metrics.csv (both appended as they come); rich tables; plots."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


class MetricsLog:
    """Rows of {step, ...} written to ``metrics.jsonl`` and ``metrics.csv`` as they come: a run killed
    (kill -9, a lost node) leaves every row logged before it in both files."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        if resume_step is not None and self.jsonl.exists():
            # keep what the checkpoint covers; later rows are recomputed by the resumed run
            self.rows = [r for r in read_rows(self.jsonl) if r.get("step", 0) <= resume_step]
        _replace(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if any(k not in self.columns for k in row):
            self.flush()  # a new column: the header changes, so the file is rewritten
        else:
            with self.csv.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.columns).writerow(row)

    def flush(self) -> None:
        """Rewrite metrics.csv whole (replaced at once: a kill meanwhile leaves the previous file)."""
        for row in self.rows:
            self.columns += [k for k in row if k not in self.columns]
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        _replace(self.csv, buffer.getvalue())

    def series(self, key: str) -> list[float]:
        return [r[key] for r in self.rows if key in r]


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL log; a line cut short by a killed process (the last one) is left out."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def print_table(title: str, rows: list[tuple[str, Any]], console: Console | None = None) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, fmt(value))
    (console or Console()).print(table)


def plot_metrics(log: MetricsLog, keys: list[str], path: Path) -> Path | None:
    """Line plots of ``keys`` against step; skipped quietly when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in keys if log.series(k)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [r["step"] for r in log.rows if key in r]
        ax.plot(steps, log.series(key), marker="." if len(steps) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def keep_samples_until(path: Any, iteration: int) -> None:
    """On resume, samples.jsonl keeps the iterations the checkpoint covers (the rest are redone)."""
    if not path.exists():
        return
    kept = [r for r in read_rows(path) if r.get("iteration", 0) <= iteration]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
