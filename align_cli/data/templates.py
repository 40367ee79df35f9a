"""Prompt templates: records become segments of text, each marked trainable or not.

The prompt/response boundary is decided here, while rendering, and never recovered later by
searching the token stream. A segment is either text (tokenized later) or literal token ids
(BOS/EOS), so user text can never inject special tokens through these.
"""

from __future__ import annotations

from typing import Any

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

# Used when a tokenizer ships no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Segment = tuple[str | list[int], bool]  # (text or token ids, trainable)


class TemplateError(ValueError):
    """A chat template that cannot be split into prompt and response segments."""


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text and input_text.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def default_template(kind: str) -> str:
    return {"alpaca": "alpaca", "messages": "chat", "text": "plain"}.get(kind, "plain")


def _chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
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


def render_prompt(prompt: str | list[dict], template: str, tokenizer: Any) -> str:
    """The text that precedes a response: a string prompt or a list of chat messages."""
    if isinstance(prompt, list):
        return _chat(tokenizer, prompt, add_generation_prompt=True)
    if template == "alpaca":
        return alpaca_prompt(prompt)
    if template == "chat":
        return _chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


def response_segments(response: str, template: str, tokenizer: Any) -> list[Segment]:
    """A response and its end marker: EOS for Alpaca/plain (so models learn to stop); for chat the
    template's own end-of-turn text, which is rendered by the template."""
    if template == "chat":
        full = _chat(
            tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": response}], False
        )
        prompt = _chat(tokenizer, [{"role": "user", "content": "x"}], True)
        return [(full[len(prompt) :], True)]
    return [(response, True), ([tokenizer.eos_token_id], True)]


def render_sft_record(kind: str, fields: dict[str, Any], template: str, tokenizer: Any) -> list[Segment]:
    """One SFT record -> segments; prompt segments are not trainable."""
    if template == "auto":
        template = default_template(kind)
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
        return [(prompt, False), *response_segments(response, "alpaca", tokenizer)]
    if kind == "prompt_completion":
        prompt_text = render_prompt(fields["prompt"], template, tokenizer)
        return [(prompt_text, False), *response_segments(fields["completion"], template, tokenizer)]
    raise ValueError(f"record kind {kind!r} is not an SFT record")
