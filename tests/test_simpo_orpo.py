"""SimPO and ORPO (``dpo.loss_type: simpo | orpo``) on the tiny model: no reference model is loaded and no
reference cache computed; the chosen responses gain per-token log-probability relative to the rejected
ones on held-out pairs; recipe settings a variant would ignore are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_cli.data.formats import load_records
from align_cli.data.preference import tokenize_preferences
from align_cli.engine.session import split_holdout
from align_cli.recipe import RecipeError, load_recipe
from align_cli.reference_cache import compute_logps
from align_cli.stages.dpo import run_dpo
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, quiet_console, step_losses

PREFS = EXAMPLES / "prefs.jsonl"
LEARN = ["training.lr=3e-3", "training.epochs=2", "training.micro_batch_size=16", "data.eval_fraction=0.2"]


def held_out_per_token(model_dir: Path) -> tuple[float, float]:
    """(mean per-token log-prob gap chosen - rejected, share of pairs with chosen > rejected) of ``model_dir``
    on the held-out pairs of the learning runs (the same split as the stage's)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_preferences(load_records(str(PREFS)), tok, "auto", 512)
    _, held = split_holdout(examples, 0.2, 42)
    logps = compute_logps(AutoModelForCausalLM.from_pretrained(model_dir), held, tok.pad_token_id, 32)
    gaps = [lp[0] / len(e["responses"][0]) - lp[1] / len(e["responses"][1]) for e, lp in zip(held, logps)]
    return sum(gaps) / len(gaps), sum(g > 0 for g in gaps) / len(gaps)


# ORPO's odds-ratio term has weight lambda = 0.1 beside the chosen NLL: it moves the gap less than SimPO
@pytest.mark.parametrize(("loss_type", "min_gain"), [("simpo", 1.0), ("orpo", 0.1)])
def test_learns_the_preference_without_a_reference(
    loss_type: str, min_gain: float, tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    console = quiet_console()
    recipe = make_recipe("dpo", tiny_model, PREFS, tmp_path / "run", LEARN + [f"dpo.loss_type={loss_type}"])
    summary = run_dpo(recipe, console=console)
    log = console.file.getvalue()
    assert summary["reference"] == {"mode": f"none (loss_type {loss_type})"}
    assert "reference log-probs" not in log  # nothing computed or cached
    assert not (runs_dir / ".align_cache" / "reference-logps").exists()
    gap_before, order_before = held_out_per_token(tiny_model)
    gap_after, order_after = held_out_per_token(tmp_path / "run" / "final")
    accuracy = summary["eval/rewards/accuracy"]
    print(f"{loss_type} held-out: per-token gap {gap_before:.3f} -> {gap_after:.3f}, chosen ahead "
          f"{order_before:.2f} -> {order_after:.2f}, reward accuracy {accuracy:.3f}")  # fmt: skip
    assert gap_after > gap_before + min_gain, (gap_before, gap_after)
    assert order_after > 0.8 and accuracy > 0.8  # chance: 0.5 (before: 0.38)
    losses = step_losses(tmp_path / "run")
    assert losses[max(losses)] < 0.6 * losses[1]


def test_orpo_trains_the_chosen_responses_by_likelihood(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    """ORPO's SFT term: with lambda 0 it is SFT on the chosen responses, whose log-probs rise."""
    sets = ["training.lr=3e-3", "training.max_steps=8", "training.micro_batch_size=16"]
    sets += ["dpo.loss_type=orpo", "dpo.orpo_lambda=0"]
    run_dpo(make_recipe("dpo", tiny_model, PREFS, tmp_path / "run", sets), console=quiet_console())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples, _ = tokenize_preferences(load_records(str(PREFS))[:64], tok, "auto", 512)
    before = compute_logps(AutoModelForCausalLM.from_pretrained(tiny_model), examples, tok.pad_token_id, 32)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    after = compute_logps(trained, examples, tok.pad_token_id, 32)
    chosen_tokens = sum(len(e["responses"][0]) for e in examples)
    nll_before = -sum(lp[0] for lp in before) / chosen_tokens
    nll_after = -sum(lp[0] for lp in after) / chosen_tokens
    assert nll_after < nll_before - 0.5, (nll_before, nll_after)
    # step 1: the loss is the chosen tokens' mean NLL under the starting model (lambda 0)
    first = step_losses(tmp_path / "run")[1]
    assert first == pytest.approx(nll_before, rel=0.05)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["dpo.loss_type=orpo", "dpo.beta=0.1"], "dpo.beta: loss_type orpo has no beta"),
        (["dpo.loss_type=simpo", "dpo.reference_model=x"], "dpo.reference_model: loss_type simpo uses no"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing: for loss_type sigmoid"),
        (["dpo.loss_type=simpo", "dpo.simpo_gamma=-1"], "dpo.simpo_gamma: must be >= 0"),
        (["dpo.loss_type=kto"], "dpo.loss_type: 'kto' is not one of sigmoid, ipo, hinge, simpo, orpo"),
    ],
)
def test_settings_a_variant_ignores_are_refused(sets: list[str], message: str):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, {"model.name_or_path": "m", "data.train": "d"}, sets, stage="dpo")
