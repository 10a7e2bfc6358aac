"""The model's readers-writer lock: many readers or one writer, waiting writers first, re-entrant."""

import signal
import threading

import pytest

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
