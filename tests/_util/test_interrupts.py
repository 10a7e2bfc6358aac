"""lordba._util.interrupts: a put-back's retry loop holds a second Ctrl-C back until the put-back is done; a generator
block puts back whatever Ctrl-C comes as it begins or ends."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lordba._util import interrupts
from lordba._util.interrupts import PutBack, generator_block

_REAL = """
import _thread, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # (started in the background, a shell ignores SIGINT)
sys.path[:0] = [{src!r}]
from torch import nn
from lordba._util.modules import eval_mode

class _Trip:
    __neg__ = _thread.interrupt_main  # (-_Trip(): a pending SIGINT set from C code, no check point there)

class Flaky(nn.Module):
    armed = False

    def __setattr__(self, name, value):
        if name == "training" and value and self.armed:
            object.__setattr__(self, "armed", False)
            -_Trip()  # a second Ctrl-C, pending: the next check point is after the put-back loop's except began
            raise KeyboardInterrupt  # the first, as the put-back sets this module's mode back
        super().__setattr__(name, value)

model = nn.Sequential(nn.Linear(2, 2), Flaky(), nn.Linear(2, 2)).train()
model[1].armed = True
try:
    with eval_mode(model):
        pass
except KeyboardInterrupt:
    python_handler = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    print("raised", [m.training for m in model.modules()], python_handler)
else:
    print("swallowed")
"""


def test_a_ctrl_c_pending_as_a_put_back_loop_jumps_back_comes_once_the_modes_are_back_in_cpython():
    """A real pending SIGINT (CPython's own check points, a fresh interpreter with Python's handler) while
    ``eval_mode``'s put-back loop handles a first Ctrl-C: it was raised as the loop jumped back, outside its ``try``,
    and the modules after the interrupted one stayed in eval mode for good (dropout off in later training)."""
    code = _REAL.format(src=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "raised [True, True, True, True] True", proc.stdout + proc.stderr[-3000:]


def _interrupted_once(calls: list) -> PutBack:
    """A put-back of three items whose second call is interrupted once."""

    def put(item):
        if item == 2 and not calls.count(2):
            calls.append(2)
            raise KeyboardInterrupt
        calls.append(item)

    return PutBack(put, [1, 2, 3])


def _run(put_back: PutBack, second_ctrl_c: bool = False) -> None:
    """A caller's retry loop, as the library's: with ``second_ctrl_c``, SIGINT's handler runs (a Ctrl-C handled) as
    the ``except`` ends."""
    while True:
        try:
            put_back()
            break
        except KeyboardInterrupt as err:
            put_back.interrupted = err
            if second_ctrl_c:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, sys._getframe())
    put_back.done()


@pytest.fixture
def python_sigint():
    """SIGINT with Python's handler (a background run inherits it ignored), put back after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_put_back_holds_a_second_ctrl_c_back_and_raises_it_after_with_sigints_handler_back(python_sigint):
    calls: list = []
    put_back = _interrupted_once(calls)
    with pytest.raises(KeyboardInterrupt) as raised:
        _run(put_back, second_ctrl_c=True)
    assert calls == [1, 2, 2, 3]
    assert raised.value is not put_back.interrupted  # (the second one, the first its context)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_put_back_gives_a_held_back_signal_to_the_programs_own_handler(python_sigint):
    """A program's own SIGINT handler (a server's graceful stop) gets the signal once the put-back is done, not a
    KeyboardInterrupt in its place."""
    got = []
    own = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        put_back = _interrupted_once([])
        with pytest.raises(KeyboardInterrupt) as raised:
            _run(put_back, second_ctrl_c=True)
        assert raised.value is put_back.interrupted and got == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not None and not put_back.caught
    finally:
        signal.signal(signal.SIGINT, own)


def test_a_put_back_without_a_ctrl_c_holds_sigint_only_while_it_puts_back(python_sigint):
    handlers = []
    _run(PutBack(lambda item: handlers.append(signal.getsignal(signal.SIGINT)), [1, 2]))
    assert len(handlers) == 2 and signal.default_int_handler not in handlers
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_put_back_failing_after_a_ctrl_c_gives_sigint_its_handler_back(python_sigint):
    tried = []

    def put(item):
        if not tried:
            tried.append(item)
            raise KeyboardInterrupt
        raise ValueError("cannot")

    put_back = PutBack(put, [1])
    with pytest.raises(ValueError):
        _run(put_back)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("made_here", [True, False])
def test_a_put_back_in_another_thread_holds_nothing_back_and_still_finishes(python_sigint, made_here):
    """Off the main thread no signal handler runs (nor can one be set: signal() raises ValueError there); a put-back
    made there, or made in the main thread and run by another (a generator finalized there), finishes."""
    calls: list = []
    outcome: list = []
    put_back = None if made_here else _interrupted_once(calls)

    def other():
        one = put_back or _interrupted_once(calls)
        try:
            _run(one)
        except BaseException as err:  # (what the thread ended with)
            outcome.append(err)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert calls == [1, 2, 2, 3] and len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


_REAL_EXIT = """
import _thread, signal, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # (started in the background, a shell ignores SIGINT)
sys.path[:0] = [{src!r}]
from lordba.nn.lock import RWLock

class _Trip:
    __neg__ = _thread.interrupt_main  # (-_Trip(): a pending SIGINT set from C code, no check point there)

lock = RWLock()
try:
    with lock.write():
        -_Trip()  # (the next check point: as the block's exit begins)
except KeyboardInterrupt as err:
    kept = err  # (its traceback kept, as a notebook keeps the last one)
got = threading.Event()

def other():
    with lock.read():
        got.set()

threading.Thread(target=other, daemon=True).start()
print("read", got.wait(10))
"""


def test_a_ctrl_c_as_a_write_block_ends_leaves_the_lock_free_while_its_traceback_lives_in_cpython():
    """A real pending SIGINT as a ``with lock.write():`` block's exit begins (CPython's own check points, a fresh
    interpreter with Python's handler), its traceback kept: another thread's read gets the lock (was: the block's
    ``__exit__``, Python code, was interrupted before any of it ran and its frame, kept by the traceback, held the
    generator suspended with the lock: every other thread's model call waited for ever)."""
    code = _REAL_EXIT.format(src=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "read True", proc.stdout + proc.stderr[-3000:]


def _held_block(held: list):
    """A generator block that puts ``1`` in ``held`` for its duration."""

    @generator_block
    def holding():
        held.append(1)
        try:
            yield "inside"
        finally:
            held.pop()

    return holding


@pytest.mark.parametrize("raising", [False, True])
def test_a_ctrl_c_anywhere_as_a_generator_block_begins_or_ends_puts_back_while_its_traceback_lives(raising):
    """Ctrl-C at each point where Python handles it in the block's own code as it begins or ends (or ends with an
    exception), its traceback kept: the generator has put back (was: one as ``__exit__`` began kept the generator
    suspended, through that frame's ``self``, for as long as the traceback lived)."""
    from _interrupts import ctrl_c_at_each_check

    held: list = []
    holding = _held_block(held)
    for attempt in ctrl_c_at_each_check({interrupts.__file__}):
        with attempt:
            with contextlib.suppress(ValueError), holding() as value:
                assert value == "inside" and held == [1]
                if raising:
                    raise ValueError
            attempt.reached()
        assert held == [], attempt.n  # (attempt.error, its traceback, kept)


def test_a_generator_block_in_an_exit_stack_and_called_through_its_class():
    """``contextlib.ExitStack`` calls ``type(block).__exit__(block, ...)``: a block entered there ends with the
    stack, and one ended through its class (as ExitStack does) raises the block's exception back into the
    generator's ``finally``."""
    held: list = []
    holding = _held_block(held)
    with contextlib.ExitStack() as stack:
        assert stack.enter_context(holding()) == "inside" and held == [1]
    assert held == []
    block = holding()
    block.__enter__()
    assert type(block).__exit__(block, ValueError, ValueError(), None) is False and held == []
