"""``lordba reproduce``: the longer sweep of the paper's comparisons (quality vs size, over seeds)."""

from __future__ import annotations

import argparse

from lordba.cli import output_directory, positive_int

NAME = "reproduce"
HELP = "sweep LoRDBA (ptq, qat) against fp16 LoRA and low-bit baselines across sizes and seeds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", type=output_directory, default="results/reproduce", help="output directory (default results/reproduce)"
    )
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default 3; quick: 2)")
    p.add_argument("--quick", action="store_true", help="a tiny structural run (under a minute)")
    p.add_argument(
        "--all-sizes",
        action="store_true",
        help="QAT and scales-only at r=4, 8, 16 and fp16 LoRA trained at r=1, 2 (default: r=16 only; ~3x the time)",
    )
    p.add_argument(
        "--r16-only",
        action="store_true",
        help="only the points derived from or trained at r=16 (ptq int8/int4, qat, scales-only, the baselines): "
        "the second model's sweep",
    )
    p.add_argument(
        "--sizes-only",
        action="store_true",
        help="only the trained points --all-sizes adds (qat and scales-only at r=4, 8; fp16 LoRA at r=1, 2), with "
        "the LoRA r=16 they are judged against: read beside the default sweep's run (same seeds, held-out set)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="an embedded model (smollm2-135m-instruct, the default; gemma-3-270m) or a transformers folder",
    )
    p.add_argument("--task", default=None, help="a built-in task (default reverse_words; sotu: held-out loss only)")
    p.add_argument(
        "--scales-fresh-batches",
        action="store_true",
        help="scales-only trains on the batches after the fp16 LoRA's instead of re-reading its first ones "
        "(on a text corpus the re-read batches are memorised)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the seeds an earlier run with the same settings finished (OUT/seeds/) instead of rerunning them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the sweep into ``--out``; returns 0. A missing matplotlib is reported before any training."""
    import lordba_lab.demo.plots  # noqa: F401  (matplotlib: fail now, not after the sweep)
    from lordba_lab.demo.reproduce import run_reproduce

    result = run_reproduce(
        args.out,
        quick=args.quick,
        seeds=args.seeds,
        progress=not args.quiet,
        all_sizes=args.all_sizes,
        resume=args.resume,
        r16_only=args.r16_only,
        model=args.model,
        task=args.task,
        sizes_only=args.sizes_only,
        scales_fresh_batches=args.scales_fresh_batches,
    )
    print(f"wrote {len(result['points'])} points to {args.out}/reproduce.json, reproduce.md and the plots")
    return 0
