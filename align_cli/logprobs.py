"""The LM head, log-softmax and target gather fused and chunked: the log-prob hot path of SFT, DPO, PPO.

A loss needs log pi(y_t | ...) only at the supervised positions, and only the target's entry of each
vocabulary-sized row. ``head_logprobs`` runs the model with its LM head replaced, for that one call,
by ``chunked_logprobs``: the hidden states the model kept (``logits_to_keep``) go through the head
``chunk`` rows at a time, and each chunk's [chunk, V] logits are reduced at once to the target's
log-prob (and, when asked, the entropy) and dropped. The backward pass recomputes a chunk's logits
instead of storing them (unless the whole batch is one chunk: then its log-softmax is kept, which
costs no more than one chunk and saves the recompute), and writes the gradient d log p_t / d z =
onehot(t) - softmax(z) directly, so at no point of forward or backward does more than one chunk of
vocabulary-sized values exist.

``temperature`` divides the logits before the log-softmax: on-policy methods score a sample under the
distribution it was drawn from, softmax(z / T), never under softmax(z) when they sampled at T != 1.

The head is swapped inside the model's own forward call, so wrappers (DDP, FSDP, peft, autocast) see
an ordinary forward pass and the head's weight is used where the original head would have used it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# vocabulary-sized values per chunk (64 MiB of float32): a [chunk, V] block of logits and its softmax
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int) -> int:
    """Kept positions per LM-head chunk: as many as fit in CHUNK_ELEMENTS, at least 64 (matmul size)."""
    return max(64, CHUNK_ELEMENTS // max(vocab, 1))


class _LinearLogprobs(torch.autograd.Function):
    """log softmax((h W^T + b) / T)[t] (and the entropy) row by row, in chunks; backward recomputes each
    chunk. Inputs are already in the compute dtype; logits are reduced in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int, with_entropy: bool, temperature: float = 1.0):
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        ctx.rows, ctx.temperature = rows, temperature
        if n <= rows:  # one chunk: keep its log-softmax for backward (at most CHUNK_ELEMENTS), no recompute
            logp = torch.log_softmax(_logits(hidden, weight, bias, temperature), -1)
            ctx.save_for_backward(hidden, weight, bias, targets, logp)
            out = logp.gather(-1, targets[:, None]).squeeze(-1)
            return (out, -(logp.exp() * logp).sum(-1)) if with_entropy else out
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        for s in range(0, n, rows):
            logits = _logits(hidden[s : s + rows], weight, bias, temperature)
            lse = torch.logsumexp(logits, -1)
            logps[s : s + rows] = logits.gather(-1, targets[s : s + rows, None]).squeeze(-1) - lse
            if entropy is not None:  # H = lse - sum_j p_j z_j
                entropy[s : s + rows] = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, None)
        return (logps, entropy) if with_entropy else logps

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        hidden, weight, bias, targets, kept_logp = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = grad_b = None  # accumulated in float32 over chunks
        rows = ctx.rows
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            if kept_logp is None:
                logp = torch.log_softmax(_logits(h, weight, bias, ctx.temperature), -1)
            else:
                logp = kept_logp
            p = logp.exp()
            g = None
            if grad_logps is not None:  # d log p_t / d z_j = [j = t] - p_j
                gl = grad_logps[s : s + rows, None]
                g = (p * -gl).scatter_add_(-1, targets[s : s + rows, None], gl)
            if grad_entropy is not None:  # d H / d z_j = -p_j (log p_j + H)
                ent = -(p * logp).sum(-1, keepdim=True)
                term = p * (logp + ent) * grad_entropy[s : s + rows, None]
                g = term.neg_() if g is None else g.sub_(term)
            if ctx.temperature != 1.0:  # z / T: d/dz = (1 / T) d/d(z / T)
                g = g.div_(ctx.temperature)
            g = g.to(weight.dtype)
            if want_h:
                grad_h[s : s + rows] = g @ weight
            if want_w:
                part = g.t().float() @ h.float()
                grad_w = part if grad_w is None else grad_w.add_(part)
            if want_b:
                part = g.float().sum(0)
                grad_b = part if grad_b is None else grad_b.add_(part)
        if hidden.shape[0] == 0:  # no supervised token in the batch
            grad_w, grad_b = torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)
        grad_w = grad_w.to(weight.dtype) if want_w else None
        grad_b = grad_b.to(bias.dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Any, temperature: float) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits if temperature == 1.0 else logits / temperature


def _checkpointed_chunk(
    head_forward: Any, h: torch.Tensor, t: torch.Tensor, with_entropy: bool, temperature: float
):
    logits = head_forward(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, -1)
    out = logp.gather(-1, t[:, None]).squeeze(-1)
    return (out, -(logp.exp() * logp).sum(-1)) if with_entropy else (out,)


def chunked_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    with_entropy: bool = False,
    head_forward: Any = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) [N], entropy [N] or None) of softmax(``head(hidden)`` / ``temperature``) for hidden
    [N, H], targets [N].

    A plain ``nn.Linear`` head takes the fused path (``_LinearLogprobs``); any other head (a LoRA-wrapped
    or quantized one) is called chunk by chunk under activation checkpointing, through
    ``head_forward`` (default: ``head.forward``)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows(head.out_features if hasattr(head, "out_features") else head.weight.shape[0])
    if type(head) is nn.Linear and head_forward is None:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        with torch.autocast(device, enabled=False):
            bias = head.bias.to(dtype) if head.bias is not None else None
            out = _LinearLogprobs.apply(
                hidden.to(dtype), head.weight.to(dtype), bias, targets, rows, with_entropy, temperature
            )
        return out if with_entropy else (out, None)
    forward = head_forward or head.forward
    parts = [
        checkpoint(_checkpointed_chunk, forward, hidden[s : s + rows], targets[s : s + rows], with_entropy,
                   temperature, use_reentrant=False)
        for s in range(0, hidden.shape[0], rows)
    ]  # fmt: skip
    logps = torch.cat([p[0] for p in parts])
    return logps, torch.cat([p[1] for p in parts]) if with_entropy else None


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed, FSDP
        model = model.module
    return model


@contextmanager
def head_logprobs(
    model: nn.Module, targets: torch.Tensor, with_entropy: bool = False, temperature: float = 1.0
) -> Iterator[list]:
    """For one forward call of ``model`` inside the block: its LM head returns the log-probs of
    ``targets`` (one per kept position, in order) under softmax(logits / ``temperature``) instead of
    logits. The yielded list receives
    (logps [N], entropy [N] or None); the model's ``logits`` output then holds logps."""
    head = _unwrap(model).get_output_embeddings()
    own = head.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook) is kept
    original = head.forward
    results: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    fused = own is None and type(head) is nn.Linear

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        out = chunked_logprobs(head, hidden, targets, with_entropy, None if fused else original, temperature)
        results.append(out)
        return out[0]

    head.forward = forward
    try:
        yield results
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
