"""The ``lordba`` command line: one small module per subcommand.

Each subcommand is a module that defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``: the library's own are ``lordba/cli/<something>_cmd.py`` (discovered, so adding
one touches no shared file); others join through the ``lordba.commands`` entry-point group (the lab's
``demo``, ``bench``, ``fuzz``, ... from ``lab/``), so the library never imports them.

A command's module is imported only when that command runs (or shows its own ``--help``): the
top-level parser reads ``NAME`` and ``HELP`` from each module's source as string literals, so
``lordba --help`` imports neither torch nor any command. Heavy imports belong inside ``run``.
Exit codes scripts can rely on:

* 0: success
* 1: unexpected internal error (a bug: please report it)
* 2: usage error (bad arguments), or a command whose optional dependency is not installed (the
  message names what to install), or :func:`main` called while another thread's call of it runs (one command at a
  time per process)
* 3: invalid input: a bad, corrupt or mismatched adapter, config or data file (a ``LoRDBAError``), or a path
  the system refuses (an ``OSError`` naming it: no permission, a name too long, a full disk)
* 130: interrupted (Ctrl-C)
* 141: the output's reader went away (``lordba ... | head``: a broken pipe, as a shell reports SIGPIPE;
  quietly)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import pkgutil
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from lordba._version import __version__
from lordba.errors import LoRDBAError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INVALID, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 3, 130, 141
COMMANDS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_cmd")))
ENTRY_POINT_GROUP = "lordba.commands"
# Commands of the lab (lab/ in the repository), named here only to say how to get them.
LAB_COMMANDS = ("bench", "demo", "fetch-assets", "fuzz", "reproduce", "train")
_LAB_INSTALL = "pip install -e lab (from a clone of the repository; scripts/setup.sh does it)"
# Optional dependencies (top-level module -> how to install it): a command that needs one that is
# missing says this instead of reporting an internal error. The library's extras are those of
# pyproject.toml; the lab's dependencies come with the lab (lab/pyproject.toml).
OPTIONAL_MODULES = {
    "peft": "pip install 'lordba[peft]'",
    "hqq": "pip install 'lordba[quant]'",
    "bitsandbytes": "pip install 'lordba[quant]'",
    "triton": "pip install 'lordba[gpu]'",
    "fastapi": "pip install 'lordba[serve]'",
    "uvicorn": "pip install 'lordba[serve]'",
    "prometheus_client": "pip install 'lordba[serve]'",
    "openai": "pip install 'lordba[serve]'",
    "matplotlib": _LAB_INSTALL,
    "reasoning_gym": _LAB_INSTALL,
    "accelerate": _LAB_INSTALL,
    "gguf": _LAB_INSTALL,
}


@dataclass(frozen=True)
class Command:
    """A subcommand known by name and help text; ``load()`` imports its module."""

    name: str
    help: str
    load: Callable[[], ModuleType]


def _literals(origin: str | None) -> dict[str, str]:
    """The module-level ``NAME = "..."`` / ``HELP = "..."`` string literals of a source file."""
    if origin is None or not origin.endswith(".py"):
        return {}
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("NAME", "HELP") and isinstance(node.value, ast.Constant):
                found[node.targets[0].id] = node.value.value
    return {k: v for k, v in found.items() if isinstance(v, str)}


def _command(module_name: str, load: Callable[[], ModuleType]) -> Command:
    """The command of ``module_name`` from its source; its module is imported only if the source
    does not spell ``NAME`` and ``HELP`` as literals."""
    spec = importlib.util.find_spec(module_name)
    text = _literals(spec.origin if spec is not None else None)
    if "NAME" in text and "HELP" in text:
        return Command(text["NAME"], text["HELP"], load)
    module = load()
    return Command(module.NAME, module.HELP, lambda: module)


def commands() -> list[Command]:
    """The library's subcommands, then those registered by installed distributions (none imported)."""
    found = [_command(f"{__name__}.{n}", lambda n=n: importlib.import_module(f"{__name__}.{n}")) for n in COMMANDS]
    own = {c.name for c in found}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in own:
            found.append(_command(ep.module, ep.load))
    return sorted(found, key=lambda c: c.name)


def _missing_lab_command(argv: Sequence[str]) -> str | None:
    """The lab command ``argv`` asks for when the lab is not installed, else None."""
    first = _chosen(argv)
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return first if first in LAB_COMMANDS and first not in names else None


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (the top-level parser has no option that takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``lordba`` argument parser with every subcommand (the library's and those of installed
    entry points); only the options of ``command`` are added, so only that command's module is
    imported. Raises ``ModuleNotFoundError`` if that module needs a missing
    optional dependency at import."""
    parser = argparse.ArgumentParser(
        prog="lordba",
        description="LoRDBA: 1-bit double-binary LoRA adapters (train, convert, inspect, export, benchmark).",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage error or missing optional dependency, "
        "3 invalid input file/config, 130 interrupted, 141 the output's reader went away.",
    )
    parser.add_argument("--version", action="version", version=f"lordba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.name == command:
            module = cmd.load()
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def missing_dependency_hint(err: ModuleNotFoundError) -> str | None:
    """How to install the optional module whose absence raised ``err``; None if it is not one."""
    top = (err.name or "").split(".")[0]
    return OPTIONAL_MODULES.get(top)


def _run(command: str | None, argv: list[str]) -> int:
    args = build_parser(command).parse_args(argv)
    # bitsandbytes (imported by peft) logs a warning on CPUs with AVX-512 BF16 when the optional
    # `kernels` hub package is absent; lordba never uses that kernel, so the line is only noise. The level is
    # restored afterwards (a caller of main() keeps its logging as it was).
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return int(args._run(args) or 0)
    finally:
        log.setLevel(level)


_ONE_AT_A_TIME = threading.RLock()  # held by the thread whose main() runs (a command calling main() again: nested)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit code (module docstring).

    Warnings show as one line ``warning: <message>`` while it runs (not Python's source file, line number and
    code line); which are shown, and ``-W error``, are as Python's warning filters say. What a command changes of
    the process while it runs (the random generators and torch's thread count: :mod:`lordba.cli._kept`; the warning
    format, loggers) is restored when it returns: a caller in the same process (a test, a notebook) finds them as
    they were.

    One command runs at a time in a process: a call from another thread while one runs is refused (exit code 2, a
    line on stderr saying so). What a command changes is the process's (the random generators, the warning format,
    loggers), so two at once would run with each other's and, ending in the order they began, leave the process with
    the second one's saved copy of the first one's for good. Run commands side by side in processes of their own."""
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        print(
            f"lordba {_chosen(list(sys.argv[1:] if argv is None else argv))}: error: another lordba command is running "
            "in this process (lordba.cli.main runs one at a time: the settings a command holds are the process's); "
            "run it after that one ends, or in a process of its own",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return _main_alone(argv)
    finally:
        _ONE_AT_A_TIME.release()


def _main_alone(argv: Sequence[str] | None) -> int:
    """:func:`main`, the only one running: the process's settings a command changes given back when it returns."""
    from lordba.cli._kept import kept_generators

    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        with kept_generators(), warnings.catch_warnings():
            for message in _OTHERS_DEPRECATIONS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            return _main(argv)
    finally:
        warnings.formatwarning = previous


# Deprecation warnings one dependency gives for another's use of it, which no command-line user can act on (not shown
# while a command runs): PEFT's get_peft_model reads transformers 5's deprecated name (`lordba demo`, train, bench).
_OTHERS_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as the command line shows it: ``warning: <message>`` (a ``warnings.formatwarning``)."""
    return f"warning: {message}\n"


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen(argv)
    lab = _missing_lab_command(argv)
    if lab is not None:
        print(
            f"lordba {lab}: this command is part of the lordba lab, which is not installed; {_LAB_INSTALL}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return _run(command, argv)
    except LoRDBAError as err:
        print(f"lordba {command}: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print(f"lordba {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except ModuleNotFoundError as err:
        hint = missing_dependency_hint(err)
        if hint is None:
            return _internal(command)
        print(f"lordba {command}: needs the optional dependency {err.name!r}, not installed: {hint}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        if err.filename is None:  # no path of the user's to name: a bug, as before
            return _internal(command)
        paths = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        print(f"lordba {command}: error: {paths}: {err.strerror or err}", file=sys.stderr)
        return EXIT_INVALID
    except Exception:
        return _internal(command)


def _silence_stdout() -> None:
    """Point stdout at the null device, so that flushing it at exit does not raise again (Python's
    documented way to handle a closed pipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


def _internal(command: str | None) -> int:
    traceback.print_exc()
    print(f"lordba {command}: internal error (a bug in lordba; please report it)", file=sys.stderr)
    return EXIT_INTERNAL


def entry_point() -> None:
    """The console script: :func:`main`, then exit with its code."""
    sys.exit(main())


# argparse types for numeric options, so that a bad number is a usage error (exit code 2).
def positive_int(text: str) -> int:
    """An integer >= 1; ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0; ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0; ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0; ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def mass_fraction(text: str) -> float:
    """A number greater than 0 and at most 1 (a probability mass); ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, float, lambda v: 0 < v <= 1, "a number greater than 0 and at most 1")


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1; ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def output_directory(text: str) -> str:
    """A directory to write into (created if absent): refused if it names an existing non-directory or lies
    under a file; ``argparse.ArgumentTypeError`` then (a usage error, before any work is done)."""
    from pathlib import Path

    for path in (Path(text), *Path(text).parents):
        if path.exists():
            if not path.is_dir():
                raise argparse.ArgumentTypeError(f"must be a directory, but {str(path)!r} is a file")
            break
    return text


def _bounded(text: str, kind: type, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value
