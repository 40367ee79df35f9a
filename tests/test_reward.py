"""Reward models: the stage's loss by hand, one forward per response, it learns the rule, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import align_cli.stages.reward as reward_stage
from align_cli.cli import app
from align_cli.data.formats import DataError, load_records
from align_cli.data.preference import collate_responses, tokenize_preferences
from align_cli.forward import reward_scores
from align_cli.models import load_reward_model
from align_cli.recipe import LoraSection, ModelSection, RecipeError, RewardSection, load_recipe
from align_cli.reward_score import score_records
from align_cli.runs import record_output
from align_cli.stages.reward import (
    collate_pairs,
    make_compute_loss,
    record_margins,
    run_reward,
)
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, metric_rows, quiet_console, write_jsonl

runner = CliRunner()


def nll(x: float) -> float:
    """-log sigma(x), by hand."""
    return math.log(1.0 + math.exp(-x))


def examples_from(path: Path, tokenizer, section: RewardSection | None = None) -> list[dict]:
    records = load_records(str(path))
    margins = record_margins(records, section or RewardSection())
    examples, _ = tokenize_preferences(records, tokenizer, "auto", 128)
    for e in examples:
        e["margin"] = margins[e["where"]]
    return examples


@pytest.fixture()
def mixed_examples(tiny_model: Path, tmp_path: Path) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Review A:", "chosen": "great fun", "rejected": "dull", "margin": 0.5},
            {"prompt": "Review B:", "chosen": "lovely", "rejected": "bad", "rating": "Slightly better"},
        ],
    )
    ranked = write_jsonl(
        tmp_path / "ranked.jsonl",
        [{"prompt": "Review C:", "responses": ["superb", "good", "okay", "awful"]}],
    )
    a, b = examples_from(pairs, tok)
    (c,) = examples_from(ranked, tok)
    return [a, c, b]  # pair, K=4 ranking, rated pair


def test_compute_loss_on_a_mixed_batch_equals_the_hand_value(mixed_examples, monkeypatch):
    batch = collate_pairs(mixed_examples, pad_token_id=0)
    assert batch["units"] == 3 and batch["input_ids"].shape[0] == 8  # 2 + 4 + 2 rows, one per response
    # rows: pair (0 chosen, 1 rejected), ranking best first (2..5), rated pair (6, 7)
    r = [1.0, 0.2, 2.0, 0.5, 0.7, -1.0, -0.3, 0.4]
    monkeypatch.setattr(reward_stage, "reward_scores", lambda model, batch: torch.tensor(r))
    loss, metrics = make_compute_loss(center_coef=0.1)(None, batch)

    m_pair, m_rated = 0.5, 0.333  # the record's margin; "Slightly better" through the small table
    ranked_pairs = [(2, 3), (2, 4), (2, 5), (3, 4), (3, 5), (4, 5)]
    bt = nll(r[0] - r[1] - m_pair) + nll(r[6] - r[7] - m_rated)
    bt += sum(nll(r[i] - r[j]) for i, j in ranked_pairs) / 6  # each prompt counts once: 1/C(4,2)
    center = (r[0] + r[1]) ** 2 + (r[6] + r[7]) ** 2 + sum((r[i] + r[j]) ** 2 for i, j in ranked_pairs) / 6
    assert loss.item() == pytest.approx(bt + 0.1 * center, rel=1e-6)
    assert metrics["center"].item() == pytest.approx(center, rel=1e-6)
    # accuracy per prompt: 1 (pair), 5/6 (r[3] < r[4] is the one wrong pair), 0 (rated pair): summed
    assert metrics["accuracy"].item() == pytest.approx(1 + 5 / 6 + 0, rel=1e-6)
    gaps = (r[0] - r[1]) + (r[6] - r[7]) + sum(r[i] - r[j] for i, j in ranked_pairs) / 6
    assert metrics["reward_gap"].item() == pytest.approx(gaps, rel=1e-6)
    means = (r[0] + r[1]) / 2 + sum(r[2:6]) / 4 + (r[6] + r[7]) / 2
    assert metrics["reward_mean"].item() == pytest.approx(means, rel=1e-6)
    squares = (r[0] ** 2 + r[1] ** 2) / 2 + sum(x * x for x in r[2:6]) / 4 + (r[6] ** 2 + r[7] ** 2) / 2
    assert metrics["reward_sq_mean"].item() == pytest.approx(squares, rel=1e-6)


def test_margins_can_be_switched_off_and_ratings_are_looked_up(tiny_model: Path, tmp_path: Path):
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b", "rating": "significantly better"},
            {"prompt": "p", "chosen": "a", "rejected": "b", "rating": "negligibly_better"},
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2, "rating": "better"},
        ],
    )
    records = load_records(str(data))
    assert list(record_margins(records, RewardSection()).values()) == [1.0, 0.0, 2.0]
    assert list(record_margins(records, RewardSection(use_margin=False)).values()) == [0.0, 0.0, 0.0]
    large = RewardSection(margins={"significantly_better": 3, "negligibly_better": 0, "better": 2})
    assert list(record_margins(records, large).values()) == [3.0, 0.0, 2.0]


def test_hh_conversations_split_off_the_shared_prompt(tiny_model: Path, tmp_path: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    shared = [
        {"role": "user", "content": "Review a film?"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "The Last Train"},
    ]
    good, bad = {"role": "assistant", "content": "Wonderful."}, {"role": "assistant", "content": "Dull."}
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + [good], "rejected": shared + [bad]}])
    explicit = write_jsonl(
        tmp_path / "x.jsonl", [{"prompt": shared, "chosen": "Wonderful.", "rejected": "Dull."}]
    )
    (e,) = examples_from(hh, tok)
    assert "The Last Train" in tok.decode(e["prompt_ids"]) and "Sure." in tok.decode(e["prompt_ids"])
    assert "Wonderful." in tok.decode(e["responses"][0]) and "Wonderful" not in tok.decode(e["prompt_ids"])
    (x,) = examples_from(explicit, tok)
    assert (e["prompt_ids"], e["responses"]) == (x["prompt_ids"], x["responses"])


def test_a_four_way_ranking_takes_four_forwards_not_twelve(tiny_model: Path, tmp_path: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ranked = write_jsonl(
        tmp_path / "r.jsonl", [{"prompt": "Review:", "responses": ["superb", "good", "okay", "awful"]}]
    )
    model = load_reward_model(ModelSection(name_or_path=str(tiny_model)), tok.pad_token_id)
    rows_seen = []
    model.model.register_forward_hook(lambda mod, args, out: rows_seen.append(out.last_hidden_state.shape[0]))
    batch = collate_pairs(examples_from(ranked, tok), tok.pad_token_id)
    loss, _ = make_compute_loss()(model, batch)
    assert rows_seen == [4]  # one forward pass, one row per response
    assert len(batch["better"]) == 6  # all C(4,2) pairs
    with torch.no_grad():
        r = reward_scores(model, batch).tolist()
    by_hand = sum(nll(r[i] - r[j]) for i, j in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]) / 6
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_scores_are_read_at_the_last_non_pad_token(tiny_model: Path, mixed_examples):
    model = load_reward_model(ModelSection(name_or_path=str(tiny_model)), 0).eval()
    batch = collate_responses(mixed_examples, 0)
    with torch.no_grad():
        ours = reward_scores(model, batch)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        # each row alone, without any padding
        alone = [
            model(input_ids=ids[: n + 1][None]).logits[0, 0]
            for ids, n in zip(batch["input_ids"], batch["last_index"])
        ]
    assert batch["attention_mask"].min() == 0  # the batch really is padded
    torch.testing.assert_close(ours, hf)
    torch.testing.assert_close(ours, torch.stack(alone), rtol=1e-4, atol=1e-5)


def test_lora_keeps_the_score_head_trainable(tiny_model: Path):
    section = ModelSection(name_or_path=str(tiny_model), lora=LoraSection(enabled=True, r=4, alpha=8))
    model = load_reward_model(section, 0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


def test_stage_defaults_are_llama2s_and_the_recipe_wins(tmp_path: Path):
    r = load_recipe(None, {}, [], stage="reward")
    t = r.training
    assert (t.epochs, t.lr, t.scheduler, t.min_lr_ratio, t.warmup_ratio, t.warmup_steps) == (
        1.0,
        1e-5,
        "cosine",
        0.1,
        0.03,
        5,
    )
    assert r.reward.margins["better"] == pytest.approx(0.667) and r.reward.use_margin
    assert load_recipe(None, {}, [], stage="sft").training.min_lr_ratio == 0.0  # other stages untouched
    tiny = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "reward-tiny.yaml")
    assert tiny.training.epochs == 2 and tiny.training.lr == pytest.approx(3e-3)
    with pytest.raises(RecipeError, match="reward.margins.better: expected float"):
        load_recipe(None, {}, ["reward.margins={better: high}"], stage="reward")


# ----------------------------------------------------------------------------- learning


def gaps_by_margin(model_dir: Path, data: Path) -> tuple[float, dict[float, float]]:
    """(accuracy, mean r_c - r_r per margin bucket) of a saved reward model, loaded with plain HF."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    records = load_records(str(data))
    rewards = score_records(model, tok, records, max_length=128)
    buckets: dict[float, list[float]] = {}
    for rec, (rc, rr) in zip(records, rewards):
        buckets.setdefault(round(rec.fields["margin"], 2), []).append(rc - rr)
    accuracy = sum(g > 0 for v in buckets.values() for g in v) / len(records)
    return accuracy, {m: sum(v) / len(v) for m, v in sorted(buckets.items())}


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("reward")
    lines = (EXAMPLES / "prefs.jsonl").read_text().splitlines(keepends=True)
    train, held = root / "train.jsonl", root / "held.jsonl"
    train.write_text("".join(lines[:500]))
    held.write_text("".join(lines[500:]))
    sets = [
        f"data.eval={held}",
        "data.max_length=128",
        "training.epochs=2",
        "training.lr=3e-3",
        "training.micro_batch_size=16",
        "training.eval_every=16",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_RUNS_DIR", str(root / "runs"))
        summary = run_reward(
            make_recipe("reward", tiny_model, train, root / "run", sets), console=quiet_console()
        )
    return {"summary": summary, "run": root / "run", "held": held, "start": tiny_model}


def test_reward_model_learns_the_rule_on_held_out_pairs(trained: dict):
    summary, run = trained["summary"], trained["run"]
    start_model = trained["run"].parent / "start"
    # the starting point: the tiny LM with a fresh (seeded) head, saved to score it the same way
    tok = AutoTokenizer.from_pretrained(trained["start"])
    torch.manual_seed(0)
    load_reward_model(ModelSection(name_or_path=str(trained["start"])), 0).save_pretrained(start_model)
    tok.save_pretrained(start_model)
    before, _ = gaps_by_margin(start_model, trained["held"])
    after, gaps = gaps_by_margin(run / "final", trained["held"])
    print(f"held-out accuracy {before:.3f} -> {after:.3f}; mean reward gap by margin {gaps}")
    assert before < 0.7 and after > 0.85, (before, after)
    # the model loaded back with plain from_pretrained reproduces the run's final eval
    assert after == pytest.approx(summary["eval/accuracy"], abs=1e-9)
    assert summary["eval/reward_std"] > 0 and summary["last_loss"] < 0.5 * summary["first_loss"]
    # stronger preferences end with larger reward gaps
    assert gaps[1.0] > gaps[0.67] > gaps[0.0] and gaps[1.0] > gaps[0.33] > gaps[0.0], gaps
    evals = [r["eval/accuracy"] for r in metric_rows(run) if "eval/accuracy" in r]
    assert len(evals) >= 3 and all(0 <= a <= 1 for a in evals)


def test_score_command_writes_every_record_with_its_reward(trained: dict, tmp_path: Path):
    out = tmp_path / "scored.jsonl"
    final = str(trained["run"] / "final")
    result = runner.invoke(
        app,
        ["reward", "score", "-m", final, "-d", str(trained["held"]), "-o", str(out)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 100 and all({"prompt", "reward_chosen", "reward_rejected"} <= set(r) for r in rows)
    accuracy = sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(trained["summary"]["eval/accuracy"])
    ranked, out2 = EXAMPLES / "ranked.jsonl", tmp_path / "ranked.jsonl"
    result = runner.invoke(app, ["reward", "score", "-m", final, "-d", str(ranked), "-o", str(out2)])
    assert result.exit_code == 0, result.output
    for line, scored in zip(ranked.read_text().splitlines(), out2.read_text().splitlines()):
        record, scored = json.loads(line), json.loads(scored)
        assert len(scored["rewards"]) == len(record["responses"]) >= 3


def test_default_model_is_the_last_sft_output(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    data = EXAMPLES / "prefs.jsonl"
    recipe = make_recipe("reward", "", data, tmp_path / "a", ["model.name_or_path=null"])
    with pytest.raises(RecipeError, match="run `align sft` first"):
        run_reward(recipe, console=quiet_console())
    assert not (tmp_path / "a").exists()
    record_output("sft", tiny_model)
    recipe = make_recipe(
        "reward", "", data, tmp_path / "b", ["model.name_or_path=null", "training.max_steps=1"]
    )
    run_reward(recipe, console=quiet_console())
    saved = load_recipe(tmp_path / "b" / "recipe.yaml")
    assert Path(saved.model.name_or_path).resolve() == tiny_model.resolve()
    assert (tmp_path / "b" / "final" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- bad input

GOOD = {"prompt": "p", "chosen": "good", "rejected": "bad"}
BAD_INPUT = {
    "chosen_equals_rejected": ([GOOD, {"prompt": "p", "chosen": "x", "rejected": "x"}], 2, "identical"),
    "empty_response": ([GOOD, GOOD, {"prompt": "p", "chosen": " ", "rejected": "b"}], 3, "chosen: empty"),
    "one_ranked_response": (
        [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["a"]}],
        2,
        "at least 2 responses",
    ),
    "non_numeric_margin": ([GOOD, {**GOOD, "margin": "big"}], 2, "margin: expected a number"),
    "unknown_rating": ([{**GOOD, "rating": "better"}, {**GOOD, "rating": "meh"}], 2, "'meh' is not in"),
    "tied_scores": ([{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 2]}], 1, "tied scores"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_refused_with_file_and_line(case: str, tmp_path: Path, tiny_model: Path, runs_dir: Path):
    rows, line, fragment = BAD_INPUT[case]
    data = write_jsonl(tmp_path / f"{case}.jsonl", rows)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["reward", "-m", str(tiny_model), "-d", str(data), "-o", str(out)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"{data}:{line}" in flat and fragment in flat, result.output
    assert not out.exists() and not runs_dir.exists()  # refused before any run directory was made


def test_record_margins_collects_every_problem(tmp_path: Path):
    data = write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "rating": "meh"}, GOOD, {**GOOD, "margin": -1}])
    with pytest.raises(DataError) as info:
        record_margins(load_records(str(data)), RewardSection())
    assert f"{data}:1: rating" in str(info.value) and f"{data}:3: margin: must be >= 0" in str(info.value)
