"""Processes and devices: the accelerator every run opens, metrics averaged over processes, a sharded
model's full parameters for sampling, DeepSpeed's batch settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def make_accelerator(precision: str, cpu: bool = False, log_with: list[str] | None = None) -> Accelerator:
    """The run's accelerator; ``log_with``: its experiment trackers (engine/tracking.py starts them)."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # accelerate keeps one global state per process; stages run one after another in one process
    # (pipeline, tests) may each pick their own precision. The process group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # the scheduler is stepped once per optimizer step, not once per process
    # TensorBoard needs a logging folder to be accepted here; tracking.start sets the run's own once the
    # processes agree on the run folder
    project = ProjectConfiguration(logging_dir=".") if log_with else None
    return Accelerator(
        mixed_precision=mixed,
        cpu=cpu or _launched_without_gpu(),
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        project_config=project,
    )


def _launched_without_gpu() -> bool:
    """Several processes (torchrun, accelerate launch) on a machine with no GPU: accelerate picks its
    gloo CPU backend only when told to use the CPU; otherwise every process would train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate.utils import is_npu_available, is_xpu_available

    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available())


def mean_across(accelerator: Accelerator, row: dict[str, float], weight: float) -> dict[str, float]:
    """The mean of every metric over processes, each process weighted by ``weight`` (e.g. its number of
    rollouts), so that a per-sample mean stays a per-sample mean. Every process gets the same row;
    every process must pass the same keys."""
    if accelerator.num_processes == 1:
        return dict(row)
    keys = sorted(row)
    values = torch.tensor(
        [weight, *[float(row[k]) * weight for k in keys]], dtype=torch.float64, device=accelerator.device
    )
    totals = accelerator.reduce(values, "sum").tolist()
    return {k: v / totals[0] for k, v in zip(keys, totals[1:])}


@contextmanager
def for_generation(
    accelerator: Accelerator, model: torch.nn.Module
) -> Iterator[tuple[torch.nn.Module, bool]]:
    """(the unwrapped ``model``, synced) for sampling with ``generate(..., synced_gpus=synced)``.

    DeepSpeed ZeRO-3 and FSDP keep a shard of each weight per process and all-gather a layer's weights
    in its forward call, which every process must join. Sampling calls forward once per new token and
    processes finish after different numbers of tokens, so they must keep stepping together until the
    longest sample of any process ends (``synced_gpus``). Under FSDP the root unit's own weights
    (embeddings, LM head), which only the root's forward would gather, are gathered here. DDP and
    single-process models need nothing."""
    unwrapped = accelerator.unwrap_model(model)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        yield unwrapped, True
    elif kind == DistributedType.FSDP:
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 1:
            raise RuntimeError(
                "sampling from a model sharded with FSDP2 is not supported; use fsdp_version: 1 "
                "(recipes/accelerate/fsdp.yaml) or DeepSpeed ZeRO-3"
            )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, recurse=False, writeback=False):
            yield unwrapped, True
    else:
        yield unwrapped, False


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int) -> None:
    """DeepSpeed wants the per-device micro-batch size, which accelerate reads from a data loader; the
    engine plans its own batches, so it is set here before ``prepare`` (no-op without DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
