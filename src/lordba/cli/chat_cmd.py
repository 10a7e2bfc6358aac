"""``lordba chat``: an interactive chat (the model's chat template) with a LoRDBA adapter."""

from __future__ import annotations

import argparse
import sys

NAME = "chat"
HELP = "chat interactively with a (4-bit) base model and a LoRDBA adapter (the model's chat template)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model options and ``--system``."""
    from lordba.cli._generation import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")


def run(args: argparse.Namespace) -> int:
    """Read user turns from stdin until EOF (or ``/exit``), answering each (under the runtime's branch
    compute); returns 0."""
    from lordba.cli._generation import runtime

    with runtime(args):
        return _chat(args)


def _chat(args: argparse.Namespace) -> int:
    from lordba.cli._generation import chat_text, check_text, encode, load, stream
    from lordba.errors import ConfigError

    loaded = load(args)
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"--model {args.model}: its tokenizer has no chat template (use lordba generate)")
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
        messages.append({"role": "user", "content": check_text(line.rstrip("\n"), "a line of stdin")})
        ids = encode(loaded, chat_text(loaded, messages, args.model), "the conversation", special=False)
        if interactive:
            print("assistant> ", end="", flush=True)
        answer = stream(loaded, ids, args)
        messages.append({"role": "assistant", "content": answer})
