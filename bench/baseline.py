"""The naive log-prob hot path, kept for `bench/run.py --naive` (before/after in one run).

It materialises full-vocabulary log-softmax for every kept position at once, as align did before the
chunked LM head (align_cli.forward.response_logprobs / actor_critic.ActorCritic). ``install()`` patches
it in place of the production path in the bench's child process only.
"""

from __future__ import annotations

import torch

from align_cli.data.tokenize import IGNORE_INDEX


def naive_response_logprobs(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from align_cli.forward import sequence_index

    labels = batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_mask
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits.float()  # [N, V]
    targets = labels[:, 1:][targets_mask]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return logps, sequence_index(batch)[:, 1:][targets_mask]


def naive_actor_forward(
    self, input_ids, attention_mask, labels, with_values: bool = True, buckets=None
) -> tuple:
    del buckets  # before length buckets: one pass with every row padded to the longest
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets_mask
    hidden: list[torch.Tensor] = []
    hook = None
    if with_values and self.value_head is not None:
        hook = self.policy.get_output_embeddings().register_forward_hook(lambda m, a, o: hidden.append(a[0]))
    try:
        out = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False
        )
    finally:
        if hook is not None:
            hook.remove()
    log_probs = torch.log_softmax(out.logits.float(), dim=-1)
    targets = labels[:, 1:][targets_mask]
    logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    values = None
    if with_values:
        if self.value_head is None:
            raise NotImplementedError("bench baseline: policy_head value only")
        values = self.value_head(hidden[-1].to(self.value_head.weight.dtype)).squeeze(-1).float()
    return logps, values, entropy


def install() -> None:
    """Replace the production log-prob path by the naive one everywhere it was imported."""
    import align_cli.actor_critic
    import align_cli.evaluate
    import align_cli.forward
    import align_cli.stages.sft

    for module in (align_cli.forward, align_cli.evaluate, align_cli.stages.sft):
        if hasattr(module, "response_logprobs"):
            module.response_logprobs = naive_response_logprobs
    align_cli.actor_critic.ActorCritic.forward = naive_actor_forward
