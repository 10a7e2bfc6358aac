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
        "--overwrite", action="store_true", help="replace OUT if it exists (never the input or one of its parents)"
    )


def run(args: argparse.Namespace) -> int:
    out = export_lora(args.directory, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote PEFT LoRA adapter to {out} (peft_type LORA, {args.dtype})")
    return 0
