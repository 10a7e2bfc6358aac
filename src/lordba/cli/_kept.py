"""The process state a command may change and :func:`lordba.cli.main` gives back: the random generators and torch's
thread count (the lab's ``train`` and ``bench`` seed the generators, ``generate`` sets the thread count)."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def kept_generators() -> Iterator[None]:
    """Restore, on leaving, Python's ``random``, NumPy's global generator and torch's CPU generator, CUDA generators
    and thread count as they were on entering: those of modules imported by then (a caller in the same process, a
    test or a notebook, has imported what it draws from; ``lordba --help`` imports neither NumPy nor torch)."""
    saved = _state()
    try:
        yield
    finally:
        _restore(saved)


def _state() -> dict[str, Any]:
    state: dict[str, Any] = {"random": random.getstate()}
    numpy = sys.modules.get("numpy")
    if numpy is not None and hasattr(numpy, "random"):
        state["numpy"] = numpy.random.get_state()
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_rng_state"):  # (not one still being imported)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        state["torch"] = (torch.get_rng_state(), torch.get_num_threads(), cuda)
    return state


def _restore(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    if "numpy" in state:
        sys.modules["numpy"].random.set_state(state["numpy"])
    if "torch" in state:
        torch = sys.modules["torch"]
        generator, threads, cuda = state["torch"]
        torch.set_rng_state(generator)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
