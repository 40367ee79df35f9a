"""The recipe: a typed, validated view of a YAML file plus command-line overrides.

Every section is a dataclass; the YAML schema *is* these classes. Unknown keys, wrong types,
values outside a field's choices and missing required values are all collected and reported at
once, so a user fixes a recipe in one go. Overrides use dotted keys: ``--set training.lr=1e-5``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align_cli.errors import AlignError

# The schema lives in align_cli/sections.py; these names are imported from here throughout.
from align_cli.sections import (
    LLAMA2_SMALL_MARGINS,
    DataSection,
    DPOSection,
    GRPOSection,
    KTOSection,
    LoraSection,
    ModelSection,
    OutputSection,
    PPOSection,
    RejectionSection,
    RewardSection,
    RLOOSection,
    SFTSection,
    SourceSection,
    TrainingSection,
    choices,
)
from align_cli.stages import STAGES, section_names
from align_cli.suggest import recipe_keys, unknown_key


class RecipeError(AlignError, ValueError):
    """A recipe that cannot be used; the message lists every problem found."""


__all__ = [  # the schema's names, imported from here throughout
    "LLAMA2_SMALL_MARGINS",
    "DataSection",
    "DPOSection",
    "GRPOSection",
    "KTOSection",
    "LoraSection",
    "ModelSection",
    "OutputSection",
    "PPOSection",
    "Recipe",
    "RecipeError",
    "RejectionSection",
    "RewardSection",
    "RLOOSection",
    "SFTSection",
    "SourceSection",
    "TrainingSection",
    "choices",
    "load_recipe",
]

COMMON_SECTIONS = ("model", "data", "training", "output")


@dataclass
class _RecipeBase:
    stage: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)

    def sections(self) -> tuple[str, ...]:
        """The sections this recipe's stage reads: the common ones and its own (all without a stage)."""
        stage = STAGES.get(self.stage or "")
        if stage is None:
            return (*COMMON_SECTIONS, *section_names())
        return (*COMMON_SECTIONS, *([stage.section] if stage.section else []))

    def to_dict(self) -> dict[str, Any]:
        """The stage's sections without the keys it does not read: what recipe.yaml of a run holds."""
        stage = STAGES.get(self.stage or "")
        unread = stage.unread if stage else {}
        tree: dict[str, Any] = {"stage": self.stage}
        for name in self.sections():
            values = dataclasses.asdict(getattr(self, name))
            tree[name] = {k: v for k, v in values.items() if f"{name}.{k}" not in unread}
        return tree

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# A recipe: the common sections plus one section per registered stage (a stage reads only its own).
Recipe = dataclasses.make_dataclass(
    "Recipe",
    [(name, cls, field(default_factory=cls)) for name, cls in section_names().items()],
    bases=(_RecipeBase,),
)
Recipe.__module__ = __name__
Recipe.__doc__ = "A validated recipe: the common sections and every stage's own section (see ``sections``)."


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[0])} to {_type_name(typing.get_args(tp)[1])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return it converted, or record an error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        trials = []
        for option in typing.get_args(tp):
            trial: list[str] = []
            converted = _coerce(value, option, where, trial)
            if not trial:
                return converted
            trials.append((option, trial))
        # a list or a mapping that fits the option of its own shape but for its contents: say what is wrong
        for option, trial in trials:
            shaped = isinstance(value, list) and typing.get_origin(option) is list
            shaped |= isinstance(value, dict) and dataclasses.is_dataclass(option)
            if shaped:
                errors.extend(trial)
                return None
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
    if origin is dict:  # a whole table: the recipe's mapping replaces the default one
        if not isinstance(value, dict):
            errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
            return None
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(k, key_tp, f"{where}", errors): _coerce(v, value_tp, f"{where}.{k}", errors)
            for k, v in value.items()
        }
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


# every key the command being validated reads: where an unknown key's suggestion is looked for
_VALID_KEYS: ContextVar[list[str] | None] = ContextVar("valid_keys", default=None)


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            errors.append(unknown_key(where, list(known), _VALID_KEYS.get()))
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


# A recipe holds a few hundred values. YAML aliases (*name) count once per use, so an "alias bomb" (each
# level a list of aliases of the one before: 400 bytes, a billion values once expanded) is refused while
# it is still a small graph of shared nodes, before anything walks or copies it.
MAX_YAML_VALUES = 10_000


def _too_many_values(root: yaml.Node) -> bool:
    todo, seen = [root], 0
    while todo and seen <= MAX_YAML_VALUES:
        node = todo.pop()
        seen += 1
        if isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            todo.extend(part for pair in node.value for part in pair)
    return seen > MAX_YAML_VALUES


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{exc.context + ': ' if exc.context else ''}{exc.problem}{at}"
    return " ".join(str(exc).split())


def parse_yaml(text: str, source: str) -> Any:
    """``text`` as YAML (plain data types only). Bad YAML and alias bombs are a one-line RecipeError
    naming ``source``."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if _too_many_values(root):
            raise RecipeError(
                f"{source}: over {MAX_YAML_VALUES} values once its YAML aliases (*name) are expanded; refused"
            )
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise RecipeError(f"{source}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (a ``what``: "recipe", "pipeline recipe")."""
    source = f"{what} {path}"
    if not path.is_file():
        raise RecipeError(f"{source}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{source}: not valid UTF-8 (byte {exc.start})") from None
    loaded = parse_yaml(text, source) or {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"{source}: the top level must be a mapping of sections (key: value)")
    return loaded


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml value of c)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set training.lr=1e-5")
    key, raw = item.split("=", 1)
    return key.strip().split("."), parse_yaml(raw, f"--set {item}") if raw.strip() else None


def _apply(tree: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = tree
    for part in dotted[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[dotted[-1]] = value


def _with_defaults(defaults: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in tree.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _with_defaults(merged[key], value) if both else value
    return merged


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix.startswith(
            ("data.columns", "data.roles", "reward.margins")
        ):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        keys.append(f"{prefix}{key}")
    return keys


def _not_read(tree: dict[str, Any], stage_name: str) -> list[str]:
    """The sections and keys set in ``tree`` that stage ``stage_name`` does not read: another stage's
    section, or a common key the stage ignores (e.g. training.micro_batch_size for PPO)."""
    stage = STAGES[stage_name]
    problems = []
    for name in tree:
        if name in section_names() and name != stage.section:
            problems.append(f"{name}: a section of another stage; `align {stage_name}` does not read it")
    for key in _leaf_keys({k: v for k, v in tree.items() if k in COMMON_SECTIONS}):
        if key in stage.unread:
            problems.append(f"{key}: not read by `align {stage_name}` ({stage.unread[key]})")
    return problems


def load_recipe(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    stage: str | None = None,
) -> Recipe:
    """Read a recipe YAML, apply flag ``overrides`` (dotted key -> value, None = not given),
    then ``--set`` items, and validate the result. Raises RecipeError listing every problem."""
    tree = read_yaml_mapping(Path(path), "recipe") if path is not None else {}
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
    stage_name = tree.get("stage")
    errors: list[str] = []
    if stage_name is not None and stage_name not in STAGES:
        errors.append(f"stage: {stage_name!r} is not one of {', '.join(STAGES)}")
    elif stage_name is not None:
        errors += _not_read(tree, stage_name)
        tree = _with_defaults(STAGES[stage_name].defaults, tree)
    stage_entry = STAGES.get(stage_name) if isinstance(stage_name, str) else None
    sections = (*COMMON_SECTIONS, stage_entry.section) if stage_entry and stage_entry.section else None
    valid = recipe_keys(
        Recipe, sections or (*COMMON_SECTIONS, *section_names()), stage_entry.unread if stage_entry else ()
    )
    token = _VALID_KEYS.set(["stage", *valid])
    try:
        recipe = _build(Recipe, tree, "", errors)
    finally:
        _VALID_KEYS.reset(token)
    errors += _check_values(recipe)
    if errors:
        source = f"recipe {path}" if path else "recipe"
        raise RecipeError(f"{source}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    return recipe


def range_problems(key: str, value: Any, rule: str, note: str = "") -> list[str]:
    """Problems of a number (or of each number of a list or mapping) under ``rule``: "> 0", ">= 0",
    an interval such as "[0, 1)", or "finite". NaN and inf fail every rule; null passes (a field that
    may be null says what null means). ``note`` is added to the message, e.g. what null means."""
    if value is None:
        return []
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in range_problems(f"{key}[{i}]", v, rule, note)]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in range_problems(f"{key}.{k}", v, rule, note)]
    finite = isinstance(value, int) or math.isfinite(value)  # a huge int would overflow math.isfinite
    if rule == "finite":
        inside, wanted = finite, "a finite number"
    elif rule[0] in "[(":
        low, high = (float(x) for x in rule[1:-1].split(","))
        above = low <= value if rule[0] == "[" else low < value
        below = value <= high if rule[-1] == "]" else value < high
        inside, wanted = finite and above and below, f"in {rule}"
    else:
        op, bound = rule.split()
        inside, wanted = finite and (value > float(bound) if op == ">" else value >= float(bound)), rule
    if inside:
        return []
    if not finite and rule != "finite":
        wanted = f"a finite number {wanted}"
    return [f"{key}: must be {wanted}{note}, got {value}"]


def _section_problems(section: Any, prefix: str) -> list[str]:
    """Every number of ``section`` (and its sub-sections) in its declared range, then its own check()."""
    problems = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            problems += _section_problems(value, f"{prefix}.{f.name}")
        elif "rule" in f.metadata:
            problems += range_problems(f"{prefix}.{f.name}", value, f.metadata["rule"])
    return problems + (section.check() if hasattr(section, "check") else [])


def _check_values(r: Recipe) -> list[str]:
    """Every number in its range, checked where it is declared, before anything is loaded or created."""
    errors = [p for name in r.sections() for p in _section_problems(getattr(r, name), name)]
    stage = STAGES.get(r.stage or "")
    m, d = r.model, r.data
    if (
        (m.load_in_4bit or m.load_in_8bit)
        and not m.lora.enabled
        and not (stage and stage.quantized_without_lora)
    ):
        errors.append(
            "model.load_in_4bit/load_in_8bit: quantized base weights cannot be trained; set "
            "model.lora.enabled=true (QLoRA)"
        )
    if r.stage == "kto" and r.training.micro_batch_size < 2:
        errors.append(
            "training.micro_batch_size: KTO estimates its KL baseline from mismatched pairs within a "
            "micro-batch; use at least 2"
        )
    errors += _backend_problems(r)
    t = r.training
    if (t.save_best or t.early_stopping_patience) and not (d.eval or d.eval_fraction):
        which = "training.save_best" if t.save_best else "training.early_stopping_patience"
        errors.append(
            f"{which}: compares evaluations, and there is no eval data; set data.eval or data.eval_fraction"
        )
    if stage and "data.eval" in stage.unread and isinstance(d.train, list):
        errors.append("data.train: a mixture of sources is for training data; prompts come from one source")
    return errors


def _backend_problems(r: Recipe) -> list[str]:
    """A backend key set to vllm (rejection.backend) without vLLM installed: said now, before torch
    loads (a missing GPU is checked when the run starts, before any model loads)."""
    import importlib.util

    return [
        f"{name}.backend: vllm is not installed (pip install 'align-cli[vllm]'), or use backend auto"
        for name in r.sections()
        if getattr(getattr(r, name), "backend", None) == "vllm" and importlib.util.find_spec("vllm") is None
    ]
