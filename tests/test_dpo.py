"""DPO on the tiny model: step 1 is log 2 with zero rewards, it learns the preference rule on held-out
pairs, the reference stays put, the reference cache is reused and invalidated correctly, rankings use
Plackett-Luce, truncation is counted, and `align sft` on preferences is Preferred-FT.

The "SFT model" here is the tiny random-init model itself (pi_ref = pi_SFT = the tiny model): DPO
only needs a reference, and the learning test measures what DPO adds on top of it."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.data.formats import load_records
from align_cli.data.preference import tokenize_preferences
from align_cli.data.tokenize import IGNORE_INDEX, tokenize_sft
from align_cli.engine.session import split_holdout
from align_cli.recipe import DPOSection, RecipeError
from align_cli.reference import LiveReference
from align_cli.reference_cache import compute_logps
from align_cli.runs import record_output
from align_cli.stages.dpo import make_collate, make_compute_loss, preference_loss, run_dpo
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, metric_rows, quiet_console, step_losses, weights, write_jsonl

PREFS = EXAMPLES / "prefs.jsonl"
FAST = ["training.max_steps=1", "training.micro_batch_size=8", "training.log_every=1"]


def dpo(model: Path, data: Path, out: Path, sets: list[str]) -> tuple[dict, str]:
    console = quiet_console()
    summary = run_dpo(make_recipe("dpo", model, data, out, sets), console=console)
    return summary, console.file.getvalue()


def step1(run_dir: Path) -> dict:
    return next(r for r in metric_rows(run_dir) if r.get("step") == 1 and "loss" in r)


def test_first_step_policy_equals_reference_for_every_variant(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    """Before the first update pi = pi_ref: h = 0, so every implicit reward is 0 and the loss is the
    variant's value at h = 0. The sweep over variants reuses one cache entry."""
    expected = {
        "dpo.loss_type=sigmoid": math.log(2.0),  # -log sigma(0)
        "dpo.label_smoothing=0.1": math.log(2.0),  # -(0.9 + 0.1) log sigma(0)
        "dpo.loss_type=ipo": 25.0,  # (0 - 1 / (2 * 0.1))^2
        "dpo.loss_type=hinge": 1.0,  # max(0, 1 - 0)
    }
    for i, (variant, loss) in enumerate(expected.items()):
        summary, log = dpo(tiny_model, PREFS, tmp_path / f"r{i}", FAST + [variant])
        row = step1(tmp_path / f"r{i}")
        assert row["loss"] == pytest.approx(loss, abs=1e-3), variant
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert row[key] == pytest.approx(0.0, abs=1e-5), (variant, key)
        assert row["logps/chosen"] < 0 and row["logps/rejected"] < 0
        assert ("cache miss" in log) == (i == 0) and ("cache hit" in log) == (i > 0), log
        assert summary["reference"]["cache"]["train"]["hit"] == (i > 0)


def test_dpo_learns_the_preference_rule_on_held_out_pairs(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    sets = [
        "training.lr=3e-3",
        "training.epochs=2",
        "training.micro_batch_size=16",
        "data.eval_fraction=0.2",
        "training.log_every=1",
    ]
    summary, _ = dpo(tiny_model, PREFS, tmp_path / "run", sets)
    # before: the reference's log-probs of the held-out pairs (from the cache entry, file order)
    ref = json.loads(Path(summary["reference"]["cache"]["train"]["path"]).read_text())["logps"]
    _, held = split_holdout(list(range(len(ref))), 0.2, 42)
    gap_before = sum(ref[i][0] - ref[i][1] for i in held) / len(held)
    ref_order_accuracy = sum(ref[i][0] > ref[i][1] for i in held) / len(held)
    gap_after = summary["eval/logps/chosen"] - summary["eval/logps/rejected"]
    print(f"held-out: reward accuracy {summary['eval/rewards/accuracy']:.3f} (ref log-prob order "
          f"{ref_order_accuracy:.3f}); log-prob gap {gap_before:.2f} -> {gap_after:.2f}")  # fmt: skip
    assert step1(tmp_path / "run")["rewards/accuracy"] == 0.0  # all rewards 0 at the start: no pair ordered
    assert summary["eval/rewards/accuracy"] > 0.85  # chance: 0.5
    assert summary["eval/rewards/margin"] > 1.0
    assert gap_after > gap_before + 10.0, (gap_before, gap_after)
    losses = step_losses(tmp_path / "run")
    assert losses[max(losses)] < 0.3 * losses[1]


def _sha(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_reference_unchanged_every_parameter_changed_and_live_equals_cache(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    sets = ["training.max_steps=3", "training.micro_batch_size=8", "training.lr=1e-3", "training.log_every=1"]
    files_before = _sha(tiny_model)
    summary, _ = dpo(tiny_model, PREFS, tmp_path / "cache", sets)
    live, _ = dpo(tiny_model, PREFS, tmp_path / "live", sets + ["dpo.reference_cache=false"])
    assert summary["reference"]["mode"] == "cache" and live["reference"]["mode"] == "live (second model)"
    assert _sha(tiny_model) == files_before  # the reference's files are bit-identical
    # the reference log-probs, recomputed from the reference after training, are bit-identical to the cache
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples, _ = tokenize_preferences(load_records(str(PREFS)), tok, "auto", 512)
    fresh = compute_logps(AutoModelForCausalLM.from_pretrained(tiny_model), examples, tok.pad_token_id, 16)
    assert fresh == json.loads(Path(summary["reference"]["cache"]["train"]["path"]).read_text())["logps"]
    start, trained = weights(tiny_model), weights(tmp_path / "cache" / "final")
    unchanged = [k for k in start if torch.equal(start[k], trained[k])]
    assert not unchanged, unchanged
    # a live reference model gives the same training as the cached log-probs
    assert step_losses(tmp_path / "live") == pytest.approx(step_losses(tmp_path / "cache"), rel=1e-4)


def test_lora_reference_is_the_base_model_with_adapters_disabled(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    sets = [
        "training.max_steps=3",
        "training.micro_batch_size=8",
        "training.lr=1e-2",
        "training.log_every=1",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "model.lora.dropout=0.0",
    ]
    live, _ = dpo(tiny_model, PREFS, tmp_path / "live", sets + ["dpo.reference_cache=false"])
    cached, _ = dpo(tiny_model, PREFS, tmp_path / "cache", sets)
    assert live["reference"]["mode"] == "live (base model, adapters disabled)"  # no second copy
    assert step1(tmp_path / "live")["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert step_losses(tmp_path / "live") == pytest.approx(step_losses(tmp_path / "cache"), rel=1e-4)
    adapter = load_file(str(tmp_path / "live" / "final" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # every B started at 0 and moved


def test_cache_reused_on_the_same_data_and_invalidated_by_data_or_max_length(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    fewer = write_jsonl(
        tmp_path / "fewer.jsonl", [json.loads(x) for x in PREFS.read_text().splitlines()[:-1]]
    )
    runs = [
        ("first", PREFS, [], "miss"),
        ("same data again", PREFS, ["dpo.beta=0.5", "training.lr=1e-4"], "hit"),
        ("one record fewer", fewer, [], "miss"),
        ("max_length changed", PREFS, ["data.max_length=200"], "miss"),
        ("max_prompt_length changed", PREFS, ["data.max_prompt_length=100"], "miss"),
    ]
    keys = []
    for i, (what, data, extra, outcome) in enumerate(runs):
        summary, log = dpo(tiny_model, data, tmp_path / f"r{i}", FAST + extra)
        assert f"cache {outcome}" in log, (what, log)
        keys.append(summary["reference"]["cache"]["train"]["key"])
    assert len(set(keys)) == 4 and keys[0] == keys[1]
    assert len(list((runs_dir / ".align_cache" / "reference-logps").glob("*.json"))) == 4


def test_rankings_use_plackett_luce(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    rows = [json.loads(x) for x in (EXAMPLES / "ranked.jsonl").read_text().splitlines()]
    k3 = write_jsonl(tmp_path / "k3.jsonl", [r for r in rows if len(r["responses"]) == 3])
    dpo(tiny_model, k3, tmp_path / "k3", FAST)
    # pi = pi_ref: every r_hat = 0, loss = -sum_k log(1 / (K - k + 1)) = log K! = log 6
    assert step1(tmp_path / "k3")["loss"] == pytest.approx(math.log(6.0), abs=1e-4)
    sets = ["training.lr=3e-3", "training.epochs=3", "training.micro_batch_size=8", "data.eval_fraction=0.2"]
    summary, _ = dpo(tiny_model, EXAMPLES / "ranked.jsonl", tmp_path / "all", sets)
    assert summary["eval/rewards/accuracy"] > 0.75  # share of correctly ordered pairs within a ranking
    with pytest.raises(RecipeError, match="Plackett-Luce"):
        dpo(tiny_model, k3, tmp_path / "ipo", FAST + ["dpo.loss_type=ipo"])
    assert not (tmp_path / "ipo").exists()  # refused before any run directory exists


def test_truncation_is_counted_and_pairs_left_identical_are_dropped(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    shared = " ".join(["the film was"] * 8)
    rows = [
        {"prompt": "Review: " * 30, "chosen": f"{shared} great", "rejected": f"{shared} awful"},  # cut alike
        {"prompt": "Review: " * 30, "chosen": "great", "rejected": "awful"},  # prompt cut only
        {"prompt": "Review:", "chosen": "lovely film", "rejected": "dull film"},  # fits
    ] * 4
    data = write_jsonl(tmp_path / "cut.jsonl", rows)
    sets = FAST + ["data.max_length=24", "data.max_prompt_length=12"]
    summary, _ = dpo(tiny_model, data, tmp_path / "run", sets)
    stats = summary["data"]["train"]
    assert stats["dropped"] == {"responses_identical_after_truncation": 4}
    assert stats["kept"] == 8 and stats["truncated"] == 4
    assert math.isfinite(step1(tmp_path / "run")["loss"])


def test_cli_chains_from_the_last_sft_output_or_says_how_to_get_one(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    runner = CliRunner()
    result = runner.invoke(app, ["dpo", "--data", str(PREFS)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "align sft" in result.output, result.output
    record_output("sft", tiny_model)
    out = tmp_path / "chained"
    result = runner.invoke(app, ["dpo", "--data", str(PREFS), "--max-steps", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "final" / "model.safetensors").exists()
    assert str(tiny_model.resolve()) in (out / "recipe.yaml").read_text()  # policy = reference = last sft


def test_sft_on_preferences_is_preferred_ft(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    records = load_records(str(PREFS))[:5]
    examples, stats = tokenize_sft(records, tok, "auto", 256, "truncate")
    assert stats.kept == 5
    for record, e in zip(records, examples):
        trained = [t for t, label in zip(e["input_ids"], e["labels"]) if label != IGNORE_INDEX]
        assert trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]) == record.fields["chosen"]  # chosen only, prompt masked
        assert tok.decode(e["input_ids"][1 : e["labels"].index(trained[0])]) == record.fields["prompt"]
    sets = ["training.max_steps=2", "training.micro_batch_size=8"]
    summary = run_sft(make_recipe("sft", tiny_model, PREFS, tmp_path / "pft", sets), console=quiet_console())
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])


def test_resume_is_exact_and_reuses_the_cache(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    sets = [
        "training.max_steps=4",
        "training.save_every=2",
        "training.micro_batch_size=8",
        "training.lr=1e-3",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    dpo(tiny_model, PREFS, straight, sets + ["training.log_every=1"])
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-0000002", resumed / "checkpoint-0000002")
    lines = (straight / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    console = quiet_console()
    run_dpo(make_recipe("dpo", tiny_model, PREFS, resumed, sets + ["training.log_every=1"]), True, console)
    assert "cache hit" in console.file.getvalue()
    assert step_losses(resumed) == pytest.approx(step_losses(straight), rel=0, abs=1e-6)
    a, b = weights(straight / "final"), weights(resumed / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_ipo_uses_per_token_logps_with_cached_or_live_reference(tiny_model: Path):
    """IPO divides each response's summed log-probs, policy and reference, by its number of tokens; the
    cached reference log-probs (sums, in the batch) and a live reference get the same normalisation."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples, _ = tokenize_preferences(load_records(str(PREFS)), tok, "auto", 512)
    examples = examples[:6]
    assert len({len(r) for e in examples for r in e["responses"]}) > 1  # lengths differ: sums != means
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy a little away from the reference, so h != 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pad = tok.pad_token_id
    ref, pol = compute_logps(reference, examples, pad, 16), compute_logps(policy, examples, pad, 16)
    beta = 0.1
    by_hand = 0.0
    for e, p, r in zip(examples, pol, ref):
        n_w, n_l = len(e["responses"][0]), len(e["responses"][1])
        h = (p[0] - r[0]) / n_w - (p[1] - r[1]) / n_l
        by_hand += (h - 1 / (2 * beta)) ** 2
    summed_h = [(p[0] - r[0]) - (p[1] - r[1]) for p, r in zip(pol, ref)]
    assert by_hand != pytest.approx(sum((h - 1 / (2 * beta)) ** 2 for h in summed_h), rel=1e-3)

    cfg = DPOSection(beta=beta, loss_type="ipo")
    for e, values in zip(examples, ref):
        e["ref_logps"] = values
    batch = make_collate(pad)(examples)
    cached, _ = make_compute_loss(cfg)(policy, batch)
    live_ref = LiveReference(SimpleNamespace(autocast=nullcontext), reference)
    live, _ = make_compute_loss(cfg, live_ref)(policy, {k: v for k, v in batch.items() if k != "ref_logps"})
    assert cached.item() == pytest.approx(by_hand, rel=1e-5)
    assert live.item() == pytest.approx(by_hand, rel=1e-5)


def test_preference_loss_on_a_mixed_batch_by_hand():
    """Rows grouped by example, best first: a K=3 ranking and a pair in one batch -> Plackett-Luce, whose
    pair row is sigmoid DPO; metrics are sums over the 2 records."""
    beta = 0.5
    batch = {"group": torch.tensor([0, 0, 0, 1, 1]), "rank": torch.tensor([0, 1, 2, 0, 1]), "units": 2}
    policy = torch.tensor([-1.0, -2.0, -4.0, -3.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -2.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    loss, metrics = preference_loss(policy, ref, batch, DPOSection(beta=beta))
    r = [0.5, 0.0, -1.0]  # beta * (policy - ref) of the ranking
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    ranking = -((r[0] - lse(r)) + (r[1] - lse(r[1:])))
    pair = math.log(1 + math.exp(-(-0.5 - 0.5)))  # -log sigma(r_w - r_l), r = [-0.5, 0.5]
    assert loss.item() == pytest.approx(ranking + pair)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 - 0.5)
    assert metrics["rewards/rejected"].item() == pytest.approx((0.0 - 1.0) / 2 + 0.5)
    assert metrics["rewards/accuracy"].item() == pytest.approx(1.0 + 0.0)  # 3 of 3 ordered; 0 of 1
    assert metrics["logps/rejected"].item() == pytest.approx(-3.0 - 1.0)
