"""A preference or ranked record as one prompt and its responses, best first, and the template they render
with: what reward training, DPO, Preferred-FT SFT and prompt reading share (below tokenization)."""

from __future__ import annotations

from typing import Any

from align_cli.data.formats import DataError, Record
from align_cli.data.templates import Segment, continuation, render_prompt, response_segments


def split_conversations(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Anthropic-HH style: two full conversations -> (shared prompt messages, chosen tail, rejected tail)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # the responses start at an assistant turn
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def ranked_responses(record: Record) -> tuple[Any, list[Any]]:
    """(prompt, responses best first) of a preference or ranked record; (prompt, [completion]) of an
    unpaired one (KTO)."""
    f = record.fields
    if record.kind == "unpaired":
        return f["prompt"], [f["completion"]]
    if record.kind == "preference":
        prompt, chosen, rejected = f.get("prompt"), f["chosen"], f["rejected"]
        # full conversations beside a `prompt` field (UltraFeedback-binarized): the shared turns are the
        # prompt, so the user's message is never trained on or counted as part of the response
        if (
            isinstance(chosen, list)
            and isinstance(rejected, list)
            and chosen[:1] == rejected[:1]
            and chosen[:1]
            and isinstance(chosen[0], dict)
            and chosen[0].get("role") != "assistant"
        ):
            prompt = None
        if prompt is None:
            if not (isinstance(chosen, list) and isinstance(rejected, list)):
                raise DataError(
                    f"{record.where}: prompt: missing (needed unless chosen/rejected are conversations)"
                )
            prompt, chosen, rejected = split_conversations(chosen, rejected)
            if not chosen or not rejected:
                raise DataError(
                    f"{record.where}: chosen: identical conversations leave no response to compare"
                )
        return prompt, [chosen, rejected]
    responses = list(f["responses"])
    if "scores" in f:
        order = sorted(range(len(responses)), key=lambda i: -f["scores"][i])
        responses = [responses[i] for i in order]
    return f["prompt"], responses


def response_template(prompt: Any, template: str) -> str:
    """The template a record's prompt and responses render with, decided per record: with data.template
    auto, chat when the prompt is a list of messages, else plain. Reward training and every scorer
    (``scoring.scored_row``) decide it here, so a sample is scored as the reward model's records were."""
    if template == "auto":
        return "chat" if isinstance(prompt, list) else "plain"
    return template


def chosen_segments(record: Record, template: str, tokenizer: Any) -> list[Segment]:
    """Preferred-FT (the DPO paper's baseline): a preference or ranked record as an SFT example, the
    prompt (not trained) followed by the chosen / best response, with the same template as DPO."""
    prompt, responses = ranked_responses(record)
    template = response_template(prompt, template)
    prompt_text = render_prompt(prompt, template, tokenizer)
    best = responses[0]
    if isinstance(best, list):  # chat messages continuing the prompt: the text after the generation prompt
        return [(prompt_text, False), (continuation(prompt, best, tokenizer), True)]
    return [(prompt_text, False), *response_segments(best, template, tokenizer)]
