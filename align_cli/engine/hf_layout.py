"""Checkpoints that ``from_pretrained`` loads: the Hugging Face files beside accelerate's state.

accelerate's ``save_state`` writes the model's weights as ``model.safetensors`` with the model's own
parameter names, the layout ``save_pretrained`` writes, so a full model only needs its ``config.json``
(and generation config) and the tokenizer beside them to load with ``AutoModel*.from_pretrained``:
no second copy of the weights. A LoRA model gets peft's adapter files (``adapter_config.json``,
``adapter_model.safetensors``: the small trained part only), loaded with ``PeftModel.from_pretrained`` or
``AutoModelForCausalLM.from_pretrained``. A model of several parts (PPO's policy and value) is left as
accelerate saved it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn


def write_hf_layout(folder: Path, model: nn.Module, tokenizer: Any) -> bool:
    """Add to the checkpoint ``folder`` what ``from_pretrained`` needs beside accelerate's weights;
    returns whether the checkpoint is now loadable that way."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        model.save_pretrained(folder, safe_serialization=True)
    elif isinstance(model, PreTrainedModel) and (folder / "model.safetensors").is_file():
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
    else:  # sharded (FSDP/DeepSpeed) or a model of several parts: accelerate's layout only
        return False
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return True


def checkpoint_files(accelerator: Accelerator, model: nn.Module, tokenizer: Any) -> Callable[[Path], bool]:
    """``Run.hf_files`` for a run training the (prepared) ``model``: ``write_hf_layout`` of its unwrapped
    self, at each checkpoint."""
    return lambda folder: write_hf_layout(folder, accelerator.unwrap_model(model), tokenizer)
