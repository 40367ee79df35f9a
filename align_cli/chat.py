"""`align chat`: talk to a model in the terminal, its reply streamed token by token.

Every turn renders the whole conversation with the model's chat template (the built-in one for a
tokenizer without one, as training would), so the model sees the history it learned to continue. When
the conversation no longer fits the model's context with room for a reply, the oldest turns go first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from align_cli.data.prompts import prompt_ids
from align_cli.data.templates import render_prompt
from align_cli.generate import (
    GenerateError,
    check_params,
    load_policy,
    template_errors,
    with_system,
)
from align_cli.generation import SamplingParams, sample
from align_cli.models import load_tokenizer
from align_cli.recipe import ModelSection

HELP = (
    "commands: /reset clears the conversation, /exit (or Ctrl-D) quits, /help shows this; "
    "anything else is your next message"
)
PROMPT = "you> "


def context_length(policy: Any, tokenizer: Any) -> int:
    """The most tokens the model attends over: its config's position limit, else the tokenizer's."""
    limit = getattr(policy.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        return limit
    fallback = getattr(tokenizer, "model_max_length", 0)
    return fallback if 0 < fallback < 1_000_000 else 2048


def text_streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """A transformers streamer that hands each decoded piece of the reply to ``on_text`` (whole words:
    a piece is released at a space or newline, so no half-decoded character is shown)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class ChatSession:
    """A conversation with one model: its history, and the prompt each new turn is sampled from."""

    policy: Any
    tokenizer: Any
    params: SamplingParams
    system: str | None = None
    context: int = 0  # tokens of prompt + reply; 0 = the model's own context length
    history: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0  # replies so far (seeds each turn differently)

    def __post_init__(self) -> None:
        self.context = self.context or context_length(self.policy, self.tokenizer)
        if self.params.max_new_tokens >= self.context:
            raise GenerateError(
                f"--max-new-tokens {self.params.max_new_tokens} leaves no room for a prompt in the "
                f"context of {self.context} tokens"
            )

    def messages(self, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """``history`` (default: the whole conversation) behind the system message, when there is one."""
        history = self.history if history is None else history
        return with_system(history, self.system) if self.system else list(history)

    def encode(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """(text, token ids) of ``messages`` in the chat template, ending with the generation prompt."""
        with template_errors("the conversation"):
            text = render_prompt(messages, "chat", self.tokenizer)
        return text, prompt_ids(text, self.tokenizer)

    def prompt(self) -> tuple[str, list[int], int]:
        """(rendered text, token ids, turns dropped) of the conversation so far, ending with the user's
        message and the assistant's generation prompt. The oldest exchanges (user + reply) are dropped,
        from the history itself, until the prompt leaves ``max_new_tokens`` of room in the context."""
        room = self.context - self.params.max_new_tokens
        alone = self.encode(self.messages(self.history[-1:]))[1]
        if len(alone) > room:  # checked first: an oversized message must not cost the history
            raise GenerateError(
                f"your message is {len(alone)} tokens with the template; with --max-new-tokens "
                f"{self.params.max_new_tokens} at most {room} fit in the context of {self.context}"
            )
        dropped = 0
        while True:
            text, ids = self.encode(self.messages())
            if len(ids) <= room:
                return text, ids, dropped
            del self.history[:2]  # the oldest user message and its reply
            dropped += 2

    def reply(
        self,
        message: str,
        on_text: Callable[[str], None] | None = None,
        on_prompt: Callable[[str, int], None] | None = None,
    ) -> str:
        """Add ``message`` as the user's turn, sample the reply and keep it in the history. ``on_prompt``
        gets the rendered prompt and the number of turns dropped to fit before sampling starts;
        ``on_text`` gets the reply as it is generated. A failed or interrupted reply leaves the history
        without the message."""
        self.history.append({"role": "user", "content": message})
        try:
            text, ids, dropped = self.prompt()
            if on_prompt is not None:
                on_prompt(text, dropped)
            streamer = text_streamer(self.tokenizer, on_text) if on_text else None
            (done,) = sample(
                self.policy, self.tokenizer, [ids], self.params, first_batch=self.turns, streamer=streamer
            )
        except BaseException:  # KeyboardInterrupt too: the unanswered message is not kept
            if self.history and self.history[-1] == {"role": "user", "content": message}:
                self.history.pop()
            raise
        reply = self.tokenizer.decode(done.response_ids, skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": reply})
        self.turns += 1
        return reply

    def reset(self) -> None:
        self.history.clear()


def run_chat(
    model: str,
    params: SamplingParams,
    system: str | None,
    context: int,
    show_prompt: bool,
    console: Console,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
) -> None:
    """`align chat`: the read-reply loop until /exit or end of input. Replies go to ``write`` (stdout),
    notices and --show-prompt to ``console`` (stderr)."""
    write = write or _stdout
    if read is input:
        try:
            import readline  # noqa: F401  (input() then edits the line and recalls earlier messages)
        except ImportError:  # not on every platform
            pass
    check_params(params)
    if params.n != 1:
        raise GenerateError("align chat samples one reply per turn (--n 1)")
    tokenizer = load_tokenizer(ModelSection(name_or_path=model))
    if not tokenizer.chat_template:
        console.print("[yellow]the tokenizer has no chat template; using align's built-in one[/]")
    session = ChatSession(load_policy(model, tokenizer), tokenizer, params, system, context)
    console.print(f"[bold]align chat[/] {escape(model)} (context {session.context} tokens). {HELP}")
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: quit
            write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if not _command(line, session, console):
                return
            continue

        def before_reply(text: str, dropped: int) -> None:
            if dropped:
                console.print(f"[yellow](the oldest {dropped} turn(s) were dropped to fit the context)[/]")
            if show_prompt:
                console.print(f"[dim]--- prompt ---\n{escape(text)}\n--- end of prompt ---[/]")

        try:
            if not session.reply(line, write, before_reply):
                console.print("[dim](an empty reply: the model ended its turn at once)[/]", end="")
        except KeyboardInterrupt:
            write("\n")
            console.print("[yellow](reply interrupted; the message was not kept)[/]")
            continue
        except GenerateError as exc:
            console.print(f"[yellow]{escape(str(exc))}[/]")
            continue
        write("\n")


def _command(line: str, session: ChatSession, console: Console) -> bool:
    """Run a /command; False means quit."""
    name = line.split()[0].lower()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        console.print("(conversation cleared)")
    elif name == "/help":
        console.print(HELP)
    else:
        console.print(f"unknown command {escape(name)}; {HELP}")
    return True


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
