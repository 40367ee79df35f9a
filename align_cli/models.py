"""Loading models and tokenizers (dtype, LoRA, gradient checkpointing) and per-token log-probs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align_cli.data.tokenize import IGNORE_INDEX
from align_cli.recipe import LoraSection, ModelSection

log = logging.getLogger("align")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded or used."""


def _hub_kwargs(section: ModelSection) -> dict[str, Any]:
    # Weights load from safetensors only; remote code runs only when the recipe asks for it.
    return {"trust_remote_code": section.trust_remote_code}


def load_tokenizer(section: ModelSection) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(section.name_or_path, **_hub_kwargs(section))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {section.name_or_path!r}: could not load its tokenizer: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using EOS (%s) for padding", tokenizer.eos_token)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model {section.name_or_path!r}: the tokenizer has no EOS token")
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(section: ModelSection) -> nn.Module:
    """A causal LM ready for training: dtype, gradient checkpointing and LoRA from the recipe."""
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(section) | {"dtype": DTYPES[section.dtype], "use_safetensors": True}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(section.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {section.name_or_path!r}: could not load: {exc}") from exc
    model.config.use_cache = False  # training never reuses past keys; generation turns it back on
    if section.gradient_checkpointing:
        enable_checkpointing(model)
    if section.lora.enabled:
        model = apply_lora(model, section.lora)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (transformers 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(model: nn.Module, lora: LoraSection, task_type: str = "CAUSAL_LM") -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    model = get_peft_model(model, config)
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """Write a from_pretrained-loadable model (safetensors) and its tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def sequence_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which sequence each token belongs to: the row when padded, or the packed example when a
    padding-free batch holds several examples in one row (position ids restart at 0)."""
    if "position_ids" in batch:
        return (batch["position_ids"] == 0).long().cumsum(-1) - 1
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    return rows[:, None].expand_as(batch["input_ids"])


def response_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) for every supervised token of the batch, and the sequence each belongs to.

    Only the positions whose next token is supervised go through the LM head (transformers'
    boolean ``logits_to_keep``), so prompt and padding positions never produce vocabulary-sized
    logits. Returns (logps [N], sequence index [N]), N = number of supervised tokens."""
    labels = batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_mask
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits.float()  # [N, V]
    targets = labels[:, 1:][targets_mask]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return logps, sequence_index(batch)[:, 1:][targets_mask]


# ----------------------------------------------------------------------------- reward models


def load_reward_model(section: ModelSection, pad_token_id: int, head_init: str = "normal") -> nn.Module:
    """A reward model: the language model with its LM head replaced by a scalar head (InstructGPT,
    Llama 2), as ``AutoModelForSequenceClassification`` with one label, so ``from_pretrained`` loads it
    back with its head. A head missing from the checkpoint is initialised by ``head_init``: "normal"
    (std 1/sqrt(hidden + 1)) or "zeros"; a saved reward model keeps its trained head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs = _hub_kwargs(section) | {"dtype": DTYPES[section.dtype], "use_safetensors": True, "num_labels": 1}
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the dropped LM head and the new head
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            section.name_or_path, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"model {section.name_or_path!r}: could not load as a reward model: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    head = score_head(model)
    # HF's own pooling reads the last token that is not pad_token_id; reward_scores reads last_index
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    if any(key.startswith("score.") for key in info["missing_keys"]):
        with torch.no_grad():
            if head_init == "zeros":
                head.weight.zero_()
            else:
                head.weight.normal_(0.0, 1.0 / (head.weight.shape[-1] + 1) ** 0.5)
            if head.bias is not None:
                head.bias.zero_()
        log.info("reward model: new scalar head (%s init) on %s", head_init, section.name_or_path)
    if section.gradient_checkpointing:
        enable_checkpointing(model)
    if section.lora.enabled:  # SEQ_CLS keeps the score head fully trainable (peft modules_to_save)
        model = apply_lora(model, section.lora, task_type="SEQ_CLS")
    return model


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (``score``), under any wrapper (DDP, peft)."""
    heads = [(name, m) for name, m in model.named_modules() if name.split(".")[-1] == "score"]
    if not heads:
        raise ModelError(f"{type(model).__name__} has no `score` head; expected a *ForSequenceClassification")
    return min(heads, key=lambda item: item[0].count("."))[1]


def reward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """r(x, y) of every row: the scalar head read at the row's final token ``batch["last_index"]``.

    The head's per-position output is captured with a forward hook, so the model still runs through
    its wrappers (DDP, autocast, peft) and HF's pad-id guess is never used (it picks the wrong token
    when the pad token is EOS and responses end with EOS). Returns float32 scores, shape [R]."""
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    per_position = captured[-1]  # [R, T, 1]
    rows = torch.arange(per_position.shape[0], device=per_position.device)
    return per_position[rows, batch["last_index"], 0].float()
