"""The ``lordba`` command line: one small module per subcommand.

Each subcommand is a module ``lordba/cli/<something>_cmd.py`` that defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; modules are discovered, so adding a command
touches no shared file. Exit codes scripts can rely on:

* 0: success
* 1: unexpected internal error (a bug: please report it)
* 2: usage error (bad arguments)
* 3: invalid input: a bad, corrupt or mismatched adapter, config or data file (a ``LoRDBAError``)
* 130: interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import LoRDBAError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
COMMANDS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_cmd")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lordba",
        description="LoRDBA: 1-bit double-binary LoRA adapters (train, convert, inspect, export, benchmark).",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage error, 3 invalid input file/config, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"lordba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = [importlib.import_module(f"{__name__}.{name}") for name in COMMANDS]
    for module in sorted(modules, key=lambda m: m.NAME):
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
    sys.exit(main())
