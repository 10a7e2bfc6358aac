"""Run the ``latency`` suite with the options ``lordba bench`` does not pass (base quantization,
threads). Usage: ``python benchmarks/latency.py [--quick] [--out DIR] [--base none|hqq|bnb] [--threads N]``."""

import argparse
from pathlib import Path

from lordba_lab.bench import latency


def main() -> None:
    p = argparse.ArgumentParser(description=latency.HELP)
    p.add_argument("--quick", action="store_true", help="demo shapes, r=16, few repeats (about a minute)")
    p.add_argument("--out", default="results/bench", help="output directory (default results/bench)")
    p.add_argument("--base", choices=("none", "hqq", "bnb"), default=None, help="quantize the demo model's base")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    for path in latency.run(Path(args.out), args.quick, base=args.base, threads=args.threads):
        print(path)


if __name__ == "__main__":
    main()
