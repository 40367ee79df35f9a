"""The data people have (issue 16, items 1-3): every file type through one reader, TRL's standard formats,
ShareGPT, HH transcripts and content parts mapped onto align's fields, column and role mapping.

Each format must give the same tokens and loss mask as the equivalent record in align's own format, and
every reader's errors still name the file and the row."""

from __future__ import annotations

import csv as csv_module
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from align_cli.data.formats import DataError, load_records
from align_cli.data.preference import encode_preference
from align_cli.data.prompts import load_prompts
from align_cli.data.readers import ReadOptions
from align_cli.data.tokenize import tokenize_sft
from align_cli.recipe import load_recipe
from align_cli.stages.dpo import prepare_dpo_data
from align_cli.stages.sft import prepare_sft_data
from tests.helpers import write_jsonl

SFT = ("alpaca", "prompt_completion", "messages", "text", "preference", "ranked")
PREFS = ("preference", "ranked")
ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
USER = {"role": "user", "content": "What colour is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def fields(records) -> list[dict]:
    return [r.fields for r in records]


# ----------------------------------------------------------------------------- item 1: readers


def write_all_types(root: Path, rows: list[dict]) -> dict[str, Path]:
    table = pa.Table.from_pylist(rows)
    paths = {
        "jsonl": write_jsonl(root / "a.jsonl", rows),
        "json_array": root / "alpaca_data.json",
        "json_lines": root / "lines.json",
        "parquet": root / "a.parquet",
        "csv": root / "a.csv",
        "tsv": root / "a.tsv",
    }
    paths["json_array"].write_text(json.dumps(rows, indent=4))  # the original alpaca_data.json layout
    paths["json_lines"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(table, paths["parquet"])
    pcsv.write_csv(table, paths["csv"])
    pcsv.write_csv(table, paths["tsv"], pcsv.WriteOptions(delimiter="\t"))
    return paths


def test_every_file_type_reads_the_same_records(tmp_path: Path):
    import datasets

    paths = write_all_types(tmp_path, ALPACA)
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ALPACA[:2]), folder / "part-0.parquet")
    write_jsonl(folder / "part-1.jsonl", ALPACA[2:])
    sources = [*paths.values(), tmp_path / "saved", tmp_path / "saved_dict", folder]
    for source in sources:
        records = load_records(str(source), "auto", SFT)
        assert [r.kind for r in records] == ["alpaca"] * 3, source
        assert fields(records) == ALPACA, source
    assert [r.line for r in load_records(str(paths["json_array"]))] == [2, 7, 12]  # the line each starts on
    assert [r.line for r in load_records(str(paths["csv"]))] == [2, 3, 4]  # the header is line 1
    assert {r.source for r in load_records(str(folder))} == {
        str(folder / "part-0.parquet"),
        str(folder / "part-1.jsonl"),
    }


def test_every_reader_names_the_file_and_the_row_of_a_bad_record(tmp_path: Path):
    bad = [*ALPACA[:2], {"instruction": "", "input": "", "output": "x"}]
    paths = write_all_types(tmp_path, bad)
    expected_row = {"jsonl": 3, "json_array": 12, "json_lines": 3, "parquet": 3, "csv": 4, "tsv": 4}
    for kind, path in paths.items():
        with pytest.raises(DataError, match=f"{path}:{expected_row[kind]}: instruction: empty"):
            load_records(str(path))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "good.jsonl", ALPACA)
    pq.write_table(pa.Table.from_pylist(bad), folder / "bad.parquet")
    with pytest.raises(DataError, match=f"{folder / 'bad.parquet'}:3: instruction: empty"):
        load_records(str(folder))


def test_readers_refuse_clearly(tmp_path: Path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": \n]')
    with pytest.raises(DataError, match=r"broken.json:3: malformed JSON"):
        load_records(str(broken))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_records(str(tmp_path / "empty"))
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(DataError, match="cannot read it as PARQUET"):
        load_records(str(not_parquet))


# ----------------------------------------------------------------------------- item 2: formats


def sft_tokens(rows: list[dict], tok, tmp_path: Path, name: str) -> list[tuple[list, list]]:
    records = load_records(str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), "auto", SFT)
    examples, _ = tokenize_sft(records, tok, "auto", 512, "truncate")
    return [(e["input_ids"], e["labels"]) for e in examples]


def pref_tokens(rows: list[dict], tok, tmp_path: Path, name: str) -> list[tuple]:
    records = load_records(str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), "auto", PREFS)
    out = []
    for record in records:
        example, _, _ = encode_preference(record, tok, "auto", 512, None)
        out.append((example["prompt_ids"], example["responses"]))
    return out


def test_trl_sft_formats_tokenize_like_our_own(tok, tmp_path: Path):
    ours = sft_tokens([{"messages": [USER, BLUE]}], tok, tmp_path, "ours")
    conversational_prompt_completion = [{"prompt": [USER], "completion": [BLUE]}]
    assert sft_tokens(conversational_prompt_completion, tok, tmp_path, "cpc") == ours
    sharegpt = [
        {
            "conversations": [
                {"from": "human", "value": USER["content"]},
                {"from": "gpt", "value": BLUE["content"]},
            ]
        }
    ]
    assert sft_tokens(sharegpt, tok, tmp_path, "sharegpt") == ours
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": USER["content"]}]}, BLUE]}]
    assert sft_tokens(parts, tok, tmp_path, "parts") == ours
    tool = [
        {
            "messages": [
                USER,
                {"role": "assistant", "content": "call: sky()"},
                {"role": "tool", "content": "blue"},
                BLUE,
            ]
        }
    ]
    ((_, labels),) = sft_tokens(tool, tok, tmp_path, "tool")
    assert sum(label != -100 for label in labels) > 0


def test_trl_preference_formats_tokenize_like_our_own(tok, tmp_path: Path):
    hh_style = pref_tokens([{"chosen": [USER, BLUE], "rejected": [USER, GREEN]}], tok, tmp_path, "hh")
    explicit = [{"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}]  # hh-rlhf-helpful-base (TRL)
    assert pref_tokens(explicit, tok, tmp_path, "explicit") == hh_style
    transcripts = [{
        "chosen": f"\n\nHuman: {USER['content']}\n\nAssistant: {BLUE['content']}",
        "rejected": f"\n\nHuman: {USER['content']}\n\nAssistant: {GREEN['content']}",
    }]  # fmt: skip
    assert pref_tokens(transcripts, tok, tmp_path, "raw_hh") == hh_style  # Anthropic/hh-rlhf as published
    standard = pref_tokens(
        [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}], tok, tmp_path, "s"
    )
    implicit = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    assert pref_tokens(implicit, tok, tmp_path, "implicit") == standard


def test_ultrafeedback_rows_are_preferences_for_dpo_and_chats_for_sft(tok, tmp_path: Path):
    row = {  # HuggingFaceH4/ultrafeedback_binarized, as published
        "prompt": USER["content"],
        "prompt_id": "abc",
        "chosen": [USER, BLUE],
        "rejected": [USER, GREEN],
        "messages": [USER, BLUE],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    assert load_records(str(path), "auto", PREFS)[0].kind == "preference"
    assert load_records(str(path), "auto", SFT)[0].kind == "messages"
    assert pref_tokens([row], tok, tmp_path, "uf2") == pref_tokens(
        [{"chosen": [USER, BLUE], "rejected": [USER, GREEN]}], tok, tmp_path, "hh"
    )
    prompts = load_prompts(
        str(write_jsonl(tmp_path / "hhp.jsonl", [{"chosen": [USER, BLUE], "rejected": [USER, GREEN]}]))
    )
    assert prompts[0].prompt == [USER]  # an implicit-prompt pair gives its shared turns as the prompt


def test_undetectable_records_say_which_set_fixes_them(tmp_path: Path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_records(str(path), "auto", SFT)
    message = str(info.value)
    assert (
        f"{path}:1" in message
        and "question, answer" in message
        and "--set data.columns.prompt=question" in message
    )


# ----------------------------------------------------------------------------- item 3: mapping


def test_column_and_role_mapping_from_the_recipe(tiny_model: Path, tmp_path: Path):
    rows = [{"question": "q1", "good": "yes", "bad": "no"}, {"question": "q2", "good": "fine", "bad": "poor"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    sets = ["data.columns.prompt=question", "data.columns.chosen=good", "data.columns.rejected=bad"]
    recipe = load_recipe(
        None, {"model.name_or_path": str(tiny_model), "data.train": str(data)}, sets, stage="dpo"
    )
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train, _, stats = prepare_dpo_data(recipe, tok)
    assert stats["train"].kept == 2 and len(train) == 2
    data = write_jsonl(
        tmp_path / "chats.jsonl",
        [{"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}]}],
    )
    sets = ["data.roles.human=user", "data.roles.bot=assistant"]
    recipe = load_recipe(
        None, {"model.name_or_path": str(tiny_model), "data.train": str(data)}, sets, stage="sft"
    )
    train, _, stats = prepare_sft_data(recipe, tok)
    assert stats["train"].kept == 1
    options = ReadOptions(roles={"human": "user", "bot": "assistant"})
    assert load_records(str(data), options=options)[0].fields["messages"][1]["role"] == "assistant"


# ----------------------------------------------------------------------------- item 5: chat templates


def test_named_chat_templates_render_and_separate_prompt_from_response(tiny_model: Path):
    from align_cli.data.templates import NAMED_CHAT_TEMPLATES, render_chat, settle_chat_template

    conversation = [
        {"role": "system", "content": "Be brief."},
        USER,
        BLUE,
        {"role": "user", "content": "And at night?"},
        GREEN,
    ]
    q, a1, a2 = "What colour is the sky?", "It is blue.", "It is green."
    expected = {
        "llama2": f"<|bos|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{q} [/INST] {a1} <|eos|>"
        f"<|bos|>[INST] And at night? [/INST] {a2} <|eos|>",
        "chatml": f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
        f"<|im_start|>assistant\n{a1}<|im_end|>\n<|im_start|>user\nAnd at night?<|im_end|>\n"
        f"<|im_start|>assistant\n{a2}<|im_end|>\n",
        "zephyr": f"<|system|>\nBe brief.<|eos|>\n<|user|>\n{q}<|eos|>\n<|assistant|>\n{a1}"
        f"<|eos|>\n<|user|>\nAnd at night?<|eos|>\n<|assistant|>\n{a2}<|eos|>\n",
    }
    for name in NAMED_CHAT_TEMPLATES:
        tok = AutoTokenizer.from_pretrained(tiny_model)
        settle_chat_template(tok, name, needs_chat=True)
        segments = render_chat(conversation, tok)
        assert "".join(text for text, _ in segments) == tok.apply_chat_template(conversation, tokenize=False)
        trained = [text for text, trainable in segments if trainable]
        assert len(trained) == 2 and "It is blue." in trained[0] and "It is green." in trained[1], name
        if name in expected:
            assert tok.apply_chat_template(conversation, tokenize=False) == expected[name], name


# ----------------------------------------------------------------------------- item 6: data check = training


def test_data_check_reads_as_the_stage_trains(tiny_model: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from align_cli.cli import app

    runner = CliRunner()
    uf = write_jsonl(
        tmp_path / "uf.jsonl",
        [{"prompt": "p", "chosen": [USER, BLUE], "rejected": [USER, GREEN], "messages": [USER, BLUE]}],
    )
    for stage, kind in (("dpo", "preference"), ("sft", "messages")):
        result = runner.invoke(
            app,
            ["data", "check", str(uf), "--model", str(tiny_model), "--stage", stage],
            env={"COLUMNS": "200"},
        )
        assert result.exit_code == 0, result.output
        assert f"(1 {kind}) for {stage}" in result.output and "as the model sees it" in result.output
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    result = runner.invoke(app, ["data", "check", str(alpaca), "--stage", "dpo"], env={"COLUMNS": "200"})
    with pytest.raises(DataError) as training:
        load_records(str(alpaca), "auto", PREFS)
    assert result.exit_code == 2 and str(training.value).split(":", 1)[1][:60] in " ".join(
        result.output.split()
    )


# ----------------------------------------------------------------------------- item 4: mixtures


def test_a_weighted_three_source_mixture_trains_and_counts_each_source(
    tiny_model: Path, tmp_path: Path, runs_dir
):
    import datasets

    from align_cli.stages.sft import run_sft
    from tests.helpers import quiet_console

    chats = [
        {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]}
        for i in range(10)
    ]
    write_jsonl(tmp_path / "sharegpt.jsonl", chats)
    pq.write_table(
        pa.Table.from_pylist([{"q": f"Double {i}.", "a": str(2 * i)} for i in range(20)]),
        tmp_path / "qa.parquet",
    )
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "alpaca"))
    recipe_file = tmp_path / "mix.yaml"
    recipe_file.write_text(
        f"""stage: sft
model: {{name_or_path: {tiny_model}}}
data:
  train:
    - {{path: {tmp_path / "sharegpt.jsonl"}, weight: 0.5}}
    - {{path: {tmp_path / "qa.parquet"}, max_examples: 5, columns: {{prompt: q, completion: a}}}}
    - {{path: {tmp_path / "alpaca"}, weight: 2}}
training: {{max_steps: 2, micro_batch_size: 4, save_every: 0}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    summary = run_sft(load_recipe(recipe_file), console=quiet_console())
    sources = summary["data"]["train"]["sources"]
    assert sources == {
        str(tmp_path / "sharegpt.jsonl"): {"read": 10, "taken": 5},
        str(tmp_path / "qa.parquet"): {"read": 20, "taken": 5},
        str(tmp_path / "alpaca"): {"read": 3, "taken": 6},
    }
    assert summary["data"]["train"]["read"] == 16 and summary["steps"] == 2


def test_mixture_settings_are_checked_before_anything_runs(tmp_path: Path):
    from align_cli.recipe import RecipeError

    bad = ["data.train=[{path: a.jsonl, weight: -1}, {path: b.jsonl, max_examples: 0}, {weight: 1}]"]
    with pytest.raises(RecipeError) as info:
        load_recipe(None, sets=bad, stage="sft")
    for expected in ("data.train[0].weight", "data.train[1].max_examples", "data.train[2].path: missing"):
        assert expected in str(info.value)
    with pytest.raises(RecipeError, match=r"data.train\[0\].colour: unknown key"):
        load_recipe(None, sets=["data.train=[{path: a.jsonl, colour: red}]"], stage="sft")


def test_csv_cells_stay_text_and_json_cells_decode(tmp_path: Path):
    csv = tmp_path / "pairs.csv"
    csv.write_text('prompt,chosen,rejected,margin\nAdd 2 and 3.,5,6,0.5\n"Say ""hi"".",hi,"no, thanks",1\n')
    records = load_records(str(csv), "auto", PREFS)
    assert [r.fields["chosen"] for r in records] == ["5", "hi"]  # digits are an answer's text
    assert [r.fields["margin"] for r in records] == [0.5, 1] and records[1].fields["rejected"] == "no, thanks"
    chats = tmp_path / "chats.csv"
    with chats.open("w", newline="") as handle:
        csv_module.writer(handle).writerows([["messages"], [json.dumps([USER, BLUE])]])
    assert load_records(str(chats))[0].fields["messages"] == [USER, BLUE]
