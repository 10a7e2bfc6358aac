"""``lordba demo``: the main job: LoRDBA vs fp16 LoRA and low-bit LoRA baselines on a real model."""

from __future__ import annotations

import argparse

from lordba.cli import output_directory

NAME = "demo"
HELP = "train and compare LoRDBA (4 modes), fp16 LoRA and low-bit LoRA baselines on SmolLM2 + real data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", type=output_directory, default="results/demo", help="output directory (default results/demo)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny structural run (about 30 seconds once set up)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the demo into ``--out``; returns 0. A missing matplotlib is reported before any training."""
    import lordba_lab.demo.plots  # noqa: F401  (matplotlib: fail now, not after minutes of training)
    from lordba_lab.demo import run_demo

    rows = run_demo(args.out, quick=args.quick, progress=not args.quiet)
    print(f"wrote {len(rows)} rows to {args.out}/results.json, results.md and the plots")
    return 0
