"""A full disk for the files this process writes: ``RLIMIT_FSIZE`` (writes past the limit fail with EFBIG,
SIGXFSZ ignored), so that a writer's behaviour on a write that fails half-way can be checked."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def disk_full_after(nbytes: int) -> Iterator[None]:
    """Within the block, no file of this process can grow past ``nbytes`` (its writes fail half-way)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
