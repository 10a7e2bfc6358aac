"""The result files of the lab's long jobs (the demo, the sweep, the benchmarks), each replaced whole or not
at all: a run that fails writing one (a full disk, a kill) leaves the earlier run's file as it was, never a
truncated JSON, report or plot in its place (:func:`lordba.format.atomic.atomic_write_bytes`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from lordba.format.atomic import atomic_write_bytes


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Render the matplotlib figure ``fig`` in memory (the format from ``path``'s suffix) and write it to
    ``path`` atomically; ``kwargs`` go to ``savefig`` (``dpi``). Returns the path."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buffer.getvalue())
    return path
