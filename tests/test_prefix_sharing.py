"""Scoring n samples of one prompt runs the prompt once (``forward.prefix_logprobs``): the same per-token
log-probs as the plain padded pass, on a random tiny model with dropout off."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from align_cli.data.preference import collate_responses
from align_cli.forward import per_token_by_bucket, prefix_logprobs, response_logprobs, token_logprobs
from align_cli.models import load_causal_lm
from align_cli.recipe import ModelSection


def grouped_batch(vocab: int) -> tuple[dict, list[tuple[list[int], int]]]:
    """Prompts of 1, 9 and 23 tokens with 3, 2 and 4 responses (one empty), rows interleaved."""
    rng = random.Random(0)
    prompts = [[rng.randrange(10, vocab) for _ in range(n)] for n in (1, 9, 23)]
    samples = [(p, n) for p, count in enumerate((3, 2, 4)) for n in range(count)]
    rng.shuffle(samples)  # a group's rows need not be contiguous
    examples = [
        {
            "prompt_ids": prompts[p],
            "responses": [[rng.randrange(10, vocab) for _ in range(n * 5)]],
            "margin": None,
        }
        for p, n in samples
    ]
    batch = collate_responses(examples, 0)
    rows: dict[int, list[int]] = {}
    for row, (p, _) in enumerate(samples):
        rows.setdefault(p, []).append(row)
    return batch, [(r, len(prompts[p])) for p, r in rows.items()]


def test_shared_prompt_gives_the_plain_passs_logprobs(tiny_model: Path):
    torch.manual_seed(0)
    model = load_causal_lm(ModelSection(name_or_path=str(tiny_model))).eval()
    batch, groups = grouped_batch(model.config.vocab_size)
    with torch.no_grad():
        plain = per_token_by_bucket(
            lambda sub: (token_logprobs(model, sub, 0.7)[0],), batch, batch["buckets"]
        )[0]
        shared = prefix_logprobs(model, batch, groups, 0.7)
        routed, seq = response_logprobs(model, {**batch, "prefix_groups": groups}, 0.7)
    assert shared.shape == plain.shape == (int((batch["labels"] != -100).sum()),)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=0)
    assert seq.tolist() == response_logprobs(model, batch, 0.7)[1].tolist()
