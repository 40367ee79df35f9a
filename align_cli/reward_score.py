"""``align reward score``: every record of a file with its reward(s), as JSONL, and a summary.

Records are rendered and cut as the reward model's training rendered its records: the same
``encode_preference`` (``preference.fit_lengths``) with the data settings of its run's recipe.yaml
(``scoring.trained_settings``), which ``--template`` / ``--max-length`` override.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from align_cli.data.formats import DataError, Record, load_records
from align_cli.data.precheck import SCORE_KINDS
from align_cli.data.preference import collate_responses, encode_preference
from align_cli.engine.metrics import print_table
from align_cli.forward import reward_scores, to_device
from align_cli.losses import ranking_pairs
from align_cli.models import ModelError, load_reward_model, load_tokenizer
from align_cli.recipe import DataSection, ModelSection, RecipeError
from align_cli.runs import last_output
from align_cli.scoring import trained_settings


def _as_ranked(record: Record) -> Record:
    """Any scorable record as one prompt with its responses in file order (scores never reorder)."""
    f = record.fields
    if record.kind == "preference":
        return record
    if record.kind == "ranked":
        fields = {"prompt": f["prompt"], "responses": f["responses"]}
    elif record.kind == "prompt_completion":
        fields = {"prompt": f["prompt"], "responses": [f["completion"]]}
    else:  # messages: the last assistant turn is the response, everything before it the prompt
        fields = {"prompt": f["messages"][:-1], "responses": [[f["messages"][-1]]]}
    return Record(record.source, record.line, "ranked", fields)


def _with_rewards(record: Record, rewards: list[float] | None) -> dict[str, Any]:
    out = dict(record.fields)
    if record.kind == "preference":
        out["reward_chosen"], out["reward_rejected"] = rewards if rewards else (None, None)
    elif record.kind == "ranked":
        out["rewards"] = rewards
    else:
        out["reward"] = rewards[0] if rewards else None
    return out


@torch.no_grad()
def score_records(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[Record],
    template: str = "auto",
    max_length: int = DataSection.max_length,
    max_prompt_length: int | None = None,
    batch_size: int = 16,
) -> list[list[float] | None]:
    """r(x, y) of every response of every record, in file order (chosen then rejected for a pair);
    None for a record that truncation left without response tokens."""
    device = next(model.parameters()).device
    encoded = [
        encode_preference(_as_ranked(r), tokenizer, template, max_length, max_prompt_length)[0]
        for r in records
    ]
    rewards: list[list[float] | None] = [None] * len(records)
    todo = [i for i, e in enumerate(encoded) if e is not None]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = collate_responses([encoded[i] for i in chunk], tokenizer.pad_token_id)
        scores = reward_scores(model, to_device(batch, device)).tolist()
        for i in chunk:
            rewards[i] = []
        for row, group in enumerate(batch["group"].tolist()):
            rewards[chunk[group]].append(scores[row])
    return rewards


def _best_first(record: Record, rewards: list[float]) -> list[float]:
    if record.kind == "ranked" and "scores" in record.fields:
        return [rewards[i] for i in sorted(range(len(rewards)), key=lambda i: -record.fields["scores"][i])]
    return rewards


def _check_reward_model(model: str) -> None:
    """Refuse a model without a trained scalar head (a plain LM would be scored by a random head)."""
    from transformers import AutoConfig

    adapter = Path(model) / "adapter_config.json"
    if adapter.is_file():  # a LoRA run saves the adapter and its score head (peft modules_to_save)
        kinds = [json.loads(adapter.read_text()).get("task_type")]
    else:
        try:
            kinds = AutoConfig.from_pretrained(model).architectures or []
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {model!r}: could not load its config: {exc}") from exc
    if not any(k and (k.endswith("ForSequenceClassification") or k == "SEQ_CLS") for k in kinds):
        raise ModelError(
            f"model {model!r} ({', '.join(map(str, kinds)) or 'unknown'}) has no trained reward head; "
            "train one with `align reward`"
        )


def run_score(
    model: str | None,
    data: str,
    out: Path | None,
    template: str | None = None,
    max_length: int | None = None,
    batch_size: int = 16,
    console: Console | None = None,
) -> dict[str, Any]:
    """``align reward score``: write every record of ``data`` with its reward(s) as JSONL to ``out``
    (stdout when None) and print a summary (mean/std reward, pair accuracy)."""
    console = console or Console(stderr=out is None)
    if not model:
        previous = last_output("reward")
        if previous is None:
            raise RecipeError("no reward model: pass --model, or train one with `align reward` first")
        model = str(previous)
    records = load_records(data, "auto", SCORE_KINDS)  # bad data fails before the model loads
    _check_reward_model(model)
    settings = trained_settings(Path(model)) | {
        k: v for k, v in {"template": template, "max_length": max_length}.items() if v is not None
    }
    section = ModelSection(name_or_path=model)
    tokenizer = load_tokenizer(section)
    rm = load_reward_model(section, tokenizer.pad_token_id).eval()
    if torch.cuda.is_available():
        rm = rm.cuda()
    rewards = score_records(rm, tokenizer, records, batch_size=batch_size, **settings)
    if all(r is None for r in rewards):
        limit = settings.get("max_length", DataSection.max_length)
        raise DataError(
            f"{data}: none of the {len(records)} record(s) could be scored: truncation to {limit} tokens "
            "left no response tokens, or left the responses identical; raise --max-length"
        )
    lines = "".join(
        json.dumps(_with_rewards(rec, r), ensure_ascii=False) + "\n" for rec, r in zip(records, rewards)
    )
    if out is None:
        sys.stdout.write(lines)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(lines)
    summary = score_summary(records, rewards)
    rows = [("model", model), ("data", data), ("written to", str(out) if out else "stdout"), *summary.items()]
    print_table("align reward score", rows, console)
    return summary


def score_summary(records: list[Record], rewards: list[list[float] | None]) -> dict[str, Any]:
    """Mean/std of all rewards; accuracy = per record, the share of its (better, worse) pairs that the
    model orders the same way, averaged over records with 2+ responses (r_c > r_r for pairs)."""
    flat, right, ranked = [], 0.0, 0
    for record, values in zip(records, rewards):
        if values is None:
            continue
        flat += values
        if len(values) > 1:
            values, pairs = _best_first(record, values), ranking_pairs(len(values))
            right += sum(values[i] > values[j] for i, j in pairs) / len(pairs)
            ranked += 1
    mean = sum(flat) / max(len(flat), 1)
    return {
        "records": len(records),
        "unscored": sum(r is None for r in rewards),
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((v - mean) ** 2 for v in flat) / max(len(flat), 1)),
        "accuracy": right / ranked if ranked else None,
    }
