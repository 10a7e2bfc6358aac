"""``lordba convert PEFT_DIR OUT_DIR``: convert a trained PEFT LoRA adapter into a LoRDBA adapter (PTQ)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lordba.cli import _bounded, non_negative_int, positive_float, positive_int
from lordba.core.scales import SCALE_DTYPES

NAME = "convert"
HELP = "convert a PEFT LoRA adapter directory into a LoRDBA adapter (post-training, no data needed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lordba convert``; a number out of range is a usage error (exit code 2)."""
    from lordba.convert import GAUGES, METHODS

    p.add_argument("peft_dir", help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out_dir", help="output directory for the LoRDBA adapter (must not exist unless --overwrite)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--r",
        type=positive_int,
        default=None,
        help="rank of every LoRDBA layer (default: the LoRA's ranks); at most 32*in*out/(in+out) for each "
        "layer, above which its signs alone outweigh its update in float32",
    )
    size.add_argument(
        "--target-bpw",
        type=target_bpw,
        default=None,
        help="file bits per LoRA parameter (LoRA basis), at most 32; per-layer ranks chosen to minimise the error",
    )
    p.add_argument(
        "--alpha", type=positive_float, default=None, help="LoRDBA alpha (s = alpha/r; default: the lora_alpha)"
    )
    p.add_argument(
        "--scale-dtype",
        choices=SCALE_DTYPES,
        default="int8",
        help="storage of the scales (default int8: float16's held-out loss at 3/4 of its bytes; int4: about 1.27 bits "
        "per LoRA parameter at r=16, docs/format.md)",
    )
    p.add_argument(
        "--iters",
        type=non_negative_int,
        default=30,
        action=_Given,
        help="BCD iterations at most (default 30; --method init gives the closed form alone)",
    )
    p.add_argument(
        "--tol",
        type=tolerance,
        default=1e-3,
        action=_Given,
        help="stop when a BCD iteration improves the error by less than this fraction (default 0.001)",
    )
    p.add_argument("--gauge", choices=(*GAUGES, "best"), default="svd", help="start of the solver (default svd)")
    p.add_argument("--method", choices=METHODS, default="admm+bcd", help="sign solver (default admm+bcd)")
    p.add_argument(
        "--admm-iters",
        type=non_negative_int,
        default=None,
        help="ADMM iterations before BCD (default: convert_lora's, 20)",
    )
    p.add_argument(
        "--adapter-name",
        default="default",
        help="adapter to read (PEFT subfolder or key name; a name the folder lacks is refused)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (torch.load weights_only)")
    p.add_argument("--skip-unsupported", action="store_true", help="leave out non-LoRA tensors instead of failing")
    p.add_argument(
        "--report", type=Path, default=None, help="also write the report as JSON (and as Markdown beside it, .md)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or tables")


class _Given(argparse.Action):
    """Store the value, and its option's name in ``namespace.given``: the default is the library's, and ``run``
    refuses an option the ``--method`` does not use only when it was given."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object, flag: object = None
    ) -> None:
        setattr(namespace, self.dest, value)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def target_bpw(text: str) -> float:
    """A finite number > 0 and at most 32 (the LoRA itself in float32); ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, float, lambda v: math.isfinite(v) and 0 < v <= 32, "a number greater than 0 and at most 32")


def tolerance(text: str) -> float:
    """A number >= 0 (not NaN), as convert_lora takes it; ``argparse.ArgumentTypeError`` otherwise."""
    return _bounded(text, float, lambda v: v >= 0, "a number >= 0")


def run(args: argparse.Namespace) -> int:
    """Convert; returns 0, or 2 for a solver option the ``--method`` does not use."""
    from lordba.cli._base import UsageError, usage_error

    try:
        return _convert(args)
    except UsageError as err:
        return usage_error(NAME, err)


def _unused_options(args: argparse.Namespace) -> None:
    """Refuse a solver option given with a ``--method`` that does not use it (it was ignored silently).

    Raises:
        UsageError: ``--admm-iters`` (not 0) without ADMM, ``--iters`` (not 0) or ``--tol`` without BCD.
    """
    from lordba.cli._base import UsageError

    given = getattr(args, "given", set())
    for flag, value, solver, uses, asked in (
        ("--admm-iters", args.admm_iters, "ADMM", ("admm+bcd", "admm"), bool(args.admm_iters)),
        ("--iters", args.iters, "BCD", ("admm+bcd", "bcd"), "iters" in given and args.iters != 0),
        ("--tol", args.tol, "BCD", ("admm+bcd", "bcd"), "tol" in given),
    ):
        if asked and args.method not in uses:
            raise UsageError(
                f"{flag} {value}: --method {args.method} runs no {solver} iterations; use --method "
                f"{' or '.join(uses)}, or leave {flag} out"
            )


def _convert(args: argparse.Namespace) -> int:
    import dataclasses

    from lordba.convert import SolverOptions, check_output_dir, convert_lora, default_config, read_lora, save_converted
    from lordba.errors import ConversionError, LoRDBAError

    _unused_options(args)
    check_output_dir(args.out_dir, args.overwrite, source=args.peft_dir)  # fail before the work, not after
    if args.report is not None:
        _check_report_path(args.report)
    lora = read_lora(args.peft_dir, args.adapter_name, args.allow_pickle, args.skip_unsupported)
    _check_outside(Path(args.out_dir), "OUT_DIR", args.peft_dir)  # (a PEFT_DIR that holds no LoRA is said first)
    if args.report is not None:
        for target in (args.report, args.report.with_suffix(".md")):
            _check_outside(target, "--report", args.peft_dir, args.out_dir)
    config = None if args.alpha is None else dataclasses.replace(default_config(lora), alpha=args.alpha)
    admm = {} if args.admm_iters is None else {"admm_iters": args.admm_iters}
    options = SolverOptions(gauge=args.gauge, method=args.method, iters=args.iters, tol=args.tol, **admm)
    state, report = convert_lora(
        lora,
        config,
        r=args.r,
        target_bpw=args.target_bpw,
        scale_dtype=args.scale_dtype,
        progress=not args.quiet,
        options=options,
    )
    out = save_converted(state, report, args.out_dir, args.overwrite)
    if not args.quiet:
        report.print()
    if args.report is not None:
        try:
            report.write_json(args.report)
            report.write_markdown(args.report.with_suffix(".md"))
        except OSError as err:
            raise ConversionError(f"--report {args.report}: cannot write it ({err.strerror or err})") from None
        except LoRDBAError as err:
            raise ConversionError(f"--report {args.report}: cannot write it ({err})") from None
    print(
        f"wrote LoRDBA adapter to {out}: {len(report.layers)} layers, relative error of ΔW "
        f"{report.total_rel_error:.4f}, {report.size.file_bytes:,} bytes ({report.bpw_lora:.3f} BPW, LoRA basis; "
        f"{report.lora_fp16_file_bytes / report.size.file_bytes:.2f}x smaller than the LoRA in fp16)"
        + (
            f", plus {report.extra_tensor_bytes:,} bytes of tensors trained in full (modules_to_save, biases)"
            if report.extra_tensor_bytes
            else ""
        )
    )
    return 0


def _check_outside(path: Path, what: str, source: str, out: str | None = None) -> None:
    """Refuse, before any work, writing ``path`` inside the ``source`` folder (PEFT_DIR: a report named after
    one of its files replaced it, the LoRA lost; an OUT_DIR in it is one more folder PEFT_DIR holds), or
    a report inside ``out`` (it would replace a file of the adapter just written).

    Raises:
        ConfigError: ``path`` is ``source`` or lies inside it, or inside ``out``.
    """
    import os

    from lordba.errors import ConfigError

    real = Path(os.path.realpath(path))
    for folder, why in (
        (source, "PEFT_DIR, the LoRA converted: lordba convert writes nothing into it"),
        (out, "OUT_DIR, which the adapter replaces (its report is conversion_report.json there)"),
    ):
        if folder is not None:  # (an OUT_DIR not yet written too: a report there failed after the conversion)
            inside = Path(os.path.realpath(folder))
            if real == inside or inside in real.parents:
                raise ConfigError(f"{what} {path}: inside {folder} ({why}); write it elsewhere")


def _check_report_path(path: Path) -> None:
    """Refuse, before any work, a ``--report`` path that cannot take the JSON report and the Markdown
    beside it (``path`` with the suffix ``.md``).

    Raises:
        ConfigError: ``path`` ends in ``.md`` (the Markdown would replace the JSON), is a folder, or its
            folder does not exist.
    """
    from lordba.errors import ConfigError

    if path.suffix == ".md":
        raise ConfigError(f"--report {path}: the Markdown report is written beside the JSON as .md; name a .json file")
    for target in (path, path.with_suffix(".md")):
        if target.is_dir():
            raise ConfigError(f"--report {path}: {target} is a folder")
    if not path.absolute().parent.is_dir():
        raise ConfigError(f"--report {path}: its folder {path.absolute().parent} does not exist")
