"""The fused, chunked LM-head log-prob path equals the naive full-vocabulary computation (values and
gradients), and never keeps vocabulary-sized tensors for the whole batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from align_cli import logprobs as LP
from align_cli.actor_critic import ActorCritic
from align_cli.data.collate import pad_collate
from align_cli.data.tokenize import IGNORE_INDEX
from align_cli.forward import response_logprobs
from align_cli.models import load_causal_lm, load_reward_model
from align_cli.recipe import ModelSection


def naive(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(head(hidden).float(), -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def grads_of(head: nn.Module, hidden: torch.Tensor, fn) -> list[torch.Tensor]:
    head.zero_grad()
    hidden = hidden.detach().clone().requires_grad_(True)
    logps, entropy = fn(hidden)
    weights = torch.linspace(0.5, 1.5, len(logps))  # distinct per-row upstream gradients
    (weights * logps).sum().add((weights.flip(0) * entropy).sum()).backward()
    return [hidden.grad, *(p.grad for p in head.parameters())]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [7, 64])  # 7: several chunks with a ragged last one
def test_fused_linear_path_matches_naive_values_and_gradients(bias: bool, rows: int, monkeypatch):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias)
    hidden, targets = torch.randn(23, 16), torch.randint(0, 50, (23,))
    monkeypatch.setattr(LP, "chunk_rows", lambda vocab: rows)
    fused = LP.chunked_logprobs(head, hidden, targets, with_entropy=True)
    want = naive(head, hidden, targets)
    for got, ref in zip(fused, want):
        torch.testing.assert_close(got, ref)
    g_fused = grads_of(head, hidden, lambda h: LP.chunked_logprobs(head, h, targets, with_entropy=True))
    g_naive = grads_of(head, hidden, lambda h: naive(head, h, targets))
    for got, ref in zip(g_fused, g_naive):
        torch.testing.assert_close(got, ref)


def test_other_heads_take_the_checkpointed_chunks(monkeypatch):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 50))  # not a plain Linear: called chunk by chunk
    head.out_features = 50
    hidden, targets = torch.randn(23, 16), torch.randint(0, 50, (23,))
    monkeypatch.setattr(LP, "chunk_rows", lambda vocab: 5)
    g_chunked = grads_of(head, hidden, lambda h: LP.chunked_logprobs(head, h, targets, True, head.forward))
    g_naive = grads_of(head, hidden, lambda h: naive(head, h, targets))
    for got, ref in zip(g_chunked, g_naive):
        torch.testing.assert_close(got, ref)


def naive_response_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["labels"][:, 1:].clamp(min=0)[..., None])
    return logp.squeeze(-1)[mask]


@pytest.fixture(scope="module")
def model_and_batch(tiny_model: Path):
    torch.manual_seed(0)
    model = load_causal_lm(ModelSection(name_or_path=str(tiny_model)))
    examples = []
    for n, p in ((30, 10), (21, 5), (12, 8)):
        ids = torch.randint(10, model.config.vocab_size, (n,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return model, pad_collate(examples, 0)


def test_response_logprobs_equals_full_logits_and_keeps_no_vocab_sized_activations(
    model_and_batch, monkeypatch
):
    model, batch = model_and_batch
    monkeypatch.setattr(LP, "chunk_rows", lambda vocab: 8)  # 40 supervised tokens: 5 chunks
    vocab = model.config.vocab_size
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logps, seq = response_logprobs(model, batch)
    big = [s for s in saved if s and s[-1] == vocab and s != tuple(model.lm_head.weight.shape)]
    assert not big, f"vocabulary-sized tensors kept for backward: {big}"
    assert seq.tolist() == [0] * 20 + [1] * 16 + [2] * 4
    ref_model = copy.deepcopy(model)
    ref = naive_response_logprobs(ref_model, batch)
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=1e-5)
    logps.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


def test_actor_critic_logprobs_and_entropy_match_naive(model_and_batch, monkeypatch):
    model, batch = model_and_batch
    monkeypatch.setattr(LP, "chunk_rows", lambda vocab: 8)
    actor = ActorCritic(model, None)
    with torch.no_grad():
        actor.value_head.weight.normal_()
    logps, values, entropy = actor(batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1][mask], -1)
    torch.testing.assert_close(logps, logp.gather(-1, batch["labels"][:, 1:][mask][:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1))
    assert values.shape == logps.shape and values.requires_grad
    model.zero_grad()


def test_length_buckets_cover_every_row_once_and_cut_padding():
    from align_cli.data.collate import length_buckets

    assert length_buckets([50, 50, 49, 50]) == [([0, 1, 3, 2], 50)]  # equal lengths: one pass
    lengths = [180, 60, 170, 70, 175, 65, 172, 62]  # pairs of a long and a short response
    buckets = length_buckets(lengths)
    assert sorted(r for rows, _ in buckets for r in rows) == list(range(8))
    assert all(width == max(lengths[r] for r in rows) for rows, width in buckets)
    padded = sum(len(rows) * width for rows, width in buckets)
    assert len(buckets) == 2 and padded - sum(lengths) < 0.05 * sum(lengths)


def test_bucketed_forward_passes_equal_one_padded_pass(model_and_batch, tiny_model: Path):
    from align_cli.data.preference import collate_responses
    from align_cli.forward import reward_scores, summed_logps

    model, _ = model_and_batch
    torch.manual_seed(1)
    examples = [
        {"prompt_ids": [1, 11, 12], "responses": [list(range(20, 100)), [30, 31, 32]], "margin": None},
        {"prompt_ids": [1, 13], "responses": [list(range(40, 115)), [33, 34]], "margin": None},
    ]
    batch = collate_responses(examples, 0)
    assert len(batch["buckets"]) >= 2
    one = dict(batch, buckets=None)
    bucketed, single = summed_logps(model, batch), summed_logps(model, one)
    torch.testing.assert_close(bucketed, single, atol=1e-4, rtol=1e-5)
    grads = []
    for b in (batch, one):
        model.zero_grad()
        (summed_logps(model, b) * torch.tensor([1.0, -1.0, 0.5, 2.0])).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)
    model.zero_grad()
    scorer = load_reward_model(ModelSection(name_or_path=str(tiny_model)), 0)
    torch.testing.assert_close(reward_scores(scorer, batch), reward_scores(scorer, one))


def test_ppo_forward_in_length_buckets_equals_one_padded_pass(model_and_batch):
    """Rollouts of different lengths run in buckets give the same log-probs, values, entropies and
    gradients, in the same token order, as one pass with every row padded to the longest."""
    from align_cli.data.collate import length_buckets

    model, _ = model_and_batch
    torch.manual_seed(2)
    examples = []
    for n, p in ((120, 40), (25, 10), (110, 30), (30, 20), (115, 55)):
        ids = torch.randint(10, model.config.vocab_size, (n,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    batch = pad_collate(examples, 0)
    buckets = length_buckets([len(e["input_ids"]) for e in examples])
    assert len(buckets) >= 2
    # in float64: the bucketed and padded passes multiply matrices of other shapes, whose fp32 sums
    # differ in the last bits by the machine's kernels (1.8e-4 on one gradient element here)
    actor = ActorCritic(copy.deepcopy(model), None).double()
    with torch.no_grad():
        actor.value_head.weight.normal_()
    results = []
    for b in (buckets, None):
        actor.zero_grad()
        outs = actor(**batch, buckets=b)
        weights = torch.linspace(-1.0, 1.0, len(outs[0]))  # a distinct upstream gradient per token
        sum((weights * o).sum() for o in outs).backward()
        results.append(([o.detach() for o in outs], [p.grad.clone() for p in actor.parameters()]))
    (bucketed, g_bucketed), (single, g_single) = results
    for got, want in zip(bucketed, single):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(g_bucketed, g_single):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.zero_grad()


def test_fused_path_with_no_supervised_token_gives_zero_gradients():
    head = nn.Linear(16, 50)
    hidden = torch.randn(0, 16, requires_grad=True)
    logps, _ = LP.chunked_logprobs(head, hidden, torch.zeros(0, dtype=torch.long))
    logps.sum().backward()
    assert logps.shape == (0,) and hidden.grad.shape == (0, 16)
    assert not head.weight.grad.any() and not head.bias.grad.any()
