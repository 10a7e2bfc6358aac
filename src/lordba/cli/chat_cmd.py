"""``lordba chat``: an interactive chat (the model's chat template) with a LoRDBA adapter."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lordba.errors import ConfigError

NAME = "chat"
HELP = "chat interactively with a (4-bit) base model and a LoRDBA adapter (the model's chat template)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model options and ``--system``."""
    from lordba.cli._generation import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")


def run(args: argparse.Namespace) -> int:
    """Read user turns from stdin until EOF (or ``/exit``), answering each (under the runtime's branch
    compute); returns 0, or 2 for options that do not fit the base."""
    from lordba.cli._base import UsageError, usage_error
    from lordba.cli._generation import runtime

    try:
        with runtime(args):
            return _chat(args)
    except UsageError as err:
        return usage_error(NAME, err)


def _chat(args: argparse.Namespace) -> int:
    from lordba.cli._generation import check_text, load, stream

    def has_template(tokenizer: Any) -> None:  # (before the model loads: a large base takes many seconds)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"--model {args.model}: its tokenizer has no chat template (use lordba generate)")

    loaded = load(args, check_tokenizer=has_template)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError as err:  # a stdin decoded strictly
            raise ConfigError(f"stdin is not UTF-8 text ({err.reason} at byte {err.start} of a line)") from None
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": check_text(line.rstrip("\r\n"), "a line of stdin")})
        try:
            ids = fit_conversation(loaded, messages, args.model, args.max_new_tokens)
        except ContextError as err:  # this turn alone does not fit: the conversation goes on without it
            messages.pop()
            print(f"[this message does not fit: {err}]", file=sys.stderr)
            continue
        if interactive:
            print("assistant> ", end="", flush=True)
        answer = stream(loaded, ids, args)
        messages.append({"role": "assistant", "content": answer})


class ContextError(ConfigError):
    """The conversation's latest message does not fit in the model's context, even without the earlier turns."""


def fit_conversation(loaded: Any, messages: list[dict[str, str]], model: str, asked: int | None) -> Any:
    """The token ids of ``messages`` (ending with a user's message) in the chat template, after dropping
    the oldest user/assistant turns (never the system message, never the latest message) until the prompt
    leaves room in the model's context for ``asked`` new tokens (``--max-new-tokens``; if not given,
    :data:`~lordba.cli._generation.DEFAULT_NEW_TOKENS` where the latest message leaves that many, else at
    least one). The turns are dropped from ``messages`` (said on stderr) only where the latest message fits.

    Raises:
        ContextError: the system message and the latest message alone leave no such room (the message
            says how many tokens there are, the context and the room).
        ConfigError: the chat template refuses the messages.
    """
    from lordba._util.modules import context_positions
    from lordba.cli._generation import DEFAULT_NEW_TOKENS, chat_text, encode

    context = context_positions(loaded.model)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    need = asked or DEFAULT_NEW_TOKENS
    if asked is None and context is not None and len(messages) - first > 1:  # the latest message alone decides
        alone = encode(loaded, chat_text(loaded, messages[:first] + messages[-1:], model), "the conversation", False)
        need = DEFAULT_NEW_TOKENS if int(alone.shape[-1]) + DEFAULT_NEW_TOKENS <= context else 1
    kept, dropped = list(messages), 0
    while True:
        ids = encode(loaded, chat_text(loaded, kept, model), "the conversation", special=False)
        if context is None or int(ids.shape[-1]) + need <= context:
            break
        if len(kept) - first < 3:  # the latest message alone
            room = context - int(ids.shape[-1])
            if asked is None and room >= 1:
                break
            raise ContextError(
                f"with it the prompt has {ids.shape[-1]} tokens and the model's context is {context}, which leaves "
                f"{max(room, 0)} for an answer" + (f" (--max-new-tokens {asked})" if asked else "") + "; shorten it"
            )
        del kept[first : first + 2]  # the oldest user message and its answer
        dropped += 1
    messages[:] = kept
    if dropped:
        print(
            f"[dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} of the conversation: the model's "
            f"context is {context} tokens]",
            file=sys.stderr,
        )
    return ids
