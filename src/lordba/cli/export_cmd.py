"""``lordba export-lora DIR OUT``: write a plain PEFT LoRA adapter (for PEFT, vLLM, LoRAX, lm-eval)."""

from __future__ import annotations

import argparse

from lordba.convert.export import EXPORT_DTYPES, export_lora

NAME = "export-lora"
HELP = "export a LoRDBA adapter directory as a standard PEFT LoRA adapter (dense factors)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="LoRDBA adapter directory")
    p.add_argument("out", help="output directory for the PEFT LoRA adapter")
    p.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default="float16", help="factor dtype (default float16)")
    p.add_argument(
        "--base",
        metavar="PATH_OR_NAME",
        help="the base model (a folder, or a hub id in the local HF cache; default: the adapter config's "
        "base_model_name_or_path): its config.json gives the layer types and heads the export needs",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the export's files in OUT if it exists, keeping its other files (never the input or a parent)",
    )


def run(args: argparse.Namespace) -> int:
    """Export; a failed write (a full disk, a read-only file system) is a :class:`ConversionError` naming
    OUT (nothing is left there: the output is written atomically)."""
    from lordba.errors import ConversionError

    try:
        out = export_lora(args.directory, args.out, dtype=args.dtype, overwrite=args.overwrite, base=args.base)
    except OSError as err:
        raise ConversionError(f"{args.out}: cannot write the PEFT LoRA adapter ({err.strerror or err})") from None
    print(f"wrote PEFT LoRA adapter to {out} (peft_type LORA, {args.dtype})")
    return 0
