"""``lordba build-kernels``: compile the CPU kernels ahead of time (for set-up scripts) and report.

Without a C++ compiler the library still works (pure-PyTorch fallback, with a warning), so by
default a failed build is reported and the command exits 0; ``--strict`` makes it exit 3.
"""

from __future__ import annotations

import argparse
import time

from lordba.errors import LoRDBAError

NAME = "build-kernels"
HELP = "compile the CPU kernels once (cached per machine) and report which kernels lordba will use"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="recompile even if a cached build exists")
    p.add_argument("--strict", action="store_true", help="exit with status 3 if the kernels cannot be built")


def _q4_features() -> str:
    """Which of the q4 kernels' CPU-specific paths this machine runs."""
    from lordba.kernels.q4 import amx_prefill_available, bf16_dot_available, int8_dot_available, native_bfloat16

    found = {
        "bfloat16 prefill GEMM": native_bfloat16(),
        "adapter prefill on the tile unit (AMX)": amx_prefill_available(),
        "bfloat16 one-token kernel": bf16_dot_available(),
        "int8 one-token kernel": int8_dot_available(),
    }
    return ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in found.items())


def _bound_calls() -> str:
    """Whether eager decode's bound kernel calls are built (:mod:`lordba.kernels.cpu.bound`), building them now."""
    from lordba.kernels.cpu import bound

    start = time.perf_counter()
    found = bound.module()
    took = time.perf_counter() - start
    return f"yes ({took:.1f} s)" if found is not None else "no (ops are called through torch.ops; see the log)"


def run(args: argparse.Namespace) -> int:
    import torch

    from lordba.kernels import cpu, load_cpu, triton_available
    from lordba.kernels.cpu import bound

    if args.force:  # the kernels' library and the bound calls' module
        cpu.clean()
        bound.clean()
    start = time.perf_counter()
    result = load_cpu(build=True, warn=False)
    took = time.perf_counter() - start
    if result.ok:
        isa = torch.ops.lordba.isa()
        print(f"CPU kernels: {result.message} in {took:.1f} s ({isa}): {result.path}")
        print(f"  4-bit base: {_q4_features()}")
        print(f"  bound calls (eager decode): {_bound_calls()}")
    else:
        print(f"CPU kernels: NOT available, the pure-PyTorch fallback will run.\n{result.message}")
    print(f"Triton (GPU) kernels: {'available' if triton_available() else 'not available (no CUDA or no triton)'}")
    if not result.ok and args.strict:
        raise LoRDBAError(f"the CPU kernels could not be built: {result.message.splitlines()[0]}")
    return 0
