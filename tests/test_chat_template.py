"""Chat models built on a base tokenizer learn to stop (issue 14, item 3).

A base model's tokenizer has no chat template. The built-in template's markers are registered as special
tokens, so the end of an assistant turn is one supervised token that sampling stops at; the template and
the stop token travel with every saved model, so plain transformers chats with it as align does. A
template named by the recipe (data.chat_template) overrides both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from align_cli.data.formats import load_records
from align_cli.data.templates import BUILTIN_CHAT_MARKERS, BUILTIN_CHAT_TEMPLATE, settle_chat_template
from align_cli.data.tokenize import IGNORE_INDEX, tokenize_sft
from align_cli.presets import init_model
from align_cli.recipe import load_recipe
from align_cli.stages.rejection_sampling import run_rejection_sampling
from align_cli.stages.sft import run_sft
from tests.conftest import EXAMPLES
from tests.helpers import make_recipe, quiet_console, weights

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("base") / "tiny-base", seed=0, chat=False)


def test_the_base_tokenizer_has_no_template_and_no_markers(base_model: Path):
    tok = AutoTokenizer.from_pretrained(base_model)
    assert tok.chat_template is None
    assert len(tok("<|end|>", add_special_tokens=False)["input_ids"]) > 1


def test_the_builtin_template_registers_its_markers_and_supervises_the_end_of_turn(base_model: Path):
    tok = AutoTokenizer.from_pretrained(base_model)
    before = len(tok)
    records = load_records(str(EXAMPLES / "chat.jsonl"))[:3]
    assert settle_chat_template(tok, None, needs_chat=False) == []  # no chats: nothing registered
    assert tok.chat_template is None
    added = settle_chat_template(tok, None, needs_chat=True)
    assert added == list(range(before, before + len(BUILTIN_CHAT_MARKERS)))
    assert tok.chat_template == BUILTIN_CHAT_TEMPLATE
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok("hi<|end|>\n", add_special_tokens=False)["input_ids"][-2] == end
    (example, *_), _ = tokenize_sft(records, tok, "auto", 512, "truncate")
    ids, labels = example["input_ids"], example["labels"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # BOS once: the template's
    ends = [i for i, t in enumerate(ids) if t == end]
    assistant_turns = sum(m["role"] == "assistant" for m in records[0].fields["messages"])
    supervised_ends = [i for i in ends if labels[i] == end]
    assert len(supervised_ends) == assistant_turns  # every assistant turn ends with a trained <|end|>
    assert all(labels[i] == IGNORE_INDEX for i in ends if i not in supervised_ends)  # user turns: not trained


def test_a_recipe_template_overrides_the_builtin_one(base_model: Path, tmp_path: Path):
    tok = AutoTokenizer.from_pretrained(base_model)
    before = len(tok)
    assert settle_chat_template(tok, CHATML, needs_chat=True) == []
    assert tok.chat_template == CHATML and len(tok) == before
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    tok = AutoTokenizer.from_pretrained(base_model)
    settle_chat_template(tok, str(jinja), needs_chat=True)
    assert tok.chat_template == CHATML


def chat_sft(model: Path, out: Path, steps: int, *sets: str) -> Path:
    recipe = make_recipe(
        "sft",
        model,
        EXAMPLES / "chat.jsonl",
        out,
        [
            f"training.max_steps={steps}",
            "training.micro_batch_size=16",
            "training.lr=3e-3",
            "training.warmup_steps=10",
            "training.save_every=0",
            "data.max_length=256",
            *sets,
        ],
    )
    run_sft(recipe, console=quiet_console())
    return out / "final"


@pytest.fixture(scope="module")
def chat_policy(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_sft(base_model, tmp_path_factory.mktemp("chat-sft") / "sft", 300)


def test_chat_sft_on_a_base_model_learns_to_end_its_turns(chat_policy: Path, review_models, tmp_path: Path):
    tok = AutoTokenizer.from_pretrained(chat_policy)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok.chat_template == BUILTIN_CHAT_TEMPLATE
    config = json.loads((chat_policy / "config.json").read_text())
    assert config["vocab_size"] == len(tok)
    assert end in GenerationConfig.from_pretrained(chat_policy).eos_token_id
    # best-of-N from the chat policy (the review reward model scores; any scorer would do)
    recipe = load_recipe(
        None,
        {"model.name_or_path": str(chat_policy), "output.dir": str(tmp_path / "rs")},
        [
            f"rejection.reward_model={review_models['reward']}",
            f"rejection.prompts={EXAMPLES / 'chat.jsonl'}",
            "rejection.max_prompts=16",
            "rejection.n=4",
            "rejection.max_new_tokens=48",
        ],
        stage="rejection-sample",
    )
    summary = run_rejection_sampling(recipe, console=quiet_console())
    samples = [json.loads(line) for line in (tmp_path / "rs" / "samples.jsonl").read_text().splitlines()]
    finished = sum(s["finished"] for s in samples) / len(samples)
    assert finished >= 0.9, finished
    assert summary["rounds"][0]["eos_rate"] == pytest.approx(finished)
    # plain transformers: the saved template and generation config end the turn where align does
    chat = pipeline("text-generation", model=str(chat_policy), tokenizer=str(chat_policy), device="cpu")
    messages = [{"role": "user", "content": "Name the color of the snow."}]
    out = chat(messages, max_new_tokens=48, do_sample=False)[0]["generated_text"]
    reply = out[-1]
    assert reply["role"] == "assistant" and reply["content"].strip()
    assert "<|" not in reply["content"]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(chat_policy)
    generated = model.generate(**ids, max_new_tokens=48, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert generated[-1].item() == end and len(generated) < 48


def test_lora_trains_the_new_marker_rows(base_model: Path, tmp_path: Path):
    final = chat_sft(base_model, tmp_path / "lora", 12, "model.lora.enabled=true", "training.lr=1e-2")
    from align_cli.models import load_causal_lm
    from align_cli.recipe import ModelSection

    tok = AutoTokenizer.from_pretrained(final)
    new = [tok.convert_tokens_to_ids(m) for m in BUILTIN_CHAT_MARKERS]
    merged = load_causal_lm(ModelSection(name_or_path=str(final)))
    base = weights(base_model)
    rows = base["model.embed_tokens.weight"].shape[0]
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) == rows + len(new)
    for name, layer in (("model.embed_tokens.weight", merged.get_input_embeddings()),
                        ("lm_head.weight", merged.get_output_embeddings())):  # fmt: skip
        start = base[name].mean(0)  # where the new rows began
        trained = layer.weight[new].detach()
        assert not torch.allclose(trained, start.expand_as(trained), atol=1e-4), name
        torch.testing.assert_close(layer.weight[:rows].detach(), base[name])  # old rows: untouched by LoRA
