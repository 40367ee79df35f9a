"""KTO (`align kto`) on the tiny model: unpaired records (text and conversational) are validated with
file:line errors, each prompt is paired with another completion of its micro-batch for the KL baseline,
the loss of a batch matches a hand computation from the models' log-probs, step 1 (pi = pi_ref) is
lambda * 0.5, desirable completions gain log-probability relative to undesirable ones on held-out data,
the reference stays put, and the CLI chains from the last `align sft` output."""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.data.formats import DataError, load_records
from align_cli.data.preference import tokenize_preferences
from align_cli.recipe import KTOSection, RecipeError, load_recipe
from align_cli.reference import LiveReference
from align_cli.reference_cache import compute_logps
from align_cli.runs import record_output
from align_cli.stages.kto import make_collate, make_compute_loss, run_kto, tokenize
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import make_recipe, metric_rows, quiet_console, step_losses, weights, write_jsonl

UNPAIRED = EXAMPLES / "unpaired.jsonl"
PAIRS = [json.loads(line) for line in (EXAMPLES / "prefs.jsonl").read_text().splitlines()]


def unpaired(pairs: list[dict]) -> list[dict]:
    """Each pair as two unpaired records: the chosen (more positive) review desirable, the other not."""
    return [
        {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
        for p in pairs
        for key in ("chosen", "rejected")
    ]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_unpaired_records_text_and_conversational(tiny_model: Path, tmp_path: Path):
    rows = [
        {"prompt": "Review:", "completion": " great film", "label": True},
        {
            "prompt": [{"role": "user", "content": "Review the film."}],
            "completion": [{"role": "assistant", "content": "Dull."}],
            "label": False,
        },
    ]
    records = load_records(str(write_jsonl(tmp_path / "u.jsonl", rows)), allowed=("unpaired",))
    assert [r.kind for r in records] == ["unpaired", "unpaired"]
    recipe = make_recipe("kto", tiny_model, tmp_path / "u.jsonl", tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples, stats = tokenize(records, tok, recipe)
    assert stats.kept == 2 and [e["desirable"] for e in examples] == [True, False]
    assert len(examples[0]["responses"]) == 1
    assert tok.decode(examples[0]["responses"][0]).startswith(" great film")
    assert "Dull." in tok.decode(examples[1]["responses"][0])
    assert "Review the film." in tok.decode(examples[1]["prompt_ids"])  # the prompt is not trained on


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "p", "completion": "c", "label": "yes"}, "label: expected true or false, got 'yes'"),
        ({"prompt": "p", "completion": "c", "label": 1}, "label: expected true or false, got 1"),
        ({"prompt": "p", "completion": "", "label": True}, "completion: empty"),
        ({"completion": "c", "label": True}, "prompt: missing"),
    ],
)
def test_a_bad_record_is_named_by_file_line_and_field(tmp_path: Path, row: dict, problem: str):
    good = {"prompt": "p", "completion": "c", "label": False}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_records(str(path), allowed=("unpaired",))
    assert f"{path}:2: {problem}" in str(info.value)


def test_a_missing_label_in_a_later_record_and_other_data_are_named(tmp_path: Path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": True}] * 2)
    path.write_text(path.read_text() + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(DataError, match=r"u.jsonl:3: label: missing"):
        load_records(str(path), allowed=("unpaired",))
    with pytest.raises(DataError, match="records are 'preference'.*unpaired \\(prompt, completion, label\\)"):
        load_records(str(EXAMPLES / "prefs.jsonl"), allowed=("unpaired",))


def test_mismatched_pairs_rotate_the_completions_by_one():
    examples = [
        {"prompt_ids": [1, 10 + i], "responses": [[20 + i, 30 + i]], "desirable": i % 2 == 0, "margin": None}
        for i in range(3)
    ]
    batch = make_collate(pad_token_id=0, max_length=64)(examples)
    assert batch["units"] == 3 and batch["desirable"].tolist() == [True, False, True]
    # KL row i: prompt i, then the completion of example i - 1 (the last one's for the first)
    assert batch["kl_input_ids"].tolist() == [[1, 10, 22, 32], [1, 11, 20, 30], [1, 12, 21, 31]]
    assert batch["kl_labels"].tolist() == [[-100, -100, 22, 32], [-100, -100, 20, 30], [-100, -100, 21, 31]]
    cut = make_collate(pad_token_id=0, max_length=3)(examples)
    assert cut["kl_input_ids"].tolist() == [[1, 10, 22], [1, 11, 20], [1, 12, 21]]  # cut to max_length
    alone = make_collate(pad_token_id=0, max_length=64)(examples[:1])
    assert "kl_input_ids" not in alone  # a micro-batch of one has no other completion: z_ref = 0


def test_batch_loss_matches_a_hand_computation_from_the_models(tiny_model: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    records = load_records(str(UNPAIRED), allowed=("unpaired",))[:5]
    examples, _ = tokenize_preferences(records, tok, "auto", 512)
    for e, r in zip(examples, records):
        e["desirable"] = r.fields["label"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a reference a little away (and worse), so r != 0 and z_ref > 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cfg = KTOSection(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    batch = make_collate(tok.pad_token_id, 512)(examples)
    ref = LiveReference(SimpleNamespace(autocast=nullcontext), reference)
    loss, metrics = make_compute_loss(cfg, ref)(policy, batch)

    swapped = [e | {"responses": examples[i - 1]["responses"]} for i, e in enumerate(examples)]
    pad = tok.pad_token_id
    pol, rf = compute_logps(policy, examples, pad, 8), compute_logps(reference, examples, pad, 8)
    pol_kl, rf_kl = compute_logps(policy, swapped, pad, 8), compute_logps(reference, swapped, pad, 8)
    z = max(0.0, sum(p[0] - q[0] for p, q in zip(pol_kl, rf_kl)) / len(examples))
    by_hand = 0.0
    for e, p, q in zip(examples, pol, rf):
        r = p[0] - q[0]
        by_hand += 1 - sigmoid(0.5 * (r - z)) if e["desirable"] else 1.5 * (1 - sigmoid(0.5 * (z - r)))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert z > 0 and metrics["kl"].item() == pytest.approx(z * len(examples), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_first_step_is_half_lambda_and_the_kl_baseline_is_zero(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    """pi = pi_ref before the first update: r = 0 and z_ref = 0, so each completion's loss is
    lambda * (1 - sigma(0)) = lambda / 2; with lambda_U = 3 the mean is 0.5 + (3 - 1) * 0.5 * share_U."""
    sets = ["training.max_steps=1", "training.micro_batch_size=16", "kto.undesirable_weight=3"]
    summary = run_kto(
        make_recipe("kto", tiny_model, UNPAIRED, tmp_path / "run", sets), console=quiet_console()
    )
    row = next(r for r in metric_rows(tmp_path / "run") if r.get("step") == 1 and "loss" in r)
    assert summary["labels"] == {"desirable": 8, "undesirable": 8}
    assert row["loss"] == pytest.approx(0.5 * 0.5 + 1.5 * 0.5, abs=1e-5)
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)
    assert row["rewards/signed"] == pytest.approx(0.0, abs=1e-6)
    assert summary["reference"] == {"mode": "live (second model)"}


def _sha(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_kto_learns_the_labels_on_held_out_data(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    train = write_jsonl(tmp_path / "train.jsonl", unpaired(PAIRS[:480]))
    held_pairs = PAIRS[480:]
    held = write_jsonl(tmp_path / "held.jsonl", unpaired(held_pairs))
    files_before = _sha(tiny_model)
    sets = [f"data.eval={held}", "training.lr=3e-3", "training.epochs=1", "training.micro_batch_size=16"]
    summary = run_kto(make_recipe("kto", tiny_model, train, tmp_path / "run", sets), console=quiet_console())
    assert _sha(tiny_model) == files_before  # the reference's files are bit-identical

    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples, _ = tokenize_preferences(load_records(str(held), allowed=("unpaired",)), tok, "auto", 512)

    def gap(model_dir: Path) -> tuple[float, float]:
        """Mean log pi(desirable) - log pi(undesirable) over the held-out prompts, and how often > 0."""
        logps = compute_logps(AutoModelForCausalLM.from_pretrained(model_dir), examples, tok.pad_token_id, 32)
        gaps = [logps[i][0] - logps[i + 1][0] for i in range(0, len(logps), 2)]
        return sum(gaps) / len(gaps), sum(g > 0 for g in gaps) / len(gaps)

    (before, ahead_before), (after, ahead_after) = gap(tiny_model), gap(tmp_path / "run" / "final")
    print(f"held-out: log-prob gap {before:.2f} -> {after:.2f}, desirable ahead {ahead_before:.2f} -> "
          f"{ahead_after:.2f}, reward accuracy {summary['eval/rewards/accuracy']:.3f}")  # fmt: skip
    assert after > before + 5.0, (before, after)
    assert ahead_after > 0.85  # chance 0.5
    assert summary["eval/rewards/accuracy"] > 0.7  # desirable above z_ref, undesirable below; chance 0.5
    losses = step_losses(tmp_path / "run")
    assert losses[max(losses)] < 0.85 * losses[1]  # bounded in [0, lambda]: it moves slowly at beta 0.1
    start, trained = weights(tiny_model), weights(tmp_path / "run" / "final")
    assert not [k for k in start if torch.equal(start[k], trained[k])]  # every parameter moved


def test_recipe_and_cli(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    recipe = load_recipe(ROOT / "recipes" / "kto-tiny.yaml")
    assert recipe.stage == "kto" and recipe.kto.beta == 0.1 and recipe.data.train.endswith("unpaired.jsonl")
    with pytest.raises(RecipeError, match="training.micro_batch_size: KTO"):
        load_recipe(None, sets=["training.micro_batch_size=1"], stage="kto")
    with pytest.raises(RecipeError, match="kto.beta: must be > 0"):
        load_recipe(None, sets=["kto.beta=0"], stage="kto")
    runner = CliRunner()
    result = runner.invoke(app, ["kto", "--data", str(UNPAIRED)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "align sft" in result.output, result.output
    record_output("sft", tiny_model)
    out = tmp_path / "chained"
    result = runner.invoke(app, ["kto", "--data", str(UNPAIRED), "--max-steps", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "final" / "model.safetensors").exists()
    assert str(tiny_model.resolve()) in (out / "recipe.yaml").read_text()  # policy = reference = last sft
