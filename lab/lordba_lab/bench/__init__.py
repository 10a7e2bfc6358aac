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
import subprocess
from pathlib import Path
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
    import lordba

    return {
        "lordba": lordba.__version__,
        "commit": commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # instruction-set limits in force (an AVX2 machine measured on a newer one: docs/kernels.md)
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
    }


def commit() -> str | None:
    """The git commit of the lordba checkout this lab runs from (``+dirty`` appended where tracked files differ
    from it), or ``None`` when it does not run from one (an installed wheel; a ``git`` that fails)."""
    here = Path(__file__).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here.parent), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")  # this file's own repository, not one an install sits in
    if top is None or Path(top, "lab", "lordba_lab", "bench", "__init__.py").resolve() != here:
        return None
    head, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    if head is None:
        return None
    return head + ("+dirty" if changes else "")
