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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align_cli.data.formats import KINDS
from align_cli.losses import DPO_LOSS_TYPES, KL_ESTIMATORS


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
    # QLoRA: the frozen base weights in 4-bit NF4 (double quantization, compute in `dtype`) or 8-bit,
    # through bitsandbytes; needs a CUDA GPU and model.lora.enabled (quantized weights are not trained)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # dropout off in every model of the run (LoRA dropout included), as TRL and the DPO reference code do
    # for preference and RL training: with dropout on, the policy that is scored differs from the one
    # that sampled (PPO ratios != 1 at identical weights, DPO's first loss != log 2). false keeps the
    # model's own dropout (e.g. as regularisation in SFT)
    disable_dropout: bool = True


@dataclass
class SourceSection:
    """One source of a mixture (data.train as a list); unset fields follow the data section."""

    path: str = ""  # as data.train: a file, folder, saved data set or hub id
    # its share: round(weight * its size) examples (< 1 takes a seeded subset, > 1 repeats it)
    weight: float | None = None
    max_examples: int | None = None  # at most this many examples (after weight)
    split: str | None = None  # default data.hub_split
    config: str | None = None  # default data.hub_config
    columns: dict[str, str] = field(default_factory=dict)  # default data.columns
    roles: dict[str, str] = field(default_factory=dict)  # default data.roles


@dataclass
class DataSection:
    # a file (.jsonl, .json array or lines, .parquet, .csv, .tsv), a folder of them, a datasets.save_to_disk
    # folder, or a hub data set id (`name` or `name:split`); or a mixture: a list of such sources, each a
    # string or a mapping (path, weight, max_examples, split, config, columns, roles)
    train: str | list[str | SourceSection] | None = None
    eval: str | None = None  # as train; else eval_fraction of train
    eval_fraction: float = 0.0
    hub_split: str = "train"
    hub_config: str | None = None  # a hub data set's configuration (subset) name
    # the source's column for each of align's fields, e.g. {prompt: question, chosen: good, rejected: bad}
    columns: dict[str, str] = field(default_factory=dict)
    # role names in the source's messages -> align's (system, user, assistant, tool), e.g. {human: user}
    roles: dict[str, str] = field(default_factory=dict)
    format: str = choices("auto", *KINDS, default="auto")  # align_cli.data.formats.KINDS
    # auto: Alpaca for instruction records, plain concatenation for prompt/completion, chat for messages
    template: str = choices("auto", "alpaca", "chat", "plain", default="auto")
    # the chat template: a name (chatml, zephyr, llama2, builtin), a Jinja file or a Jinja string; overrides
    # the tokenizer's own. Without either, the
    # built-in template (<|role|>...<|end|>) is used, its markers registered as special tokens (new
    # embedding rows, trained) and <|end|> made a stop token. The template used is saved in final/.
    chat_template: str | None = None
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
    # checkpoints: every save_every steps (PPO: iterations); null: every 10% of the run's steps. Also every
    # save_every_minutes since the last save, whichever comes first (0: no time-based saves). save_every: 0
    # turns periodic checkpoints off altogether (a stop on SIGTERM/SIGINT still saves one)
    save_every: int | None = None
    save_every_minutes: float = 30.0
    keep_last: int = 2
    # a NaN/inf loss or gradient: stop with an error (the last checkpoint is kept), or skip the update
    # and count it (skipped_steps in metrics and summary)
    nan_policy: str = choices("stop", "skip", default="stop")


@dataclass
class OutputSection:
    dir: str | None = None  # default: runs/<stage>/<timestamp>
    overwrite: bool = False


@dataclass
class SFTSection:
    pass


# Llama 2's "small" margin table m(rating); its large one is {3, 2, 1, 0}
LLAMA2_SMALL_MARGINS = {
    "significantly_better": 1.0,
    "better": 0.667,
    "slightly_better": 0.333,
    "negligibly_better": 0.0,
    "unsure": 0.0,
}


@dataclass
class RewardSection:
    # Llama 2 margin: loss -log sigma(r_c - r_r - m); m is a record's `margin`, else margins[its rating]
    use_margin: bool = True
    margins: dict[str, float] = field(default_factory=lambda: dict(LLAMA2_SMALL_MARGINS))
    center_coef: float = 0.0  # reward centering: + coef * (r_c + r_r)^2 per pair (e.g. 0.01)
    # init of a newly added scalar head: normal(0, 1/sqrt(hidden + 1)) or zeros (all rewards start at 0)
    head: str = choices("normal", "zeros", default="normal")


@dataclass
class DPOSection:
    # strength of the implicit KL constraint to the reference (paper: 0.1; TL;DR 0.5); null: the loss
    # type's default (0.1; simpo 2.0; orpo has no beta)
    beta: float | None = None
    loss_type: str = choices(*DPO_LOSS_TYPES, default="sigmoid")  # align_cli.losses.PREFERENCE_LOSSES
    label_smoothing: float = 0.0  # conservative DPO: probability that a preference label is wrong
    reference_free: bool = False  # take log pi_ref = 0 (no reference model at all)
    # true: reference log-probs computed once before training and cached on disk (no reference model in
    # memory while training); false: a live reference model scores every batch
    reference_cache: bool = True
    reference_model: str | None = None  # default: the policy's starting weights (pi_ref = pi_SFT)
    simpo_gamma: float = 1.0  # SimPO's target reward margin gamma (paper: gamma / beta 0.5, beta 2)
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term beside the chosen NLL (paper: 0.1)


@dataclass
class KTOSection:
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D; KTO paper: lambda_D n_D / (lambda_U n_U) in [1, 4/3]
    undesirable_weight: float = 1.0  # lambda_U
    reference_model: str | None = None  # default: the policy's starting weights (pi_ref = pi_SFT)


@dataclass
class RejectionSection:
    reward_model: str | None = None  # default: the last `align reward` output
    prompts: str | None = None  # prompt JSONL; default: data.train
    max_prompts: int | None = None
    n: int = 16  # samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompts_per_batch: int = 8  # prompts per generate call, each with its n samples
    score_batch_size: int = 32
    # best: the top sample per prompt (Llama 2); top_k: the `keep` best; threshold: every sample >= threshold
    select: str = choices("best", "top_k", "threshold", default="best")
    keep: int = 1
    threshold: float | None = None
    rounds: int = 1
    then: str = choices("none", "sft", default="none")  # fine-tune on the selected samples after each round
    keep_previous_best: bool = True  # Llama 2: a prompt keeps its best sample over all rounds
    eval_n: int = 4  # samples per prompt used to measure the fine-tuned policy's mean reward
    backend: str = choices("auto", "transformers", "vllm", default="auto")


@dataclass
class PPOSection:
    reward_model: str | None = None  # default: the last `align reward` output
    prompts: str | None = None  # prompt JSONL; default: data.train
    # value model: a copy of the reward model (InstructGPT) or a scalar head on the policy's last hidden state
    value_model: str = choices("reward_model", "policy_head", default="reward_model")
    iterations: int = 20  # rollout + update rounds (training.max_steps overrides)
    rollout_batch_size: int = 16  # prompts per iteration, one response each
    mini_batch_size: int = 8  # one optimizer step per mini-batch (Llama 2: 512 / 64)
    ppo_epochs: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.05  # beta (InstructGPT 0.02, Llama 2 0.01 / 0.005)
    kl_estimator: str = choices(*KL_ESTIMATORS, default="k1")  # align_cli.losses.kl_penalty
    adaptive_kl: bool = False  # Ziegler et al.: move kl_coef toward kl_target over kl_horizon samples
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    score_norm: bool = False  # standardise scores within each rollout batch
    score_clip: float | None = None  # clip scores to [-c, c]
    missing_eos_penalty: float | None = None  # subtracted from the score of responses without EOS
    ptx_data: str | None = None  # PPO-ptx: SFT/pretraining JSONL mixed into every update
    ptx_coef: float = 0.0  # gamma of PPO-ptx (InstructGPT 27.8, on per-token mean NLL)
    ptx_batch_size: int = 8
    log_samples: int = 4  # generations per iteration written to samples.jsonl


@dataclass
class Recipe:
    stage: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)
    sft: SFTSection = field(default_factory=SFTSection)
    reward: RewardSection = field(default_factory=RewardSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    kto: KTOSection = field(default_factory=KTOSection)
    rejection: RejectionSection = field(default_factory=RejectionSection)
    ppo: PPOSection = field(default_factory=PPOSection)

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


# Per-stage defaults under the recipe file, flags and --set (which all win over them); the run's saved
# recipe.yaml shows the resolved values.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Llama 2 reward models: 1 epoch (more overfits), lr 1e-5, cosine to 10%, warmup 3% (>= 5 steps)
    "reward": {
        "training": {
            "epochs": 1.0,
            "lr": 1e-5,
            "scheduler": "cosine",
            "min_lr_ratio": 0.1,
            "warmup_ratio": 0.03,
            "warmup_steps": 5,
        }
    },
}


def _with_defaults(defaults: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in tree.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _with_defaults(merged[key], value) if both else value
    return merged


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
    tree = _with_defaults(STAGE_DEFAULTS.get(stage_name, {}) if isinstance(stage_name, str) else {}, tree)
    errors: list[str] = []
    recipe = _build(Recipe, tree, "", errors)
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


def _number_rules(r: Recipe) -> list[tuple[str, Any, str]]:
    """(key, value, rule) for every number of a recipe; counts are > 0."""
    t, d, m, p, j = r.training, r.data, r.model, r.ppo, r.rejection
    return [
        ("model.lora.r", m.lora.r, "> 0"),
        ("model.lora.alpha", m.lora.alpha, "> 0"),
        ("model.lora.dropout", m.lora.dropout, "[0, 1)"),
        ("data.eval_fraction", d.eval_fraction, "[0, 1)"),
        ("data.max_length", d.max_length, "> 0"),
        ("data.max_prompt_length", d.max_prompt_length, "> 0"),
        ("training.epochs", t.epochs, "> 0"),
        ("training.max_steps", t.max_steps, "> 0"),
        ("training.micro_batch_size", t.micro_batch_size, "> 0"),
        ("training.grad_accum", t.grad_accum, "> 0"),
        # lr 0 trains nothing while looking like a run: surely a mistake (`align eval` measures a model)
        ("training.lr", t.lr, "> 0"),
        ("training.weight_decay", t.weight_decay, ">= 0"),
        ("training.adam_betas", t.adam_betas, "[0, 1)"),
        ("training.adam_eps", t.adam_eps, "> 0"),
        ("training.warmup_ratio", t.warmup_ratio, "[0, 1]"),
        ("training.warmup_steps", t.warmup_steps, ">= 0"),
        ("training.min_lr_ratio", t.min_lr_ratio, "[0, 1]"),
        ("training.log_every", t.log_every, "> 0"),
        ("training.keep_last", t.keep_last, "> 0"),
        ("training.save_every", t.save_every, ">= 0"),  # 0: no periodic checkpoints
        ("training.save_every_minutes", t.save_every_minutes, ">= 0"),  # 0: none by time
        ("training.eval_every", t.eval_every, "> 0"),
        ("reward.margins", r.reward.margins, ">= 0"),
        ("reward.center_coef", r.reward.center_coef, ">= 0"),
        ("dpo.beta", r.dpo.beta, "> 0"),
        ("dpo.label_smoothing", r.dpo.label_smoothing, "[0, 0.5)"),
        ("dpo.simpo_gamma", r.dpo.simpo_gamma, ">= 0"),
        ("dpo.orpo_lambda", r.dpo.orpo_lambda, ">= 0"),
        ("kto.beta", r.kto.beta, "> 0"),
        ("kto.desirable_weight", r.kto.desirable_weight, ">= 0"),
        ("kto.undesirable_weight", r.kto.undesirable_weight, ">= 0"),
        ("rejection.max_prompts", j.max_prompts, "> 0"),
        ("rejection.n", j.n, "> 0"),
        ("rejection.max_new_tokens", j.max_new_tokens, "> 0"),
        ("rejection.temperature", j.temperature, ">= 0"),  # 0: greedy
        ("rejection.top_p", j.top_p, "(0, 1]"),
        ("rejection.top_k", j.top_k, ">= 0"),
        ("rejection.prompts_per_batch", j.prompts_per_batch, "> 0"),
        ("rejection.score_batch_size", j.score_batch_size, "> 0"),
        ("rejection.keep", j.keep, "> 0"),
        ("rejection.threshold", j.threshold, "finite"),
        ("rejection.rounds", j.rounds, "> 0"),
        ("rejection.eval_n", j.eval_n, "> 0"),
        ("ppo.iterations", p.iterations, "> 0"),
        ("ppo.rollout_batch_size", p.rollout_batch_size, "> 0"),
        ("ppo.mini_batch_size", p.mini_batch_size, "> 0"),
        ("ppo.ppo_epochs", p.ppo_epochs, "> 0"),
        ("ppo.max_new_tokens", p.max_new_tokens, "> 0"),
        ("ppo.top_p", p.top_p, "(0, 1]"),
        ("ppo.top_k", p.top_k, ">= 0"),
        ("ppo.kl_coef", p.kl_coef, ">= 0"),
        ("ppo.kl_target", p.kl_target, "> 0"),
        ("ppo.kl_horizon", p.kl_horizon, "> 0"),
        ("ppo.gamma", p.gamma, "[0, 1]"),
        ("ppo.lam", p.lam, "[0, 1]"),
        ("ppo.cliprange", p.cliprange, "> 0"),
        ("ppo.cliprange_value", p.cliprange_value, "> 0"),
        ("ppo.vf_coef", p.vf_coef, ">= 0"),
        ("ppo.score_clip", p.score_clip, "> 0"),
        ("ppo.missing_eos_penalty", p.missing_eos_penalty, "finite"),
        ("ppo.ptx_coef", p.ptx_coef, ">= 0"),
        ("ppo.ptx_batch_size", p.ptx_batch_size, "> 0"),
        ("ppo.log_samples", p.log_samples, ">= 0"),
    ]


def _check_values(r: Recipe) -> list[str]:
    """Every number in its range, checked where it is declared, before anything is loaded or created."""
    errors = [e for key, value, rule in _number_rules(r) for e in range_problems(key, value, rule)]
    t, d, p = r.training, r.data, r.ppo
    errors += range_problems("training.max_grad_norm", t.max_grad_norm, "> 0", " (or null: no clipping)")
    if p.rollout_batch_size > 0 and p.mini_batch_size > p.rollout_batch_size:
        errors.append(
            f"ppo.mini_batch_size: must be <= ppo.rollout_batch_size ({p.rollout_batch_size}), "
            f"got {p.mini_batch_size}"
        )
    if len(t.adam_betas or []) != 2:
        errors.append(f"training.adam_betas: expected two numbers, got {t.adam_betas}")
    if d.max_prompt_length is not None and d.max_prompt_length >= d.max_length:
        errors.append("data.max_prompt_length: must be smaller than data.max_length")
    m = r.model
    if m.load_in_4bit and m.load_in_8bit:
        errors.append("model.load_in_4bit, model.load_in_8bit: choose one")
    if (m.load_in_4bit or m.load_in_8bit) and not m.lora.enabled and r.stage != "rejection-sample":
        errors.append(
            "model.load_in_4bit/load_in_8bit: quantized base weights cannot be trained; set "
            "model.lora.enabled=true (QLoRA)"
        )
    for i, source in enumerate(d.train if isinstance(d.train, list) else []):
        if isinstance(source, SourceSection):
            where = f"data.train[{i}]"
            if not source.path:
                errors.append(f"{where}.path: missing")
            if source.weight is not None and not 0 <= source.weight < float("inf"):
                errors.append(f"{where}.weight: must be a finite number >= 0, got {source.weight}")
            if source.max_examples is not None and source.max_examples < 1:
                errors.append(f"{where}.max_examples: must be >= 1, got {source.max_examples}")
    if r.stage in ("ppo", "rejection-sample") and isinstance(d.train, list):
        errors.append("data.train: a mixture of sources is for training data; prompts come from one source")
    if r.stage == "ppo" and (r.ppo.top_p < 1.0 or r.ppo.top_k > 0):
        errors.append(
            f"ppo.top_p={r.ppo.top_p}, ppo.top_k={r.ppo.top_k}: PPO's ratios and KL are computed on the full "
            "distribution at ppo.temperature, so rollouts must be sampled from it; use top_p 1.0 and top_k 0"
        )
    errors += _preference_problems(r)
    sampled = r.stage == "ppo"  # PPO samples from the policy; elsewhere 0 means greedy
    note = " (PPO samples from the policy)" if sampled else ""
    errors += range_problems("ppo.temperature", r.ppo.temperature, "> 0" if sampled else ">= 0", note)
    return errors


def _preference_problems(r: Recipe) -> list[str]:
    """Settings a DPO loss type or KTO would silently ignore."""
    d, errors = r.dpo, []
    if d.loss_type == "orpo" and d.beta is not None:
        errors.append("dpo.beta: loss_type orpo has no beta (its odds-ratio weight is dpo.orpo_lambda)")
    if d.label_smoothing and d.loss_type != "sigmoid":
        errors.append(f"dpo.label_smoothing: for loss_type sigmoid (conservative DPO), not {d.loss_type}")
    if d.loss_type in ("simpo", "orpo") and d.reference_model:
        errors.append(f"dpo.reference_model: loss_type {d.loss_type} uses no reference model")
    if r.stage == "kto" and r.training.micro_batch_size < 2:
        errors.append(
            "training.micro_batch_size: KTO estimates its KL baseline from mismatched pairs within a "
            "micro-batch; use at least 2"
        )
    return errors
