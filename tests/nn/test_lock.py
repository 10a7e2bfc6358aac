"""The model's readers-writer lock: many readers or one writer, waiting writers first, re-entrant."""

import contextlib
import signal
import threading

import pytest

from _interrupts import (
    Attempt,
    ctrl_c_at_each_check,
    ctrl_c_while_giving_back_wakes_the_waiter,
    held_by_another_thread,
)
from lordba.nn.lock import RWLock


class Interrupted(Exception):
    """What a signal handler raises in the waiting thread (as Ctrl-C's KeyboardInterrupt does)."""


def _interrupt(signum, frame):
    raise Interrupted


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread")
def test_a_writer_interrupted_while_it_waits_leaves_the_lock_usable():
    """A writer waiting for readers and interrupted there (Ctrl-C in a notebook while another thread
    generates) no longer counts as waiting: later readers and writers go on (was: it stayed counted as a
    waiting writer, so every later forward of the model waited forever)."""
    lock = RWLock()
    inside, release = threading.Event(), threading.Event()

    def reader():
        with lock.read():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=reader)
    thread.start()
    assert inside.wait(10)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            with lock.write():
                pass  # never reached: the reader holds the lock
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    release.set()
    thread.join(10)
    done = []

    def later():
        with lock.read():
            done.append("read")
        with lock.write():
            done.append("write")

    other = threading.Thread(target=later, daemon=True)
    other.start()
    other.join(10)
    assert done == ["read", "write"], "the lock stayed blocked after the interrupted writer"


@pytest.mark.parametrize("how", ["read", "write", "write in write", "read in write"])
def test_a_ctrl_c_anywhere_while_taking_the_lock_leaves_it_free(how):
    """Ctrl-C at each point where Python handles it while taking the lock, from the start to the block's first
    line, in turn: the lock is free after it (was: one landing after the count and before the ``try`` kept a reader or
    the writer counted for good, and one in ``Condition.__exit__`` kept its mutex: every later write of the model
    waited forever; one in contextlib's ``__enter__`` as the lock's generator yielded kept the lock while the
    traceback lived, as a notebook keeps it: another thread's write waited, this thread's raised AdapterStateError)."""
    from lordba._util import interrupts
    from lordba.nn import lock as lock_module

    files = {threading.__file__, contextlib.__file__, lock_module.__file__, interrupts.__file__}
    for attempt in ctrl_c_at_each_check(files):
        lock, n = RWLock(), attempt.n
        outer = lock.write() if how.endswith("in write") else None
        if outer is not None:
            outer.__enter__()
        inner = lock.read() if how.startswith("read") else lock.write()
        with attempt, inner:
            attempt.reached()
        held = (threading.get_ident(), 1) if outer is not None else (None, 0)
        state = (lock._readers, lock._writer, lock._writer_depth, lock._waiting_writers, lock._mutex.locked())
        assert state == (0, *held, 0, False), (n, state)  # (before releasing the outer one: a kept mutex hangs it)
        assert getattr(lock._local, "depth", 0) == 0, n
        if outer is not None:
            outer.__exit__(None, None, None)
            assert (lock._writer, lock._writer_depth) == (None, 0), n


@pytest.mark.parametrize("held", ["read", "write"])
def test_a_ctrl_c_anywhere_while_giving_the_lock_back_still_wakes_a_waiting_thread(held):
    """Ctrl-C at each point where Python handles it while this thread gives the lock back, in turn, another thread
    waiting for it (a writer for this reader, a reader for this writer): the other thread gets the lock (was: one
    inside ``Condition.notify_all``, Python code, left it asleep for good: a hang of the other thread)."""
    from lordba._util import interrupts
    from lordba.nn import lock as lock_module

    files = {threading.__file__, contextlib.__file__, lock_module.__file__, interrupts.__file__}

    def setup():
        lock = RWLock()
        mine = lock.read() if held == "read" else lock.write()
        return mine, lock.write if held == "read" else lock.read, lock._cond

    ctrl_c_while_giving_back_wakes_the_waiter(files, setup)


@pytest.mark.parametrize("how", ["read", "write"])
def test_a_ctrl_c_anywhere_while_waiting_for_the_lock_raises_it_and_leaves_the_lock_consistent(how):
    """Ctrl-C at each of the first points where Python handles it while this thread waits for the lock another
    thread holds, in turn: KeyboardInterrupt comes out, nothing counted, the mutex free (was: one inside
    ``Condition.wait`` just after it gave the mutex back, or as it took it again, raised RuntimeError: release
    unlocked lock, the ``with`` releasing a mutex this thread did not hold: another thread's hold given away)."""
    from lordba._util import interrupts
    from lordba.nn import lock as lock_module

    files = {threading.__file__, contextlib.__file__, lock_module.__file__, interrupts.__file__}

    for n in range(1, 40):
        lock = RWLock()
        with held_by_another_thread(lock.read if how == "write" else lock.write):
            attempt = Attempt(n, files)
            with attempt, lock.write() if how == "write" else lock.read():  # (a RuntimeError would come out)
                attempt.reached()
            assert isinstance(attempt.error, KeyboardInterrupt) and not attempt.finished, n
            assert (lock._waiting_writers, lock._mutex.locked(), getattr(lock._local, "depth", 0)) == (0, False, 0), n
        assert (lock._readers, lock._writer, lock._writer_depth, lock._waiting_writers) == (0, None, 0, 0), n


@pytest.mark.parametrize("how", ["read", "write"])
def test_a_holding_blocks_close_gives_the_lock_back_and_does_nothing_once_it_is_given_back(how):
    """``close()`` of a held block (what a generator holding it inside its own calls on an exception) gives the lock
    back; after the block ended, or called again, it changes nothing."""
    lock = RWLock()
    held = lock.read() if how == "read" else lock.write()
    held.__enter__()
    held.close()
    assert (lock._readers, lock._writer, lock._writer_depth, getattr(lock._local, "depth", 0)) == (0, None, 0, 0)
    held.close()
    with lock.write():  # (another block of this thread while one is held: the count stays that one's)
        ended = lock.read() if how == "read" else lock.write()
        with ended:
            pass
        ended.close()
        assert (lock._writer, lock._writer_depth, lock._readers) == (threading.get_ident(), 1, 0)
    assert (lock._readers, lock._writer, lock._writer_depth) == (0, None, 0)
