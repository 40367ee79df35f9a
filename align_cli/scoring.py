"""Scoring sampled responses with a reward model, rendered exactly as reward training rendered its records."""

from __future__ import annotations

from typing import Any

import torch

from align_cli.data.preference import collate_responses, response_template
from align_cli.data.prompts import Prompt
from align_cli.data.templates import response_segments
from align_cli.data.tokenize import encode_segments, segment_ids
from align_cli.models import reward_scores


def scored_row(
    prompt: Prompt, response: str, template: str, tokenizer: Any, finished: bool, limit: int
) -> dict[str, Any]:
    """One (prompt, response) as the reward model's training saw a record: the prompt as the policy saw it,
    the response rendered as a chat turn when the prompt is a chat (or data.template is chat), else as
    plain text, in the reward model's own tokenizer. The end marker (EOS, or the template's end-of-turn)
    follows only a ``finished`` response: a sample cut at max_new_tokens did not end, and is not
    scored as if it had. Longer than ``limit`` tokens: the response keeps its start (at most half), the
    prompt its end."""
    prompt_ids = encode_segments([(prompt.text(template, tokenizer), False)], tokenizer)[0]
    segments = response_segments(response, response_template(prompt.prompt, template), tokenizer, finished)
    response_ids = [t for piece, _ in segments for t in segment_ids(piece, tokenizer)][: limit // 2]
    keep = limit - len(response_ids)
    if len(prompt_ids) > keep:  # keep the end of the prompt, next to the response
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep + 1 :]
    return {"prompt_ids": prompt_ids, "responses": [response_ids], "margin": None}


@torch.no_grad()
def score(
    reward_model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    responses: list[str],
    template: str,
    finished: list[bool] | None = None,
    batch_size: int = 32,
) -> list[float]:
    """r(x, y) of each (prompt, response text) pair, tokenized with the reward model's own tokenizer
    (policy and reward model may use different tokenizers); ``finished[i]`` False for a response that
    did not end by itself (default: all finished)."""
    device = next(reward_model.parameters()).device
    limit = min(getattr(tokenizer, "model_max_length", 2048) or 2048, 4096)
    done = finished if finished is not None else [True] * len(responses)
    examples = [
        scored_row(prompt, response, template, tokenizer, end, limit)
        for prompt, response, end in zip(prompts, responses, done)
    ]
    reward_model.eval()
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate_responses(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        scores += reward_scores(reward_model, batch).tolist()
    return scores
