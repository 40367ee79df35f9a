"""Scoring (prompt, response) texts with a reward model, in the reward model's own tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from align_cli.data.preference import collate_responses
from align_cli.data.templates import response_segments
from align_cli.data.tokenize import encode_segments, segment_ids
from align_cli.models import reward_scores


@torch.no_grad()
def score(
    reward_model: Any,
    tokenizer: Any,
    prompt_texts: list[str],
    responses: list[str],
    template: str,
    batch_size: int = 32,
) -> list[float]:
    """r(x, y) for text pairs, tokenized with the reward model's own tokenizer (policy and reward
    model may use different tokenizers). Responses end with EOS, as in reward training."""
    device = next(reward_model.parameters()).device
    limit = min(getattr(tokenizer, "model_max_length", 2048) or 2048, 4096)
    examples = []
    for prompt_text, response in zip(prompt_texts, responses):
        prompt_ids = encode_segments([(prompt_text, False)], tokenizer)[0]
        segments = response_segments(response, "chat" if template == "chat" else "plain", tokenizer)
        response_ids = [t for piece, _ in segments for t in segment_ids(piece, tokenizer)][: limit // 2]
        keep = limit - len(response_ids)
        if len(prompt_ids) > keep:  # keep the end of the prompt, next to the response
            prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep + 1 :]
        examples.append({"prompt_ids": prompt_ids, "responses": [response_ids], "margin": None})
    reward_model.eval()
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate_responses(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        scores += reward_scores(reward_model, batch).tolist()
    return scores
