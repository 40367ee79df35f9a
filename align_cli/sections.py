"""The recipe's schema: one dataclass per YAML section, plain values only (no torch, so a recipe is
checked before any heavy import).

The common sections (model, data, training, output) come first, then each stage's own section; a stage
is registered with its section in ``align_cli/stages/__init__.py``. A field's allowed values
(``choices``) and range (``number``) are declared on the field, and ``check()`` on a section holds the
rules that tie several of its fields together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align_cli.data.formats import KINDS

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # training.report_to (engine/tracking.py)


def choices(*allowed: str, default: Any) -> Any:
    """A dataclass field restricted to ``allowed`` values."""
    return field(default=default, metadata={"choices": allowed})


def number(rule: str, default: Any = None, default_factory: Any = None) -> Any:
    """A numeric field (or list / mapping of numbers) that must satisfy ``rule``: "> 0", ">= 0", an
    interval such as "[0, 1)", or "finite" (see ``recipe.range_problems``). Null passes."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def reward_functions() -> Any:
    """``<stage>.reward_functions``: Python reward functions, ``file.py:function`` or
    ``module:function`` (TRL's convention, see ``align_cli/rewards.py``); naming one runs its code."""
    return field(default_factory=list)


def reward_weights() -> Any:
    """``<stage>.reward_weights``: one weight per reward source, the reward model's first (when one is
    used), then each function's; null: all 1."""
    return number("finite", None)


def uses_reward_model(section: Any) -> bool:
    """A stage section with ``reward_model`` (and ``reward_functions``) scores with a reward model when
    one is named, or when no function is (then the last `align reward` output): functions alone never
    fall back to a reward model."""
    return section.reward_model is not None or not getattr(section, "reward_functions", [])


def reward_problems(name: str, section: Any) -> list[str]:
    """The problems of a section's reward fields (``reward_model``, ``reward_functions``,
    ``reward_weights``): a function not written ``file.py:function`` / ``module:function``, and weights
    not one per source."""
    functions, weights, model = (
        section.reward_functions or [],
        section.reward_weights,
        uses_reward_model(section),
    )
    problems = []
    for i, spec in enumerate(functions):
        location, sep, function = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
        if not (sep and location.strip() and function.strip()):
            problems.append(
                f"{name}.reward_functions[{i}]: expected file.py:function or module:function, got {spec!r}"
            )
    if weights is not None and len(weights) != len(functions) + model:
        whose = ["the reward model's"] * model + ["one per reward function"] * bool(functions)
        problems.append(
            f"{name}.reward_weights: expected {len(functions) + model} ({', then '.join(whose)}), got "
            f"{len(weights)}"
        )
    return problems


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = number("> 0", 16)
    alpha: int = number("> 0", 32)
    dropout: float = number("[0, 1)", 0.05)
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

    def check(self) -> list[str]:
        both = self.load_in_4bit and self.load_in_8bit
        return ["model.load_in_4bit, model.load_in_8bit: choose one"] if both else []


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
    eval_fraction: float = number("[0, 1)", 0.0)
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
    max_length: int = number("> 0", 512)
    max_prompt_length: int | None = number("> 0", None)
    # too long: keep what fits ("truncate") or drop the example ("drop"); both are counted
    on_too_long: str = choices("truncate", "drop", default="truncate")
    packing: bool = False  # padding-free: a micro-batch becomes one row, attention kept per example
    group_by_length: bool = True

    def check(self) -> list[str]:
        problems = []
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            problems.append("data.max_prompt_length: must be smaller than data.max_length")
        for i, source in enumerate(self.train if isinstance(self.train, list) else []):
            if isinstance(source, SourceSection):
                where = f"data.train[{i}]"
                if not source.path:
                    problems.append(f"{where}.path: missing")
                if source.weight is not None and not 0 <= source.weight < float("inf"):
                    problems.append(f"{where}.weight: must be a finite number >= 0, got {source.weight}")
                if source.max_examples is not None and source.max_examples < 1:
                    problems.append(f"{where}.max_examples: must be >= 1, got {source.max_examples}")
        return problems


@dataclass
class TrainingSection:
    epochs: float = number("> 0", 1.0)
    max_steps: int | None = number("> 0", None)
    micro_batch_size: int = number("> 0", 4)
    grad_accum: int = number("> 0", 1)
    lr: float = number("> 0", 2e-5)
    weight_decay: float = number(">= 0", 0.0)
    adam_betas: list[float] = number("[0, 1)", default_factory=lambda: [0.9, 0.999])
    adam_eps: float = number("> 0", 1e-8)
    optimizer: str = choices("adamw", "adamw_8bit", "paged_adamw_8bit", default="adamw")
    scheduler: str = choices("cosine", "linear", "constant", default="cosine")
    warmup_ratio: float = number("[0, 1]", 0.0)
    warmup_steps: int = number(">= 0", 0)  # lower bound on warmup (Llama 2: 3% of steps, at least 5)
    min_lr_ratio: float = number("[0, 1]", 0.0)  # cosine floor as a fraction of lr (Llama 2 RM: 0.1)
    max_grad_norm: float | None = 1.0
    precision: str = choices("fp32", "bf16", "fp16", default="fp32")
    seed: int = 42
    log_every: int = number("> 0", 1)
    eval_every: int | None = number("> 0", None)
    # checkpoints: every save_every steps (PPO: iterations); null: every 10% of the run's steps. Also every
    # save_every_minutes since the last save, whichever comes first (0: no time-based saves). save_every: 0
    # turns periodic checkpoints off altogether (a stop on SIGTERM/SIGINT still saves one)
    save_every: int | None = number(">= 0", None)
    save_every_minutes: float = number(">= 0", 30.0)
    keep_last: int = number("> 0", 2)
    # a NaN/inf loss or gradient: stop with an error (the last checkpoint is kept), or skip the update
    # and count it (skipped_steps in metrics and summary)
    nan_policy: str = choices("stop", "skip", default="stop")
    # experiment trackers (accelerate's): none, or one or a list of TRACKERS; their packages are the
    # `tracking` extra (trackio: the `trackio` extra). run_name: default the run folder's name
    report_to: str | list[str] = "none"
    run_name: str | None = None
    project: str = "align"
    # the best model by an eval metric (HF Trainer's metric_for_best_model / greater_is_better): save_best
    # keeps a copy in RUN/best/; early_stopping_patience N > 0 stops after N evals without improvement.
    # best_metric: a logged eval metric (eval/loss, eval/accuracy, ...); greater_is_better null: lower is
    # better for a loss, higher otherwise. Both need training.eval_every and eval data.
    save_best: bool = False
    best_metric: str = "eval/loss"
    greater_is_better: bool | None = None
    early_stopping_patience: int = number(">= 0", 0)

    def check(self) -> list[str]:
        from align_cli.recipe import range_problems

        note = " (or null: no clipping)"
        problems = range_problems("training.max_grad_norm", self.max_grad_norm, "> 0", note)
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        for name in names:
            if name not in ("none", *TRACKERS):
                problems.append(f"training.report_to: {name!r} is not one of none, {', '.join(TRACKERS)}")
        if "none" in names and len(names) > 1:
            problems.append("training.report_to: none cannot be listed with a tracker")
        if len(self.adam_betas or []) != 2:
            problems.append(f"training.adam_betas: expected two numbers, got {self.adam_betas}")
        if (self.save_best or self.early_stopping_patience) and not self.eval_every:
            which = "training.save_best" if self.save_best else "training.early_stopping_patience"
            problems.append(f"{which}: needs evaluations during the run; set training.eval_every")
        return problems


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
    margins: dict[str, float] = number(">= 0", default_factory=lambda: dict(LLAMA2_SMALL_MARGINS))
    center_coef: float = number(">= 0", 0.0)  # reward centering: + coef * (r_c + r_r)^2 per pair (e.g. 0.01)
    # init of a newly added scalar head: normal(0, 1/sqrt(hidden + 1)) or zeros (all rewards start at 0)
    head: str = choices("normal", "zeros", default="normal")


# dpo.loss_type: the keys of losses.PREFERENCE_LOSSES (named here so a recipe is checked without torch;
# tests/test_registry.py holds the two equal)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
KL_ESTIMATORS = ("k1", "k3", "abs", "mse")  # losses.kl_penalty's estimators


@dataclass
class DPOSection:
    # strength of the implicit KL constraint to the reference (paper: 0.1; TL;DR 0.5); null: the loss
    # type's default (0.1; simpo 2.0; orpo has no beta)
    beta: float | None = number("> 0", None)
    loss_type: str = choices(*DPO_LOSS_TYPES, default="sigmoid")
    # conservative DPO: probability that a preference label is wrong
    label_smoothing: float = number("[0, 0.5)", 0.0)
    reference_free: bool = False  # take log pi_ref = 0 (no reference model at all)
    # true: reference log-probs computed once before training and cached on disk (no reference model in
    # memory while training); false: a live reference model scores every batch
    reference_cache: bool = True
    reference_model: str | None = None  # default: the policy's starting weights (pi_ref = pi_SFT)
    simpo_gamma: float = number(">= 0", 1.0)  # SimPO's target reward margin gamma (paper: gamma/beta 0.5)
    orpo_lambda: float = number(">= 0", 0.1)  # ORPO: weight of the odds-ratio term beside the chosen NLL

    def check(self) -> list[str]:
        """Settings a loss type would silently ignore."""
        problems = []
        if self.loss_type == "orpo" and self.beta is not None:
            problems.append("dpo.beta: loss_type orpo has no beta (its odds-ratio weight is dpo.orpo_lambda)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            problems.append(
                f"dpo.label_smoothing: for loss_type sigmoid (conservative DPO), not {self.loss_type}"
            )
        if self.loss_type in ("simpo", "orpo") and self.reference_model:
            problems.append(f"dpo.reference_model: loss_type {self.loss_type} uses no reference model")
        return problems


@dataclass
class KTOSection:
    beta: float = number("> 0", 0.1)
    # lambda_D; KTO paper: lambda_D n_D / (lambda_U n_U) in [1, 4/3]
    desirable_weight: float = number(">= 0", 1.0)
    undesirable_weight: float = number(">= 0", 1.0)  # lambda_U
    reference_model: str | None = None  # default: the policy's starting weights (pi_ref = pi_SFT)


@dataclass
class RejectionSection:
    # default: the last `align reward` output, unless reward functions are named (then only they score)
    reward_model: str | None = None
    reward_functions: list[str] = reward_functions()
    reward_weights: list[float] | None = reward_weights()
    prompts: str | None = None  # prompt JSONL; default: data.train
    max_prompts: int | None = number("> 0", None)
    n: int = number("> 0", 16)  # samples per prompt
    max_new_tokens: int = number("> 0", 64)
    temperature: float = number(">= 0", 1.0)
    top_p: float = number("(0, 1]", 1.0)
    top_k: int = number(">= 0", 0)
    prompts_per_batch: int = number("> 0", 8)  # prompts per generate call, each with its n samples
    score_batch_size: int = number("> 0", 32)
    # best: the top sample per prompt (Llama 2); top_k: the `keep` best; threshold: every sample >= threshold
    select: str = choices("best", "top_k", "threshold", default="best")
    keep: int = number("> 0", 1)
    threshold: float | None = number("finite", None)
    rounds: int = number("> 0", 1)
    then: str = choices("none", "sft", default="none")  # fine-tune on the selected samples after each round
    keep_previous_best: bool = True  # Llama 2: a prompt keeps its best sample over all rounds
    eval_n: int = number("> 0", 4)  # samples per prompt used to measure the fine-tuned policy's mean reward
    backend: str = choices("auto", "transformers", "vllm", default="auto")

    def check(self) -> list[str]:
        return reward_problems("rejection", self)


@dataclass
class PPOSection:
    reward_model: str | None = None  # default: the last `align reward` output
    prompts: str | None = None  # prompt JSONL; default: data.train
    # value model: a copy of the reward model (InstructGPT) or a scalar head on the policy's last hidden state
    value_model: str = choices("reward_model", "policy_head", default="reward_model")
    iterations: int = number("> 0", 20)  # rollout + update rounds (training.max_steps overrides)
    rollout_batch_size: int = number("> 0", 16)  # prompts per iteration, one response each
    mini_batch_size: int = number("> 0", 8)  # one optimizer step per mini-batch (Llama 2: 512 / 64)
    ppo_epochs: int = number("> 0", 4)
    max_new_tokens: int = number("> 0", 32)
    temperature: float = number("> 0", 1.0)  # PPO samples from the policy (0 would be greedy)
    top_p: float = number("(0, 1]", 1.0)
    top_k: int = number(">= 0", 0)
    backend: str = choices("auto", "transformers", "vllm", default="auto")  # vLLM on a GPU: vllm_engine.py
    kl_coef: float = number(">= 0", 0.05)  # beta (InstructGPT 0.02, Llama 2 0.01 / 0.005)
    kl_estimator: str = choices(*KL_ESTIMATORS, default="k1")
    adaptive_kl: bool = False  # Ziegler et al.: move kl_coef toward kl_target over kl_horizon samples
    kl_target: float = number("> 0", 6.0)
    kl_horizon: int = number("> 0", 10000)
    gamma: float = number("[0, 1]", 1.0)
    lam: float = number("[0, 1]", 0.95)
    cliprange: float = number("> 0", 0.2)
    cliprange_value: float = number("> 0", 0.2)
    vf_coef: float = number(">= 0", 0.1)
    whiten_advantages: bool = True
    score_norm: bool = False  # standardise scores within each rollout batch
    score_clip: float | None = number("> 0", None)  # clip scores to [-c, c]
    # subtracted from the score of responses without EOS
    missing_eos_penalty: float | None = number("finite", None)
    ptx_data: str | None = None  # PPO-ptx: SFT/pretraining JSONL mixed into every update
    ptx_coef: float = number(">= 0", 0.0)  # gamma of PPO-ptx (InstructGPT 27.8, on per-token mean NLL)
    ptx_batch_size: int = number("> 0", 8)
    log_samples: int = number(">= 0", 4)  # generations per iteration written to samples.jsonl

    def check(self) -> list[str]:
        problems = []
        if self.rollout_batch_size > 0 and self.mini_batch_size > self.rollout_batch_size:
            problems.append(
                f"ppo.mini_batch_size: must be <= ppo.rollout_batch_size ({self.rollout_batch_size}), "
                f"got {self.mini_batch_size}"
            )
        if self.top_p < 1.0 or self.top_k > 0:
            problems.append(
                f"ppo.top_p={self.top_p}, ppo.top_k={self.top_k}: PPO's ratios and KL are computed on the "
                "full distribution at ppo.temperature, so rollouts must be sampled from it; use top_p 1.0 "
                "and top_k 0"
            )
        return problems


# grpo.loss_type: the keys of losses.GRPO_LOSS_TYPES (tests/test_registry.py holds the two equal)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def _group_problems(name: str, s: Any, group: str) -> list[str]:
    """The rules GRPO and RLOO share: a group of at least two samples (a baseline needs another sample),
    mini-batches within one iteration's samples, and sampling from the full distribution."""
    problems = []
    size = getattr(s, group)
    if size < 2:
        problems.append(f"{name}.{group}: a group needs at least 2 samples per prompt, got {size}")
    samples = s.prompts_per_iteration * size
    if samples > 0 and s.mini_batch_size > samples:
        problems.append(
            f"{name}.mini_batch_size: must be <= the samples of an iteration ({name}.prompts_per_iteration x "
            f"{name}.{group} = {samples}), got {s.mini_batch_size}"
        )
    if s.top_p < 1.0 or s.top_k > 0:
        problems.append(
            f"{name}.top_p={s.top_p}, {name}.top_k={s.top_k}: the ratios and KL are computed on the full "
            f"distribution at {name}.temperature, so samples must be drawn from it; use top_p 1.0 and top_k 0"
        )
    return problems


@dataclass
class GRPOSection:
    # default: the last `align reward` output, unless reward functions are named (then only they score)
    reward_model: str | None = None
    reward_functions: list[str] = reward_functions()
    reward_weights: list[float] | None = reward_weights()
    prompts: str | None = None  # prompt JSONL; default: data.train
    iterations: int = number("> 0", 20)  # sample + update rounds (training.max_steps overrides)
    prompts_per_iteration: int = number("> 0", 8)  # over all processes; a prompt's group stays on one
    num_generations: int = number("> 0", 8)  # G samples per prompt (DeepSeekMath: 64)
    # prompts per generate call, each with its G samples; batches are seeded by their global index, so
    # the samples do not depend on the number of processes when it divides each process's prompts
    prompts_per_batch: int = number("> 0", 8)
    mini_batch_size: int = number("> 0", 16)  # samples (over all processes) per optimizer step
    num_iterations: int = number("> 0", 1)  # mu: update passes over each iteration's samples
    max_new_tokens: int = number("> 0", 64)
    temperature: float = number("> 0", 1.0)  # samples come from the policy (0 would be greedy)
    top_p: float = number("(0, 1]", 1.0)
    top_k: int = number(">= 0", 0)
    backend: str = choices("auto", "transformers", "vllm", default="auto")  # vLLM on a GPU: vllm_engine.py
    beta: float = number(">= 0", 0.04)  # k3 KL penalty in the loss (DeepSeekMath 0.04); 0: no reference
    epsilon: float = number("> 0", 0.2)  # clip range of the ratio
    # grpo: each sequence's token mean, then the mean (the paper); bnpo / dapo: every token of the
    # mini-batch / of the optimizer step over all processes alike; dr_grpo: sum / (B x max_new_tokens)
    loss_type: str = choices(*GRPO_LOSS_TYPES, default="grpo")
    scale_rewards: bool = True  # divide by the group's std; false: Dr. GRPO (Liu et al. 2025)
    log_samples: int = number(">= 0", 4)  # samples per iteration written to samples.jsonl

    def check(self) -> list[str]:
        return reward_problems("grpo", self) + _group_problems("grpo", self, "num_generations")


@dataclass
class RLOOSection:
    # default: the last `align reward` output, unless reward functions are named (then only they score)
    reward_model: str | None = None
    reward_functions: list[str] = reward_functions()
    reward_weights: list[float] | None = reward_weights()
    prompts: str | None = None  # prompt JSONL; default: data.train
    iterations: int = number("> 0", 20)  # sample + update rounds (training.max_steps overrides)
    prompts_per_iteration: int = number("> 0", 8)  # over all processes; a prompt's k samples stay on one
    k: int = number("> 0", 4)  # samples per prompt (Ahmadian et al.: 2 and 4)
    prompts_per_batch: int = number("> 0", 8)  # prompts per generate call (as grpo.prompts_per_batch)
    mini_batch_size: int = number("> 0", 16)  # samples (over all processes) per optimizer step
    num_iterations: int = number("> 0", 1)  # update passes over each iteration's samples (1: REINFORCE)
    max_new_tokens: int = number("> 0", 64)
    temperature: float = number("> 0", 1.0)
    top_p: float = number("(0, 1]", 1.0)
    top_k: int = number(">= 0", 0)
    backend: str = choices("auto", "transformers", "vllm", default="auto")  # vLLM on a GPU: vllm_engine.py
    beta: float = number(">= 0", 0.05)  # reward r - beta * log(pi(y|x) / pi_ref(y|x)); 0: no reference
    # clip of the sequence ratio pi(y|x) / pi_old(y|x): active only off-policy (after the first update)
    cliprange: float = number("> 0", 0.2)
    # none: the leave-one-out advantages as they are; reinforce_pp: then whitened over the whole batch of
    # every process (REINFORCE++, Hu 2025)
    normalize: str = choices("none", "reinforce_pp", default="none")
    log_samples: int = number(">= 0", 4)  # samples per iteration written to samples.jsonl

    def check(self) -> list[str]:
        return reward_problems("rloo", self) + _group_problems("rloo", self, "k")


# online_dpo.loss_type: the pairwise variants of losses.PREFERENCE_LOSSES that read the frozen reference
ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class OnlineDPOSection:
    # default: the last `align reward` output, unless reward functions are named (then only they score)
    reward_model: str | None = None
    reward_functions: list[str] = reward_functions()
    reward_weights: list[float] | None = reward_weights()
    prompts: str | None = None  # prompt JSONL; default: data.train
    iterations: int = number("> 0", 20)  # sample + update rounds (training.max_steps overrides)
    prompts_per_iteration: int = number("> 0", 8)
    num_generations: int = number("> 0", 4)  # samples per prompt; the pair is the best vs the worst
    prompts_per_batch: int = number("> 0", 8)  # prompts per generate call, each with its samples
    mini_batch_size: int = number("> 0", 8)  # pairs per optimizer step
    num_epochs: int = number("> 0", 1)  # update passes over one iteration's pairs
    max_new_tokens: int = number("> 0", 64)
    temperature: float = number("> 0", 1.0)  # samples come from the policy (0 would be greedy)
    top_p: float = number("(0, 1]", 1.0)
    top_k: int = number(">= 0", 0)
    backend: str = choices("auto", "transformers", "vllm", default="auto")  # vLLM on a GPU: vllm_engine.py
    beta: float = number("> 0", 0.1)  # DPO's beta: strength of the implicit KL constraint to pi_ref
    loss_type: str = choices(*ONLINE_DPO_LOSS_TYPES, default="sigmoid")
    label_smoothing: float = number("[0, 0.5)", 0.0)  # conservative DPO (loss_type sigmoid)
    log_samples: int = number(">= 0", 4)  # pairs per iteration written to samples.jsonl

    def check(self) -> list[str]:
        problems = reward_problems("online_dpo", self)
        if self.num_generations < 2:
            problems.append(
                f"online_dpo.num_generations: a pair needs at least 2 samples per prompt, got "
                f"{self.num_generations}"
            )
        if self.label_smoothing and self.loss_type != "sigmoid":
            problems.append(
                f"online_dpo.label_smoothing: for loss_type sigmoid (conservative DPO), not {self.loss_type}"
            )
        return problems
