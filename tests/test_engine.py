"""Engine pieces: 8-bit optimizer state, bf16 on CPU, schedules, batch plans, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from align_cli.data.collate import plan_epoch, shard
from align_cli.engine.checkpoint import latest_checkpoint
from align_cli.engine.optim import build_optimizer, build_scheduler
from align_cli.recipe import TrainingSection
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, quiet_console, step_losses


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, set[torch.dtype]]:
    total, dtypes = 0, set()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                total += value.numel() * value.element_size()
                dtypes.add(value.dtype)
    return total, dtypes


def one_step(model_dir: Path, optimizer_name: str) -> torch.optim.Optimizer:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = build_optimizer(model, TrainingSection(optimizer=optimizer_name, lr=1e-3))
    ids = torch.randint(3, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def test_adamw_8bit_keeps_uint8_state(tiny_model: Path):
    full_bytes, full_dtypes = optimizer_state_bytes(one_step(tiny_model, "adamw"))
    small_bytes, small_dtypes = optimizer_state_bytes(one_step(tiny_model, "adamw_8bit"))
    assert full_dtypes == {torch.float32}
    assert torch.uint8 in small_dtypes
    assert small_bytes <= 0.30 * full_bytes, (small_bytes, full_bytes)


def test_paged_optimizer_needs_a_gpu(tiny_model: Path):
    if torch.cuda.is_available():
        assert one_step(tiny_model, "paged_adamw_8bit") is not None
    else:
        with pytest.raises(ValueError, match="needs a GPU"):
            one_step(tiny_model, "paged_adamw_8bit")


def test_bf16_and_8bit_run_complete_on_cpu(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    sets = [
        "training.precision=bf16",
        "training.optimizer=adamw_8bit",
        "training.max_steps=6",
        "training.lr=3e-3",
    ]
    run_sft(
        make_recipe("sft", tiny_model, EXAMPLES / "alpaca.jsonl", tmp_path / "run", sets),
        console=quiet_console(),
    )
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[6] < losses[1]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final") is not None


def test_cosine_schedule_warms_up_and_ends_at_min_ratio():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    t = TrainingSection(lr=1.0, warmup_ratio=0.1, warmup_steps=5, min_lr_ratio=0.1, scheduler="cosine")
    scheduler = build_scheduler(optimizer, t, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.8)  # warmup is max(5, 10% of 20) steps
    assert lrs[5] == pytest.approx(1.0)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)  # cosine floor: 10% of the peak


def test_batch_plan_is_deterministic_grouped_and_complete():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    plan = plan_epoch(lengths, micro_batch_size=4, grad_accum=2, world_size=1, seed=3, epoch=0)
    again = plan_epoch(lengths, micro_batch_size=4, grad_accum=2, world_size=1, seed=3, epoch=0)
    other_epoch = plan_epoch(lengths, micro_batch_size=4, grad_accum=2, world_size=1, seed=3, epoch=1)
    assert plan == again and plan != other_epoch
    seen = sorted(i for step in plan for micro in step for i in micro)
    assert seen == list(range(200))  # every example exactly once per epoch
    # same step size, different micro-batch split: the same examples share each step
    flat = plan_epoch(lengths, micro_batch_size=8, grad_accum=1, world_size=1, seed=3, epoch=0)
    assert [sorted(sum(s, [])) for s in plan] == [sorted(sum(s, [])) for s in flat]
    # length grouping keeps padding small
    padded = sum(len(m) * max(lengths[i] for i in m) for step in plan for m in step)
    assert sum(lengths) / padded > 0.9
    # two processes split each global micro-batch between them
    two = plan_epoch(lengths, micro_batch_size=4, grad_accum=2, world_size=2, seed=3, epoch=0)
    micro = two[0][0]
    assert sorted(shard(micro, 0, 2) + shard(micro, 1, 2)) == sorted(micro) and len(micro) == 8


def test_partial_checkpoints_are_never_picked(tmp_path: Path):
    (tmp_path / "checkpoint-0000004").mkdir()
    (tmp_path / "checkpoint-0000004" / "trainer_state.json").write_text('{"step": 4}')
    (tmp_path / "checkpoint-0000008.tmp").mkdir()  # a save that was killed
    (tmp_path / "checkpoint-0000012").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-0000004"


def test_lr_schedules_equal_transformers_own():
    """build_scheduler writes the warmup/cosine/linear/constant factors itself (importing
    transformers.optimization costs every command seconds); they must be transformers' numbers."""
    from types import SimpleNamespace

    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    from align_cli.engine.optim import build_scheduler

    def lrs(scheduler, steps: int = 40) -> list[float]:
        out = []
        for _ in range(steps):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    for warmup, total, floor in ((0, 30, 0.0), (5, 30, 0.1), (7, 12, 0.25)):
        t = SimpleNamespace(warmup_steps=warmup, warmup_ratio=0.0, min_lr_ratio=floor)
        theirs = {
            "cosine": get_cosine_with_min_lr_schedule_with_warmup(
                optimizer(), warmup, total, min_lr_rate=floor
            ),
            "linear": get_linear_schedule_with_warmup(optimizer(), warmup, total),
            "constant": get_constant_schedule_with_warmup(optimizer(), warmup),
        }
        for name, reference in theirs.items():
            ours = build_scheduler(optimizer(), SimpleNamespace(**vars(t), scheduler=name), total)
            assert lrs(ours) == pytest.approx(lrs(reference), rel=1e-12, abs=0), (name, warmup, total)
