"""``lordba fuzz``: fuzz the adapter loader with untrusted-file mutations and report the outcome."""

from __future__ import annotations

import argparse
import json

from lordba.cli import non_negative_int, positive_float, positive_int

NAME = "fuzz"
HELP = "fuzz the adapter loader (coverage-guided with atheris, or structure-aware random) and report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lordba fuzz``."""
    from lordba_lab.fuzz.engine import ENGINES

    p.add_argument("--seconds", type=positive_float, default=60.0, help="time budget (default 60)")
    p.add_argument("--engine", choices=ENGINES, default=None, help="default: atheris if installed, else mutate")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--failures", default="fuzz-failures", help="directory for failing inputs (default fuzz-failures)")
    p.add_argument("--corpus", default=None, help="atheris corpus directory to keep between runs")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--mem-mb", type=positive_int, default=1024, help="address-space cap per worker above its start (MiB)"
    )
    p.add_argument(
        "--case-timeout", type=positive_float, default=20.0, help="seconds after which a case counts as a hang"
    )
    p.add_argument("--workers", type=positive_int, default=1, help="atheris: libFuzzer jobs run at once (default 1)")
    p.add_argument("--replay", nargs="+", metavar="CASE", help="run saved failing inputs again and print outcomes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Fuzz (or replay saved cases) as ``args`` say and print the report; returns 1 on an unclean case."""
    from lordba._util.tables import print_table
    from lordba_lab.fuzz.engine import default_engine, fuzz, replay
    from lordba_lab.fuzz.oracle import UNCLEAN

    if args.replay:
        rows = [(path, r.outcome, r.kind, r.detail[-300:]) for path, r in replay(args.replay)]
        print_table("replayed cases", ["case", "outcome", "kind", "detail"], rows)
        return 1 if any(row[1] == UNCLEAN for row in rows) else 0
    engine = args.engine or default_engine()
    report = fuzz(
        args.seconds,
        engine,
        out=args.out,
        failures_dir=args.failures,
        corpus_dir=args.corpus,
        seed=args.seed,
        mem_mb=args.mem_mb,
        case_timeout=args.case_timeout,
        progress=not args.no_progress,
        workers=args.workers,
    )
    print_table(
        f"lordba fuzz: {report['engine_version']}, {report['elapsed_s']} s",
        ["cases", "refused cleanly", "loaded validly", "failed uncleanly", "cases/s", "peak RSS (MiB)"],
        [
            (
                report["cases"],
                report["refused"],
                report["loaded"],
                report["unclean"],
                report["cases_per_s"],
                report["peak_rss_mb"],
            )
        ],
    )
    _print_problems(report, print_table)
    return 1 if report["unclean"] else 0


def _print_problems(report: dict, print_table) -> None:  # noqa: ANN001
    reasons = sorted(report["refusal_reasons"].items(), key=lambda kv: -kv[1])[:15]
    print_table("most frequent refusal reasons", ["reason", "cases"], reasons)
    if report["mutator_errors"] or report["worker_errors"]:
        print(
            f"fuzzer problems (not loader failures): {report['mutator_errors']} mutator errors, "
            f"{len(report['worker_errors'])} worker deaths outside a case; see the JSON report"
        )
    if report["unclean"]:
        print(json.dumps({"unclean_kinds": report["unclean_kinds"], "failures": report["failures"]}, indent=2))
