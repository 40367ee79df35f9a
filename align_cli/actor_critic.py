"""The policy and its value function in one module, for PPO: log-probs at the sampling temperature,
values and entropy of the response tokens in one pass (stages/ppo.py; the bench measures it)."""

from __future__ import annotations

import torch
from torch import nn

from align_cli.forward import per_token_by_bucket, token_logprobs, token_scores


class ActorCritic(nn.Module):
    """The policy and its value function V(s_t), evaluated in one call at the positions that predict
    response tokens. The value is either a separate model (InstructGPT initialises it from the reward
    model) or a scalar head on the policy's final hidden state (read as the LM head's input)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # FSDP auto-wrap (recipes/accelerate/fsdp.yaml) shards by these layer classes of both models
        models = [m for m in (policy, value_model) if m is not None]
        self._no_split_modules = sorted(
            {c for m in models for c in getattr(m, "_no_split_modules", None) or []}
        )
        hidden = policy.get_output_embeddings().in_features
        self.value_head = nn.Linear(hidden, 1) if value_model is None else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        with_values: bool = True,
        buckets: list[tuple[list[int], int]] | None = None,
        temperature: float = 1.0,
    ) -> tuple:
        """(log pi_T(a_t|s_t) [N], V(s_t) [N] or None, entropy of pi_T [N]) for the N supervised tokens,
        row by row, pi_T = softmax(logits / temperature) (the sampling distribution); one pass per length
        bucket of rows (``length_buckets``) so short rollouts are not padded."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        def rows(sub: dict[str, torch.Tensor]) -> tuple:
            return self._rows(**sub, with_values=with_values, temperature=temperature)

        return per_token_by_bucket(rows, batch, buckets)

    def _rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        with_values: bool,
        temperature: float,
    ) -> tuple:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        hidden: list[torch.Tensor] = []
        hook = None
        if with_values and self.value_head is not None:  # the LM head sees exactly the kept hidden states
            hook = self.policy.get_output_embeddings().register_forward_hook(
                lambda m, a, o: hidden.append(a[0])
            )
        try:
            logps, entropy = token_logprobs(self.policy, batch, temperature, with_entropy=True)
        finally:
            if hook is not None:
                hook.remove()
        if not with_values:
            values = None
        elif self.value_head is not None:
            values = self.value_head(hidden[-1].to(self.value_head.weight.dtype)).squeeze(-1).float()
        else:
            values = token_scores(self.value_model, batch)
        return logps, values, entropy


def to_padded(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row-major flat per-token values -> [B, T] right-padded with zeros."""
    mask = torch.arange(int(lengths.max()), device=flat.device)[None] < lengths[:, None]
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out
