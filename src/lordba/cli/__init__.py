"""The ``lordba`` command line: one small module per subcommand.

Each subcommand is a module that defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``: the library's own are ``lordba/cli/<something>_cmd.py`` (discovered, so adding
one touches no shared file); others join through the ``lordba.commands`` entry-point group (the lab's
``demo``, ``bench``, ``fuzz``, ... from ``lab/``), so the library never imports them. Exit codes
scripts can rely on:

* 0: success
* 1: unexpected internal error (a bug: please report it)
* 2: usage error (bad arguments)
* 3: invalid input: a bad, corrupt or mismatched adapter, config or data file (a ``LoRDBAError``)
* 130: interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from lordba._version import __version__
from lordba.errors import LoRDBAError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
COMMANDS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_cmd")))
ENTRY_POINT_GROUP = "lordba.commands"
# Commands of the lab (lab/ in the repository), named here only to say how to get them.
LAB_COMMANDS = ("bench", "demo", "fetch-assets", "fuzz", "reproduce", "train")


def _command_modules() -> list[ModuleType]:
    """The library's subcommand modules, then those registered by installed distributions."""
    modules = [importlib.import_module(f"{__name__}.{name}") for name in COMMANDS]
    own = {m.NAME for m in modules}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in own:
            modules.append(ep.load())
    return modules


def _missing_lab_command(argv: Sequence[str]) -> str | None:
    """The lab command ``argv`` asks for when the lab is not installed, else None."""
    first = next((a for a in argv if not a.startswith("-")), None)
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return first if first in LAB_COMMANDS and first not in names else None


def build_parser() -> argparse.ArgumentParser:
    """The ``lordba`` argument parser with every subcommand (the library's and those of installed entry points)."""
    parser = argparse.ArgumentParser(
        prog="lordba",
        description="LoRDBA: 1-bit double-binary LoRA adapters (train, convert, inspect, export, benchmark).",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage error, 3 invalid input file/config, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"lordba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in sorted(_command_modules(), key=lambda m: m.NAME):
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit code (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lab = _missing_lab_command(argv)
    if lab is not None:
        print(
            f"lordba {lab}: this command is part of the lordba lab, which is not installed; from a clone of the "
            "repository: pip install -e lab (scripts/setup.sh does it)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    # bitsandbytes (imported by peft) logs a warning on CPUs with AVX-512 BF16 when the optional
    # `kernels` hub package is absent; lordba never uses that kernel, so the line is only noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return int(args._run(args) or 0)
    except LoRDBAError as err:
        print(f"lordba {args.command}: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print(f"lordba {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(f"lordba {args.command}: internal error (a bug in lordba; please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def entry_point() -> None:
    """The console script: :func:`main`, then exit with its code."""
    sys.exit(main())
