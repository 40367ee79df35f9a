"""Where an on-policy iteration's time goes: generation, reward scoring, the old-policy (and value)
pass, the reference pass, updates. ``SectionTimer`` accumulates named sections of one iteration; its
``row`` is the iteration's ``time/<section>_s`` metrics (plus ``time/other_s``, the rest, and
``time/iteration_s``), and ``time_split`` sums those rows over a run for summary.json and the table.

On a GPU, kernels run asynchronously: each section boundary synchronizes the device so the seconds land
in the section that launched the work, not in the next one that happens to wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

PREFIX = "time/"
# the order sections are shown in; ones that are not listed follow in the order first seen
ORDER = ("generation", "reward", "old_policy", "reference", "update", "other")
SHORT = {"old_policy": "old-policy", "reference": "ref"}


def _sync(device: torch.device | str | None) -> None:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class SectionTimer:
    """Seconds per named section of one iteration: ``begin()``, then ``with timer("generation"): ...``
    around each part, then ``row()``. A section entered twice adds up; sections must not nest."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def begin(self) -> None:
        """Start a new iteration: sections cleared, the iteration's clock started."""
        _sync(self.device)
        self.seconds = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def row(self) -> dict[str, float]:
        """This iteration's ``time/<section>_s``, ``time/other_s`` (what no section covered: decoding
        texts, advantages, metrics) and ``time/iteration_s`` (the whole, since ``begin``)."""
        _sync(self.device)
        total = time.perf_counter() - self.started
        row = {f"{PREFIX}{k}_s": v for k, v in self.seconds.items()}
        row[f"{PREFIX}other_s"] = max(total - sum(self.seconds.values()), 0.0)
        row[f"{PREFIX}iteration_s"] = total
        return row


def time_split(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The ``time/<section>_s`` of metrics rows summed over a run: {"seconds": {section: s}, "fraction":
    {section: share of the iterations' total}}; empty when no row has them."""
    seconds: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(PREFIX) and key.endswith("_s") and key != f"{PREFIX}iteration_s":
                name = key[len(PREFIX) : -2]
                seconds[name] = seconds.get(name, 0.0) + float(value)
    if not seconds:
        return {}
    ordered = [k for k in ORDER if k in seconds] + [k for k in seconds if k not in ORDER]
    seconds = {k: seconds[k] for k in ordered}
    total = sum(seconds.values()) or 1.0
    return {"seconds": seconds, "fraction": {k: v / total for k, v in seconds.items()}}


def describe_split(split: dict[str, dict[str, float]]) -> str:
    """One line for the summary table: "generation 62% / reward 5% / ref 8% / update 25% / other 0%"."""
    return " / ".join(f"{SHORT.get(k, k)} {v:.0%}" for k, v in split.get("fraction", {}).items())
