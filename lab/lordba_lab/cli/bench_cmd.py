"""``lordba bench``: run benchmark suites and write their tables, JSON and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lordba.cli import EXIT_USAGE, output_directory
from lordba_lab.bench import suites

NAME = "bench"
HELP = "run benchmark suites (latency, training memory, conversion, ...) and write JSON, Markdown and plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", action="append", help="suite to run (repeatable; default: the default suites)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes and few repeats (minutes a suite; convert-quality first trains a SmolLM2 LoRA 10 steps)",
    )
    p.add_argument(
        "--out",
        type=output_directory,
        default="results/bench",
        help="output directory (default results/bench; several suites: a folder per suite in it)",
    )


def run(args: argparse.Namespace) -> int:
    available = suites()
    if args.list:
        for name, module in sorted(available.items()):
            print(f"{name:16s} {'(default) ' if module.DEFAULT else ''}{module.HELP}")
        return 0
    chosen = list(dict.fromkeys(args.suite or [n for n, m in sorted(available.items()) if m.DEFAULT]))
    unknown = [n for n in chosen if n not in available]
    if unknown:  # a usage error (exit 2), as argparse's choices would give
        print(f"lordba bench: unknown suite(s) {unknown}; available: {sorted(available)}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:  # suites name their files alike (latency's and e2e's bench.json): each its own folder
        files = available[name].run(out if len(chosen) == 1 else out / name, args.quick)
        print(f"suite {name}: wrote " + ", ".join(str(f) for f in files))
    return 0
