"""The stage registry drives everything: every stage has a command, a memory plan and a recipe section,
and every recipe key a stage accepts is read by it (a key it does not read is refused).

"Read" is measured, not declared: each stage runs on the tiny model with every recipe section's
attribute reads recorded, in settings that take its conditional paths (LoRA, epochs, eval data, the
adaptive KL controller, a too-long record...). What it never read must be exactly what its registry
entry declares unread; those keys are refused in a recipe."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli import sections
from align_cli.cli import app
from align_cli.recipe import COMMON_SECTIONS, Recipe, RecipeError, load_recipe
from align_cli.stages import STAGES
from tests.conftest import EXAMPLES
from tests.helpers import quiet_console, write_jsonl

runner = CliRunner()
SECTION_CLASSES = [c for c in vars(sections).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
# generic code that touches every field (saving, comparing, copying a recipe) is not "reading" it
NOT_READING = {"to_dict", "asdict", "_asdict_inner", "replace", "deepcopy", "_deepcopy_dict", "_reconstruct"}
NOT_READING |= {"record_data_identity", "data_identity", "check_resume", "recipe_changes", "__repr__"}


def validating() -> bool:
    """Inside ``load_recipe``: a recipe being validated (every key is looked at), e.g. a reward model's
    saved recipe loaded by the stage; not the stage reading its own settings."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "load_recipe" and frame.f_code.co_filename.endswith("recipe.py"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def recorded_reads() -> Iterator[set[tuple[type, str]]]:
    """Every (section class, field) read while the block runs, outside generic whole-recipe code."""
    reads: set[tuple[type, str]] = set()
    originals = {cls: cls.__getattribute__ for cls in SECTION_CLASSES}

    def make(cls: type, fields: set[str]):
        def getattribute(self, name):
            if name in fields and not validating():
                caller = sys._getframe(1).f_code
                if caller.co_name not in NOT_READING and not caller.co_filename.endswith("copy.py"):
                    reads.add((cls, name))
            return object.__getattribute__(self, name)

        return getattribute

    for cls in SECTION_CLASSES:
        cls.__getattribute__ = make(cls, {f.name for f in dataclasses.fields(cls)})
    try:
        yield reads
    finally:
        for cls, original in originals.items():
            cls.__getattribute__ = original


def keys_of(cls: type, prefix: str) -> dict[str, tuple[type, str]]:
    """dotted key -> (class, field) for every leaf key of a section (sub-sections included)."""
    out = {}
    for f in dataclasses.fields(cls):
        hint = {s.__name__: s for s in SECTION_CLASSES}.get(str(f.type))
        if hint is not None and hint is not sections.SourceSection:
            out |= keys_of(hint, f"{prefix}{f.name}.")
        out[f"{prefix}{f.name}"] = (cls, f.name)
    return out


def stage_keys(stage: str) -> dict[str, tuple[type, str]]:
    entry = STAGES[stage]
    hints = {f.name: f.type for f in dataclasses.fields(Recipe)}
    keys = {}
    for name in (*COMMON_SECTIONS, *([entry.section] if entry.section else [])):
        cls = next(c for c in SECTION_CLASSES if c.__name__ == str(hints[name]) or c is hints[name])
        keys |= keys_of(cls, f"{name}.")
    return keys


def test_every_stage_has_a_command_a_memory_plan_and_a_recipe_section():
    for name, stage in STAGES.items():
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (name, result.output)
        for flag in ("--recipe", "--set", "--resume", *(f.name for f in stage.flags)):
            assert flag in result.output, (name, flag)
        module = stage.load()
        assert callable(module.run) and callable(module.memory_plan), name
        assert stage.section is None or isinstance(getattr(Recipe(), stage.section), stage.config), name
        assert all(key.split(".")[0] in COMMON_SECTIONS for key in stage.unread), name


def test_allowed_values_are_the_code_tables():
    from align_cli.losses import GRPO_LOSS_TYPES, KL_ESTIMATORS, PREFERENCE_LOSSES

    assert sections.DPO_LOSS_TYPES == tuple(PREFERENCE_LOSSES)
    assert sections.GRPO_LOSS_TYPES == GRPO_LOSS_TYPES
    # online DPO: the pairwise variants with a reference
    assert all(PREFERENCE_LOSSES[k].reference for k in sections.ONLINE_DPO_LOSS_TYPES)
    assert sections.KL_ESTIMATORS == KL_ESTIMATORS


@pytest.mark.parametrize("stage", list(STAGES))
def test_unknown_and_unread_keys_are_errors_naming_the_stage(stage: str):
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(None, sets=["training.learning_rat=1"], stage=stage)
    for key in STAGES[stage].unread:
        with pytest.raises(RecipeError, match=f"{key}: not read by `align {stage}`"):
            load_recipe(None, sets=[f"{key}=null"], stage=stage)
    other = next(s for s in STAGES.values() if s.section and s.name != stage)
    with pytest.raises(RecipeError, match=f"{other.section}: a section of another stage"):
        load_recipe(None, sets=[f"{other.section}={{}}"], stage=stage)


def _recipe(stage: str, model: Path, data: Path, out: Path, sets: list[str]):
    overrides = {"model.name_or_path": str(model), "data.train": str(data), "output.dir": str(out)}
    return load_recipe(None, overrides, sets, stage)


SHORT = ["training.max_steps=2", "training.micro_batch_size=2", "training.save_every=1"]
LORA = ["model.lora.enabled=true", "model.lora.r=2", "model.lora.alpha=4", "model.lora.dropout=0.0"]
LORA += ["model.lora.target_modules=[q_proj, v_proj]"]
WITH_EVAL = ["data.eval_fraction=0.25", "training.eval_every=1"]
BY_EPOCHS = ["training.epochs=0.2", "training.micro_batch_size=2", "training.save_every=1"]


def settings(stage: str, tmp: Path, review_models: dict[str, Path]) -> list[tuple[Path, Path, list[str]]]:
    """(model, data, --set items) of the runs that together take the stage's conditional paths."""
    tiny, rm = review_models["sft"], review_models["reward"]
    long_pref = write_jsonl(
        tmp / "long.jsonl",
        [{"prompt": "Review:\n", "chosen": "good " * 80, "rejected": "bad " * 80}] * 4
        + [{"prompt": "Say:\n", "chosen": "yes", "rejected": "no"}] * 4,
    )
    prefs, prompts = EXAMPLES / "prefs.jsonl", EXAMPLES / "prompts.jsonl"
    if stage == "sft":
        return [
            (tiny, EXAMPLES / "alpaca.jsonl", SHORT + WITH_EVAL),
            (tiny, EXAMPLES / "alpaca.jsonl", BY_EPOCHS + LORA + [f"data.eval={EXAMPLES / 'alpaca.jsonl'}"]),
        ]
    cut = ["data.max_length=48"] + (["data.on_too_long=drop"] if stage != "reward" else [])
    if stage in ("reward", "dpo"):
        return [(tiny, prefs, SHORT + WITH_EVAL), (tiny, long_pref, BY_EPOCHS + LORA + cut)]
    if stage == "kto":
        long_unpaired = write_jsonl(
            tmp / "long_unpaired.jsonl",
            [{"prompt": "Review:\n", "completion": "good " * 80, "label": True}] * 4
            + [{"prompt": "Say:\n", "completion": w, "label": w == "yes"} for w in ("yes", "no")] * 2,
        )
        unpaired = EXAMPLES / "unpaired.jsonl"
        return [
            (tiny, unpaired, SHORT + WITH_EVAL),
            (tiny, long_unpaired, BY_EPOCHS + LORA + cut + [f"data.eval={unpaired}"]),
        ]
    if stage == "ppo":
        ppo = [
            "ppo.rollout_batch_size=4",
            "ppo.mini_batch_size=2",
            "ppo.max_new_tokens=6",
            f"ppo.reward_model={rm}",
        ]
        return [
            (tiny, prompts, ["training.max_steps=2", "training.save_every=1", *ppo]),
            (
                tiny,
                prompts,
                [
                    "ppo.iterations=1",
                    *ppo,
                    *LORA,
                    "ppo.adaptive_kl=true",
                    f"ppo.ptx_data={EXAMPLES / 'alpaca.jsonl'}",
                ]
                + ["ppo.ptx_coef=0.5"],
            ),
        ]
    if stage in ("grpo", "rloo"):
        group = "num_generations" if stage == "grpo" else "k"
        small = [
            f"{stage}.prompts_per_iteration=2",
            f"{stage}.{group}=2",
            f"{stage}.mini_batch_size=2",
            f"{stage}.max_new_tokens=6",
            f"{stage}.reward_model={rm}",
        ]
        variant = ["grpo.loss_type=dr_grpo"] if stage == "grpo" else ["rloo.normalize=reinforce_pp"]
        return [
            (tiny, prompts, ["training.max_steps=2", "training.save_every=1", *small]),
            (tiny, prompts, [f"{stage}.iterations=1", *small, *LORA, *variant]),
        ]
    if stage == "online-dpo":
        small = [
            "online_dpo.prompts_per_iteration=2",
            "online_dpo.num_generations=2",
            "online_dpo.mini_batch_size=2",
            "online_dpo.max_new_tokens=6",
            f"online_dpo.reward_model={rm}",
        ]
        return [
            (tiny, prompts, ["training.max_steps=2", "training.save_every=1", *small]),
            (tiny, prompts, ["online_dpo.iterations=1", *small, *LORA, "online_dpo.loss_type=ipo"]),
        ]
    if stage == "rejection-sample":
        rs = [
            "rejection.n=2",
            "rejection.max_new_tokens=6",
            "rejection.max_prompts=4",
            f"rejection.reward_model={rm}",
        ]
        threshold = ["rejection.select=threshold", "rejection.threshold=-100"]
        return [
            (tiny, prompts, [*rs, "rejection.then=sft", *SHORT, *WITH_EVAL]),
            (tiny, prompts, [*rs, "rejection.then=sft", *threshold, *BY_EPOCHS, *LORA]),
        ]
    raise AssertionError(f"no probe settings for stage {stage!r}: add them here")


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_key_a_stage_accepts_is_read(
    stage: str, review_models: dict[str, Path], tmp_path: Path, runs_dir
):
    keys = stage_keys(stage)
    read: set[tuple[type, str]] = set()
    for i, (model, data, sets) in enumerate(settings(stage, tmp_path, review_models)):
        recipe = _recipe(stage, model, data, tmp_path / f"run{i}", sets)  # validation reads every key
        with recorded_reads() as reads:
            STAGES[stage].load().run(recipe, console=quiet_console())
        read |= reads
    never_read = sorted(k for k, where in keys.items() if where not in read)
    declared = STAGES[stage].unread
    assert never_read == sorted(declared), (
        f"{stage}: never read {never_read}, declared unread {sorted(declared)}"
    )
