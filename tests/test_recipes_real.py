"""Every shipped recipe parses and resolves to a memory plan without loading (or downloading) weights.

The real-model recipes name hub models that cannot be fetched here, so each is planned from a config
written out below with the published shapes of that model; the parameter counts built from them on the
meta device must equal the published sizes, which checks the configs themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig, LlamaConfig, MistralConfig
from typer.testing import CliRunner

from align_cli.cli import app
from align_cli.data.formats import Record
from align_cli.data.preference import ranked_responses
from align_cli.memory import GIB, plan
from align_cli.recipe import load_recipe
from align_cli.stages import STAGES
from tests.conftest import ROOT

RECIPES = ROOT / "recipes"
GiB = GIB

# published shapes (config.json on the hub) and parameter counts
MISTRAL_7B = MistralConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    sliding_window=4096,
    tie_word_embeddings=False,
)
LLAMA2_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
SMOLLM2_360M = LlamaConfig(
    vocab_size=49152,
    hidden_size=960,
    intermediate_size=2560,
    num_hidden_layers=32,
    num_attention_heads=15,
    num_key_value_heads=5,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
FAMILIES = {  # recipe folder -> (base model id, config, published parameter count)
    "zephyr-7b": ("mistralai/Mistral-7B-v0.1", MISTRAL_7B, 7_241_732_096),
    "llama2-hh": ("meta-llama/Llama-2-7b-hf", LLAMA2_7B, 6_738_415_616),
    "smollm-1gpu": ("HuggingFaceTB/SmolLM2-360M", SMOLLM2_360M, 361_821_120),
}
STAGE_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate")


def test_every_recipe_folder_is_covered():
    folders = {p.parent.name for p in STAGE_RECIPES if p.parent != RECIPES}
    assert folders == set(FAMILIES)
    assert len(STAGE_RECIPES) >= 12


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses_and_plans(path: Path, tiny_model: Path):
    recipe = load_recipe(path)
    assert recipe.stage in STAGES
    family = FAMILIES.get(path.parent.name)
    config = family[1] if family else AutoConfig.from_pretrained(tiny_model)
    if family and recipe.model.name_or_path and not recipe.model.name_or_path.startswith("runs/"):
        assert recipe.model.name_or_path == family[0]
    estimate = plan(recipe, config)  # no weights: everything on the meta device
    names = [c.name for c in estimate.components]
    assert estimate.total > 0 and all(c.bytes >= 0 for c in estimate.components)
    if not family:
        return
    base = family[2]
    trained_models = 2 if recipe.stage == "ppo" and recipe.ppo.value_model == "reward_model" else 1
    if recipe.stage == "rejection-sample":  # sampling, then an SFT round: the larger phase is shown
        assert all("[sampling" in n for n in names) or all("[SFT round" in n for n in names)
    elif recipe.model.lora.enabled:
        assert 0 < estimate.trainable < 0.1 * base * trained_models  # adapters only
    elif recipe.stage == "reward":
        assert estimate.trainable == pytest.approx(base, rel=0.02)  # LM head swapped for a scalar head
    else:
        assert estimate.trainable == base  # full fine-tuning: the published size, exactly
    if recipe.stage == "ppo" and recipe.model.lora.enabled:
        assert not any(n.startswith("reference") for n in names)  # adapters disabled = the reference
    if recipe.stage == "dpo" and recipe.dpo.reference_cache:
        assert not any(n.startswith("reference") for n in names)  # cached log-probs, no model


def test_plans_say_what_fits(tiny_model: Path):
    """The figures that decide a launch: full 7B SFT leaves one 80 GB GPU less than 20% headroom but fits 8
    with ZeRO-3; QLoRA DPO of the same 7B fits one 24 GB GPU; the small model fits one GPU."""
    zephyr_sft = load_recipe(RECIPES / "zephyr-7b" / "sft.yaml")
    # ~66.6 GiB: bf16 weights, gradients and AdamW moments (8 bytes a parameter, 54 GiB) + checkpointed
    # activations of 16 x 2048 tokens (the LM head runs in chunks: no 16 x 2048 x 32000 logits); less than
    # the advised 20% headroom left on an 80 GB GPU
    assert plan(zephyr_sft, MISTRAL_7B).total > 0.8 * 80 * GiB
    sharded = plan(zephyr_sft, MISTRAL_7B, processes=8, shard="zero3")
    assert sharded.total < 40 * GiB
    qlora = plan(load_recipe(RECIPES / "zephyr-7b" / "dpo-qlora.yaml"), MISTRAL_7B)
    weights = next(c for c in qlora.components if c.name.startswith("weights"))
    assert 3.5 * GiB < weights.bytes < 6 * GiB  # ~0.52 byte per quantized weight, embeddings in fp32
    assert qlora.total < 24 * GiB
    assert plan(load_recipe(RECIPES / "smollm-1gpu" / "sft.yaml"), SMOLLM2_360M).total < 24 * GiB
    full, lora = (
        plan(load_recipe(None, {"model.name_or_path": "x"}, sets, stage="sft"), LLAMA2_7B)
        for sets in ([], ["model.lora.enabled=true", "model.lora.r=16"])
    )
    assert full.trainable == 6_738_415_616 and lora.trainable == 39_976_960  # all-linear r=16 on Llama-2-7B
    optimizer = {c.name: c.bytes for c in full.components}["optimizer state"]
    assert optimizer == 8 * 6_738_415_616  # AdamW: two fp32 moments
    for c in sharded.components:
        print(f"  zephyr sft, 8 x ZeRO-3: {c.name:24s} {c.bytes / GiB:7.2f} GiB  {c.detail}")
    print(f"  total {sharded.total / GiB:.1f} GiB per GPU; QLoRA DPO on one GPU: {qlora.total / GiB:.1f} GiB")


def test_align_plan_command(tiny_model: Path):
    runner = CliRunner()
    local = ["plan", "-r", str(RECIPES / "sft-tiny.yaml"), "--model", str(tiny_model), "--processes", "2"]
    result = runner.invoke(app, local)
    assert result.exit_code == 0, result.output
    assert "estimated memory per device" in result.output and "global batch" in result.output
    offline = runner.invoke(app, ["plan", "-r", str(RECIPES / "llama2-hh" / "sft.yaml")])
    assert offline.exit_code == 2 and "could not read its config.json" in offline.output


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        "multi-gpu.yaml": "MULTI_GPU",
        "fsdp.yaml": "FSDP",
        "deepspeed-zero2.yaml": "DEEPSPEED",
        "deepspeed-zero3.yaml": "DEEPSPEED",
    }
    for name, kind in kinds.items():
        config = load_config_from_file(str(RECIPES / "accelerate" / name))
        assert config.distributed_type.value == kind, name
    fsdp = load_config_from_file(str(RECIPES / "accelerate" / "fsdp.yaml")).fsdp_config
    assert (
        fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    )
    zero3 = load_config_from_file(str(RECIPES / "accelerate" / "deepspeed-zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"]


def test_ultrafeedback_style_conversations_split_off_the_prompt():
    """UltraFeedback-binarized records hold `prompt` and whole conversations as chosen / rejected: the
    user turn they share is the prompt, never part of a response."""
    user = {"role": "user", "content": "Name a colour."}
    fields = {
        "prompt": "Name a colour.",
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "No."}],
    }
    prompt, responses = ranked_responses(Record("uf.jsonl", 1, "preference", fields))
    assert prompt == [user]
    assert responses == [
        [{"role": "assistant", "content": "Blue."}],
        [{"role": "assistant", "content": "No."}],
    ]


# ----------------------------------------------------------------------------- their data, as published

HH_HELPFUL_BASE = [  # trl-lib/hh-rlhf-helpful-base: conversational preference, explicit prompt
    {
        "prompt": [
            {"role": "user", "content": "What is a good way to learn to cook?"},
            {"role": "assistant", "content": "Start with simple recipes."},
            {"role": "user", "content": "Which ones?"},
        ],
        "chosen": [{"role": "assistant", "content": "Eggs, pasta and soups are forgiving."}],
        "rejected": [{"role": "assistant", "content": "I don't know."}],
    },
    {
        "prompt": [{"role": "user", "content": "How do I tie a tie?"}],
        "chosen": [{"role": "assistant", "content": "Start with the wide end on your right."}],
        "rejected": [{"role": "assistant", "content": "Buy a clip-on."}],
    },
]
ULTRACHAT = [  # HuggingFaceH4/ultrachat_200k, split train_sft
    {
        "prompt": "Explain photosynthesis briefly.",
        "prompt_id": "a1",
        "messages": [
            {"role": "user", "content": "Explain photosynthesis briefly."},
            {"role": "assistant", "content": "Plants turn light, water and CO2 into sugar and oxygen."},
            {"role": "user", "content": "Where does it happen?"},
            {"role": "assistant", "content": "In the chloroplasts."},
        ],
    },
]
ULTRAFEEDBACK = [  # HuggingFaceH4/ultrafeedback_binarized, split train_prefs
    {
        "prompt": "Name a prime number.",
        "prompt_id": "b2",
        "chosen": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7 is prime."},
        ],
        "rejected": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "9 is prime."},
        ],
        "messages": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7 is prime."},
        ],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    },
]
PUBLISHED = {
    ("trl-lib/hh-rlhf-helpful-base", "train"): HH_HELPFUL_BASE,
    ("HuggingFaceH4/ultrachat_200k", "train_sft"): ULTRACHAT,
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): ULTRAFEEDBACK,
}


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(RECIPES) for p in RECIPES.glob("*/*.yaml") if p.parent.name in FAMILIES)
)
def test_real_recipes_read_their_data_sets_as_published(path: Path, tiny_model: Path, monkeypatch):
    """Issue 16 item 7: each real recipe's data path on rows in the exact shape of the public set it names
    (the hub is replaced by those rows, for the recipe's own split); every row is kept."""
    from transformers import AutoTokenizer

    from align_cli.data import readers
    from align_cli.data.prompts import load_prompts
    from align_cli.stages.dpo import prepare_dpo_data
    from align_cli.stages.reward import prepare_reward_data
    from align_cli.stages.sft import prepare_sft_data

    asked = []

    def published(name: str, options: readers.ReadOptions) -> list:
        asked.append((name, options.split))
        return [(name, i + 1, row) for i, row in enumerate(PUBLISHED[(name, options.split)])]

    monkeypatch.setattr(readers, "_read_hub", published)
    monkeypatch.chdir(ROOT)  # recipes name files (chat templates) relative to the repository
    recipe = load_recipe(RECIPES / path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    stage = recipe.stage
    if stage in ("sft", "reward", "dpo"):
        prepare = {"sft": prepare_sft_data, "reward": prepare_reward_data, "dpo": prepare_dpo_data}[stage]
        recipe.data.eval_fraction = 0.0
        _, _, stats = prepare(recipe, tok)
        assert stats["train"].kept == stats["train"].read == len(PUBLISHED[asked[0]]), stats
    else:
        source = recipe.ppo.prompts if stage == "ppo" else recipe.rejection.prompts
        prompts = load_prompts(source, readers.read_options(recipe.data))
        assert len(prompts) == len(PUBLISHED[asked[0]])
        assert all(isinstance(p.prompt, list) and p.prompt[-1]["role"] == "user" for p in prompts)
    assert asked, "the recipe read no hub data set"
