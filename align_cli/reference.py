"""The frozen reference pi_ref of DPO and PPO: built one way, scored one way, live or cached.

pi_ref is the policy's starting (SFT) weights, or a model named for it (``dpo.reference_model``), loaded
with the policy's own settings (dtype, attention implementation, dropout, quantization, remote code)
but without adapters or gradient checkpointing, frozen, in eval mode (``load_reference``). Under LoRA,
when pi_ref is the policy's own starting weights, no second copy is loaded: the policy with its adapters
disabled is the reference (``frozen_reference`` returns None, ``adapters_off`` switches them off).

Live: ``LiveReference`` scores a batch (DPO with ``reference_cache: false``, PPO every rollout) under
the policy's autocast, at a temperature (PPO's sampling temperature, so the KL at identical weights is
0; 1 for DPO). Cached: ``cache_reference_logps`` computes DPO's summed log-probs once before training
and stores them with ``align_cli.reference_cache`` (keys, checksummed entries).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from align_cli.engine.distributed import for_generation
from align_cli.forward import response_logprobs, summed_logps
from align_cli.models import ModelError, load_causal_lm, quantization_settings
from align_cli.recipe import LoraSection, ModelSection, Recipe
from align_cli.reference_cache import attach_reference_logps, compute_logps, model_identity


def is_policy_start(policy: ModelSection, path: str | None = None) -> bool:
    """Whether the reference at ``path`` is the policy's own starting weights (no path: it is)."""
    return path in (None, "", policy.name_or_path)


def reference_section(policy: ModelSection, path: str | None = None) -> ModelSection:
    """How the reference at ``path`` (default: the policy's starting weights) is loaded: with every
    loading setting of the policy, without its adapters and gradient checkpointing (nothing trains)."""
    name = policy.name_or_path if is_policy_start(policy, path) else path
    return replace(policy, name_or_path=name, lora=LoraSection(), gradient_checkpointing=False)


def load_reference(policy: ModelSection, path: str | None = None, tokenizer: Any = None) -> nn.Module:
    """The reference model, frozen and in eval mode; its vocabulary grown to ``tokenizer`` as the
    policy's is, so both start from identical weights."""
    model = load_causal_lm(reference_section(policy, path), tokenizer)
    model.requires_grad_(False)
    return model.eval()


def frozen_reference(
    policy: ModelSection, path: str | None = None, tokenizer: Any = None
) -> nn.Module | None:
    """The reference model to hold beside the policy, or None where the policy serves as its own
    reference with its adapters disabled (LoRA, and the reference is the policy's starting weights)."""
    if policy.lora.enabled and is_policy_start(policy, path):
        return None
    return load_reference(policy, path, tokenizer)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """A peft policy as its reference: adapters disabled and in eval mode (no dropout); its training
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


class LiveReference:
    """Scores batches with pi_ref: ``model`` (a frozen reference), or, when it is None, the trained
    model's policy (``policy_of(unwrapped trained model)``) with its adapters disabled. Sharded trained
    models (ZeRO-3, FSDP) are gathered as for sampling. Runs under the accelerator's autocast, as the
    policy does, so identical weights give identical numbers."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module | None,
        temperature: float = 1.0,
        policy_of: Callable[[nn.Module], nn.Module] = lambda unwrapped: unwrapped,
    ) -> None:
        self.accelerator, self.model, self.temperature, self.policy_of = (
            accelerator,
            model,
            temperature,
            policy_of,
        )

    @contextmanager
    def _scorer(self, trained: nn.Module) -> Iterator[nn.Module]:
        if self.model is not None:
            yield self.model
            return
        with for_generation(self.accelerator, trained) as (unwrapped, _):
            with adapters_off(self.policy_of(unwrapped)) as base:
                yield base

    @torch.no_grad()
    def token_logprobs(self, trained: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """log pi_ref,T of every supervised token [N] (``forward.response_logprobs``)."""
        with self._scorer(trained) as model, self.accelerator.autocast():
            return response_logprobs(model, batch, self.temperature)[0]

    @torch.no_grad()
    def __call__(self, trained: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """log pi_ref,T(y|x) of every row [R] (``forward.summed_logps``)."""
        with self._scorer(trained) as model, self.accelerator.autocast():
            return summed_logps(model, batch, self.temperature)


# ----------------------------------------------------------------------------- cached (DPO)


def reference_cache_material(recipe: Recipe) -> dict[str, Any]:
    """Everything DPO's reference log-probs depend on except the examples (reference_key adds those).

    The reference is loaded as ``reference_section`` says; its identity hashes the bytes of its config
    and weights, and for a LoRA adapter directory also those of the base model named in
    adapter_config.json; ``quantization`` holds the bitsandbytes settings (4-bit NF4, double
    quantization, compute dtype; or 8-bit), {} when none."""
    d, section = recipe.data, reference_section(recipe.model, recipe.dpo.reference_model)
    try:
        identity = model_identity(section.name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"reference model {section.name_or_path!r}: cannot identify it for the cache: {exc}"
        ) from exc
    return {
        "reference": identity,
        "quantization": quantization_settings(section),
        "dtype": section.dtype,
        "attn_implementation": section.attn_implementation,
        "precision": recipe.training.precision,
        "template": d.template,
        "max_length": d.max_length,
        "max_prompt_length": d.max_prompt_length,
    }


def cache_reference_logps(
    recipe: Recipe,
    model: nn.Module,
    accelerator: Accelerator,
    tokenizer: Any,
    sets: dict[str, list],
    console: Console,
) -> dict[str, Any]:
    """Attach cached (or freshly computed, then cached) reference log-probs to every example of each
    named set, before training; returns {set name: {key, hit, corrupt, path, seconds}}.

    ``model`` is the untrained policy: when the reference is its starting weights it scores them itself
    (under LoRA with its adapters off), else the reference model is loaded for the pass and dropped."""
    policy, path = recipe.model, recipe.dpo.reference_model
    material = reference_cache_material(recipe)
    holder: dict[str, nn.Module] = {}

    def compute(examples: list) -> list[list[float]]:
        size = recipe.training.micro_batch_size * 2  # no activations kept: larger batches fit
        if not is_policy_start(policy, path):
            if "ref" not in holder:
                holder["ref"] = load_reference(policy, path, tokenizer).to(accelerator.device)
            context = nullcontext(holder["ref"])
        else:
            scorer = model.to(accelerator.device)
            context = adapters_off(scorer) if policy.lora.enabled else nullcontext(scorer)
        with context as scorer:
            return compute_logps(
                scorer, examples, tokenizer.pad_token_id, size, accelerator.device, accelerator.autocast
            )

    infos = {}
    for name, examples in sets.items():
        if not examples:
            continue
        started = time.perf_counter()
        if not accelerator.is_main_process:  # the main process computes and writes; the others read
            accelerator.wait_for_everyone()
        info = attach_reference_logps(examples, material, lambda ex=examples: compute(ex))
        if accelerator.is_main_process:
            accelerator.wait_for_everyone()
        info["seconds"] = round(time.perf_counter() - started, 3)
        outcome = "entry corrupt (see the warning above)" if info["corrupt"] else "miss"
        what = (
            "cache hit, reused"
            if info["hit"]
            else f"cache {outcome}, computed in {info['seconds']:.1f} s and saved to"
        )
        console.print(
            f"[bold]reference log-probs[/] ({name}, {len(examples)} examples): {what} {info['path']}"
        )
        infos[name] = info
    holder.clear()  # the reference model is not kept during training
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return infos


def open_live_reference(
    policy: ModelSection, path: str | None, accelerator: Accelerator, tokenizer: Any
) -> tuple[LiveReference, nn.Module | None, str]:
    """(scorer, frozen model or None, mode) of a live reference for an offline preference stage (DPO,
    KTO): ``path`` loaded frozen, or by default the policy's starting weights: a second copy, or under
    LoRA the policy itself with its adapters disabled (no copy)."""
    model = frozen_reference(policy, path, tokenizer)
    if model is not None:
        model.to(accelerator.device)
    mode = "live (base model, adapters disabled)" if model is None else "live (second model)"
    return LiveReference(accelerator, model), model, mode
