"""A training set from several sources (data.train as a list), each taken in its own share.

Zephyr, Tulu and Llama 2 train on mixtures. A source's ``weight`` w takes round(w * its size) of its
examples: w < 1 a subset drawn with the run's seed, w > 1 whole copies plus a drawn remainder;
``max_examples`` caps what is taken. Each source is read and validated on its own (its own columns,
roles, split), so errors still name its file and line, and the summary counts what each gave.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from align_cli.data.formats import DataError, Record, load_records
from align_cli.data.readers import ReadOptions, read_options


def source_options(source: Any, data: Any) -> tuple[str, ReadOptions]:
    """(path, reading options) of one source: a string, or a SourceSection whose unset fields follow
    the data section."""
    base = read_options(data)
    if isinstance(source, str):
        return source, base
    return source.path, replace(
        base,
        split=source.split or base.split,
        config=source.config or base.config,
        columns=source.columns or base.columns,
        roles=source.roles or base.roles,
    )


def take_share(
    records: list[Record], weight: float | None, max_examples: int | None, seed: int
) -> list[Record]:
    """The examples a source contributes: round(weight * n) (whole copies, then a seeded draw), capped
    at max_examples; all of them when neither is set."""
    n = len(records)
    wanted = n if weight is None else round(weight * n)
    if max_examples is not None:
        wanted = min(wanted, max_examples)
    copies, rest = divmod(wanted, n) if n else (0, 0)
    drawn = random.Random(seed).sample(range(n), rest)
    return records * copies + [records[i] for i in sorted(drawn)]


def load_mixture(
    train: str | list, kind: str, allowed: Iterable[str], data: Any, seed: int
) -> tuple[list[Record], dict[str, dict[str, int]]]:
    """Every record of ``train`` (one source, or a list of sources with shares) and, for a list, per
    source how many it held and how many were taken: {path: {"read": n, "taken": m}} ({} for one source)."""
    sources = train if isinstance(train, list) else [train]
    if not sources:
        raise DataError("data.train: an empty list of sources")
    records, counts = [], {}
    for index, source in enumerate(sources):
        path, options = source_options(source, data)
        found = load_records(path, kind, allowed, options)
        weight = None if isinstance(source, str) else source.weight
        cap = None if isinstance(source, str) else source.max_examples
        taken = take_share(found, weight, cap, seed * 1_000_003 + index)
        name = path if path not in counts else f"{path} ({index + 1})"
        counts[name] = {"read": len(found), "taken": len(taken)}
        records += taken
    return records, counts if isinstance(train, list) else {}
