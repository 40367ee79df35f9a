"""Reference log-probs computed once and cached on disk, keyed by a hash of everything they depend on.

DPO needs log pi_ref(y|x) (summed over response tokens) for every response of every example. The
reference never changes, so these numbers are computed in one no-grad pass before training and stored
under ``$ALIGN_CACHE_DIR`` (default ``<runs root>/.align_cache``) in ``reference-logps/<key>.json``.

The key is a SHA-256 of:
- the reference model's identity: SHA-256 of the *bytes* of its config.json and weight files (a
  memo keyed by path + size + mtime avoids re-hashing an unchanged file on every run), for a LoRA
  adapter directory also those of its base model (adapter_config.json's base_model_name_or_path), its
  dtype, quantization (4-/8-bit bitsandbytes settings) and attention implementation, and the training
  precision (autocast changes the numbers);
- the tokenized examples (prompt and response token ids: data, tokenizer and template all show here);
- the template and max lengths, named explicitly.

A later run with the same key (a resume, a sweep over beta or lr, an eval) reads the numbers instead of
loading and running the reference model. Files are written to a temporary name and renamed (atomic).
Each entry holds the SHA-256 of its numbers: an entry that does not match it (a flipped byte, a file cut
short) is no hit; it is recomputed, rewritten, logged and counted (``corrupt`` in the run's summary).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from align_cli.data.preference import collate_responses
from align_cli.forward import summed_logps, to_device
from align_cli.runs import runs_root, why, write_atomic

log = logging.getLogger("align")

CACHE_VERSION = 2  # 2: entries carry a checksum of their numbers
_MODEL_FILES = ("config.json", "adapter_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE_DIR") or runs_root() / ".align_cache")


# ----------------------------------------------------------------------------- hashing


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, memoised by (resolved path, size, mtime) so big weight files are hashed
    once per version, not once per run."""
    real = path.resolve()
    st = real.stat()
    memo_path = cache_dir() / "file-digests.json"
    memo_key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    with real.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    memo = {k: v for k, v in memo.items() if Path(k.rsplit("|", 2)[0]).exists()}  # forget deleted files
    memo[memo_key] = digest.hexdigest()
    try:
        write_atomic(memo_path, json.dumps(memo, indent=0))
    except OSError:  # a read-only cache dir only costs a re-hash next time
        pass
    return memo[memo_key]


def _model_dir(name_or_path: str) -> Path:
    """The local directory of a model: the path itself, or the hub cache snapshot it was loaded from."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from transformers.utils import cached_file

    return Path(cached_file(name_or_path, "config.json")).parent


def model_identity(name_or_path: str, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """{file name: SHA-256} for the config and weight files of a model directory (or hub snapshot).

    A peft adapter directory (adapter_config.json) is loaded on top of its base model, so its identity
    also holds ``"base_model"``: the identity of ``base_model_name_or_path``, resolved as the loader does
    (a local directory, relative to the working directory, else a hub id)."""
    root = _model_dir(name_or_path)
    files = sorted(
        p for p in root.iterdir() if p.is_file() and (p.name in _MODEL_FILES or p.suffix in _WEIGHT_SUFFIXES)
    )
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"{root}: no weight files to identify the reference model by")
    identity: dict[str, Any] = {p.name: file_digest(p) for p in files}
    adapter_config = root / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config}: no base_model_name_or_path to identify the base model by")
        if root.resolve() in _seen:
            raise ValueError(f"{adapter_config}: the base model chain loops back to {root}")
        identity["base_model"] = model_identity(base, _seen | {root.resolve()})
    return identity


def examples_digest(examples: list[dict[str, Any]]) -> str:
    """SHA-256 of the token ids of every prompt and response, in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e["prompt_ids"], e["responses"]]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def reference_key(material: dict[str, Any], examples: list[dict[str, Any]]) -> str:
    """The cache key of the reference log-probs of ``examples``: ``material`` (everything else they
    depend on: the reference's identity, dtype, quantization, precision, template, max lengths) plus the
    examples' token ids and the cache version."""
    return cache_key({"version": CACHE_VERSION, **material, "examples": examples_digest(examples)})


# ----------------------------------------------------------------------------- computing and caching


@torch.no_grad()
def compute_logps(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
) -> list[list[float]]:
    """Summed log-probs of every response of every example (best first), in one no-grad pass.

    Examples are batched longest first so padding stays small; results come back in input order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: -examples[i]["length"])
    out: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_responses([examples[i] for i in chunk], pad_token_id)
        batch = to_device(batch, device)
        with autocast() if autocast else nullcontext():
            values = summed_logps(model, batch).float().cpu().tolist()
        for value, group in zip(values, batch["group"].tolist()):
            out[chunk[group]].append(value)
    model.train(was_training)
    return out


def _entry_path(key: str) -> Path:
    return cache_dir() / "reference-logps" / f"{key}.json"


def _checksum(key: str, logps: Any) -> str:
    return hashlib.sha256(json.dumps([key, logps]).encode()).hexdigest()


class CorruptEntry(Exception):
    """A cache entry that exists but does not hold what was written: never used."""


def load_entry(key: str, examples: list[dict[str, Any]]) -> list[list[float]] | None:
    """The cached log-probs for ``key``, or None when absent. Raises CorruptEntry when the file cannot be
    read, fails its checksum or does not match the examples' shapes."""
    path = _entry_path(key)
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        logps = entry["logps"]
        written = entry["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"cannot be read ({type(exc).__name__}: {exc})") from exc
    if written != _checksum(key, logps):
        raise CorruptEntry("does not match its checksum")
    if not isinstance(logps, list) or len(logps) != len(examples):
        raise CorruptEntry("holds another number of examples")
    if any(len(v) != len(e["responses"]) for v, e in zip(logps, examples)):
        raise CorruptEntry("holds another number of responses")
    return logps


def save_entry(key: str, logps: list[list[float]], meta: dict[str, Any]) -> Path:
    path = _entry_path(key)
    entry = {
        "version": CACHE_VERSION,
        "key": key,
        "meta": meta,
        "sha256": _checksum(key, logps),
        "logps": logps,
    }
    write_atomic(path, json.dumps(entry))
    return path


def attach_reference_logps(
    examples: list[dict[str, Any]], material: dict[str, Any], compute: Callable[[], list[list[float]]]
) -> dict[str, Any]:
    """Set ``example["ref_logps"]`` (one float per response) from the cache, or from ``compute()``
    (then stored). ``material`` is everything the numbers depend on except the examples, which are
    hashed here. Returns {"key", "hit", "corrupt", "path"} for the run's log and summary: ``corrupt`` when
    the entry was there but damaged (then recomputed and rewritten)."""
    key = reference_key(material, examples)
    corrupt = False
    try:
        logps = load_entry(key, examples)
    except CorruptEntry as exc:
        log.warning("reference cache entry %s %s: recomputed and written again", _entry_path(key), exc)
        logps, corrupt = None, True
    hit = logps is not None
    if logps is None:
        logps = compute()
        try:
            save_entry(key, logps, material | {"n": len(logps)})
        except OSError as exc:  # a full disk or read-only cache costs the next run a recomputation only
            log.warning(
                "cannot write the reference cache %s: %s; the reference log-probs are used for this run, "
                "not cached",
                cache_dir(),
                why(exc),
            )
    for example, values in zip(examples, logps):
        example["ref_logps"] = values
    return {"key": key, "hit": hit, "corrupt": corrupt, "path": str(_entry_path(key))}
