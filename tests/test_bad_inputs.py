"""Bad inputs (tests/data/bad/): every malformed file is refused with its file and line before any run
directory exists, or, where the recipe allows drops, trained without the bad records and counted. Never
a traceback, a NaN or silence. Every run's summary shows read = kept + dropped (by reason)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.data.formats import SFT_KINDS, DataError, load_records
from align_cli.data.prompts import fit_prompts, load_prompts, prompt_room
from align_cli.models import load_tokenizer
from align_cli.recipe import ModelSection
from align_cli.stages.dpo import prepare_dpo_data
from align_cli.stages.reward import prepare_reward_data
from align_cli.stages.sft import prepare_sft_data
from tests.helpers import make_recipe

runner = CliRunner()
BAD = Path(__file__).parent / "data" / "bad"
PAIRS = ("reward", "dpo")
PROMPTS = ("ppo", "rejection-sample")

# file -> (commands that must refuse it, line named in the error (None: the file), words of the error)
REFUSED = {
    "sft_alpaca_broken_json.jsonl": (("sft",), 3, "malformed JSON"),
    "sft_alpaca_wrong_type.jsonl": (("sft",), 2, "output: expected a string, got int"),
    "sft_alpaca_missing_output.jsonl": (("sft",), 2, "output: missing"),
    "sft_alpaca_whitespace_output.jsonl": (("sft",), 2, "output: empty"),
    "sft_not_an_object.jsonl": (("sft",), 2, "expected a JSON object, got list"),
    "sft_prompt_completion_empty.jsonl": (("sft",), 2, "completion: empty"),
    "sft_prompt_completion_null_prompt.jsonl": (("sft",), 2, "prompt: missing"),
    "sft_messages_invalid_role.jsonl": (("sft",), 2, "'bot' is not one of system, user, assistant"),
    "sft_messages_wrong_order.jsonl": (("sft",), 2, "two user messages in a row"),
    "sft_messages_system_late.jsonl": (("sft",), 2, "a system message may only come first"),
    "sft_messages_ends_with_user.jsonl": (("sft",), 2, "must end with an assistant message"),
    "sft_messages_content_not_string.jsonl": (("sft",), 2, "content: expected a string, got dict"),
    "sft_text_blank.jsonl": (("sft",), 2, "text: empty"),
    "sft_mixed_kinds.jsonl": (("sft",), 2, "instruction: missing"),
    "sft_unknown_fields.jsonl": (("sft",), 1, "cannot tell the record kind"),
    "sft_deep_nesting.jsonl": (("sft",), 2, "nested too deeply"),
    "sft_non_utf8.jsonl": (("sft",), 2, "not valid UTF-8"),
    "sft_empty.jsonl": (("sft", "ppo"), None, "no records (the file is empty"),
    "sft_blank_lines.jsonl": (("sft", "dpo"), None, "no records (the file is empty or only blank lines)"),
    "pref_margin_nan.jsonl": (PAIRS, 2, "NaN is not a JSON number"),
    "pref_margin_wrong_type.jsonl": (PAIRS, 2, "margin: expected a number"),
    "pref_negative_margin.jsonl": (("reward",), 2, "margin: must be >= 0"),
    "pref_unknown_rating.jsonl": (("reward",), 2, "rating: 'meh' is not in reward.margins"),
    "pref_chosen_equals_rejected.jsonl": (PAIRS, 2, "chosen: identical to rejected"),
    "pref_missing_rejected.jsonl": (PAIRS, 2, "rejected: missing"),
    "pref_empty_chosen.jsonl": (PAIRS, 2, "chosen: empty response"),
    "pref_hh_identical_conversations.jsonl": (PAIRS, 2, "chosen: identical to rejected"),
    "pref_hh_bad_order.jsonl": (PAIRS, 2, "the first non-system message must be from the user"),
    "pref_non_utf8.jsonl": (PAIRS, 2, "not valid UTF-8"),
    "ranked_one_response.jsonl": (PAIRS, 2, "at least 2 responses"),
    "ranked_scores_mismatch.jsonl": (PAIRS, 2, "scores: expected one number per response"),
    "ranked_duplicate_responses.jsonl": (PAIRS, 2, "two responses are identical"),
    "ranked_tied_scores.jsonl": (PAIRS, 2, "tied scores"),
    "ranked_score_overflow.jsonl": (PAIRS, 2, "number 1e999 is out of range"),
    "prompts_missing_prompt.jsonl": (PROMPTS, 2, "prompt: missing"),
    "prompts_wrong_type.jsonl": (PROMPTS, 2, "prompt: expected a string, got int"),
    "prompts_bad_messages.jsonl": (PROMPTS, 2, "'narrator' is not one of"),
    "prompts_empty.jsonl": (PROMPTS, 2, "prompt: empty"),
}
# file -> what the recipe allows: dropped and counted (tested below, through each stage's data layer)
DROPPED = {
    "sft_prompt_too_long.jsonl": "no_response_tokens_left (truncate) / too_long (drop)",
    "pref_identical_after_truncation.jsonl": "responses_identical_after_truncation (reward, dpo)",
    "prompts_too_long.jsonl": "prompt_too_long (ppo, rejection-sample)",
}


def stage_args(command: str, data: Path, model: Path, out: Path) -> list[str]:
    if command in PROMPTS:  # prompts are read before any model is loaded
        return [
            command,
            "-m",
            str(model),
            "--reward-model",
            str(model),
            "--prompts",
            str(data),
            "-o",
            str(out),
        ]
    return [command, "-m", str(model), "-d", str(data), "-o", str(out)]


def test_the_corpus_covers_every_file_and_every_record_kind():
    files = {p.name for p in BAD.glob("*.jsonl")}
    assert files == set(REFUSED) | set(DROPPED)
    assert len(files) >= 25
    for prefix in ("sft_alpaca", "sft_prompt_completion", "sft_messages", "sft_text", "pref_", "ranked_"):
        assert any(name.startswith(prefix) for name in files), prefix
    assert any(name.startswith("prompts_") for name in files)


@pytest.mark.parametrize(
    "name,command", [(name, command) for name, (cmds, _, _) in sorted(REFUSED.items()) for command in cmds]
)
def test_bad_file_is_refused_naming_file_and_line(
    name: str, command: str, tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    _, line, words = REFUSED[name]
    out = tmp_path / "run"
    result = runner.invoke(app, stage_args(command, BAD / name, tiny_model, out), env={"COLUMNS": "400"})
    flat = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception escaping the CLI
    assert "Traceback" not in result.output
    where = f"{BAD / name}:{line}:" if line else str(BAD / name)
    assert where in flat and words in flat, flat
    assert not out.exists()  # refused before any run directory was made


def huge_line_file(path: Path, megabytes: int) -> Path:
    good = json.dumps({"instruction": "Say hi.", "output": "hi"}).encode()
    with path.open("wb") as handle:
        handle.write(good + b"\n" + b'{"instruction": "')
        chunk = b"a" * 2**20
        for _ in range(megabytes):
            handle.write(chunk)
        handle.write(b'", "output": "b"}\n' + good + b"\n")
    return path


def test_a_100_mb_line_is_refused_without_reading_it_into_memory(
    tmp_path: Path, tiny_model: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    path = huge_line_file(tmp_path / "huge.jsonl", 100)  # made at run time, never committed
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as refused:
            load_records(str(path), "auto", SFT_KINDS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{path}:2: line is 100.0 MB; lines over 10 MB are refused (set ALIGN_MAX_LINE_MB" in str(
        refused.value
    )
    assert peak < 32 * 2**20, peak  # at most about the limit is held, never the 100 MB line
    result = runner.invoke(app, stage_args("sft", path, tiny_model, tmp_path / "run"), env={"COLUMNS": "400"})
    assert result.exit_code == 2 and f"{path}:2: line is 100.0 MB" in " ".join(result.output.split())
    # the limit is configurable both ways
    small = huge_line_file(tmp_path / "small.jsonl", 1)
    assert len(load_records(str(small), "auto", SFT_KINDS)) == 3
    monkeypatch.setenv("ALIGN_MAX_LINE_MB", "0.5")
    with pytest.raises(DataError, match=r"small.jsonl:2: line is 1.0 MB; lines over 0.5 MB"):
        load_records(str(small), "auto", SFT_KINDS)


def test_drops_are_counted_by_reason_in_every_data_layer(tiny_model: Path, tmp_path: Path):
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny_model)))

    def recipe(stage: str, data: str, *sets: str):
        return make_recipe(stage, tiny_model, BAD / data, tmp_path / "unused", ["data.max_length=64", *sets])

    _, _, stats = prepare_sft_data(recipe("sft", "sft_prompt_too_long.jsonl"), tok)
    assert stats["train"].as_dict() == {
        "read": 5,
        "kept": 3,
        "truncated": 0,
        "dropped": {"no_response_tokens_left": 2},  # prompts that fill max_length: nothing left to learn
    }
    _, _, stats = prepare_sft_data(recipe("sft", "sft_prompt_too_long.jsonl", "data.on_too_long=drop"), tok)
    assert stats["train"].dropped == {"too_long": 2} and stats["train"].kept == 3
    _, _, stats = prepare_reward_data(recipe("reward", "pref_identical_after_truncation.jsonl"), tok)
    assert stats["train"].as_dict() == {
        "read": 3,
        "kept": 2,
        "truncated": 0,  # counted among the kept; the cut pair is a drop
        "dropped": {"responses_identical_after_truncation": 1},
    }
    _, _, stats = prepare_dpo_data(recipe("dpo", "pref_identical_after_truncation.jsonl"), tok)
    assert stats["train"].dropped == {"responses_identical_after_truncation": 1} and stats["train"].kept == 2
    prompts = load_prompts(str(BAD / "prompts_too_long.jsonl"))
    kept, stats = fit_prompts(prompts, tok, "auto", 64 - 8)
    assert len(kept) == 2 and stats.dropped == {"prompt_too_long": 1} and stats.read == 3
    kept, stats = fit_prompts(prompts, tok, "auto", 64 - 8, limit=1)
    assert len(kept) == 1 and stats.dropped == {"prompt_too_long": 1, "beyond_max_prompts": 1}
    with pytest.raises(DataError, match="no prompt fits in 4 tokens"):
        fit_prompts(prompts, tok, "auto", 4)
    # PPO and rejection sampling read data.max_prompt_length: a prompt longer than it is dropped too
    assert prompt_room(64, 8) == 56 and prompt_room(64, 8, max_prompt_length=20) == 20
    assert prompt_room(64, 50, max_prompt_length=20) == 14
    longest = max(len(p.ids("auto", tok)) for p in prompts)
    kept, stats = fit_prompts(prompts, tok, "auto", prompt_room(1024, 8, max_prompt_length=longest - 1))
    assert stats.dropped["prompt_too_long"] >= 1 and len(kept) + stats.dropped["prompt_too_long"] == 3


def accounted(summary_data: dict) -> None:
    for split, stats in summary_data.items():
        assert stats["read"] == stats["kept"] + sum(stats["dropped"].values()), (split, stats)


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_every_training_summary_accounts_for_every_record(
    stage: str, tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    data = {"sft": "sft_prompt_too_long.jsonl"}.get(stage, "pref_identical_after_truncation.jsonl")
    out = tmp_path / "run"
    args = [
        *stage_args(stage, BAD / data, tiny_model, out),
        "--max-steps",
        "1",
        "--set",
        "data.max_length=64",
    ]
    result = runner.invoke(app, [*args, "--set", "training.micro_batch_size=2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    accounted(summary["data"])
    reason, n = (
        ("no_response_tokens_left", 2) if stage == "sft" else ("responses_identical_after_truncation", 1)
    )
    assert summary["data"]["train"]["dropped"] == {reason: n}
    flat = " ".join(result.output.split())
    assert f"examples (train) │ {summary['data']['train']['read']} read" in flat  # the summary table
    assert f"dropped: {n} {reason}" in flat


@pytest.mark.parametrize("stage", PROMPTS)
def test_prompt_stages_account_for_every_prompt(stage: str, review_models, tmp_path: Path, runs_dir: Path):
    out = tmp_path / "run"
    args = [stage, "-m", str(review_models["sft"]), "--reward-model", str(review_models["reward"])]
    args += ["--prompts", str(BAD / "prompts_too_long.jsonl"), "-o", str(out), "--set", "data.max_length=64"]
    if stage == "ppo":
        args += ["--max-steps", "1", "--set", "ppo.rollout_batch_size=2", "--set", "ppo.mini_batch_size=2"]
        args += ["--set", "ppo.ppo_epochs=1", "--set", "ppo.max_new_tokens=4", "--set", "ppo.log_samples=0"]
        expected = {"read": 3, "kept": 2, "truncated": 0, "dropped": {"prompt_too_long": 1}}
    else:
        args += ["--n", "2", "--set", "rejection.max_new_tokens=4", "--set", "rejection.max_prompts=1"]
        dropped = {"prompt_too_long": 1, "beyond_max_prompts": 1}
        expected = {"read": 3, "kept": 1, "truncated": 0, "dropped": dropped}
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["prompts"] == expected
    accounted(summary["data"])
    assert f"{expected['read']} read, {expected['kept']} kept" in " ".join(result.output.split())
