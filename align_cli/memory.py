"""How much accelerator memory a run needs, estimated before it starts (and by `align plan` without any
weights: the models are built on PyTorch's "meta" device from their config alone).

Per device, for the model being trained: weights (their dtype; 4-bit NF4 about 0.52 byte per weight of
the quantized linear layers), gradients (trainable parameters only), optimizer state (AdamW: two
moments in the parameter dtype, 8 bytes per parameter in fp32; 8-bit AdamW about 2 bytes), and
activations kept for the backward pass. Activations follow Korthikanti et al. (2022) for a block with
an attention kernel that never stores the s x s matrix (SDPA / flash): about (7 h + 3 i) values per
token and layer (h hidden size, i MLP size), or only each layer's input h with gradient checkpointing;
plus one chunk of fp32 logits (the LM head runs in chunks of at most 2^24 logits, align_cli/logprobs.py).
Frozen models (reference, reward model) count their weights; sampling (PPO, rejection sampling) counts
the KV cache. ZeRO-2 divides gradients and optimizer state by the number of processes; ZeRO-3 / FSDP
full shard the weights too. The figure is a guide (allocator overhead, temporary buffers and
fragmentation come on top: leave ~10-20% headroom).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from align_cli.logprobs import chunk_rows
from align_cli.recipe import LoraSection, Recipe

GIB = 2**30
SHARDING = ("none", "zero2", "zero3")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 scale per 256 blocks


@dataclass
class Component:
    name: str
    bytes: float
    detail: str = ""


@dataclass
class MemoryEstimate:
    stage: str
    components: list[Component] = field(default_factory=list)
    parameters: int = 0
    trainable: int = 0
    processes: int = 1
    shard: str = "none"

    @property
    def total(self) -> float:
        return sum(c.bytes for c in self.components)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "parameters": self.parameters,
            "trainable": self.trainable,
            "processes": self.processes,
            "shard": self.shard,
            "components_gib": {c.name: round(c.bytes / GIB, 4) for c in self.components},
            "total_gib": round(self.total / GIB, 4),
        }

    def table(self, title: str | None = None) -> Table:
        where = f"{self.processes} process(es), sharding {self.shard}"
        table = Table(title=title or f"estimated memory per device: align {self.stage} ({where})")
        table.add_column("component")
        table.add_column("memory", justify="right")
        table.add_column("how")
        for c in self.components:
            table.add_row(c.name, human_bytes(c.bytes), c.detail)
        share = f"{self.trainable / max(self.parameters, 1):.2%}"
        table.add_row(
            "[bold]total[/]",
            f"[bold]{human_bytes(self.total)}[/]",
            f"{self.parameters:,} parameters, {self.trainable:,} trainable ({share}); add 10-20% headroom",
        )
        return table


def human_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- counting


def _quantized_linear(model: nn.Module) -> set[int]:
    """ids of the weights that 4/8-bit loading quantizes: linear layers, except the heads."""
    return {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and name.split(".")[-1] not in ("lm_head", "score", "lora_A", "lora_B")
        and "lora_" not in name
    }


def weight_bytes(model: nn.Module, bits: int | None = None) -> float:
    """Bytes of a model's parameters. ``bits`` (4 or 8): as if loaded quantized (for a meta model
    that `align plan` builds; a model really loaded in 4/8-bit is counted as it is)."""
    quantized = _quantized_linear(model) if bits else set()
    total = 0.0
    for p in model.parameters():
        if id(p) in quantized:
            total += p.numel() * (NF4_BYTES if bits == 4 else 1.0)
        elif bits and p.is_floating_point():
            total += p.numel() * 4  # peft's k-bit preparation keeps every unquantized weight in fp32
        else:
            total += p.numel() * p.element_size()
    return total


def _dtype_bytes(model: nn.Module) -> int:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.element_size() if p is not None else 4


def _dims(config: Any) -> tuple[int, int, int, int, int]:
    text = getattr(config, "text_config", None) or config
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    i = getattr(text, "intermediate_size", None) or 4 * h
    return h, i, text.num_hidden_layers, kv * head_dim, text.vocab_size


def activation_bytes(
    config: Any,
    rows: int,
    seq: int,
    act: int,
    checkpointing: bool,
    logits: bool,
    attention_scores: bool = False,
) -> float:
    """Activations kept for backward for ``rows`` sequences of ``seq`` tokens (``act`` bytes a value).

    ``attention_scores``: the attention kernel materialises the scores and their softmax, [heads, s, s]
    per sequence and layer (PyTorch's math SDPA kernel on a CPU with a padding mask; eager attention)."""
    h, i, layers, _, vocab = _dims(config)
    tokens = rows * seq
    per_layer = tokens * (7 * h + 3 * i) * act
    if attention_scores:
        text = getattr(config, "text_config", None) or config
        per_layer += 2 * rows * text.num_attention_heads * seq * seq * act
    kept = layers * tokens * h * act + per_layer if checkpointing else layers * per_layer
    # the LM head runs chunk by chunk (align_cli/logprobs.py): one chunk's fp32 logits, softmax, log-softmax
    # and gradient exist at a time, never the whole batch's
    head = min(tokens, chunk_rows(vocab)) * vocab * 4 * 4 if logits else 0
    return kept + head


def kv_cache_bytes(config: Any, rows: int, seq: int, act: int) -> float:
    _, _, layers, kv_width, _ = _dims(config)
    return 2 * layers * rows * seq * kv_width * act


# ----------------------------------------------------------------------------- the estimate


def _group_section(recipe: Recipe) -> Any:
    """The section of a stage that samples groups per prompt (GRPO, RLOO), else None."""
    return {"grpo": recipe.grpo, "rloo": recipe.rloo}.get(recipe.stage or "")


def _group_size(section: Any) -> int:
    return section.num_generations if hasattr(section, "num_generations") else section.k


def _shape(recipe: Recipe, processes: int) -> tuple[int, int, str]:
    """(rows, tokens per row, description) of one micro-batch of the stage."""
    t, d, stage = recipe.training, recipe.data, recipe.stage
    if stage in ("reward", "dpo"):  # every response of a pair is one row
        return (
            2 * t.micro_batch_size,
            d.max_length,
            f"micro-batch {t.micro_batch_size} pairs x {d.max_length}",
        )
    if stage == "online-dpo":  # every sampled pair is two rows of prompt + response
        o = recipe.online_dpo
        seq = (d.max_prompt_length or d.max_length) + o.max_new_tokens
        return (
            2 * o.mini_batch_size,
            seq,
            f"mini-batch {o.mini_batch_size} pairs x (prompt + {o.max_new_tokens} new) {seq}",
        )
    on_policy = recipe.ppo if stage == "ppo" else _group_section(recipe)
    if on_policy is not None:
        rows = max(1, on_policy.mini_batch_size // processes)
        seq = (d.max_prompt_length or d.max_length) + on_policy.max_new_tokens
        return rows, seq, f"mini-batch {rows} x (prompt + {on_policy.max_new_tokens} new) {seq}"
    return t.micro_batch_size, d.max_length, f"micro-batch {t.micro_batch_size} x {d.max_length} tokens"


def estimate(
    recipe: Recipe,
    trained: nn.Module | None,
    frozen: dict[str, nn.Module] | None = None,
    processes: int = 1,
    shard: str = "none",
    planned_bits: int | None = None,
    config: Any = None,
    value_config: Any = None,
    device: str = "cuda",
) -> MemoryEstimate:
    """The estimate for ``recipe``'s stage: ``trained`` (None: nothing is trained, e.g. rejection
    sampling without SFT; for PPO the policy and value model together) and the ``frozen`` models held
    beside it, e.g. {"reference": model}. ``config``: the policy's model config (default: ``trained``'s);
    ``value_config``: PPO's value model, a reward-model copy, whose activations count too.
    ``planned_bits``: weights of meta models counted as 4/8-bit (QLoRA planning). Rejection sampling
    samples, then fine-tunes: the larger of the two phases is reported. ``device``: "cpu" counts the
    attention scores the CPU's SDPA kernel keeps (GPU kernels do not)."""
    t = recipe.training
    frozen = frozen or {}
    est = MemoryEstimate(stage=recipe.stage or "run", processes=processes, shard=shard)
    first = trained if trained is not None else next(iter(frozen.values()))
    config = config or first.config
    act = 2 if t.precision in ("bf16", "fp16") else _dtype_bytes(first)
    training: list[Component] = []
    if trained is not None:
        trainable = [p for p in trained.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)
        est.parameters = sum(p.numel() for p in trained.parameters())
        est.trainable = n_train
        weights = weight_bytes(trained, planned_bits)
        grads = sum(p.numel() * p.element_size() for p in trainable)
        if t.optimizer != "adamw":  # bitsandbytes: two 8-bit moments (+ small block scales)
            optim, how = 2.0 * n_train, f"{t.optimizer}: 2 bytes per trainable"
        elif shard != "none" and all(p.element_size() == 2 for p in trainable):
            optim, how = 12.0 * n_train, "adamw under DeepSpeed bf16: fp32 master weights + 2 fp32 moments"
        else:  # torch AdamW: two moments in each parameter's dtype (peft keeps adapters in fp32)
            optim = sum(2.0 * p.numel() * p.element_size() for p in trainable)
            how = f"adamw: two moments, {optim / max(n_train, 1):.0f} bytes per trainable"
        shards = processes if shard in ("zero2", "zero3") else 1
        kind = f"{planned_bits}-bit base" if planned_bits else f"{_dtype_bytes(trained)} bytes each"
        rows, seq, what = _shape(recipe, processes)
        ckpt = recipe.model.gradient_checkpointing
        scores = device == "cpu"
        acts = activation_bytes(config, rows, seq, act, ckpt, recipe.stage != "reward", scores)
        if value_config is not None:
            acts += activation_bytes(value_config, rows, seq, act, ckpt, False, scores)
            what += " (policy and value model)"
        if scores:
            what += ", attention scores (CPU kernel)"
        training = [
            Component(
                "weights (trained model)",
                weights / (processes if shard == "zero3" else 1),
                kind + (f", / {processes} (ZeRO-3 / FSDP)" if shard == "zero3" and processes > 1 else ""),
            ),
            Component("gradients", grads / shards, f"{n_train:,} trainable parameters"),
            Component("optimizer state", optim / shards, how),
            Component("activations", acts, f"{what}; gradient checkpointing {'on' if ckpt else 'off'}"),
        ]
    held = [
        Component(f"{name} (frozen)", weight_bytes(model), "weights only") for name, model in frozen.items()
    ]
    est.parameters += sum(p.numel() for model in frozen.values() for p in model.parameters())
    sampling: list[Component] = []
    group = _group_section(recipe)
    if recipe.stage in ("ppo", "rejection-sample", "online-dpo") or group is not None:
        if recipe.stage == "ppo":
            rows, new = max(1, recipe.ppo.rollout_batch_size // processes), recipe.ppo.max_new_tokens
        elif recipe.stage == "online-dpo":
            o = recipe.online_dpo
            rows, new = (
                min(o.prompts_per_batch, o.prompts_per_iteration) * o.num_generations,
                o.max_new_tokens,
            )
        elif group is not None:  # one generate call: prompts_per_batch prompts with their samples
            prompts = min(group.prompts_per_batch, max(1, group.prompts_per_iteration // processes))
            rows, new = prompts * _group_size(group), group.max_new_tokens
        else:
            rs = recipe.rejection
            rows, new = rs.prompts_per_batch * rs.n, rs.max_new_tokens
        seq = (recipe.data.max_prompt_length or recipe.data.max_length) + new
        sampling = [
            Component("KV cache (sampling)", kv_cache_bytes(config, rows, seq, act), f"{rows} x {seq} tokens")
        ]
    if recipe.stage != "rejection-sample" or not training:
        est.components = training + held + sampling
        return est
    # rejection sampling: the sampling policy is freed before the SFT round; the reward model stays
    phases = {
        "sampling": held + sampling,
        "SFT round": training + [c for c in held if c.name.startswith("reward")],
    }
    phase = max(phases, key=lambda k: sum(c.bytes for c in phases[k]))
    est.components = [replace(c, name=f"{c.name} [{phase}, the larger phase]") for c in phases[phase]]
    return est


# ----------------------------------------------------------------------------- from a config alone


def meta_model(
    config: Any, recipe: Recipe, reward: bool = False, lora: LoraSection | None = None
) -> nn.Module:
    """The model ``config`` describes, on the meta device (no memory, no weights), in the recipe's dtype,
    with the recipe's LoRA adapters when ``lora`` is enabled."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align_cli.models import DTYPES, apply_lora

    config = copy.deepcopy(config)
    with torch.device("meta"):
        if reward:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[recipe.model.dtype])
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[recipe.model.dtype])
        if lora is not None and lora.enabled:
            model = apply_lora(model, lora, task_type="SEQ_CLS" if reward else "CAUSAL_LM")
    return model


@dataclass
class MemoryPlan:
    """What a stage holds on a device: the model it trains (None: nothing is trained) and the frozen
    models beside it; ``value_config``: a value model trained with the policy (PPO), whose activations
    count too. Each stage module's ``memory_plan`` builds one from model configs on the meta device."""

    trained: nn.Module | None
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    value_config: Any = None


def reference_copy(config: Any, recipe: Recipe) -> nn.Module:
    """A frozen reference model: the policy's architecture and dtype, without adapters."""
    return meta_model(config, replace(recipe, model=replace(recipe.model, lora=LoraSection())))


def trained_lora(recipe: Recipe) -> LoraSection | None:
    return recipe.model.lora if recipe.model.lora.enabled else None


def plan(
    recipe: Recipe,
    config: Any,
    reward_config: Any = None,
    processes: int = 1,
    shard: str = "none",
    device: str = "cuda",
) -> MemoryEstimate:
    """The memory estimate of ``recipe`` from model configs only (nothing is downloaded or allocated):
    the policy's ``config`` and, for stages with a reward model, its config (default: the same). The
    models come from the stage's own ``memory_plan``."""
    from align_cli.stages import STAGES

    if shard not in SHARDING:
        raise ValueError(f"shard {shard!r}: choose one of {', '.join(SHARDING)}")
    m = recipe.model
    bits = 4 if m.load_in_4bit else 8 if m.load_in_8bit else None
    held = STAGES[recipe.stage].load().memory_plan(recipe, config, reward_config or config)
    return estimate(
        recipe, held.trained, held.frozen, processes, shard, bits, config, held.value_config, device
    )


def sharding_of(accelerator: Any) -> str:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "zero3"  # full shard (recipes/accelerate/fsdp.yaml)
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"zero{stage}" if stage in (2, 3) else "none"
    return "none"


def print_estimate(
    recipe: Recipe,
    trained: nn.Module | None,
    accelerator: Any,
    console: Console,
    frozen: dict[str, nn.Module | None] | None = None,
    config: Any = None,
    value_config: Any = None,
) -> MemoryEstimate:
    """Print the estimate for a run about to start (its loaded models as they are) on the main process."""
    models = {k: v for k, v in (frozen or {}).items() if v is not None}
    est = estimate(
        recipe,
        trained,
        models,
        accelerator.num_processes,
        sharding_of(accelerator),
        config=config,
        value_config=value_config,
        device=accelerator.device.type,
    )
    if accelerator.is_main_process:
        console.print(est.table())
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            if est.total > free:
                console.print(
                    f"[bold yellow]warning[/]: the estimate ({est.total / GIB:.1f} GiB) exceeds this GPU's "
                    f"free memory ({free / GIB:.1f} of {total / GIB:.1f} GiB); consider LoRA / QLoRA, "
                    "gradient checkpointing, a smaller micro-batch, 8-bit AdamW or ZeRO / FSDP"
                )
    return est


# ----------------------------------------------------------------------------- `align plan`


def read_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """A model's config (config.json only: no weights), for a local directory, a LoRA output (its base
    model's config) or a hub id (needs the network or the hub cache)."""
    from transformers import AutoConfig

    from align_cli.models import ModelError, is_adapter_dir

    source = name_or_path
    if is_adapter_dir(name_or_path):
        from peft import PeftConfig

        source = PeftConfig.from_pretrained(name_or_path).base_model_name_or_path
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model {name_or_path!r}: could not read its config.json ({str(exc).splitlines()[0]}); "
            "`align plan` reads only the config, but a hub id needs the network or the local hub cache"
        ) from exc


def plan_recipe(
    recipe: Recipe, processes: int = 1, shard: str = "none", device: str = "cuda"
) -> MemoryEstimate:
    """`align plan`: the estimate of a recipe from its models' configs (chaining like the stages do)."""
    from align_cli.recipe import RecipeError
    from align_cli.runs import last_output
    from align_cli.sections import uses_reward_model

    policy = recipe.model.name_or_path or last_output("sft")
    if not policy:
        raise RecipeError("plan: no model.name_or_path (--model) and no `align sft` output to chain from")
    config = read_config(str(policy), recipe.model.trust_remote_code)
    scored = {
        "ppo": recipe.ppo,
        "rejection-sample": recipe.rejection,
        "grpo": recipe.grpo,
        "rloo": recipe.rloo,
        "online-dpo": recipe.online_dpo,
    }.get(recipe.stage or "")
    reward = scored.reward_model if scored is not None else None
    if scored is not None and reward is None and uses_reward_model(scored):  # functions alone: no model
        reward = last_output("reward")
    reward_config = read_config(str(reward), recipe.model.trust_remote_code) if reward else None
    return plan(recipe, config, reward_config, processes, shard, device)


def print_plan(
    path: Path,
    model: str | None,
    sets: list[str] | None,
    processes: int,
    shard: str,
    device: str,
    console: Console,
) -> MemoryEstimate:
    """`align plan`: resolve the recipe at ``path``, print its batch arithmetic and memory estimate."""
    from align_cli.recipe import RecipeError, load_recipe
    from align_cli.stages import STAGES

    if shard not in SHARDING:
        raise RecipeError(f"--shard {shard!r}: choose one of {', '.join(SHARDING)}")
    if processes < 1:
        raise RecipeError("--processes: must be >= 1")
    if device not in ("cuda", "cpu"):
        raise RecipeError(f"--device {device!r}: choose cuda or cpu")
    recipe = load_recipe(path, {"model.name_or_path": model}, sets)
    if not recipe.stage:
        raise RecipeError(f"recipe {path}: no `stage:`; add one ({', '.join(STAGES)})")
    estimate_ = plan_recipe(recipe, processes, shard, device)
    name = recipe.model.name_or_path or "(chained)"
    console.print(
        f"[bold]plan[/] {path}: stage {recipe.stage}, model {name}, {batch_arithmetic(recipe, processes)}"
    )
    console.print(estimate_.table())
    return estimate_


def batch_arithmetic(recipe: Recipe, processes: int) -> str:
    """How many sequences one optimizer step sees, from the fields the stage reads."""
    if recipe.stage == "ppo":
        p = recipe.ppo
        return (
            f"{p.rollout_batch_size} rollouts per iteration over {processes} process(es), "
            f"{p.ppo_epochs} epoch(s) of mini-batches of {p.mini_batch_size}"
        )
    if recipe.stage == "online-dpo":
        o = recipe.online_dpo
        return (
            f"{o.prompts_per_iteration} prompts x {o.num_generations} samples per iteration -> at most "
            f"{o.prompts_per_iteration} pairs, {o.num_epochs} epoch(s) of mini-batches of "
            f"{o.mini_batch_size} pairs"
        )
    group = _group_section(recipe)
    if group is not None:
        size = _group_size(group)
        return (
            f"{group.prompts_per_iteration} prompts x {size} samples per iteration over {processes} "
            f"process(es), {group.num_iterations} pass(es) of mini-batches of {group.mini_batch_size} samples"
        )
    t = recipe.training
    return (
        f"global batch {t.micro_batch_size} x {t.grad_accum} accumulation x {processes} process(es) = "
        f"{t.micro_batch_size * t.grad_accum * processes}"
    )
