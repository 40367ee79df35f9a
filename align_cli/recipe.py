"""The recipe: a typed, validated view of a YAML file plus command-line overrides.

Every section is a dataclass; the YAML schema *is* these classes. Unknown keys, wrong types,
values outside a field's choices and missing required values are all collected and reported at
once, so a user fixes a recipe in one go. Overrides use dotted keys: ``--set training.lr=1e-5``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used; the message lists every problem found."""


def choices(*allowed: str, default: Any) -> Any:
    """A dataclass field restricted to ``allowed`` values."""
    return field(default=default, metadata={"choices": allowed})


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelSection:
    # Hub id or local directory. Empty: chain from the last run of the previous stage.
    name_or_path: str | None = None
    dtype: str = choices("float32", "bfloat16", "float16", default="float32")
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class DataSection:
    train: str | None = None  # JSONL path or hub data set id
    eval: str | None = None  # JSONL path or hub data set id; else eval_fraction of train
    eval_fraction: float = 0.0
    hub_split: str = "train"
    format: str = choices(
        "auto", "alpaca", "prompt_completion", "messages", "text", "preference", "ranked", default="auto"
    )
    # auto: Alpaca for instruction records, plain concatenation for prompt/completion, chat for messages
    template: str = choices("auto", "alpaca", "chat", "plain", default="auto")
    max_length: int = 512
    max_prompt_length: int | None = None
    # too long: keep what fits ("truncate") or drop the example ("drop"); both are counted
    on_too_long: str = choices("truncate", "drop", default="truncate")
    packing: bool = False  # padding-free: a micro-batch becomes one row, attention kept per example
    group_by_length: bool = True


@dataclass
class TrainingSection:
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    optimizer: str = choices("adamw", "adamw_8bit", "paged_adamw_8bit", default="adamw")
    scheduler: str = choices("cosine", "linear", "constant", default="cosine")
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # lower bound on warmup (Llama 2: 3% of steps, at least 5)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr (Llama 2 RM: 0.1)
    max_grad_norm: float | None = 1.0
    precision: str = choices("fp32", "bf16", "fp16", default="fp32")
    seed: int = 42
    log_every: int = 1
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int = 2


@dataclass
class OutputSection:
    dir: str | None = None  # default: runs/<stage>/<timestamp>
    overwrite: bool = False


@dataclass
class SFTSection:
    pass


@dataclass
class Recipe:
    stage: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)
    sft: SFTSection = field(default_factory=SFTSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return it converted, or record an error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            trial: list[str] = []
            converted = _coerce(value, option, where, trial)
            if not trial:
                return converted
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    if tp is type(None):
        if value is not None:
            errors.append(f"{where}: expected null, got {value!r}")
        return None
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
            return None
        return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping (section), got {value!r}")
            return tp()
        return _build(tp, value, where, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return None


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            errors.append(f"{where}: unknown key (allowed: {', '.join(known) or 'none'})")
            continue
        converted = _coerce(value, hints[key], where, errors)
        allowed = known[key].metadata.get("choices")
        if allowed and converted is not None and converted not in allowed:
            errors.append(f"{where}: {converted!r} is not one of {', '.join(allowed)}")
        kwargs[key] = converted
    instance = cls()
    for key, value in kwargs.items():
        if value is not None or typing.get_origin(hints[key]) in (typing.Union, types.UnionType):
            setattr(instance, key, value)
    return instance


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml value of c)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set training.lr=1e-5")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _apply(tree: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = tree
    for part in dotted[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[dotted[-1]] = value


def load_recipe(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    stage: str | None = None,
) -> Recipe:
    """Read a recipe YAML, apply flag ``overrides`` (dotted key -> value, None = not given),
    then ``--set`` items, and validate the result. Raises RecipeError listing every problem."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe {p}: no such file")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {p}: the top level must be a mapping of sections")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is not None:
            _apply(tree, key.split("."), value)
    for item in sets or []:
        dotted, value = parse_override(item)
        _apply(tree, dotted, value)
    if stage is not None:
        if tree.get("stage") not in (None, stage):
            raise RecipeError(f"recipe is for stage {tree['stage']!r}, not {stage!r}")
        tree["stage"] = stage
    errors: list[str] = []
    recipe = _build(Recipe, tree, "", errors)
    errors += _check_values(recipe)
    if errors:
        source = f"recipe {path}" if path else "recipe"
        raise RecipeError(f"{source}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    return recipe


def _check_values(r: Recipe) -> list[str]:
    errors = []
    t, d = r.training, r.data
    positive = {
        "training.micro_batch_size": t.micro_batch_size,
        "training.grad_accum": t.grad_accum,
        "training.log_every": t.log_every,
        "training.keep_last": t.keep_last,
        "data.max_length": d.max_length,
    }
    errors += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if v is not None and v <= 0]
    if t.lr is not None and t.lr < 0:
        errors.append(f"training.lr: must be >= 0, got {t.lr}")
    if not 0.0 <= (d.eval_fraction or 0.0) < 1.0:
        errors.append(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    if t.max_steps is not None and t.max_steps <= 0:
        errors.append(f"training.max_steps: must be > 0, got {t.max_steps}")
    if t.epochs is not None and t.epochs <= 0:
        errors.append(f"training.epochs: must be > 0, got {t.epochs}")
    if len(t.adam_betas or []) != 2:
        errors.append(f"training.adam_betas: expected two numbers, got {t.adam_betas}")
    if d.max_prompt_length is not None and d.max_prompt_length >= d.max_length:
        errors.append("data.max_prompt_length: must be smaller than data.max_length")
    return errors
