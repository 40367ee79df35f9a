"""vLLM as the sampler of the on-policy stages (PPO, GRPO, RLOO, online DPO) on a GPU.

The engine is colocated with the trainer on the same GPU (``enable_sleep_mode``: it sleeps while the
trainer updates and wakes to sample), starts from the policy's checkpoint directory, and receives the
policy's weights before every rollout (after every update; also the first one, which matters on resume).
It only samples: the log-probs of the sampled tokens are recomputed by the trainer's own forward pass,
never taken from vLLM, whose kernels and sampler differ numerically from the training model.

Not exercised by this project's CI (no GPU, no vLLM): ``resolve_backend``, ``weights_for_vllm`` and
``VllmRollouts.sync``/``sample`` are unit-tested with a fake engine (tests/test_vllm_engine.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from align_cli.errors import AlignError
from align_cli.generation import Sample, SamplingParams, stop_token_ids

BACKENDS = ("auto", "transformers", "vllm")


def vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, stage: str) -> str:
    """``auto``: vLLM when it is installed, a GPU is present and one process runs; else transformers.
    ``vllm`` where it cannot run is a one-line AlignError, raised by the stages before models load."""
    if requested not in BACKENDS:
        raise AlignError(f"{stage}.backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if requested == "transformers":
        return requested
    usable = vllm_installed() and torch.cuda.is_available() and single
    if requested == "auto":
        return "vllm" if usable else "transformers"
    if not vllm_installed():
        raise AlignError(
            f"{stage}.backend is vllm but vLLM is not installed (pip install 'align-cli[vllm]'), or use auto"
        )
    if not torch.cuda.is_available():
        raise AlignError(f"{stage}.backend is vllm but no GPU is visible; vLLM needs one (or use auto)")
    if not single:
        raise AlignError(f"{stage}.backend vllm runs on one process; launch without accelerate/torchrun")
    return "vllm"


def weights_for_vllm(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the checkpoint names vLLM's ``load_weights`` expects.

    A peft model is expected merged (``VllmRollouts.sync`` merges and unmerges around this): its
    wrappers' prefixes are stripped and the LoRA factors themselves are left out."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, tensor in inner.state_dict().items():
        if "lora_" in name or ".original_module." in name:  # adapters (merged) and frozen copies
            continue
        yield name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), tensor.detach()


def _load_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside the vLLM worker (``collective_rpc``): load the policy's weights into its model."""
    worker.model_runner.model.load_weights(weights=weights)


class VllmRollouts:
    """One colocated vLLM engine for a run; ``sample`` has ``generation.sample``'s Sample contract."""

    def __init__(self, model_dir: str, tokenizer: Any, seed: int, gpu_memory_utilization: float = 0.3,
                 make_llm: Callable[..., Any] | None = None) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        if make_llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
            from vllm import LLM as make_llm  # noqa: N811
        self.llm = make_llm(
            model=model_dir,
            seed=seed,
            enable_sleep_mode=True,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.llm.sleep(level=1)  # the trainer has the GPU until the first rollout

    def sync(self, model: torch.nn.Module) -> int:
        """Push the policy's current weights into the engine; returns the number of tensors pushed."""
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = list(weights_for_vllm(model))
            if hasattr(self.llm, "collective_rpc"):
                self.llm.collective_rpc(_load_on_worker, args=(weights,))
            else:  # older vLLM: the model lives in this process
                self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()  # prefixes cached under the old weights are stale
        return len(weights)

    def sample(self, model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
               first_batch: int = 0) -> list[Sample]:  # fmt: skip
        """Wake the engine, load ``model``'s weights, sample, sleep again. Each prompt's seed comes from
        (params.seed, its global index), as ``sample_vllm``: independent of the number of processes."""
        from vllm import SamplingParams as VllmParams

        self.llm.wake_up()
        try:
            self.sync(model)
            stops = stop_token_ids(self.tokenizer)
            first = first_batch * params.prompts_per_batch
            requests = [
                VllmParams(
                    n=params.n,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k if params.top_k > 0 else -1,
                    max_tokens=params.max_new_tokens,
                    stop_token_ids=stops,
                    seed=params.seed * 1_000_003 + first + index,
                )
                for index in range(len(prompts))
            ]
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], requests, use_tqdm=False)
        finally:
            self.llm.sleep(level=1)
        samples = []
        for index, output in enumerate(outputs):
            for k, completion in enumerate(output.outputs):
                tokens = list(completion.token_ids)
                samples.append(Sample(index, k, prompts[index], tokens, bool(tokens) and tokens[-1] in stops))
        return samples


def make_rollouts(backend: str, model_dir: str, tokenizer: Any, seed: int) -> VllmRollouts | None:
    """The engine for a resolved backend (None: transformers)."""
    return VllmRollouts(model_dir, tokenizer, seed) if backend == "vllm" else None
