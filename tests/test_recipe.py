"""Recipes: typed schema, all problems reported at once, overrides, every shipped recipe parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align_cli.recipe import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path: Path):
    if path.parent.name == "accelerate":
        return  # accelerate launcher configs, not align recipes (parsed in the distributed tests)
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.stage


def test_all_problems_are_listed_at_once(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_pth": "x"},
                "training": {"lr": "fast", "micro_batch_size": 2.5, "optimizer": "sgd", "grad_accum": 0},
                "data": {"packing": "yes"},
                "extra": 1,
            }
        )
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    message = str(info.value)
    for fragment in (
        "model.name_or_pth: unknown key",
        "training.lr: expected float",
        "training.micro_batch_size: expected int",
        "training.optimizer: 'sgd' is not one of adamw, adamw_8bit, paged_adamw_8bit",
        "training.grad_accum: must be > 0",
        "data.packing: expected bool",
        "extra: unknown key",
    ):
        assert fragment in message, fragment
    assert "7 problem(s)" in message


def test_flags_then_set_override_the_file(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: sft\ntraining:\n  lr: 1e-5\n  seed: 1\nmodel:\n  name_or_path: a\n")
    recipe = load_recipe(
        path, {"model.name_or_path": "b", "training.seed": None}, ["training.lr=3e-4", "data.max_length=64"]
    )
    assert recipe.model.name_or_path == "b"  # flag beats file
    assert recipe.training.seed == 1  # a flag not given leaves the file's value
    assert recipe.training.lr == pytest.approx(3e-4)  # YAML's "1e-5" string is read as a float
    assert recipe.data.max_length == 64
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(None, sets=["training.lr"])
    with pytest.raises(RecipeError, match="not 'dpo'"):
        load_recipe(path, stage="dpo")


def test_resolved_recipe_round_trips(tmp_path: Path):
    recipe = load_recipe(
        None, {"model.name_or_path": "m", "data.train": "d.jsonl"}, ["training.epochs=2"], stage="sft"
    )
    recipe.save(tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == recipe
