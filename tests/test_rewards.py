"""Issue 18, item 1: reward sources. Python reward functions in TRL's GRPO convention (prompts,
completions and every other prompt column as keyword lists; None = not applicable; weighted nansum),
a reward model beside them, one-line errors naming the function and the sample, the recipe fields and
their validation, and rejection sampling scored by a function alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align_cli.data.prompts import Prompt, load_prompts
from align_cli.data.readers import ReadOptions
from align_cli.recipe import RecipeError, load_recipe
from align_cli.rewards import RewardFunction, RewardSource, load_function, load_reward_source
from align_cli.runs import record_output
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import load_example_module, quiet_console, write_jsonl

VERIFIABLE = ROOT / "examples" / "verifiable"
PARITY = f"{VERIFIABLE / 'rewards.py'}:right_parity"
make_prompts = load_example_module(VERIFIABLE / "make_prompts.py", "verifiable_make_prompts")
right_parity = load_example_module(VERIFIABLE / "rewards.py", "verifiable_rewards").right_parity


def fn(f, spec: str | None = None) -> RewardFunction:
    return RewardFunction(spec or f"test.py:{f.__name__}", f)


def prompts(*rows: tuple[str, dict]) -> list[Prompt]:
    return [Prompt(f"p.jsonl:{i + 1}", text, columns=cols) for i, (text, cols) in enumerate(rows)]


# ----------------------------------------------------------------------------- loading code


def test_load_function_from_a_file_or_a_module_and_only_the_file_named(tmp_path: Path, monkeypatch):
    code = tmp_path / "json.py"  # a name that would shadow a real module if it were registered as such
    code.write_text(  # a dataclass needs its module in sys.modules while the file runs
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass Box:\n"
        "    n: int\n\ndef length(prompts, completions, **kwargs):\n"
        "    return [Box(len(c)).n for c in completions]\n"
    )
    (tmp_path / "__init__.py").write_text("raise RuntimeError('the folder was imported')\n")
    f = load_function(f"{code}:length")
    assert f(prompts=["p"], completions=["abc"]) == [3]
    assert sys.modules["json"].__file__ != str(code) and str(tmp_path) not in sys.path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards_mod.py").write_text("def one(**kwargs):\n    return [1.0]\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert load_function("my_rewards_mod:one")() == [1.0]


def test_loader_errors_name_the_spec(tmp_path: Path):
    code = tmp_path / "r.py"
    code.write_text("x = 3\n\ndef f(**kwargs):\n    return []\n")
    cases = {
        "r.py": "expected module:function or file.py:function",
        f"{tmp_path / 'missing.py'}:f": "no such file",
        f"{code}:g": "has no function 'g'",
        f"{code}:x": "x is not a function",
        "no_such_package_here.sub:f": "cannot load: ModuleNotFoundError: No module named 'no_such_package",
    }
    for spec, problem in cases.items():
        with pytest.raises(RecipeError) as caught:
            load_function(spec)
        assert str(caught.value).startswith(f"reward function {spec!r}: ") and problem in str(caught.value)
    code.write_text("import no_such_module_here\n")
    with pytest.raises(RecipeError, match=r"r.py:f'.*cannot load: ModuleNotFoundError"):
        load_function(f"{code}:f")


# ----------------------------------------------------------------------------- TRL's calling convention


def test_functions_get_prompts_completions_and_every_column_as_keyword_lists():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [0.0] * len(completions)

    chat = [{"role": "user", "content": "Add 2 and 2."}]
    batch = [
        Prompt("p.jsonl:1", "Write an even number:", columns={"parity": "even", "answer": 4}),
        Prompt("p.jsonl:2", chat, columns={"answer": "4"}),
    ]
    RewardSource([fn(spy)])(batch, ["12", "4"], [True, False])
    assert seen == {
        "prompts": ["Write an even number:", chat],
        # a chat prompt's completion is an assistant message, as TRL gives conversational data
        "completions": ["12", [{"role": "assistant", "content": "4"}]],
        "parity": ["even", None],  # a row without the column: None
        "answer": [4, "4"],
    }


def test_weights_sum_the_sources_that_apply_and_none_means_not_applicable():
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def only_even(completions, parity, **kwargs):
        return [None if p is None else float(c.isdigit()) for c, p in zip(completions, parity)]

    batch = prompts(("a", {"parity": "even"}), ("b", {}))
    source = RewardSource([fn(length), fn(only_even)], weights=[0.5, 2.0])
    rewards = source(batch, ["12", "xyz"], [True, True])
    assert rewards.total == [0.5 * 2 + 2.0 * 1.0, 0.5 * 3]  # the second: only `length` applies
    assert rewards.by_source == {"length": [2.0, 3.0], "only_even": [1.0, None]}
    assert rewards.means() == {
        "reward/length": 2.5,
        "reward/only_even": 1.0,
    }  # over the samples it applied to
    assert RewardSource([fn(length)])(batch, ["12", "xyz"], [True, True]).total == [2.0, 3.0]  # default 1
    with pytest.raises(RecipeError, match=r"reward weights: 1 given for 2 source\(s\) \(length, only_even\)"):
        RewardSource([fn(length), fn(only_even)], weights=[1.0])


def test_a_sample_no_source_applies_to_stops_the_run_naming_it():
    def never(completions, **kwargs):
        return [None] * len(completions)

    def first_only(completions, **kwargs):
        return [1.0] + [None] * (len(completions) - 1)

    batch = prompts(("a", {}), ("b", {}))
    with pytest.raises(RecipeError) as caught:
        RewardSource([fn(never), fn(first_only)])(batch, ["x", "y"], [True, True])
    assert str(caught.value) == (
        "no reward for the sample of p.jsonl:2 (completion 'y'): every reward function returned None "
        "(test.py:never, test.py:first_only); a sample needs at least one source that applies to it"
    )


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [1.0, 2.0]", "returned 2 values for 3 samples (the first from p.jsonl:1)"),
        ("return 1.0", "returned 1.0 for 3 samples (the first from p.jsonl:1); expected a list"),
        ("return 'abc'", "returned 'abc' for 3 samples"),
        ("return [0.0, float('nan'), 1.0]", "returned nan for the sample of p.jsonl:2 (completion 'bb')"),
        ("return [0.0, 1.0, 'high']", "returned 'high' for the sample of p.jsonl:3 (completion 'ccc')"),
        ("return [len(c) / (len(c) - 2) for c in completions]", "raised ZeroDivisionError: division by "
         "zero on the sample of p.jsonl:2 (completion 'bb')"),
    ],
)  # fmt: skip
def test_bad_return_values_and_exceptions_name_the_function_and_the_sample(body: str, message: str):
    namespace: dict = {}
    exec(f"def judge(completions, **kwargs):\n    {body}\n", namespace)
    batch = prompts(("a", {}), ("b", {}), ("c", {}))
    with pytest.raises(RecipeError) as caught:
        RewardSource([fn(namespace["judge"], "rules.py:judge")])(batch, ["a", "bb", "ccc"], [True] * 3)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("reward function rules.py:judge ") and message in line, line


def test_numbers_of_any_kind_count_and_names_stay_apart():
    import numpy as np
    import torch

    def mixed(completions, **kwargs):
        return np.array([True, 2, np.float32(0.5)], dtype=object)

    def tensor(completions, **kwargs):
        return torch.tensor([1.0, 2.0, 3.0])

    other = fn(tensor, "other.py:mixed")  # a second function called `mixed`
    rewards = RewardSource([fn(mixed), other])(
        prompts(("a", {}), ("b", {}), ("c", {})), ["", "", ""], [True] * 3
    )
    assert rewards.total == [2.0, 4.0, 3.5] and list(rewards.by_source) == ["mixed", "mixed_2"]


def test_a_function_named_like_a_total_metric_is_numbered_and_means_skip_none():
    def mean(completions, **kwargs):  # its metric would overwrite reward/mean, the total's
        return [1.0, None]

    source = RewardSource([fn(mean), fn(lambda **kw: [0.0, 2.0], "f.py:std")])
    rewards = source(prompts(("a", {}), ("b", {})), ["x", "y"], [True, True])
    assert source.names == ["mean_2", "std_2"] and rewards.total == [1.0, 2.0]
    assert rewards.sums() == {"mean_2": (1.0, 1), "std_2": (2.0, 2)}
    assert rewards.means() == {"reward/mean_2": 1.0, "reward/std_2": 1.0}


def test_a_column_named_like_the_functions_own_arguments_is_refused():
    batch = prompts(("a", {}), ("b", {"completions": "x"}))
    with pytest.raises(RecipeError, match="p.jsonl:2: a column named 'completions' would replace"):
        RewardSource([fn(lambda **kw: [1.0, 1.0])])(batch, ["x", "y"], [True, True])


def test_reward_model_and_functions_weighted_together(tiny_model: Path):
    from align_cli.scoring import score

    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    source = load_reward_source(str(tiny_model), [], None, "auto")
    batch, texts = prompts(("Review:", {}), ("Say:", {})), [" good film", " bad"]
    by_model = score(source.reward_model, source.tokenizer, batch, texts, "auto", [True, False])
    assert source(batch, texts, [True, False]).total == pytest.approx(by_model)
    both = RewardSource([fn(length, "rules.py:length")], [0.5, 2.0], source.reward_model, source.tokenizer)
    rewards = both(batch, texts, [True, False])
    assert rewards.total == pytest.approx([0.5 * m + 2.0 * len(t) for m, t in zip(by_model, texts)])
    assert list(rewards.by_source) == ["reward_model", "length"]
    assert both.describe() == f"0.5 x reward model {tiny_model} + 2 x rules.py:length"


# ----------------------------------------------------------------------------- prompt columns


def test_prompt_columns_hold_every_field_but_the_prompts_own(tmp_path: Path):
    write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Write an even number:", "parity": "even", "answer": [2, 4]},
            {"instruction": "Add.", "input": "2 2", "output": "4", "id": 7},
            {"messages": [{"role": "user", "content": "Hi"}], "lang": "en"},
            {"question": "Why?", "answer": "because"},  # data.columns maps question -> prompt
        ],
    )
    got = load_prompts(str(tmp_path / "p.jsonl"), ReadOptions(columns={"prompt": "question"}))
    assert [p.columns for p in got] == [
        {"parity": "even", "answer": [2, 4]},
        {"output": "4", "id": 7},
        {"lang": "en"},
        {"answer": "because"},
    ]
    assert got[1].prompt == "Add.\n\n2 2" and got[3].prompt == "Why?"
    for plain in ("prompts.jsonl", "chat.jsonl", "alpaca.jsonl"):  # every existing format still reads
        assert load_prompts(str(EXAMPLES / plain))
    assert all(p.columns == {} for p in load_prompts(str(EXAMPLES / "prompts.jsonl")))
    assert set(load_prompts(str(EXAMPLES / "prefs.jsonl"))[0].columns) == {"chosen", "rejected", "margin"}


# ----------------------------------------------------------------------------- the example task


def test_parity_example_rewards_the_first_number_with_the_asked_parity(tmp_path: Path):
    assert right_parity(
        completions=[" 12 and 7", " 7", "-3", "none", [{"role": "assistant", "content": "8"}], "5"],
        parity=["even", "even", "odd", "odd", "even", None],
    ) == [1.0, 0.0, 1.0, 0.0, 1.0, None]
    make_prompts.main(["--out", str(tmp_path), "--heldout", "16"])
    train, held = load_prompts(str(tmp_path / "train.jsonl")), load_prompts(str(tmp_path / "heldout.jsonl"))
    assert len(held) == 16 and not {p.prompt for p in train} & {p.prompt for p in held}
    assert {p.columns["parity"] for p in train} == {"even", "odd"}
    assert all(("even" in p.prompt) == (p.columns["parity"] == "even") for p in train + held)


# ----------------------------------------------------------------------------- the recipe


def test_recipe_checks_the_functions_and_one_weight_per_source_before_torch_loads():
    def problems(*sets: str) -> str:
        with pytest.raises(RecipeError) as caught:
            load_recipe(None, sets=list(sets), stage="rejection-sample")
        return str(caught.value)

    fns = "rejection.reward_functions=[a.py:f, mod:g]"
    assert "rejection.reward_weights: expected 2 (one per reward function), got 3" in problems(
        fns, "rejection.reward_weights=[1, 2, 3]"
    )
    assert "expected 3 (the reward model's, then one per reward function), got 2" in problems(
        fns, "rejection.reward_model=runs/rm", "rejection.reward_weights=[1, 2]"
    )
    assert "expected 1 (the reward model's), got 2" in problems("rejection.reward_weights=[1, 2]")
    assert "rejection.reward_functions[1]: expected file.py:function or module:function, got 'nocolon'" in (
        problems("rejection.reward_functions=[a.py:f, nocolon]")
    )
    assert "rejection.reward_weights[0]: must be a finite number" in problems(
        fns, "rejection.reward_weights=[.nan, 1]"
    )
    ok = load_recipe(None, sets=[fns, "rejection.reward_weights=[1, 0.5]"], stage="rejection-sample")
    assert ok.rejection.reward_functions == ["a.py:f", "mod:g"] and ok.rejection.reward_weights == [1.0, 0.5]
    checked = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom align_cli.recipe import load_recipe\ntry:\n"
         f"    load_recipe(None, sets=['{fns}', 'rejection.reward_weights=[1]'], stage='rejection-sample')\n"
         "except Exception as e:\n    print(type(e).__name__, 'torch' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.stdout.strip() == "RecipeError False", checked.stderr


def test_plan_has_no_reward_model_when_functions_score_alone(tiny_model: Path, runs_dir: Path):
    from align_cli.memory import plan_recipe

    record_output("reward", tiny_model)  # a last `align reward` output that functions must not fall back to
    policy = {"model.name_or_path": str(tiny_model)}

    def components(*sets: str) -> list[str]:
        recipe = load_recipe(None, policy, list(sets), stage="rejection-sample")
        return [c.name for c in plan_recipe(recipe, device="cpu").components]

    alone, with_model = components(f"rejection.reward_functions=[{PARITY}]"), components()
    assert any("reward model" in n for n in with_model) and not any("reward model" in n for n in alone)


# ----------------------------------------------------------------------------- rejection sampling


def test_rejection_sampling_with_a_function_and_no_reward_model_keeps_what_it_prefers(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    from align_cli.stages.rejection_sampling import run_rejection_sampling

    make_prompts.main(["--out", str(tmp_path / "data")])
    record_output("reward", tiny_model)  # a last `align reward` output: functions alone never fall back to it
    out = tmp_path / "rs"
    overrides = {
        "model.name_or_path": str(tiny_model),
        "rejection.prompts": str(tmp_path / "data" / "train.jsonl"),
        "output.dir": str(out),
    }
    sets = [f"rejection.reward_functions=[{PARITY}]", "rejection.n=8", "rejection.max_new_tokens=8"]
    sets += ["rejection.max_prompts=16"]
    summary = run_rejection_sampling(
        load_recipe(None, overrides, sets, stage="rejection-sample"), console=quiet_console()
    )
    assert summary["reward_model"] is None and summary["reward_functions"] == [PARITY]
    asked = {p.prompt: p.columns["parity"] for p in load_prompts(str(tmp_path / "data" / "train.jsonl"))}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    # every sample scored by the function with its prompt's `parity` column
    expected = right_parity(
        completions=[s["response"] for s in samples], parity=[asked[s["prompt"]] for s in samples]
    )
    assert [s["reward"] for s in samples] == expected
    assert all(s["reward_sources"] == {"right_parity": s["reward"]} for s in samples)
    by_prompt: dict[str, list[float]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s["reward"])
    assert len(by_prompt) == 16 and all(len(r) == 8 for r in by_prompt.values())
    for row in best:  # the kept sample is one the function prefers most for its prompt
        assert row["reward"] == max(by_prompt[row["prompt"]])
    figures = summary["rounds"][0]
    mean_all, mean_best = figures["mean_reward"], figures["best_jsonl_mean_reward"]
    print(f"\nparity task, untrained tiny model, best of 8: mean reward {mean_all:.3f}, kept {mean_best:.3f}")
    assert figures["reward_sources"] == {"reward/right_parity": pytest.approx(mean_all)}
    assert mean_best > mean_all + 0.2  # selection by the function matters


def test_rejection_sampling_needs_some_reward(tiny_model: Path, tmp_path: Path, runs_dir: Path):
    from align_cli.stages.rejection_sampling import run_rejection_sampling

    overrides = {"model.name_or_path": str(tiny_model), "rejection.prompts": str(EXAMPLES / "prompts.jsonl")}
    recipe = load_recipe(None, overrides, [], stage="rejection-sample")
    with pytest.raises(RecipeError, match="needs a reward: --reward-model .*rejection.reward_functions"):
        run_rejection_sampling(recipe, console=quiet_console())


def test_two_processes_score_their_shares_and_every_result_comes_back(
    tiny_model: Path, tmp_path: Path, runs_dir: Path
):
    """Each process samples and scores its own share of the prompts; the samples, their rewards and each
    source's values come back whole, as one process gives them."""
    from align_cli.stages.rejection_sampling import run_rejection_sampling

    rows = [{"prompt": f"Write an {p} number:", "parity": p} for p in ("even", "odd")] * 2
    prompts_file = write_jsonl(tmp_path / "p.jsonl", rows)
    sets = [f"rejection.reward_functions=[{PARITY}]", "rejection.n=4", "rejection.prompts_per_batch=2"]
    sets += ["rejection.max_new_tokens=6"]
    common = {"model.name_or_path": str(tiny_model), "rejection.prompts": str(prompts_file)}
    recipe = load_recipe(None, common | {"output.dir": str(tmp_path / "one")}, sets, stage="rejection-sample")
    run_rejection_sampling(recipe, console=quiet_console())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["align_cli.cli", "rejection-sample", "-m", str(tiny_model), "--prompts", str(prompts_file)]
    cmd += ["-o", str(tmp_path / "two"), *(arg for item in sets for arg in ("--set", item))]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ALIGN_RUNS_DIR": str(runs_dir)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = ((tmp_path / d / "samples.jsonl").read_text().splitlines() for d in ("one", "two"))
    assert len(one) == 16 and [json.loads(r) for r in two] == [json.loads(r) for r in one]
    assert all("right_parity" in json.loads(r)["reward_sources"] for r in two)
