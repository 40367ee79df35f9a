"""``final/README.md``: a Hugging Face model card for a run's final model (full fine-tune or LoRA adapter).

The YAML header is the Hub's metadata (base_model, library_name, tags, datasets), the body says what
trained the model and how to load it with plain transformers / peft. It is written from the run's own
recipe.yaml and summary, after the final model is saved; for a LoRA adapter it replaces peft's template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

# the tags TRL's trainers put on the models they save, by align stage
TRL_TAGS = {
    "sft": ["sft"],
    "reward": ["reward-trainer", "reward-model"],
    "dpo": ["dpo"],
    "kto": ["kto"],
    "ppo": ["ppo", "rlhf"],
    "grpo": ["grpo"],
    "rloo": ["rloo"],
    "online-dpo": ["online-dpo"],
    "rejection-sample": ["rejection-sampling"],
}
# summary keys that are costs or bookkeeping, not results
_NOT_HEADLINE = {
    "elapsed_s",
    "peak_memory_mb",
    "parameters_trainable",
    "parameters_total",
    "skipped_steps",
    "tokens_per_s",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(name: Any) -> str | None:
    """``name`` when it reads as a Hub repo id (``org/name`` or ``name``) and is no local path."""
    if not isinstance(name, str) or Path(name).exists() or not _HUB_ID.match(name):
        return None
    return None if name.endswith((".json", ".jsonl", ".parquet", ".csv", ".yaml", ".txt")) else name


def _card_header(model_dir: Path) -> dict[str, Any]:
    """The YAML header of a model card already in ``model_dir`` ({} when there is none)."""
    card = model_dir / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    try:
        header = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def base_model(name: Any) -> str | None:
    """The Hub id the model descends from: the recipe's model when it is a hub id, else (a previous
    stage's output) the base_model of that model's own card."""
    found = hub_id(name)
    if found or not isinstance(name, str) or not Path(name).is_dir():
        return found
    inherited = _card_header(Path(name)).get("base_model")
    return inherited if isinstance(inherited, str) else None


def _model_kind(model_dir: Path) -> tuple[bool, bool]:
    """(is a LoRA adapter, is a reward/value model with a scalar head)."""
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        return True, json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS"
    config = model_dir / "config.json"
    kinds = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    return False, any(str(k).endswith("ForSequenceClassification") for k in kinds)


def _data_files(recipe: dict[str, Any], section: str | None) -> list[str]:
    data = recipe.get("data") or {}
    own = recipe.get(section) or {} if section else {}
    found: list[str] = []
    for value in (data.get("train"), data.get("eval"), own.get("prompts")):
        for item in value if isinstance(value, list) else [value]:
            path = item.get("path") if isinstance(item, dict) else item
            if isinstance(path, str) and path and path not in found:
                found.append(path)
    return found


def _stage_recipe(recipe: dict[str, Any], stage: str) -> tuple[dict[str, Any], str | None]:
    """The recipe without the sections of other stages (which this stage never reads), and the stage's
    own section name."""
    from align_cli.stages import STAGES

    own = STAGES[stage].section if stage in STAGES else None
    others = {s.section for s in STAGES.values() if s.section and s.section != own}
    return {k: v for k, v in recipe.items() if k not in others}, own


def headline(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The results of a run's summary: losses, eval metrics, scores (no costs, no paths)."""
    rows = []
    for key, value in summary.items():
        if key in _NOT_HEADLINE or isinstance(value, (dict, list)) or value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((key, f"{value:.4g}" if isinstance(value, float) else value))
        elif key in ("best_checkpoint", "early_stopped"):
            rows.append((key, value))
    return rows


def _load_snippet(model_dir: Path, adapter: bool, scalar_head: bool) -> str:
    auto = "AutoModelForSequenceClassification" if scalar_head else "AutoModelForCausalLM"
    path = str(model_dir)
    if not adapter:
        use = (
            'inputs = tokenizer("Hello", return_tensors="pt")\nreward = model(**inputs).logits[0, 0]'
            if scalar_head
            else 'inputs = tokenizer("Hello", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))"
        )
        return (
            f"from transformers import {auto}, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")\n'
            f'model = {auto}.from_pretrained("{path}")\n{use}'
        )
    base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    labels = ", num_labels=1" if scalar_head else ""
    return (
        f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")\n'
        f'base = {auto}.from_pretrained("{base}"{labels})\n'
        f'model = PeftModel.from_pretrained(base, "{path}")\n'
        "model = model.merge_and_unload()  # optional: a plain transformers model"
    )


def render_card(model_dir: Path, run_dir: Path, stage: str, summary: dict[str, Any]) -> str:
    """The model card text of ``model_dir``, a final model of ``run_dir`` (its recipe.yaml) trained by
    ``stage``, with the figures of ``summary``."""
    saved = run_dir / "recipe.yaml"
    full = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    recipe, section = _stage_recipe(full or {}, stage)
    adapter, scalar_head = _model_kind(model_dir)
    start = (recipe.get("model") or {}).get("name_or_path")
    base = base_model(start)
    files = _data_files(recipe, section)
    header: dict[str, Any] = {}
    if base:
        header["base_model"] = base
    header["library_name"] = "peft" if adapter else "transformers"
    tags = ["align", stage, *TRL_TAGS.get(stage, []), *(["lora"] if adapter else [])]
    header["tags"] = list(dict.fromkeys(tags))  # once each (sft's stage name is its TRL tag too)
    hub_sets = [f for f in files if hub_id(f)]
    if hub_sets:
        header["datasets"] = hub_sets
    if not adapter:
        header["pipeline_tag"] = "text-classification" if scalar_head else "text-generation"
    kind = "LoRA adapter" if adapter else "model"
    role = "reward model (scalar head)" if scalar_head else "causal language model"
    metrics = "\n".join(f"| {k} | {v} |" for k, v in headline(summary)) or "| (none) | |"
    data = "\n".join(f"- `{f}`" for f in files) or "- (none recorded)"
    command = f"align {stage} --recipe recipe.yaml --set output.dir=runs/{stage}-again"
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# {model_dir.name}: {stage} {kind}\n\n"
        f"A {role} trained with `align {stage}`"
        f"{' as a LoRA adapter' if adapter else ''}.\n\n"
        f"- **Base model:** `{start}`\n- **Stage:** `{stage}`\n- **Run:** `{run_dir}`\n\n"
        f"## Data\n\n{data}\n\n"
        f"## Results\n\n| metric | value |\n|---|---|\n{metrics}\n\n"
        f"## How to load\n\n```python\n{_load_snippet(model_dir, adapter, scalar_head)}\n```\n\n"
        f"## Reproduce\n\nSave the recipe below as `recipe.yaml` (it is the run's own `{saved}`), then "
        "train into a new folder:\n\n"
        f"```bash\n{command}\n```\n\n"
        f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n"
    )


def write_model_card(model_dir: Path, run_dir: Path, stage: str, summary: dict[str, Any]) -> None:
    """Write ``model_dir/README.md`` (``render_card``), replacing peft's template on an adapter."""
    if model_dir.is_dir():
        text = render_card(model_dir, run_dir, stage, summary)
        (model_dir / "README.md").write_text(text, encoding="utf-8")
