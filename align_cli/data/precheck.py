"""A torch-free pass over a training command's data files, run by the CLI before the stage module (and
so torch and transformers) is imported: a bad JSON line or a missing field is reported as
``file:line: field: problem`` in about a second instead of after the libraries load.

It reads local files only, with the readers and validators the stage itself uses (the stage reads them
again); hub data sets and saved ``datasets`` folders are left to the stage (they need ``datasets``).
Tokenizer-level checks (lengths, chat templates) stay in the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align_cli.data.formats import PREFERRED_FT_KINDS, SFT_KINDS, load_records
from align_cli.data.mixture import source_options
from align_cli.data.prompts import load_prompts
from align_cli.data.readers import FILE_SUFFIXES, read_options

# the record kinds each record-reading stage accepts (as its module's *_KINDS; tests/test_fast_errors.py
# checks they agree)
RECORD_KINDS: dict[str, tuple[str, ...]] = {
    "sft": SFT_KINDS + PREFERRED_FT_KINDS,
    "reward": ("preference", "ranked"),
    "dpo": ("preference", "ranked"),
    "kto": ("unpaired",),
}
# the stages that read prompts: their recipe section (prompts there, else data.train)
PROMPT_SECTIONS = {
    "ppo": "ppo",
    "grpo": "grpo",
    "rloo": "rloo",
    "online-dpo": "online_dpo",
    "rejection-sample": "rejection",
}
# what `align reward score` scores: pairs, rankings, or single responses
SCORE_KINDS = ("preference", "ranked", "prompt_completion", "messages")
_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_local(source: str) -> bool:
    """Whether ``source`` names a local file or folder of files (a missing path with a data file's
    suffix counts: its reader says "no such file" at once); not a hub id nor a saved data set."""
    path = Path(source)
    if path.is_dir():
        return not any((path / marker).is_file() for marker in _SAVED_MARKERS)
    return path.is_file() or source.endswith(FILE_SUFFIXES)


def precheck_data(recipe: Any, stage: str) -> None:
    """Read and validate the local data files ``stage`` would read; raises DataError (file:line: field)."""
    d = recipe.data
    if stage in RECORD_KINDS:
        kinds = RECORD_KINDS[stage]
        for source in d.train if isinstance(d.train, list) else [d.train] if d.train else []:
            path, options = source_options(source, d)
            if is_local(path):
                load_records(path, d.format, kinds, options)
        if d.eval and is_local(d.eval):
            load_records(d.eval, d.format, kinds, read_options(d))
    elif stage in PROMPT_SECTIONS:
        section = getattr(recipe, PROMPT_SECTIONS[stage])
        prompts = section.prompts or (d.train if isinstance(d.train, str) else None)
        if prompts and is_local(prompts):
            load_prompts(prompts, read_options(d))
        ptx = getattr(section, "ptx_data", None)
        if ptx and is_local(ptx):
            load_records(ptx, "auto", SFT_KINDS)
