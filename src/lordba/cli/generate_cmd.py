"""``lordba generate``: complete one prompt with a base model and a LoRDBA adapter, streaming tokens."""

from __future__ import annotations

import argparse

NAME = "generate"
HELP = "complete a prompt with a (4-bit) base model and a LoRDBA adapter, streaming tokens"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``PROMPT``, the model options and ``--chat-template``."""
    from lordba.cli._generation import add_model_arguments

    p.add_argument("prompt", help="the text to complete")
    add_model_arguments(p)
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt as one user turn in the model's chat template (default: raw completion)",
    )


def run(args: argparse.Namespace) -> int:
    """Load, generate, print (under the runtime's branch compute); returns 0, or 2 for options that do not fit
    the base."""
    from lordba.cli._base import UsageError, usage_error
    from lordba.cli._generation import runtime

    try:
        with runtime(args):
            return _generate(args)
    except UsageError as err:
        return usage_error(NAME, err)


def _generate(args: argparse.Namespace) -> int:
    from lordba.cli._generation import chat_text, check_text, encode, load, stream

    prompt = check_text(args.prompt, "PROMPT")
    loaded = load(args)
    if args.chat_template:
        text = chat_text(loaded, [{"role": "user", "content": prompt}], args.model)
    else:
        text = prompt
    ids = encode(loaded, text, "PROMPT", special=not args.chat_template)
    stream(loaded, ids, args)
    return 0
