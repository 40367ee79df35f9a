"""What to say after "unknown key": the valid key the user most likely meant (a typo, a key in another
section, a TRL / transformers argument name). Torch-free: recipe validation runs before torch loads."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from typing import Any

# TRL / transformers TrainingArguments names -> align's recipe key ("*.x": the stage's own x), or a
# (key, value) pair when a flag of theirs is a value of ours, or a command-line flag
TRL_NAMES: dict[str, str | tuple[str, str]] = {
    "learning_rate": "training.lr",
    "per_device_train_batch_size": "training.micro_batch_size",
    "train_batch_size": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "num_train_epochs": "training.epochs",
    "lr_scheduler_type": "training.scheduler",
    "warmup_ratio": "training.warmup_ratio",
    "logging_steps": "training.log_every",
    "save_steps": "training.save_every",
    "eval_steps": "training.eval_every",
    "save_total_limit": "training.keep_last",
    "bf16": ("training.precision", "bf16"),
    "fp16": ("training.precision", "fp16"),
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "use_peft": "model.lora.enabled",
    "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "dataset_name": "data.train",
    "output_dir": "output.dir",
    "beta": "*.beta",
    "loss_type": "*.loss_type",
    "num_generations": "*.num_generations",
}
# flags that set a key: named in the hint (output.dir is --out)
_FLAGS = {"output.dir": "--out", "model.name_or_path": "--model", "data.train": "--data"}


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``: each field, and the fields of nested sections."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{key}.")
    return keys


def _name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _trl_hint(name: str, valid: Sequence[str]) -> str:
    target = TRL_NAMES.get(name)
    if target is None:
        return ""
    key, value = target if isinstance(target, tuple) else (target, None)
    if key.startswith("*."):
        key = next((k for k in valid if k.endswith(key[1:]) and k.count(".") == 1), "")
    if key not in valid:
        return ""
    said = f"{key}={value}" if value else key
    flag = f" (or {_FLAGS[key]})" if key in _FLAGS else ""
    return f"; did you mean {said}{flag}? ({name} is the TRL / transformers name)"


def did_you_mean(where: str, valid: Sequence[str]) -> str:
    """'; did you mean KEY?' for the unknown key ``where`` (dotted), or '' when nothing is close.

    In order: a TRL / transformers name, the same name in another section (``lr`` -> training.lr), a
    near spelling in the same section, then anywhere."""
    name = _name(where)
    hint = _trl_hint(name, valid)
    if hint:
        return hint
    parent = where[: -len(name)]
    elsewhere = [k for k in valid if _name(k) == name and k != where]
    if elsewhere:
        return f"; did you mean {' or '.join(elsewhere[:3])}?"
    siblings = [k for k in valid if k.startswith(parent) and "." not in k[len(parent) :]]
    for pool, cutoff in ((siblings, 0.6), (valid, 0.75)):
        close = difflib.get_close_matches(name, [_name(k) for k in pool], n=1, cutoff=cutoff)
        if close:
            return f"; did you mean {next(k for k in pool if _name(k) == close[0])}?"
    return ""


def unknown_key(where: str, known: Sequence[str], valid: Sequence[str] | None = None) -> str:
    """The message for an unknown key at ``where``: a suggestion among ``valid`` (every key the command
    reads) and the section's own ``known`` fields, else the allowed fields."""
    parent = where[: -len(_name(where))]
    local = [f"{parent}{k}" for k in known]
    hint = did_you_mean(where, list(dict.fromkeys([*local, *(valid or [])])))
    return (
        f"{where}: unknown key{hint}"
        if hint
        else f"{where}: unknown key (allowed: {', '.join(known) or 'none'})"
    )


def recipe_keys(recipe_cls: Any, sections: Sequence[str], unread: Sequence[str] = ()) -> list[str]:
    """The keys a stage reads: the fields of its ``sections`` of ``recipe_cls``, less ``unread``."""
    hints = typing.get_type_hints(recipe_cls)
    keys = [k for name in sections for k in [name, *schema_keys(hints[name], f"{name}.")]]
    return [k for k in keys if k not in unread]
