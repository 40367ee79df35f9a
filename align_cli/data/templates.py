"""Prompt templates: records become segments of text, each marked trainable or not.

The prompt/response boundary is decided here, while rendering, and never recovered later by
searching the token stream. A segment is either text (tokenized later) or literal token ids
(BOS/EOS), so user text can never inject special tokens through these.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from align_cli.errors import AlignError

# Stanford Alpaca templates, verbatim: the response follows directly after the last "\n".
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# The built-in chat template, for tokenizers that ship none (base models) when the recipe names none
# (data.chat_template). A training stage registers its markers as special tokens (settle_chat_template),
# so <|end|> is one token: supervised at the end of every assistant turn, a stop token for sampling, and
# generation_config's EOS in every saved model. BOS comes first, as in training, so plain transformers
# (pipeline, apply_chat_template) feed the model what it was trained on.
BUILTIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BUILTIN_CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Widely used chat formats, by name (data.chat_template: chatml | zephyr | llama2 | builtin). Each is
# prefix-stable (a longer conversation only appends), so prompt and response separate by rendering.
NAMED_CHAT_TEMPLATES = {
    # ChatML (Qwen, SmolLM2-Instruct, OpenHermes): <|im_start|>role ... <|im_end|>
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Zephyr (alignment-handbook): <|role|> headers, every turn ended by the tokenizer's EOS
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    # Llama 2 chat: [INST] ... [/INST] answer EOS, the system prompt inside the first [INST] in <<SYS>>
    "llama2": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ bos_token + '[INST] <<SYS>>\n' + message['content']"
        " + '\n<</SYS>>\n\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{% if loop.first or loop.previtem['role'] != 'system' %}{{ bos_token + '[INST] ' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "builtin": BUILTIN_CHAT_TEMPLATE,
}

Segment = tuple[str | list[int], bool]  # (text or token ids, trainable)


class TemplateError(AlignError, ValueError):
    """A chat template that cannot be split into prompt and response segments."""


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text and input_text.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def default_template(kind: str) -> str:
    return {"alpaca": "alpaca", "messages": "chat", "text": "plain"}.get(kind, "plain")


def load_chat_template(value: str) -> str:
    """``data.chat_template``: a known name (``NAMED_CHAT_TEMPLATES``), the path of a Jinja file, or the
    Jinja text itself."""
    if value in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[value]
    if "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise TemplateError(
            f"data.chat_template: {value!r} is neither a known name ({', '.join(NAMED_CHAT_TEMPLATES)}), "
            "a file, nor a Jinja template string"
        )
    return path.read_text(encoding="utf-8")


def needs_chat(template: str, items: Iterable[Any]) -> bool:
    """Whether rendering goes through a chat template: data.template chat, or any record (a ``Record``'s
    fields) or prompt (a ``Prompt``'s ``prompt``) holding a list of messages."""
    if template == "chat":
        return True
    for item in items:
        fields = getattr(item, "fields", None)
        values = fields.values() if isinstance(fields, dict) else [getattr(item, "prompt", item)]
        if any(isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v) for v in values):
            return True
    return False


def settle_chat_template(tokenizer: Any, chat_template: str | None, needs_chat: bool) -> list[int]:
    """Fix, on the tokenizer itself (so every saved model carries it), the template chats render with:
    ``chat_template`` (data.chat_template: a Jinja file or string) when given; else the tokenizer's own;
    else, when the data has chats (``needs_chat``), the built-in template, with its markers registered as
    special tokens. Returns the ids of tokens added to the vocabulary (``models.fit_vocabulary`` grows
    the embeddings to match)."""
    if chat_template and chat_template != "builtin":
        tokenizer.chat_template = load_chat_template(chat_template)
        return []
    if (tokenizer.chat_template and not chat_template) or not needs_chat:
        return []
    before = len(tokenizer)
    tokenizer.add_tokens(list(BUILTIN_CHAT_MARKERS), special_tokens=True)
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    return list(range(before, len(tokenizer)))


def builtin_chat_token_ids(tokenizer: Any) -> list[int]:
    """The built-in template's marker ids when the tokenizer renders with it (their embedding rows are
    trained under LoRA too), else []."""
    if tokenizer.chat_template != BUILTIN_CHAT_TEMPLATE:
        return []
    ids = [tokenizer.convert_tokens_to_ids(marker) for marker in BUILTIN_CHAT_MARKERS]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]


def _chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    template = tokenizer.chat_template or BUILTIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_chat(messages: list[dict], tokenizer: Any) -> list[Segment]:
    """Chat messages -> segments; only assistant turns are trainable.

    Each assistant turn is the text the template adds after the generation prompt, found by
    rendering growing prefixes of the conversation (so any prefix-stable template works)."""
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = _chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering a longer conversation changes the "
                "text of an earlier part), so prompt and response cannot be separated; use a template "
                "that only appends, or data.template: alpaca/plain"
            )
        segments.append((prompt[len(done) :], False))
        segments.append((full[len(prompt) :], True))
        done = full
    rest = _chat(tokenizer, messages, add_generation_prompt=False)[len(done) :]
    if rest:
        segments.append((rest, False))
    return [s for s in segments if s[0]]


def continuation(prompt: str | list[dict], response: list[dict], tokenizer: Any) -> str:
    """The text a chat template adds after a prompt's generation prompt for ``response`` (the assistant
    turn(s) that continue the prompt): the trainable part of a conversational completion or preference."""
    prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    before = _chat(tokenizer, prompt_msgs, add_generation_prompt=True)
    full = _chat(tokenizer, prompt_msgs + response, add_generation_prompt=False)
    if not full.startswith(before):
        raise TemplateError("the chat template is not prefix-stable; cannot separate prompt and response")
    return full[len(before) :]


def render_prompt(prompt: str | list[dict], template: str, tokenizer: Any) -> str:
    """The text that precedes a response: a string prompt or a list of chat messages."""
    if isinstance(prompt, list):
        return _chat(tokenizer, prompt, add_generation_prompt=True)
    if template == "alpaca":
        return alpaca_prompt(prompt)
    if template == "chat":
        return _chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


def response_segments(response: str, template: str, tokenizer: Any, finished: bool = True) -> list[Segment]:
    """A response and its end marker: EOS for Alpaca/plain (so models learn to stop); for chat the
    template's own end-of-turn text, which is rendered by the template. ``finished=False`` (a sample cut
    at max_new_tokens) leaves the end marker out: the text is rendered as far as it went."""
    if template == "chat":
        full = _chat(
            tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": response}], False
        )
        prompt = _chat(tokenizer, [{"role": "user", "content": "x"}], True)
        rendered = full[len(prompt) :]
        if not finished:  # what the template puts before the content, and the content: no end-of-turn
            at = rendered.rfind(response) if response else -1
            rendered = rendered[: at + len(response)] if at >= 0 else response
        return [(rendered, True)]
    if not finished:
        return [(response, True)]
    return [(response, True), ([tokenizer.eos_token_id], True)]


def render_sft_record(kind: str, fields: dict[str, Any], template: str, tokenizer: Any) -> list[Segment]:
    """One SFT record -> segments; prompt segments are not trainable. A record with ``finished: false``
    (a best-of-N sample cut at max_new_tokens) gets no end marker: the model is not taught to stop there."""
    if template == "auto":
        template = default_template(kind)
    finished = fields.get("finished") is not False
    if kind == "messages":
        return render_chat(fields["messages"], tokenizer)
    if kind == "text":
        return [(fields["text"], True), ([tokenizer.eos_token_id], True)]
    if kind == "alpaca":
        instruction, input_text, response = fields["instruction"], fields.get("input") or "", fields["output"]
        if template == "alpaca":
            prompt = alpaca_prompt(instruction, input_text)
        else:
            prompt = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
            if template == "chat":
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                return render_chat(messages, tokenizer)
        return [(prompt, False), *response_segments(response, "alpaca", tokenizer, finished)]
    if kind == "prompt_completion":
        prompt_text = render_prompt(fields["prompt"], template, tokenizer)
        if isinstance(fields["completion"], list):  # conversational prompt-completion (TRL)
            return [
                (prompt_text, False),
                (continuation(fields["prompt"], fields["completion"], tokenizer), True),
            ]
        chat = template == "chat" or isinstance(fields["prompt"], list)
        response_template = "chat" if chat else template
        return [
            (prompt_text, False),
            *response_segments(fields["completion"], response_template, tokenizer, finished),
        ]
    raise ValueError(f"record kind {kind!r} is not an SFT record")
