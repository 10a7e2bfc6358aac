"""A writer-preferring, re-entrant reader/writer lock for a model's adapters.

Forward calls hold it shared; operations that change adapters (set, load, hot-swap, delete,
merge) hold it exclusively, so every forward sees one consistent set of adapters and weights.
A thread may re-enter a lock it holds (a writer may also read); a reader cannot become a writer
(changing adapters from inside a forward raises :class:`~lordba.errors.AdapterStateError`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from lordba.errors import AdapterStateError


class RWLock:
    """Many readers or one writer; waiting writers go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> RWLock:
        return RWLock()

    def __reduce__(self) -> tuple:
        return (RWLock, ())

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared for the block (re-entrant; a writer may also read)."""
        me = threading.get_ident()
        depth = getattr(self._local, "depth", 0)
        if depth or self._writer == me:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively for the block (re-entrant for the writing thread)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                if getattr(self._local, "depth", 0):
                    raise AdapterStateError("cannot change adapters from inside a forward call of the same model")
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                except BaseException:  # interrupted while waiting (Ctrl-C): not waiting any more
                    self._waiting_writers -= 1
                    self._cond.notify_all()  # the readers held back for this writer go on
                    raise
                self._waiting_writers -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()
