"""The options ``lordba generate`` and ``lordba chat`` share (:func:`add_model_arguments`) and their checks: the model
and its one adapter, the base's quantization, how the branch computes, sampling and how the decode step compiles. It
imports no torch (``lordba generate --help`` stays fast)."""

from __future__ import annotations

import argparse
from typing import Any

from lordba.cli import mass_fraction, non_negative_float, non_negative_int, positive_int
from lordba.cli._base import add_quant_arguments

DEFAULT_NEW_TOKENS = 128


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter``, the base's quantization (:func:`~lordba.cli._base.add_quant_arguments`) and the
    sampling options."""
    p.add_argument("--model", required=True, help="transformers model folder, or 'default' (the lab's default model)")
    p.add_argument(
        "--adapter",
        default=None,
        action=_OneAdapter,
        help="LoRDBA adapter folder (or Hub id) to apply; default: the base alone (one adapter per run)",
    )
    add_quant_arguments(
        p,
        "the base the --adapter was trained on (the quantization its config records; unquantized where it records "
        "none); without --adapter, q4",
    )
    p.add_argument(
        "--branch-compute",
        default=None,
        choices=("exact", "fast"),
        help="how the adapter's branch computes a prompt on a float32 or HQQ base (default: "
        "$LORDBA_BRANCH_COMPUTE, else fast: bfloat16 with float32 sums on the CPU's tile unit where it has "
        "AMX-BF16, elsewhere float32; exact: float32, bit for bit the trained model's; q4 follows "
        "--q4-compute; docs/kernels.md)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help=f"most tokens to generate (default {DEFAULT_NEW_TOKENS}, or what the model's context leaves); more "
        "than the context leaves after the prompt is an error",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature; 0 is greedy (default 0). The next token is chosen by --temperature and --top-p "
        "alone, as lordba serve chooses it: no setting of the model's generation config (top-k, min-p, ...)",
    )
    p.add_argument("--top-p", type=mass_fraction, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=seed, default=0, help=f"sampling seed, 0 to {SEED_MAX} (default 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    compiled = p.add_mutually_exclusive_group()  # two ways to compile the decode step: one at a time
    compiled.add_argument(
        "--compile",
        action="store_true",
        help="static KV cache + torch.compile of the decode step (faster tokens after a one-time compile of "
        "~1 min for SmolLM2-135M on 2 cores, less when inductor's cache is warm; falls back to eager on failure)",
    )
    compiled.add_argument(
        "--aot",
        action="store_true",
        help="decode with an ahead-of-time compiled step (AOTInductor: no Python per token; the fastest "
        "decode on CPU). The first run for a model, adapter and cache length compiles (~1 min on 2 cores, "
        "kept in the lordba cache); each start exports the step (~10-30 s); falls back to eager on failure",
    )
    p.add_argument(
        "--kv-dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="KV cache dtype with --aot (default float16, as llama.cpp's: half the bytes attention reads per "
        "token; float32: the model's own results)",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode with --compile (default: default)",
    )


def check_decode_options(args: argparse.Namespace) -> None:
    """Refuse an option of one way to decode given without it: ``--kv-dtype`` sets ``--aot``'s KV cache and
    ``--compile-mode`` is ``--compile``'s mode; either alone would be ignored (the eager decode keeps the model's
    dtype and compiles nothing), as ``--q4-compute`` with another base would be (:func:`~lordba.cli._base.choose_base`).

    Raises:
        UsageError: either is given without its option (the commands exit 2, before the model loads).
    """
    from lordba.cli._base import UsageError

    if getattr(args, "kv_dtype", None) and not getattr(args, "aot", False):
        raise UsageError("--kv-dtype is the KV cache dtype of --aot's decode step: give --aot, or leave --kv-dtype out")
    if getattr(args, "compile_mode", None) and not getattr(args, "compile", False):
        raise UsageError("--compile-mode is the torch.compile mode of --compile: give --compile, or leave it out")


SEED_MAX = 2**64 - 1  # the most torch.manual_seed takes


def seed(text: str) -> int:
    """``--seed``: an integer from 0 to :data:`SEED_MAX`; ``argparse.ArgumentTypeError`` otherwise (a larger one
    overflowed in ``torch.manual_seed``, an internal error after the model had loaded)."""
    value = non_negative_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX}, got {text!r}")
    return value


class _OneAdapter(argparse.Action):
    """``--adapter``, given once: argparse would keep the last of several silently (B alone, as if A and B ran)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, flag: Any = None
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"argument {flag}: given twice; one adapter per run (adapters are not stacked)")
        setattr(namespace, self.dest, value)
