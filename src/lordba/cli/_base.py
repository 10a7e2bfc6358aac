"""The frozen base ``lordba generate``, ``chat`` and ``serve`` run adapters on: the options that choose its
quantization (``--quant``, ``--bits``, ``--group-size``, ``--q4-compute``: defined here once) and ``--quant auto``,
the base quantization the adapters record (their config's ``base_quantization``: the base they were trained on)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from lordba.cli import positive_int

BACKENDS = ("q4", "hqq", "bnb", "none")  # what --quant builds (lordba.quant.QUANT_BACKENDS; not imported: torch)
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64
_LISTED = 3  # adapter names a startup line lists


class UsageError(Exception):
    """Options that do not fit together, or that ``--quant auto`` cannot decide: the command exits 2."""


def usage_error(command: str, err: UsageError) -> int:
    """Say ``err`` as ``lordba COMMAND: error: ...`` on stderr; returns the usage error's exit code (2)."""
    from lordba.cli import EXIT_USAGE

    print(f"lordba {command}: error: {err}", file=sys.stderr)
    return EXIT_USAGE


def add_quant_arguments(p: argparse.ArgumentParser, auto: str) -> None:
    """``--quant`` (default ``auto``: ``auto`` says what that is for the command), ``--bits``, ``--group-size``
    and ``--q4-compute``."""
    p.add_argument(
        "--quant",
        default="auto",
        choices=("auto", *BACKENDS),
        help=f"quantization of the base's linear layers: q4 (lordba's fast 4-bit CPU base), hqq, bnb (NF4) or none; "
        f"default auto: {auto}",
    )
    p.add_argument(
        "--bits",
        type=positive_int,
        default=None,
        help=f"base weight bits (default: the adapters' record, else {DEFAULT_BITS}; q4 and bnb take 4 only)",
    )
    p.add_argument(
        "--group-size",
        type=positive_int,
        default=None,
        help=f"base quantization group size (default: the adapters' record, else {DEFAULT_GROUP_SIZE}; q4: a "
        "multiple of 32, hqq: of 8)",
    )
    p.add_argument(
        "--q4-compute",
        default=None,
        choices=("exact", "fast", "fast-int8"),
        help="how the q4 base computes (a q4 base only; default: $LORDBA_Q4_COMPUTE, else fast: bfloat16 operands "
        "where the CPU has native bfloat16 (prefill GEMM, decode inputs); exact: float32 throughout; fast-int8: int8 "
        "decode inputs, faster and less accurate; docs/kernels.md)",
    )


@dataclass(frozen=True)
class Base:
    """The base to build: ``backend`` (one of :data:`BACKENDS`), its ``bits`` and ``group_size``, the q4 base's
    ``compute`` (None: its default) and ``why`` it was chosen."""

    backend: str
    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    compute: str | None = None
    why: str = ""

    def describe(self) -> str:
        """``q4 (4-bit, groups of 64)``, ``unquantized``, ..."""
        if self.backend == "none":
            return "unquantized"
        unit = "blocks" if self.backend == "bnb" else "groups"
        compute = f", compute {self.compute}" if self.compute else ""
        return f"{self.backend} ({self.bits}-bit, {unit} of {self.group_size}{compute})"


def choose_base(args: argparse.Namespace, records: dict[str, dict[str, Any] | None], fallback: str) -> Base:
    """The base of ``args`` (``--quant``, ``--bits``, ``--group-size``, ``--q4-compute``): ``--quant auto`` takes
    the quantization ``records`` (``{adapter name: its record}``) agree on, ``fallback`` (a backend, with the
    default bits and group size) where none records one; explicit ``--bits`` / ``--group-size`` win over a record.

    Raises:
        UsageError: the records disagree (naming two adapters and their records), one records a base ``--quant``
            cannot build, ``--q4-compute`` / ``--bits`` / ``--group-size`` is given for a base they do not apply
            to (they would be ignored), or the bits and group size are ones the backend does not take (``--quant q4
            --bits 8``).
    """
    if args.quant != "auto":
        base = Base(args.quant, why=f"--quant {args.quant}")
    else:
        base = _recorded(records, fallback)
    if base.backend == "none":
        given = [flag for flag, value in (("--bits", args.bits), ("--group-size", args.group_size)) if value]
        if given:
            raise UsageError(
                f"{' and '.join(given)}: the base is unquantized ({base.why}): give --quant q4, hqq or bnb, or "
                f"leave {' and '.join(given)} out"
            )
    if args.q4_compute and base.backend != "q4":
        raise UsageError(
            f"--q4-compute applies to the q4 base, and the base is {base.describe()} ({base.why}): give --quant q4, "
            "or leave --q4-compute out"
        )
    chosen = Base(base.backend, args.bits or base.bits, args.group_size or base.group_size, args.q4_compute, base.why)
    problem = _unbuildable(chosen)
    if problem:
        given = (("--bits", args.bits), ("--group-size", args.group_size))
        source = " ".join([f"--quant {args.quant}", *(f"{flag} {value}" for flag, value in given if value)])
        raise UsageError(
            f"{source}: the {chosen.backend} base {problem}, got {chosen.bits}-bit with groups of {chosen.group_size} "
            f"({chosen.why}): choose --quant, --bits and --group-size that fit together"
        )
    return chosen


def _unbuildable(base: Base) -> str | None:
    """What of ``base`` its backend cannot build (the checks of :func:`lordba.quant.quantize_model`, made before the
    model loads: they failed with exit 3 only once it had loaded), else None."""
    if base.backend == "q4" and (base.bits != 4 or base.group_size % 32):
        return "is 4-bit with groups of a multiple of 32"
    if base.backend == "hqq" and (base.bits not in (1, 2, 3, 4, 8) or base.group_size % 8):
        return "takes 1, 2, 3, 4 or 8 bits with groups of a multiple of 8"
    if base.backend == "bnb" and (base.bits != 4 or base.group_size != DEFAULT_GROUP_SIZE):
        return f"is NF4: 4-bit with blocks of {DEFAULT_GROUP_SIZE}"
    return None


def generation_base(args: argparse.Namespace) -> Base:
    """The base of ``lordba generate`` / ``chat`` (:func:`choose_base`): with ``--quant auto``, the quantization
    ``--adapter`` records, unquantized where it records none, and ``q4`` without ``--adapter``. Said on stderr in one
    line. ``--adapter`` is read first (a Hub id fetched) and checked as the loader checks it, so that an adapter that
    cannot be loaded is said before the base model loads, not after.

    Raises:
        UsageError: the options do not fit the base (``--q4-compute`` with another base, ...).
        LoRDBAError: an adapter that cannot be loaded (no such folder, a file missing, a PEFT LoRA, a corrupt file:
            the loader's own error), or a Hub id that cannot be fetched.
    """
    records = {}
    if args.adapter:
        from lordba.config import recorded_base_quantization
        from lordba.format.adapter import open_adapter
        from lordba.nn.hub import resolve_adapter_dir

        folder = resolve_adapter_dir(args.adapter)
        open_adapter(folder, warn_recovered=False).close()  # (its load warns, if an interrupted save left it)
        if args.quant == "auto":
            records[args.adapter] = recorded_base_quantization(folder)
    base = choose_base(args, records, "none" if args.adapter else "q4")
    print(f"[base: {base.describe()}: {base.why}]", file=sys.stderr)
    return base


def _recorded(records: dict[str, dict[str, Any] | None], fallback: str) -> Base:
    """The base ``--quant auto`` chooses for ``records`` (:func:`choose_base`)."""
    found = {name: record for name, record in records.items() if record is not None}
    if not found:
        if not records:
            return Base(fallback, why="no adapter to take the base quantization from")
        verb = "records" if len(records) == 1 else "record"
        return Base(fallback, why=f"{_names(list(records))} {verb} no base quantization")
    (first, record), *rest = found.items()
    for name, other in rest:
        if other != record:
            raise UsageError(
                f"--quant auto: the adapters {first!r} and {name!r} were trained on different bases ({first!r}: "
                f"{record}; {name!r}: {other}) and one base serves them all: choose it with --quant (and --bits, "
                "--group-size)"
            )
    if record["backend"] not in BACKENDS:
        raise UsageError(
            f"--quant auto: the adapter {first!r} records a base quantized as {record}, which --quant cannot build: "
            "choose the base with --quant"
        )
    unrecorded = [name for name in records if name not in found]
    why = f"the base {_names(list(found))} {'was' if len(found) == 1 else 'were'} trained on"
    if unrecorded:
        why += f" ({_names(unrecorded)} {'records' if len(unrecorded) == 1 else 'record'} none)"
    group = record["group_size"] if record["group_size"] is not None else DEFAULT_GROUP_SIZE
    bits = int(record["bits"]) if float(record["bits"]).is_integer() else record["bits"]  # 3.5: no base builds it
    return Base(record["backend"], bits, int(group), why=why)


def _names(names: list[str]) -> str:
    """``adapter 'a'``, ``adapters 'a', 'b'``, ``adapters 'a', 'b', 'c' and 4 more``."""
    shown = ", ".join(repr(n) for n in names[:_LISTED])
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"adapter{'s' if len(names) > 1 else ''} {shown}{more}"
