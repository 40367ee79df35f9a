"""Reward sources: a reward model and/or Python reward functions, one call for every stage that scores
samples (rejection sampling now; the on-policy stages share it).

Python reward functions follow TRL's GRPO convention, so one written for TRL works here unchanged:

    def f(prompts, completions, **kwargs) -> list[float | None]

called once per batch with keyword lists, one item per sample: ``prompts`` (the prompt text, or its
chat messages), ``completions`` (the sampled text, or ``[{"role": "assistant", "content": text}]`` for
a chat prompt) and every other column of the prompt file (``answer=[...]``; a sample whose prompt row
lacks a column gets None there). A value is the sample's reward, or None: "not applicable to this
sample". The total is the weighted sum over the sources that applied (TRL's nansum).

A sample to which no source applies is an error, not a reward: TRL's nansum would make it 0 (with a
warning), a real reward on a scale the user chose, that best-of-N would rank and GRPO would turn into an
advantage. The run stops naming the sample; give every prompt at least one function that applies.

Naming a function is running code: ``load_function`` imports it with the user's rights.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import reprlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_cli.data.prompts import Prompt
from align_cli.recipe import ModelSection, RecipeError

REWARD_MODEL = "reward_model"  # the reward model's name among the sources (metric reward/reward_model)
# reward/<name> metrics the stages log of the total reward: a function of such a name is numbered instead
TOTAL_METRICS = ("mean", "std", "frac_zero_std", "sq_mean")
OWN_ARGUMENTS = ("prompts", "completions")  # a prompt column of that name would shadow one


def load_function(spec: str, role: str = "reward function") -> Callable[..., Any]:
    """``path/to/file.py:function`` or ``package.module:function`` -> the function.

    Importing runs that code with the user's rights. A file is executed on its own: its folder is not put
    on ``sys.path``, and it is registered (as dataclasses and pickle need) under a private name made from
    its path, so it shadows no module. A module is imported from the current directory or the installed
    packages. A missing file, a module that fails to import
    and a missing function are a RecipeError naming ``role`` and ``spec``."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise RecipeError(f"{role} {spec!r}: expected module:function or file.py:function")
    if location.endswith(".py") and not Path(location).is_file():
        raise RecipeError(f"{role} {spec!r}: no such file {location}")
    try:
        if location.endswith(".py"):
            path = Path(location).resolve()
            private = f"_align_user_code_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
            found = importlib.util.spec_from_file_location(private, path)
            module = importlib.util.module_from_spec(found)
            sys.modules[private] = module
            try:
                found.loader.exec_module(module)
            except BaseException:
                del sys.modules[private]
                raise
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(location)
    except Exception as exc:  # the module is the user's code: any error at import is theirs to see
        raise RecipeError(f"{role} {spec!r}: cannot load: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise RecipeError(f"{role} {spec!r}: {location} has no function {name!r}")
    if not callable(fn):
        raise RecipeError(f"{role} {spec!r}: {name} is not a function")
    return fn


def as_number(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a number (text never is, though float("0.5") works)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)  # int, float, bool, numpy and one-element torch numbers
    except (TypeError, ValueError):
        return None


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


@dataclass
class RewardFunction:
    """A loaded Python reward function and the ``file.py:function`` / ``module:function`` it came from."""

    spec: str
    fn: Callable[..., Any]

    @classmethod
    def load(cls, spec: str) -> RewardFunction:
        return cls(spec, load_function(spec))

    @property
    def name(self) -> str:
        return self.spec.rpartition(":")[2]


@dataclass
class Rewards:
    """The total reward of each sample, and each source's own values (None: not applicable)."""

    total: list[float]
    by_source: dict[str, list[float | None]] = field(default_factory=dict)

    def sums(self) -> dict[str, tuple[float, int]]:
        """Each source's (sum, count) over the samples it applied to: what processes add up before
        dividing, so that a mean over every process is the mean of every sample."""
        return {
            name: (sum(v for v in values if v is not None), sum(v is not None for v in values))
            for name, values in self.by_source.items()
        }

    def means(self) -> dict[str, float]:
        """``reward/<source>``: the mean of each source over the samples it applied to."""
        return {f"reward/{name}": total / count for name, (total, count) in self.sums().items() if count}

    def sample(self, i: int) -> dict[str, float | None]:
        return {name: values[i] for name, values in self.by_source.items()}


class RewardSource:
    """An optional reward model and zero or more Python reward functions, each weighted.

    ``weights``: one per source, the reward model's first (when there is one), then the functions' in
    order; default all 1. The reward model scores as every scorer does (``scoring.score``: rendered and
    cut as its training records were)."""

    def __init__(
        self,
        functions: Sequence[RewardFunction] = (),
        weights: Sequence[float] | None = None,
        reward_model: Any = None,
        tokenizer: Any = None,
        template: str = "auto",
        batch_size: int = 32,
    ) -> None:
        if reward_model is None and not functions:
            raise RecipeError("a reward needs a reward model and/or reward functions")
        self.reward_model, self.tokenizer = reward_model, tokenizer
        self.template, self.batch_size = template, batch_size
        self.functions = list(functions)
        self.names = [REWARD_MODEL] if reward_model is not None else []
        for f in self.functions:  # metric names: the function's name, numbered when taken
            name, k = f.name, 1
            while name in self.names or name in TOTAL_METRICS:
                k += 1
                name = f"{f.name}_{k}"
            self.names.append(name)
        self.weights = [1.0] * len(self.names) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.names):
            raise RecipeError(
                f"reward weights: {len(self.weights)} given for {len(self.names)} source(s) "
                f"({', '.join(self.names)})"
            )

    def to(self, device: Any) -> RewardSource:
        if self.reward_model is not None:
            self.reward_model.to(device)
        return self

    def describe(self) -> str:
        """The sources and their weights, e.g. "1 x reward model runs/reward/final + 0.5 x f.py:exact"."""
        path = getattr(getattr(self.reward_model, "config", None), "name_or_path", "")
        labels = ([f"reward model {path}".strip()] if self.reward_model is not None else []) + [
            f.spec for f in self.functions
        ]
        if len(labels) == 1:
            return labels[0]
        return " + ".join(f"{w:g} x {label}" for w, label in zip(self.weights, labels))

    def __call__(self, prompts: list[Prompt], completions: list[str], finished: list[bool]) -> Rewards:
        """The reward of each (prompt, completion); ``finished[i]`` False for a completion cut at the
        token limit (the reward model then scores it without an end marker; functions see the text)."""
        if not completions:
            return Rewards([], {name: [] for name in self.names})
        by_source: dict[str, list[float | None]] = {}
        if self.reward_model is not None:
            from align_cli.scoring import score

            by_source[REWARD_MODEL] = score(
                self.reward_model,
                self.tokenizer,
                prompts,
                completions,
                self.template,
                finished,
                self.batch_size,
            )
        if self.functions:
            arguments = trl_arguments(prompts, completions)
            for f, name in zip(self.functions, self.names[-len(self.functions) :]):
                by_source[name] = call_function(f, prompts, completions, arguments)
        total = []
        for i, prompt in enumerate(prompts):
            applied = [
                (w, values[i]) for w, values in zip(self.weights, by_source.values()) if values[i] is not None
            ]
            if not applied:
                raise RecipeError(
                    f"no reward for the sample of {prompt.where} (completion {_short(completions[i])}): "
                    f"every reward function returned None ({', '.join(f.spec for f in self.functions)}); "
                    "a sample needs at least one source that applies to it"
                )
            total.append(sum(w * v for w, v in applied))
        return Rewards(total, by_source)


def trl_arguments(prompts: list[Prompt], completions: list[str]) -> dict[str, list[Any]]:
    """The keyword lists of TRL's reward-function call: prompts, completions (chat messages for a chat
    prompt) and every prompt column (None where a row lacks it)."""
    names: dict[str, None] = {}
    for p in prompts:
        names |= dict.fromkeys(p.columns)
    for name in names:
        if name in OWN_ARGUMENTS:
            where = next(p.where for p in prompts if name in p.columns)
            raise RecipeError(
                f"{where}: a column named {name!r} would replace the reward functions' own argument; "
                "rename it (data.columns)"
            )
    chat = [isinstance(p.prompt, list) for p in prompts]
    return {
        "prompts": [p.prompt for p in prompts],
        "completions": [
            [{"role": "assistant", "content": c}] if is_chat else c for c, is_chat in zip(completions, chat)
        ],
        **{name: [p.columns.get(name) for p in prompts] for name in names},
    }


def _one(arguments: dict[str, list[Any]], i: int) -> dict[str, list[Any]]:
    return {k: v[i : i + 1] for k, v in arguments.items()}


def call_function(
    f: RewardFunction, prompts: list[Prompt], completions: list[str], arguments: dict[str, list[Any]]
) -> list[float | None]:
    """``f``'s rewards for the batch; an exception, a result of the wrong length or a value that is
    neither a finite number nor None is a one-line RecipeError naming the function and the sample."""
    try:
        out = f.fn(**arguments)
    except Exception as exc:
        raise RecipeError(_raised(f, exc, prompts, completions, arguments)) from exc
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise RecipeError(
            f"reward function {f.spec} returned {reprlib.repr(out)} for {len(completions)} samples (the "
            f"first from {prompts[0].where}); expected a list of one reward per completion"
        )
    values = list(out)
    if len(values) != len(completions):
        raise RecipeError(
            f"reward function {f.spec} returned {len(values)} values for {len(completions)} samples (the "
            f"first from {prompts[0].where}); expected one reward (a number or None) per completion"
        )
    rewards: list[float | None] = []
    for i, value in enumerate(values):
        number = None if value is None else as_number(value)
        if value is not None and (number is None or not math.isfinite(number)):
            raise RecipeError(
                f"reward function {f.spec} returned {reprlib.repr(value)} for the sample of "
                f"{prompts[i].where} (completion {_short(completions[i])}); expected a finite number or None"
            )
        rewards.append(number)
    return rewards


def _raised(
    f: RewardFunction,
    exc: Exception,
    prompts: list[Prompt],
    completions: list[str],
    arguments: dict[str, list[Any]],
) -> str:
    """The error line for ``f`` raising ``exc`` on a batch: it names the first sample that raises on its
    own (the function is called again one sample at a time), or the batch when none does."""
    culprit: int | None = 0
    if len(completions) > 1:
        culprit = None
        for i in range(len(completions)):
            try:
                f.fn(**_one(arguments, i))
            except Exception as single:
                culprit, exc = i, single
                break
    if culprit is None:
        what = f"a batch of {len(completions)} samples (the first from {prompts[0].where})"
    else:
        what = f"the sample of {prompts[culprit].where} (completion {_short(completions[culprit])})"
    message = " ".join(str(exc).split())  # one line, whatever the function's message
    return f"reward function {f.spec} raised {type(exc).__name__}: {message} on {what}"


def load_reward_source(
    reward_model: str | None,
    functions: Sequence[str],
    weights: Sequence[float] | None,
    template: str,
    batch_size: int = 32,
) -> RewardSource:
    """The functions named (loaded first: a bad one fails before any model loads) and the reward model in
    ``reward_model`` (its own tokenizer), weighted as ``RewardSource`` says."""
    loaded = [RewardFunction.load(spec) for spec in functions]
    model = tokenizer = None
    if reward_model:
        from align_cli.models import load_reward_model, load_tokenizer

        tokenizer = load_tokenizer(ModelSection(name_or_path=reward_model))
        model = load_reward_model(ModelSection(name_or_path=reward_model), tokenizer.pad_token_id)
    return RewardSource(loaded, weights, model, tokenizer, template, batch_size)
