"""Scoring sampled responses with a reward model, rendered and cut exactly as reward training did.

One rule for reward training and every scorer (PPO, rejection sampling, ``align eval``, ``align reward
score``): the response template is decided per prompt (``ranked.response_template``), and lengths follow
``preference.fit_lengths`` with the ``data.max_length`` / ``data.max_prompt_length`` the reward model
was trained with, read from its run's recipe.yaml (beside the model directory); a reward model without
one (a hub model) gets the recipe defaults, as ``align reward`` would have trained it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from align_cli.data.preference import collate_responses, fit_lengths
from align_cli.data.prompts import Prompt
from align_cli.data.ranked import response_template
from align_cli.data.templates import response_segments
from align_cli.data.tokenize import encode_segments, segment_ids, special_prefix
from align_cli.forward import reward_scores, to_device
from align_cli.recipe import DataSection, RecipeError, load_recipe


@lru_cache(maxsize=32)
def _saved_data_settings(recipe_path: str, mtime_ns: int) -> tuple[str, int, int | None] | None:
    """Read once per version of the file (PPO scores every iteration)."""
    try:
        d = load_recipe(Path(recipe_path)).data
    except (OSError, RecipeError):
        return None
    return d.template, d.max_length, d.max_prompt_length


def trained_settings(model_dir: str | Path) -> dict[str, Any]:
    """The data settings a reward model was trained with ({template, max_length, max_prompt_length},
    from its run's recipe.yaml), or {} when unknown."""
    saved = (Path(model_dir).parent / "recipe.yaml").resolve()
    found = _saved_data_settings(str(saved), saved.stat().st_mtime_ns) if saved.is_file() else None
    return {} if found is None else dict(zip(("template", "max_length", "max_prompt_length"), found))


def scoring_lengths(reward_model: Any) -> tuple[int, int | None]:
    """(max_length, max_prompt_length) of the loaded ``reward_model``'s training, found through the
    directory it was loaded from; the recipe defaults when unknown."""
    source = getattr(getattr(reward_model, "config", None), "name_or_path", "") or ""
    settings = trained_settings(source) if source and Path(source).is_dir() else {}
    default = DataSection()
    return (
        settings.get("max_length", default.max_length),
        settings.get("max_prompt_length", default.max_prompt_length),
    )


def scored_row(
    prompt: Prompt,
    response: str,
    template: str,
    tokenizer: Any,
    finished: bool,
    max_length: int,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """One (prompt, response) as the reward model's training saw a record: the prompt as the policy saw it,
    the response rendered as a chat turn when the prompt is a chat (or data.template is chat), else as
    plain text, in the reward model's own tokenizer, cut by ``fit_lengths``. The end marker (EOS, or the
    template's end-of-turn) follows only a ``finished`` response: a sample cut at max_new_tokens did not
    end, and is not scored as if it had."""
    prompt_ids = encode_segments([(prompt.text(template, tokenizer), False)], tokenizer)[0]
    segments = response_segments(response, response_template(prompt.prompt, template), tokenizer, finished)
    response_ids = [t for piece, _ in segments for t in segment_ids(piece, tokenizer)]
    keep = len(special_prefix(tokenizer))
    prompt_ids, (response_ids,), _ = fit_lengths(
        prompt_ids, [response_ids], max_length, max_prompt_length, keep
    )
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
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> list[float]:
    """r(x, y) of each (prompt, response text) pair, tokenized with the reward model's own tokenizer
    (policy and reward model may use different tokenizers); ``finished[i]`` False for a response that
    did not end by itself (default: all finished). ``max_length`` / ``max_prompt_length``: default the
    reward model's trained ones (``scoring_lengths``)."""
    device = next(reward_model.parameters()).device
    if max_length is None:
        max_length, trained_prompt_length = scoring_lengths(reward_model)
        max_prompt_length = max_prompt_length or trained_prompt_length
    done = finished if finished is not None else [True] * len(responses)
    examples = [
        scored_row(prompt, response, template, tokenizer, end, max_length, max_prompt_length)
        for prompt, response, end in zip(prompts, responses, done)
    ]
    reward_model.eval()
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate_responses(examples[start : start + batch_size], tokenizer.pad_token_id)
        scores += reward_scores(reward_model, to_device(batch, device)).tolist()
    return scores
