"""`align export`: a run's final model as a standalone model directory; ``--merge-lora`` folds a LoRA
adapter into its base weights, so the result loads with plain ``from_pretrained`` (no peft) and gives the
adapter model's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from align_cli.models import DTYPES, ModelError, is_adapter_dir, load_merged, pickle_hint, save_model


def export_model(
    model_dir: str | Path, out: str | Path, merge_lora: bool, dtype: str | None = None
) -> dict[str, Any]:
    """Write ``model_dir`` (a full model, or with ``merge_lora`` a LoRA adapter directory) to ``out`` in
    safetensors with its tokenizer; ``dtype`` (float32 / bfloat16 / float16) casts the weights.
    Returns what was written."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: no such model directory")
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} already exists and is not empty; choose another --out")
    adapter = is_adapter_dir(model_dir)
    if adapter and not merge_lora:
        raise ModelError(
            f"{model_dir} holds a LoRA adapter, not a full model; add --merge-lora to merge it into its base"
        )
    if merge_lora and not adapter:
        raise ModelError(f"--merge-lora: {model_dir} holds no LoRA adapter (no adapter_config.json)")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype] if dtype else "auto"}
    task = json.loads((model_dir / "adapter_config.json").read_text()).get("task_type") if adapter else None
    if task == "SEQ_CLS" or (not adapter and _is_reward_model(model_dir)):
        auto, kwargs["num_labels"] = AutoModelForSequenceClassification, 1
    else:
        auto = AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        model = (
            load_merged(model_dir, auto, **kwargs) if adapter else auto.from_pretrained(model_dir, **kwargs)
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: could not load: {exc}{pickle_hint(model_dir)}") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    save_model(model, tokenizer, out)
    n = sum(p.numel() for p in model.parameters())
    return {
        "source": str(model_dir),
        "out": str(out),
        "merged": adapter,
        "kind": auto.__name__,
        "parameters": n,
    }


def _is_reward_model(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
