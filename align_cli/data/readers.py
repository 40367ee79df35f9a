"""Every place data comes from, read through one function into rows that know where they came from.

``read_rows(source, options)`` takes a JSONL file (streamed line by line, bounded memory), a JSON file
(an array, as the original ``alpaca_data.json``, or JSON lines), Parquet, CSV or TSV (through pyarrow,
the engine of ``datasets``), a ``datasets.save_to_disk`` folder, a folder of such files, or a hub data
set id (``name``, ``name:split``; ``data.hub_split`` and ``data.hub_config``). Each row is
(source, number, object): the source is the file (a folder's rows name their own file), the number is
the line a record starts on for JSONL and JSON, the 1-based row for Parquet and hub sets, and the line
in the file for CSV/TSV (the header is line 1). So every error still reads ``FILE:N: field: problem``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_cli.errors import AlignError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
Row = tuple[str, int, Any]  # (source, line or row number, record)
MAX_REPORTED_ERRORS = 20
# a JSONL line longer than this is refused without being read into memory (a runaway line is almost
# always a broken export, e.g. a whole file on one line); ALIGN_MAX_LINE_MB changes it
MAX_LINE_MB_ENV = "ALIGN_MAX_LINE_MB"
DEFAULT_MAX_LINE_MB = 10.0


class DataError(AlignError, ValueError):
    """Input data that cannot be used; the message names file, line and field."""


def raise_collected(errors: list[str], source: Any) -> None:
    """One DataError naming ``source`` with every collected problem (``file:line: field: problem``)."""
    if errors:
        more = " (showing the first ones)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        raise DataError(f"{source}: {len(errors)} bad record(s){more}:\n  " + "\n  ".join(errors))


@dataclass
class ReadOptions:
    """How to read a source: the hub split and config, and the column and role renames
    (``data.columns``: our field -> the source's column; ``data.roles``: the source's role -> ours)."""

    split: str = "train"
    config: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)


def read_options(data: Any) -> ReadOptions:
    """The reading settings of a recipe's ``data`` section."""
    return ReadOptions(data.hub_split, data.hub_config, dict(data.columns), dict(data.roles))


# ----------------------------------------------------------------------------- JSON and JSONL


def max_line_bytes() -> int:
    raw = os.environ.get(MAX_LINE_MB_ENV)
    try:
        megabytes = float(raw) if raw else DEFAULT_MAX_LINE_MB
    except ValueError:
        raise DataError(f"{MAX_LINE_MB_ENV}={raw!r}: expected a number of megabytes") from None
    return max(1, int(megabytes * 2**20))


def _lines(handle: Any, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes or None when longer than ``limit``, size in bytes), reading at most about
    ``limit`` bytes at a time: an overlong line is skipped in bounded chunks, never held whole."""
    line_no = 0
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield line_no, raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = handle.readline(2**20)
            if not raw:
                break
            size += len(raw)
        yield line_no, None, size


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # plain json would keep the last value, silently
            raise ValueError(f"duplicate key {key!r} (which value is meant?)")
        obj[key] = value
    return obj


# refuses NaN/Infinity (and numbers that overflow to inf): such a value in a margin or score would turn
# the loss into NaN; and a key given twice in one object (which value was meant?)
JSON_DECODER = json.JSONDecoder(
    parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys
)


def parse_json_line(text: str) -> Any:
    """One JSON document, by ``JSON_DECODER``. Raises ValueError with the reason."""
    try:
        return JSON_DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """Parse a JSONL file into (line number, object); blank lines are skipped.

    The file is read line by line. Non-UTF-8 bytes, malformed JSON, NaN/Infinity and lines longer than
    ``ALIGN_MAX_LINE_MB`` (default 10) are errors naming the line; all of them are reported together."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    limit = max_line_bytes()
    rows, errors = [], []
    with p.open("rb") as handle:
        for line_no, raw, size in _lines(handle, limit):
            if raw is None:
                errors.append(
                    f"{p}:{line_no}: line is {size / 2**20:.1f} MB; lines over {limit / 2**20:g} MB are "
                    f"refused (set {MAX_LINE_MB_ENV} to allow longer ones)"
                )
            else:
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading BOM is fine
                except UnicodeDecodeError as exc:
                    bad = raw[exc.start : exc.start + 1]
                    errors.append(f"{p}:{line_no}: not valid UTF-8 (byte {exc.start}: {bad!r})")
                    continue
                if not text.strip():
                    continue
                try:
                    rows.append((line_no, parse_json_line(text)))
                except ValueError as exc:
                    errors.append(f"{p}:{line_no}: malformed JSON: {exc}")
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    raise_collected(errors, p)
    if not rows:
        raise DataError(f"{p}: no records (the file is empty or only blank lines)")
    return rows


# ----------------------------------------------------------------------------- every source


def read_rows(source: str, options: ReadOptions | None = None) -> list[Row]:
    """Every row of ``source`` (see the module docstring), in order. Raises DataError naming the source
    (for JSONL with every bad line)."""
    options = options or ReadOptions()
    path = Path(source)
    if path.is_dir():
        if any(
            (path / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            return _read_saved(path, options.split)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(
                f"{source}: a folder with no data files ({', '.join(FILE_SUFFIXES)}) and no saved data set"
            )
        return [row for p in files for row in read_file(p)]
    if path.is_file():
        return read_file(path)
    if source.endswith(FILE_SUFFIXES):
        raise DataError(f"{source}: no such file")
    return _read_hub(source, options)


def read_file(path: Path) -> list[Row]:
    suffix = path.suffix
    if suffix == ".jsonl":
        return [(str(path), line, obj) for line, obj in read_jsonl(path)]
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = _arrow(path, lambda: pq.read_table(path))
        return [(str(path), i + 1, row) for i, row in enumerate(table.to_pylist())]
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    raise DataError(
        f"{path}: unknown file type {suffix or '(none)'}; expected one of {', '.join(FILE_SUFFIXES)}"
    )


def _arrow(path: Path, read: Any) -> Any:
    import pyarrow as pa

    try:
        return read()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read it as {path.suffix[1:].upper()}: {exc}") from exc


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    """CSV/TSV cells are text (a column of digits stays text: an answer "5" is not the number 5); a cell
    holding a JSON list or object (messages) is decoded, and a ``margin`` cell read as a number."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    parse = pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    header = _arrow(path, lambda: pcsv.open_csv(path, parse_options=parse).schema.names)
    convert = pcsv.ConvertOptions(
        column_types={name: pa.string() for name in header}, strings_can_be_null=False
    )
    table = _arrow(path, lambda: pcsv.read_csv(path, parse_options=parse, convert_options=convert))
    return [
        (str(path), i + 2, {k: _csv_cell(k, v) for k, v in row.items()})
        for i, row in enumerate(table.to_pylist())
    ]


def _csv_cell(key: str, value: str) -> Any:
    if key == "margin" or value[:1] in ("[", "{"):
        try:
            decoded = JSON_DECODER.decode(value)
        except ValueError:
            return value
        if isinstance(decoded, (list, dict)) or key == "margin":
            return decoded
    return value


def _read_json(path: Path) -> list[Row]:
    """A JSON array of records (each numbered by the line it starts on), or JSON lines."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        return [(str(path), line, obj) for line, obj in read_jsonl(path)]  # JSON lines in a .json file
    rows, pos = [], start + 1
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            break
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = JSON_DECODER.raw_decode(text, pos)
        except ValueError as exc:
            raise DataError(f"{path}:{line}: malformed JSON in the array: {exc}") from None
        rows.append((str(path), line, obj))
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{line}: malformed JSON array: expected ',' or ']' after a record")
    if not rows:
        raise DataError(f"{path}: no records (an empty JSON array)")
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_saved(path: Path, split: str) -> list[Row]:
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot load the saved data set: {exc}") from exc
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(saved)} (set data.hub_split)")
        saved = saved[split]
    return [(str(path), i + 1, row) for i, row in enumerate(saved)]


def _read_hub(name: str, options: ReadOptions) -> list[Row]:
    import datasets

    split = options.split
    if ":" in name:  # name:split
        name, split = name.rsplit(":", 1)
    try:
        ds = datasets.load_dataset(name, options.config, split=split)
    except Exception as exc:  # datasets raises many kinds; the user needs the name and the reason
        raise DataError(
            f"{name}: could not load data set (config {options.config!r}, split {split!r}): {exc}"
        ) from exc
    return [(name, i + 1, row) for i, row in enumerate(ds)]
