"""Loading models and tokenizers (dtype, quantization, LoRA, gradient checkpointing, dropout) and saving them.

Forward passes (log-probs, reward scores) are in ``align_cli.forward``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align_cli.errors import AlignError
from align_cli.recipe import LoraSection, ModelSection

log = logging.getLogger("align")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(AlignError, ValueError):
    """A model or tokenizer that cannot be loaded or used."""


def pickle_hint(model: ModelSection | Path) -> str:
    """Why a directory holding only pickled weights (.bin/.pt) is refused, and what to do."""
    folder = model if isinstance(model, Path) else Path(str(model.name_or_path))
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return ""
    if not any(folder.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth")):
        return ""
    return (
        " (align loads weights only from safetensors: a pickled .bin/.pt file can run code when loaded; "
        "convert a trusted checkpoint with save_pretrained(..., safe_serialization=True))"
    )


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


def quantization_settings(section: ModelSection) -> dict[str, Any]:
    """The BitsAndBytesConfig arguments of the base weights as plain values, or {} when unquantized: the
    one source for quantization_kwargs and for the reference cache key (no GPU needed)."""
    if section.load_in_4bit:
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": section.dtype,
        }
    if section.load_in_8bit:
        return {"load_in_8bit": True}
    return {}


def quantization_kwargs(section: ModelSection) -> dict[str, Any]:
    """from_pretrained arguments for QLoRA base weights (4-bit NF4 or 8-bit, bitsandbytes), or {}.

    Raises ModelError without a CUDA GPU, before any weight is read."""
    settings = quantization_settings(section)
    if not settings:
        return {}
    if not torch.cuda.is_available():
        bits = 4 if section.load_in_4bit else 8
        raise ModelError(
            f"model.load_in_{bits}bit: {bits}-bit base weights (QLoRA, bitsandbytes) need a CUDA GPU and "
            "none is available; on a CPU train LoRA on the unquantized model (model.lora.enabled=true, "
            f"model.load_in_{bits}bit=false)"
        )
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    if "bnb_4bit_compute_dtype" in settings:
        settings["bnb_4bit_compute_dtype"] = DTYPES[settings["bnb_4bit_compute_dtype"]]
    config = BitsAndBytesConfig(**settings)
    # quantized weights are placed at load time: each process on its own GPU
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def is_adapter_dir(path: str | Path | None) -> bool:
    """A LoRA run's output: peft's adapter_config.json and adapter weights, no full model."""
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def _local(name_or_path: str) -> str:
    # an absolute local path goes into config.json and adapter_config.json (base_model_name_or_path), so
    # a LoRA output still finds its base model when loaded from another directory
    path = Path(name_or_path)
    return str(path.resolve()) if path.is_dir() else name_or_path


def load_merged(adapter_dir: str | Path, auto_class: Any, **kwargs: Any) -> nn.Module:
    """A LoRA output directory as a plain model: its base model with the adapter merged into the weights
    (and, for a reward model, the trained score head that peft saved beside the adapter)."""
    from peft import PeftConfig, PeftModel

    folder = Path(adapter_dir)
    if not (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_model.bin").is_file():
        raise ModelError("its adapter weights are pickled (adapter_model.bin)")  # callers add pickle_hint()
    config = PeftConfig.from_pretrained(str(adapter_dir))
    base = auto_class.from_pretrained(_local(config.base_model_name_or_path), **kwargs)
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():  # tokens added while training the adapter
        from transformers import AutoTokenizer

        fit_vocabulary(base, AutoTokenizer.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def fit_vocabulary(model: nn.Module, tokenizer: Any) -> None:
    """Grow the embeddings (and an untied LM head) to a tokenizer that gained tokens (the built-in chat
    template's markers, ``settle_chat_template``). The new rows start at the mean of the existing ones,
    without noise, so a policy and its reference built from the same files start identical."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
            layer.weight[rows:] = layer.weight[:rows].mean(0)
            if getattr(layer, "bias", None) is not None:
                layer.bias[rows:] = layer.bias[:rows].mean()
    log.info("vocabulary grown from %d to %d tokens (chat template markers)", rows, len(tokenizer))


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere, also where a model applies it functionally from a float attribute
    (Llama's ``attention_dropout``) and in LoRA's ``lora_dropout``: a preference or RL objective compares
    log-probs of one policy, which train-mode dropout would turn into two."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def load_causal_lm(section: ModelSection, tokenizer: Any = None) -> nn.Module:
    """A causal LM ready for training: dtype, 4-/8-bit base weights, gradient checkpointing, LoRA and
    dropout from the recipe, its vocabulary grown to ``tokenizer`` when that gained tokens. A LoRA output
    directory loads as its base model with the adapter merged (a LoRA SFT model is then the start, and
    under LoRA the reference, of the next stage)."""
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(section) | {"dtype": DTYPES[section.dtype], "use_safetensors": True}
    kwargs |= quantization_kwargs(section)
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    try:
        if is_adapter_dir(section.name_or_path):
            model = load_merged(section.name_or_path, AutoModelForCausalLM, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(_local(section.name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model {section.name_or_path!r}: could not load: {exc}{pickle_hint(section)}"
        ) from exc
    model.config.use_cache = False  # training never reuses past keys; generation turns it back on
    return _prepare_for_training(model, section, tokenizer=tokenizer)


def _prepare_for_training(
    model: nn.Module, section: ModelSection, task_type: str = "CAUSAL_LM", tokenizer: Any = None
) -> nn.Module:
    new_tokens: list[int] = []
    if tokenizer is not None:
        from align_cli.data.templates import builtin_chat_token_ids

        fit_vocabulary(model, tokenizer)
        new_tokens = builtin_chat_token_ids(tokenizer)
    if section.load_in_4bit or section.load_in_8bit:
        from peft import prepare_model_for_kbit_training

        # norms and head in fp32 for stability; input grads on for checkpointing through frozen weights
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if section.gradient_checkpointing:
        enable_checkpointing(model)
    if section.lora.enabled:
        model = apply_lora(model, section.lora, task_type=task_type, trainable_tokens=new_tokens)
    if section.disable_dropout:
        disable_dropout(model)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (transformers 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(
    model: nn.Module,
    lora: LoraSection,
    task_type: str = "CAUSAL_LM",
    trainable_tokens: list[int] | None = None,
) -> nn.Module:
    """LoRA adapters; the embedding rows of ``trainable_tokens`` (new chat markers) are trained too, in
    the input embeddings and, when not tied to them, the LM head (peft's trainable tokens)."""
    from peft import LoraConfig, get_peft_model

    token_rows = None
    if trainable_tokens:
        names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
        layers = [model.get_input_embeddings()]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not layers[0].weight:
            layers.append(output)
        token_rows = {names[layer]: list(trainable_tokens) for layer in layers}
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        trainable_token_indices=token_rows,
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
    """Write a from_pretrained-loadable model (safetensors) and its tokenizer (with its chat template). A
    causal LM's generation config stops at every stop token of the tokenizer (EOS and a chat template's
    end-of-turn), so plain ``generate`` and ``pipeline`` end a chat turn where align's sampler does."""
    from align_cli.generation import stop_token_ids

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generation_config = getattr(model, "generation_config", None)
    stops = stop_token_ids(tokenizer)
    if generation_config is not None and len(stops) > 1:
        generation_config.eos_token_id = stops
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- reward models


def load_reward_model(
    section: ModelSection, pad_token_id: int, head_init: str = "normal", tokenizer: Any = None
) -> nn.Module:
    """A reward model: the language model with its LM head replaced by a scalar head (InstructGPT,
    Llama 2), as ``AutoModelForSequenceClassification`` with one label, so ``from_pretrained`` loads it
    back with its head. A head missing from the checkpoint is initialised by ``head_init``: "normal"
    (std 1/sqrt(hidden + 1)) or "zeros"; a saved reward model keeps its trained head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs = _hub_kwargs(section) | {"dtype": DTYPES[section.dtype], "use_safetensors": True, "num_labels": 1}
    kwargs |= quantization_kwargs(section)
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the dropped LM head and the new head
    try:
        if is_adapter_dir(section.name_or_path):  # a LoRA reward model (head saved beside the adapter)
            model = load_merged(section.name_or_path, AutoModelForSequenceClassification, **kwargs)
            # where it came from, not its base: scoring reads the trained length settings beside it
            model.config.name_or_path = _local(section.name_or_path)
            adapter_config = Path(section.name_or_path) / "adapter_config.json"
            task = json.loads(adapter_config.read_text()).get("task_type")
            info = {"missing_keys": [] if task == "SEQ_CLS" else ["score.weight"]}
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                _local(section.name_or_path), output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"model {section.name_or_path!r}: could not load as a reward model: {exc}{pickle_hint(section)}"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    head = score_head(model)
    # HF's own pooling reads the last token that is not pad_token_id; forward.reward_scores reads last_index
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
    # under LoRA, SEQ_CLS keeps the score head fully trainable (peft modules_to_save)
    return _prepare_for_training(model, section, task_type="SEQ_CLS", tokenizer=tokenizer)


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (``score``), under any wrapper (DDP, peft)."""
    heads = [(name, m) for name, m in model.named_modules() if name.split(".")[-1] == "score"]
    if not heads:
        raise ModelError(f"{type(model).__name__} has no `score` head; expected a *ForSequenceClassification")
    return min(heads, key=lambda item: item[0].count("."))[1]
