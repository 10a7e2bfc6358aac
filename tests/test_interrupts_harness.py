"""The Ctrl-C harness (tests/_interrupts.py) against CPython 3.11's own check points: a real pending signal (set
from C code, no check point there) and the harness's Ctrl-C at each check point give the same outcomes."""

import _thread
import contextlib
import subprocess
import sys
from pathlib import Path

from _interrupts import ctrl_c_at_each_check


class _Trip:
    """``-_Trip()`` sets a pending SIGINT from C code (no check point), as a Ctrl-C pressed just then."""

    __neg__ = _thread.interrupt_main


class _NoTrip:
    __neg__ = int  # (the same code, no signal)


def _retry(state, trip):
    """A retry loop as the library's put-backs: the first try interrupted, the handler runs no call."""
    while True:
        try:
            if not state[0]:
                raise KeyboardInterrupt
            state[1] = "done"
            break
        except KeyboardInterrupt:
            state[0] = "caught"
            -trip  # (the pending Ctrl-C: the next check point is the jump back)


def _cleanup_after_raising_call(log):
    try:
        int("x")
    finally:
        log.append("finally")


def _value():
    return 1


def _return_in_try(log):
    try:
        return _value()
    finally:
        log.append("finally")


def _attempts(function, args_of):
    """``(escaped, args)`` of each attempt of ``function`` (this file traced) with fresh ``args_of()``; a
    ``ValueError`` of the function is expected."""
    outcomes = []
    for attempt in ctrl_c_at_each_check({__file__}, functions={function.__name__, "_value"}):
        args = args_of()
        with attempt:
            with contextlib.suppress(ValueError):
                function(*args)
            attempt.reached()
        outcomes.append((attempt.error is not None, args))
    return outcomes


_REAL_RETRY = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # (started in the background, a shell ignores SIGINT)
sys.path.insert(0, {tests!r})
from test_interrupts_harness import _retry, _Trip
state = [None, None]
try:
    _retry(state, _Trip())
except KeyboardInterrupt:
    print("escaped", state)
else:
    print("kept", state)
"""


def test_a_ctrl_c_at_a_retry_loops_jump_back_leaves_the_loop_in_cpython_as_in_the_harness():
    """CPython's own outcome is taken in a fresh interpreter with Python's SIGINT handler: a test run started in the
    background by a non-interactive shell (CI, ``cmd &``) inherits SIGINT ignored, and an ignored signal is never
    raised (the clean-clone run saw no interrupt)."""
    code = _REAL_RETRY.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # CPython 3.11: raised before the jump's target, outside the ``try``
    assert proc.stdout.strip() == "escaped ['caught', None]", proc.stdout + proc.stderr[-2000:]
    outcomes = [(escaped, state) for escaped, (state, _) in _attempts(_retry, lambda: ([None, None], _NoTrip()))]
    assert (True, ["caught", None]) in outcomes  # (the harness's Ctrl-C at the jump: caught in the ``try`` before)


def test_the_harness_raises_no_ctrl_c_as_a_handler_begins_after_a_call_that_raised():
    outcomes = [(escaped, log) for escaped, (log,) in _attempts(_cleanup_after_raising_call, lambda: ([],))]
    assert outcomes[0] == (True, [])  # at the function's start
    assert all(log == ["finally"] for _, log in outcomes[1:]), outcomes  # (no check after a call that raised)


def test_a_ctrl_c_after_a_call_returned_in_a_try_runs_its_finally():
    outcomes = [(escaped, log) for escaped, (log,) in _attempts(_return_in_try, lambda: ([],))]
    assert outcomes[0] == (True, [])  # at the function's start
    assert all(log == ["finally"] for _, log in outcomes[1:]), outcomes  # (raised in the ``try``)
