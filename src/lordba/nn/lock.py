"""A writer-preferring, re-entrant reader/writer lock for a model's adapters.

Forward calls hold it shared; operations that change adapters (set, load, hot-swap, delete,
merge) hold it exclusively, so every forward sees one consistent set of adapters and weights.
A thread may re-enter a lock it holds (a writer may also read); a reader cannot become a writer
(changing adapters from inside a forward raises :class:`~lordba.errors.AdapterStateError`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from lordba._util.interrupts import generator_block
from lordba.errors import AdapterStateError

# how long a waiting thread sleeps before it checks the state again without being woken: a Ctrl-C in the thread giving
# the lock back, inside Condition.notify_all (Python code), can leave it unwoken (it waited for good)
RECHECK_S = 0.1

# ``contextlib.contextmanager`` for a generator taking a lock: a Ctrl-C cannot leave it holding (GeneratorBlock)
holding = generator_block


class Condition:
    """A condition variable on a plain ``threading.Lock`` that its users hold through ``with``. ``threading.Condition``
    gives the lock back and takes it again in ``wait`` in Python code (``_release_save``, ``_acquire_restore``): a
    Ctrl-C just after the one or at the start of the other raised without the lock, and the caller's ``with`` then
    released a lock it did not hold (RuntimeError: release unlocked lock, or another thread's hold given away). Here
    both are calls of the C lock inside the ``try``. A waiter that a Ctrl-C in ``notify_all`` left asleep wakes after
    its timeout (its caller checks the state again)."""

    __slots__ = ("_mutex", "_waiters")

    def __init__(self, mutex: threading.Lock) -> None:
        self._mutex, self._waiters = mutex, []

    def wait(self, timeout: float = RECHECK_S) -> None:
        """Sleep, the lock (held) given back, until notified or ``timeout`` seconds passed; the lock held again."""
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        try:
            self._mutex.release()
            waiter.acquire(True, timeout)
        finally:
            self._mutex.acquire()
            if waiter in self._waiters:  # (not notified)
                self._waiters.remove(waiter)

    def notify_all(self) -> None:
        """Wake every waiting thread (the lock held)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()


class RWLock:
    """Many readers or one writer; waiting writers go first."""

    def __init__(self) -> None:
        # Held through the C lock itself (``with self._mutex``): its enter and exit run no Python code, so a Ctrl-C
        # cannot stop between taking it and releasing it (Condition.__exit__ is Python: it could, lock kept for good).
        self._mutex = threading.Lock()
        self._cond = Condition(self._mutex)
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> RWLock:
        return RWLock()

    def __reduce__(self) -> tuple:
        return (RWLock, ())

    @holding
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
        counted = False
        try:  # (the count inside: a Ctrl-C right after it still takes it back)
            with self._mutex:
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
                self._readers += 1
                counted = True  # (no signal is handled between the count and this)
            self._local.depth = 1
            yield
        finally:
            if counted:
                self._local.depth = 0
                with self._mutex:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @holding
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively for the block (re-entrant for the writing thread)."""
        me, held = threading.get_ident(), False
        try:  # (taking it inside: a Ctrl-C right after still gives it back)
            with self._mutex:
                if self._writer == me:
                    self._writer_depth += 1
                    held = True
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
                    held = True  # (no signal is handled between the two lines above and this)
            yield
        finally:
            if held:
                with self._mutex:
                    self._writer_depth -= 1
                    if not self._writer_depth:
                        self._writer = None
                        self._cond.notify_all()
