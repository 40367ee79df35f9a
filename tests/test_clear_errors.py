"""Issue 15, items 9, 10, 11, 14, 16 and 17: every number of a recipe is checked where it is declared,
before any run folder exists; duplicate JSON keys and YAML alias bombs are refused; a scoring that
scores nothing, bad YAML, corrupt bookkeeping files, a pickled adapter and a ground-truth function that
raises or returns a non-number are one clear line (exit code 2, no traceback); a non-finite loss names
its records and the recipe keys behind it; code named in a recipe is documented as code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.data.formats import DataError, load_records
from align_cli.data.prompts import Prompt, load_prompts
from align_cli.engine.nonfinite import NonFiniteError
from align_cli.evaluate import load_reward_fn
from align_cli.pipeline import _final_of, load_pipeline
from align_cli.recipe import RecipeError, load_recipe
from align_cli.runs import last_output, record_output
from tests.conftest import EXAMPLES, ROOT

runner = CliRunner()


def cli(args: list[str]) -> tuple[int, str]:
    """Exit code and output (whitespace folded) of the CLI run in-process; an uncaught exception (a
    traceback for a user) gives exit code 1."""
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


def one_error_line(args: list[str]) -> str:
    """The CLI's error: exit code 2 and one line, the last, starting with "error:"."""
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: "), result.output
    return lines[-1]


# ----------------------------------------------------------------------------- item 9: numbers


BAD_NUMBERS = {  # --set value -> the problem named
    "training.lr=0": "training.lr: must be > 0, got 0.0",
    "training.epochs=.inf": "training.epochs: must be a finite number > 0, got inf",
    "training.max_grad_norm=0": "training.max_grad_norm: must be > 0 (or null: no clipping), got 0.0",
    "training.weight_decay=-0.1": "training.weight_decay: must be >= 0, got -0.1",
    "training.adam_eps=0": "training.adam_eps: must be > 0, got 0.0",
    "training.adam_betas=[0.9, 1.0]": "training.adam_betas[1]: must be in [0, 1), got 1.0",
    "training.warmup_ratio=1.5": "training.warmup_ratio: must be in [0, 1], got 1.5",
    "training.min_lr_ratio=-0.1": "training.min_lr_ratio: must be in [0, 1], got -0.1",
    "ppo.ppo_epochs=0": "ppo.ppo_epochs: must be > 0, got 0",
    "ppo.rollout_batch_size=0": "ppo.rollout_batch_size: must be > 0, got 0",
    "ppo.cliprange=-1": "ppo.cliprange: must be > 0, got -1.0",
    "rejection.n=0": "rejection.n: must be > 0, got 0",
    "dpo.beta=nan": "dpo.beta: must be a finite number > 0, got nan",
    "dpo.label_smoothing=.nan": "dpo.label_smoothing: must be a finite number in [0, 0.5), got nan",
    "reward.margins={better: .inf}": "reward.margins.better: must be a finite number >= 0, got inf",
}


def test_issue15_item9_every_bad_number_is_named_and_no_run_folder_is_created(tmp_path: Path):
    out = tmp_path / "run"
    # a recipe holds the common sections and its stage's own: each stage's command gets its numbers
    own = {"ppo": "ppo", "rejection-sample": "rejection", "dpo": "dpo", "reward": "reward"}
    for stage, section in {"sft": "training", **own}.items():
        bad = {k: v for k, v in BAD_NUMBERS.items() if k.startswith(section + ".")}
        args = [stage, "-m", "some/model", "-d", str(EXAMPLES / "alpaca.jsonl"), "-o", str(out)]
        code, text = cli(args + [item for s in bad for item in ("--set", s)])
        assert code == 2 and f"recipe: {len(bad)} problem(s)" in text, text
        assert [problem for problem in bad.values() if problem not in text] == []
        assert not out.exists()
    # NaN and inf also come through YAML's .nan and .inf, and relations between keys are checked
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training:\n  lr: .nan\n  adam_eps: -.inf\nppo:\n  mini_batch_size: 32\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert "training.lr: must be a finite number > 0, got nan" in str(info.value)
    assert "training.adam_eps: must be a finite number > 0, got -inf" in str(info.value)
    assert "ppo.mini_batch_size: must be <= ppo.rollout_batch_size (16), got 32" in str(info.value)


def test_issue15_item9_pipeline_recipe_numbers_are_checked(tmp_path: Path):
    path = tmp_path / "pipeline.yaml"
    stage = {"name": "dpo", "stage": "dpo", "sweep": {"key": "dpo.beta", "values": [0.1, float("nan")]}}
    evaluate = {"prompts": "p.jsonl", "n": 0, "max_new_tokens": 0, "best_of_n": [4, 0]}
    path.write_text(yaml.safe_dump({"stages": [stage], "evaluate": evaluate}))
    with pytest.raises(RecipeError) as info:
        load_pipeline(path)
    for problem in (
        "stages[0].sweep.values[1]: must be a finite number, got nan",
        "evaluate.n: must be > 0, got 0",
        "evaluate.max_new_tokens: must be > 0, got 0",
        "evaluate.best_of_n[1]: must be > 0, got 0",
    ):
        assert problem in str(info.value)
    # each stage's own recipe is checked before any stage runs or any folder is made
    stages = [{"name": "sft", "stage": "sft"}, {"name": "dpo", "stage": "dpo", "set": ["dpo.beta=0"]}]
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "stages": stages}))
    code, text = cli(["pipeline", "-r", str(path)])
    assert (
        code == 2
        and f"pipeline recipe {path}: stage dpo: recipe: 1 problem(s): - dpo.beta: must be > 0" in text
    )
    assert not (tmp_path / "out").exists()
    stages[1]["set"] = ["model.name_or_path=@nope"]  # so is every `@name`
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "stages": stages}))
    with pytest.raises(RecipeError, match="stage dpo: @nope: no earlier stage is named 'nope'"):
        load_pipeline(path)


# ----------------------------------------------------------------------------- item 10: records


def test_issue15_item10_duplicate_json_keys_are_refused_naming_file_line_and_key(tmp_path: Path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        '{"prompt": "p", "chosen": "good", "rejected": "bad"}\n'
        '{"prompt": "p", "chosen": "good", "rejected": "bad", "chosen": "fine"}\n'
    )
    with pytest.raises(DataError, match=rf"{prefs}:2: malformed JSON: duplicate key 'chosen'"):
        load_records(str(prefs))
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=rf"{chat}:1: malformed JSON: duplicate key 'role'"):
        load_records(str(chat))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n\n{"prompt": "two", "prompt": "three"}\n')
    with pytest.raises(DataError, match=rf"{prompts}:3: malformed JSON: duplicate key 'prompt'"):
        load_prompts(str(prompts))


def test_issue15_item10_reward_score_that_scores_nothing_fails(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from align_cli.models import load_reward_model, load_tokenizer, save_model
    from align_cli.recipe import ModelSection

    section = ModelSection(name_or_path=str(tiny_model))
    tokenizer = load_tokenizer(section)
    save_model(load_reward_model(section, tokenizer.pad_token_id), tokenizer, tmp_path / "rm")
    data = tmp_path / "pairs.jsonl"
    row = {
        "prompt": "Review the film.",
        "chosen": "The film was a delight",
        "rejected": "The film was a bore",
    }
    data.write_text(json.dumps(row) + "\n" + json.dumps(row | {"prompt": "Review it."}) + "\n")
    scored = tmp_path / "scored.jsonl"
    args = ["reward", "score", "-m", str(tmp_path / "rm"), "-d", str(data), "-o", str(scored)]
    line = one_error_line([*args, "--max-length", "6"])  # both responses cut to the same tokens
    assert f"{data}: none of the 2 record(s) could be scored" in line and "--max-length" in line
    assert not scored.exists()
    code, text = cli(args)
    assert code == 0 and "unscored │ 0" in text and len(scored.read_text().splitlines()) == 2
    monkeypatch.setattr("align_cli.data.readers._read_hub", lambda name, options: [])  # an empty hub split
    with pytest.raises(DataError, match="some/dataset: no records"):
        load_records("some/dataset")


# ----------------------------------------------------------------------------- item 11: YAML bombs


def alias_bomb() -> tuple[str, str]:
    """Billion laughs under `x:`: 8 anchored levels, each a list of 9 aliases of the one before (9**8
    strings once the last is expanded); and the last anchor's name."""
    lines = ['  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for name, previous in zip("bcdefgh", "abcdefg"):
        lines.append(f"  {name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "x:\n" + "\n".join(lines) + "\n", "h"


BOMB_CHECK = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # a bomb that expands fails here, not the host
from align_cli.pipeline import load_pipeline
from align_cli.recipe import RecipeError, load_recipe
recipe, pipeline, override = sys.argv[1:]
results = {}
for name, load in (
    ("recipe", lambda: load_recipe(recipe)),
    ("pipeline", lambda: load_pipeline(pipeline)),
    ("--set", lambda: load_recipe(None, sets=[override])),
):
    started = time.perf_counter()
    try:
        load()
        results[name] = ["loaded", time.perf_counter() - started]
    except RecipeError as exc:
        results[name] = [str(exc), time.perf_counter() - started]
print(json.dumps(results))
"""


def test_issue15_item11_yaml_alias_bombs_are_refused_before_expanding(tmp_path: Path):
    anchors, last = alias_bomb()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(anchors + f"model:\n  lora:\n    target_modules: [{','.join(['*' + last] * 9)}]\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(anchors + f"stages: [{{name: a, stage: sft, set: *{last}}}]\n")
    assert len(recipe.read_bytes()) < 400
    levels = "[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"
    for name, previous in zip("bcdefgh", "abcdefg"):
        levels += f",&{name} [" + ",".join([f"*{previous}"] * 9) + "]"
    override = f"model.lora.target_modules={levels},[*h,*h,*h,*h,*h,*h,*h,*h,*h]]"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", BOMB_CHECK, str(recipe), str(pipeline), override],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    for name, (message, seconds) in results.items():
        assert "values once its YAML aliases (*name) are expanded; refused" in message and seconds < 0.5, (
            name,
            message,
            seconds,
        )
    assert str(recipe) in results["recipe"][0] and str(pipeline) in results["pipeline"][0]
    assert "--set model.lora.target_modules" in results["--set"][0]
    # anchors and aliases used as intended still work
    fine = tmp_path / "fine.yaml"
    fine.write_text("training: &t {lr: 0.001}\nstage: sft\ndata: {eval_fraction: 0.1}\n")
    assert load_recipe(fine).training.lr == 0.001
    fine.write_text("model:\n  lora:\n    target_modules: &m [q_proj, v_proj]\nx_modules: *m\n")
    with pytest.raises(RecipeError, match="x_modules: unknown key"):
        load_recipe(fine)


# ----------------------------------------------------------------------------- item 14: one clear line


def test_issue15_item14_bad_yaml_in_a_pipeline_recipe_or_a_set_value_is_one_line(tmp_path: Path):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("output: runs/x\nstages: [\n  {name: a, stage: sft\n")
    line = one_error_line(["pipeline", "-r", str(bad)])
    assert f"pipeline recipe {bad}:" in line and "not valid YAML" in line
    bad.write_text("- a list, not a mapping\n")
    assert "the top level must be a mapping" in one_error_line(["pipeline", "-r", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text(f"output: {tmp_path / 'out'}\nstages: []\n")
    line = one_error_line(["pipeline", "-r", str(good), "--set", "output=[unclosed"])
    assert "--set output=[unclosed: not valid YAML" in line
    out = tmp_path / "run"
    line = one_error_line(["sft", "-m", "m", "-d", "d.jsonl", "-o", str(out), "--set", "training.lr={1e-3"])
    assert "--set training.lr={1e-3: not valid YAML" in line and not out.exists()


def test_issue15_item14_a_truncated_summary_or_latest_json_is_one_line(tmp_path: Path, runs_dir: Path):
    # runs/latest.json: chaining refuses it with one line, before the run folder exists
    runs_dir.mkdir()
    (runs_dir / "latest.json").write_text('{"sft": "/runs/sf')
    out = tmp_path / "dpo"
    line = one_error_line(["dpo", "-d", str(EXAMPLES / "prefs.jsonl"), "-o", str(out)])
    assert f"{runs_dir / 'latest.json'}: not valid JSON" in line and not out.exists()
    with pytest.raises(Exception, match="latest.json: not valid JSON"):
        last_output("sft")
    # recording a finished run's output is never failed by it: the index is written afresh
    final = tmp_path / "final"
    final.mkdir()
    record_output("sft", final)
    assert last_output("sft") == final.resolve()
    # a pipeline stage's cut-off summary.json: the stage is not finished, so it is resumed or run again
    # (issue 15 item 10), never read as finished nor a crash
    summary = tmp_path / "out" / "01-sft" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text('{"final_model": "/some/wh')
    assert _final_of(summary.parent) is None


class RunsCode:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_issue15_item14_a_pickled_adapter_is_refused(tiny_model: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align_cli.models import ModelError, load_causal_lm
    from align_cli.recipe import ModelSection

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        adapter, safe_serialization=False
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, adapter / name)
    assert (adapter / "adapter_model.bin").is_file()
    with pytest.raises(ModelError, match="adapter_model.bin.*align loads weights only from safetensors"):
        load_causal_lm(ModelSection(name_or_path=str(adapter)))
    marker = tmp_path / "pwned"
    torch.save(RunsCode(marker), adapter / "adapter_model.bin")
    out = tmp_path / "run"
    line = one_error_line(["sft", "-m", str(adapter), "-d", str(EXAMPLES / "alpaca.jsonl"), "-o", str(out)])
    assert "adapter_model.bin" in line and "safetensors" in line and not marker.exists()


def test_issue15_item14_a_ground_truth_that_raises_or_returns_a_non_number_is_one_line(
    tiny_model: Path, tmp_path: Path
):
    code = tmp_path / "gt.py"
    code.write_text(
        "def broken(text):\n    raise KeyError('lexicon')\n\n"
        "def label(text):\n    return 'positive'\n\n"
        "def nan(text):\n    return float('nan')\n\n"
        "def good(text):\n    return len(text) > 3\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Review the film."}\n')
    args = ["eval", "-m", str(tiny_model), "--reference", str(tiny_model), "--prompts", str(prompts)]
    args += ["--n", "1", "--max-new-tokens", "2", "--ground-truth", f"{code}:broken"]
    line = one_error_line(args)
    assert f"ground truth {code}:broken raised KeyError: 'lexicon' on sample " in line
    with pytest.raises(RecipeError, match=rf"ground truth {code}:label returned 'positive' for sample 'a b'"):
        load_reward_fn(f"{code}:label")("a b")
    with pytest.raises(RecipeError, match="returned nan for sample 'x'; expected a finite number"):
        load_reward_fn(f"{code}:nan")("x")
    assert load_reward_fn(f"{code}:good")("long enough") == 1.0
    code.write_text("import no_such_module_here\n")
    with pytest.raises(
        RecipeError, match="cannot load: ModuleNotFoundError: No module named 'no_such_module_here'"
    ):
        load_reward_fn(f"{code}:good")


# ----------------------------------------------------------------------------- item 16: non-finite loss


def test_issue15_item16_a_non_finite_loss_names_its_records_and_recipe_keys(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = ["dpo", "-m", str(tiny_model), "-d", str(EXAMPLES / "prefs.jsonl"), "-o", str(out)]
    sets = [
        "training.lr=1e30",
        "training.max_steps=3",
        "training.micro_batch_size=2",
        "training.save_every=0",
    ]
    sets += ["dpo.reference_cache=false", "data.max_length=64"]
    code, text = cli(args + [item for s in sets for item in ("--set", s)])
    assert code == 2 and "step 2: non-finite loss" in text, text
    assert f"records: {EXAMPLES / 'prefs.jsonl'}:" in text
    assert "recipe keys that can cause it: training.lr=1e+30, training.precision=fp32" in text
    assert "dpo.beta=0.1" in text and "no checkpoint was saved before it" in text


def test_issue15_item16_ppo_names_the_iteration_prompts_and_keys(tmp_path: Path):
    from rich.console import Console

    from align_cli.engine.run import Run
    from align_cli.ppo_core import apply_or_skip

    recipe = load_recipe(None, {}, ["training.lr=0.5"], stage="ppo")
    accelerator = SimpleNamespace(scaler=None, is_main_process=True)
    run = Run("ppo", recipe.training, tmp_path, accelerator, Console(), total=3, unit="iteration")
    prompts = [Prompt("prompts.jsonl:4", "a"), Prompt("prompts.jsonl:9", "b")]
    assert apply_or_skip(run, recipe.ppo, torch.tensor(1.0), 1.0, 2, prompts)
    with pytest.raises(NonFiniteError) as info:
        apply_or_skip(run, recipe.ppo, torch.tensor(float("nan")), 1.0, 2, prompts)
    text = str(info.value)
    assert "ppo iteration 3: non-finite loss" in text
    assert "prompts: prompts.jsonl:4, prompts.jsonl:9" in text
    assert "training.lr=0.5" in text and "ppo.kl_coef=0.05" in text and "ppo.vf_coef=0.1" in text


# ----------------------------------------------------------------------------- item 17: code execution


def test_issue15_item17_code_named_in_a_recipe_is_documented_as_code_execution():
    said = "runs it as Python code"
    commands = (["eval", "--help"], ["frontier", "--help"], ["pipeline", "--help"])
    for command in (*commands, *([stage, "--help"] for stage in ("rejection-sample", "grpo", "rloo"))):
        code, text = cli(command)
        assert code == 0 and said in text, command
    for doc in (ROOT / "README.md", ROOT / "docs" / "reliability.md"):
        assert said in " ".join(doc.read_text().split()), doc
