"""Benchmark suites behind ``lordba bench``.

A suite is a module ``lordba/bench/<name>.py`` (discovered, so adding one touches no shared file)
defining:

* ``SUITE``: its name on the command line (``lordba bench --suite NAME``);
* ``HELP``: one line;
* ``DEFAULT``: whether ``lordba bench`` without ``--suite`` runs it;
* ``run(out_dir: Path, quick: bool) -> list[Path]``: measure, print a table, and write JSON (plus
  Markdown and a PNG where results are compared) into ``out_dir``; return the files written.

Benchmarks report what they measured, as ratios measured side by side in one run; absolute times
always come with the hardware they ran on (:func:`hardware`).
"""

from __future__ import annotations

import importlib
import pkgutil
import platform
from types import ModuleType


def suites() -> dict[str, ModuleType]:
    """``{suite name: module}`` of every benchmark suite."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "SUITE") and hasattr(module, "run"):
            found[module.SUITE] = module
    return found


ISA_LIMITS = ("LORDBA_CPU_ARCH", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "LORDBA_AMX")


def hardware() -> dict[str, object]:
    """What the numbers were measured on."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # instruction-set limits in force (an AVX2 machine measured on a newer one: docs/kernels.md)
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
    }
