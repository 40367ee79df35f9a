"""Offline model presets: tiny random-init Llama models with a locally trained byte-level BPE tokenizer.

Nothing here touches the network: the tokenizer is trained on a bundled corpus (``assets/corpus.txt``,
written by ``examples/make_data.py --corpus``) and the model is initialised from a seed, so
``init_model("tiny", dir)`` gives a checkpoint that ``AutoTokenizer`` / ``AutoModelForCausalLM`` /
``AutoModelForSequenceClassification`` load back with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from align_cli.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

__all__ = [
    "BOS_TOKEN",
    "CHAT_MARKERS",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PRESETS",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "default_corpus",
    "init_model",
]

#: ``LlamaConfig`` keyword arguments per preset. ``vocab_size`` is the BPE training target; the saved
#: config uses the trained tokenizer's real size (``len(tokenizer)``), which is smaller when the corpus
#: has fewer distinct pieces.
PRESETS: dict[str, dict] = {
    # ~0.9M parameters; fwd+bwd on 8 x 256 tokens takes ~0.1 s on 2 CPU cores.
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 352,
        "vocab_size": 2048,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    # ~25.2M parameters at vocab 8192 (~20.7M with the 2345-token vocab the default corpus yields).
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 8,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "intermediate_size": 1536,
        "vocab_size": 8192,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
}

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
#: Role markers (``<|user|>`` ...) and the end-of-message marker, used by ``CHAT_TEMPLATE``.
CHAT_MARKERS = ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
#: All special tokens, in id order (ids 0..6).
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *CHAT_MARKERS)

#: Each message renders as ``<|{role}|>\n{content}<|end|>\n``; the generation prompt is ``<|assistant|>\n``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS_SEPARATOR = "\n\n\n"


def default_corpus() -> list[str]:
    """Texts the tokenizer is trained on by default: Alpaca templates, chat markers, ``assets/corpus.txt``."""
    text = resources.files("align_cli").joinpath("assets", "corpus.txt").read_text(encoding="utf-8")
    markers = "\n".join(f"{m}\n" for m in CHAT_MARKERS)
    docs = [doc for doc in text.split(_CORPUS_SEPARATOR) if doc.strip()]
    return [ALPACA_WITH_INPUT, ALPACA_NO_INPUT, markers, *docs]


def _train_bpe(
    corpus: list[str], vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS
) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE over raw UTF-8 bytes, so every string round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tok


@lru_cache(maxsize=8)
def _trained_json(corpus: tuple[str, ...], vocab_size: int, special_tokens: tuple[str, ...]) -> str:
    return _train_bpe(list(corpus), vocab_size, special_tokens).to_str()


def build_tokenizer(
    corpus: list[str], vocab_size: int, *, model_max_length: int = 1024, chat: bool = True
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer on ``corpus`` (no download).

    Any UTF-8 text round-trips (``decode(encode(s)) == s``) and there is no unknown token. Special tokens:
    ``<|pad|>`` (0), ``<|bos|>`` (1), ``<|eos|>`` (2) and the chat markers ``<|user|>``, ``<|assistant|>``,
    ``<|system|>``, ``<|end|>`` (3-6), each a single id. Like a Llama tokenizer, its own encoding puts BOS
    first (``tokenizer(text)``; not with ``add_special_tokens=False``) and appends no EOS, so plain
    transformers feeds a tiny model what align trained it on. ``chat_template`` is ``CHAT_TEMPLATE``;
    padding is on the right. ``len(tokenizer)`` may be below ``vocab_size`` on a small corpus.
    ``chat=False`` gives a base model's tokenizer: pad/BOS/EOS only, no chat markers, no chat template.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    specials = SPECIAL_TOKENS if chat else SPECIAL_TOKENS[:3]
    backend = Tokenizer.from_str(_trained_json(tuple(corpus), vocab_size, specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(specials[3:]),
        add_bos_token=True,  # a post-processor "<|bos|> $A", as Llama's (tokenizer.json carries it)
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def init_model(
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    corpus: list[str] | None = None,
    vocab_size: int | None = None,
    chat: bool = True,
) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` of ``preset`` and its tokenizer to ``out_dir``.

    The tokenizer is trained on ``corpus`` (default: ``default_corpus()``) with ``vocab_size`` (default: the
    preset's). The config's vocabulary is the tokenizer's real size; bos/eos/pad ids are set in the config
    and generation config. Weights depend only on ``preset``, ``seed`` and the vocabulary size: the same
    arguments give bit-identical safetensors. The global torch RNG state is left untouched. ``chat=False``:
    a base model, whose tokenizer has no chat template and no chat markers (``build_tokenizer``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    out = Path(out_dir)
    tokenizer = build_tokenizer(
        default_corpus() if corpus is None else corpus,
        vocab_size or kwargs["vocab_size"],
        model_max_length=kwargs["max_position_embeddings"],
        chat=chat,
    )
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs["vocab_size"] = len(tokenizer)
    config = LlamaConfig(**kwargs, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def init_model_command(preset: str, out: Path, seed: int, corpus: list[Path] | None, base: bool) -> Path:
    """`align init-model`: the preset and corpus files checked, then ``init_model``."""
    from align_cli.recipe import RecipeError

    if preset not in PRESETS:
        raise RecipeError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    missing = [str(p) for p in corpus or [] if not p.is_file()]
    if missing:
        raise RecipeError(f"--corpus: no such file(s): {', '.join(missing)}")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in corpus] if corpus else None
    return init_model(preset, out, seed=seed, corpus=texts, chat=not base)
