"""Where lordba keeps what it builds or fetches (compiled kernels, models, quantized bases)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LORDBA_CACHE``, else ``$XDG_CACHE_HOME/lordba``, else ``~/.cache/lordba``."""
    if os.environ.get("LORDBA_CACHE"):
        return Path(os.environ["LORDBA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lordba"
