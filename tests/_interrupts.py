"""Helpers of the Ctrl-C (``KeyboardInterrupt``) tests: an interrupt after a chosen call of a method, and an interrupt
at each point in turn where CPython handles a pending signal in the code of some files."""

from __future__ import annotations

import contextlib
import dis
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest


def interrupt(monkeypatch, owner, attr, *calls):
    """Make ``owner.attr`` raise ``KeyboardInterrupt`` on its calls numbered ``calls`` (from 1), as a Ctrl-C there."""
    original, count = getattr(owner, attr), [0]

    def patched(*args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, patched)


def interrupt_after(monkeypatch, owner, attr, *calls):
    """Make ``owner.attr`` raise ``KeyboardInterrupt`` just after its calls numbered ``calls`` (from 1) did their
    work, as a Ctrl-C pressed during them is raised when they return."""
    original, count = getattr(owner, attr), [0]

    def patched(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] in calls:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, attr, patched)


_CHECKS_AFTER = ("CALL", "CALL_FUNCTION_EX", "JUMP_BACKWARD", "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_TRUE")
_CHECKS_AFTER += ("POP_JUMP_BACKWARD_IF_NONE", "POP_JUMP_BACKWARD_IF_NOT_NONE")


def interrupt_at_check(n, files, functions=None):
    """A tracer raising KeyboardInterrupt, once, at the ``n``-th point of code from ``files`` (of its ``functions``
    by name, if given) where CPython handles a pending signal (a Ctrl-C): a function's start or a generator's
    resumption (RESUME), and the instruction after a call or a backward jump (they check the eval breaker when they
    end)."""
    count, last, opnames = [0], {}, {}

    def local(frame, event, arg):
        if event != "opcode":
            return local
        code = frame.f_code
        if code not in opnames:
            opnames[code] = {i.offset: (i.opname, i.arg) for i in dis.get_instructions(code)}
        opname, arg = opnames[code].get(frame.f_lasti, ("", None))
        checked = (opname == "RESUME" and arg < 2) or last.get(id(frame)) in _CHECKS_AFTER
        last[id(frame)] = opname
        if checked:
            count[0] += 1
            if count[0] == n:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        if frame.f_code.co_filename in files and (functions is None or frame.f_code.co_name in functions):
            frame.f_trace_opcodes = True
            return local(frame, "opcode", None) if event == "call" else local
        return None

    return tracer


class Attempt:
    """One try of :func:`ctrl_c_at_each_check`: its block runs traced, the ``n``-th check a Ctrl-C, until
    :meth:`reached` (or the block's end); the block's ``KeyboardInterrupt`` is swallowed and kept in ``error``, its
    traceback alive, as a notebook keeps the last one (``sys.last_traceback``): what its frames hold stays."""

    def __init__(self, n: int, files, functions=None) -> None:
        self.n, self.files, self.functions, self.finished, self.error = n, files, functions, False, None

    def __enter__(self) -> Attempt:
        sys.settrace(interrupt_at_check(self.n, self.files, self.functions))
        return self

    def __exit__(self, typ, value, traceback) -> bool:
        sys.settrace(None)
        if typ is KeyboardInterrupt:
            self.error = value
            return True
        return False

    def reached(self) -> None:
        """The code under test ran to here uninterrupted (every check point before was tried): tracing stops."""
        sys.settrace(None)
        self.finished = True


def ctrl_c_at_each_check(files, limit: int = 500, functions=None) -> Iterator[Attempt]:
    """A Ctrl-C at each point where CPython handles it in the code of ``files``, in turn: one :class:`Attempt` per
    point, until an attempt's block :meth:`~Attempt.reached` its end (fails if none did in ``limit`` tries)."""
    for n in range(1, limit):
        attempt = Attempt(n, files, functions)
        yield attempt
        if attempt.finished:
            return
    pytest.fail("the traced code never ran to its end")


@contextlib.contextmanager
def held_by_another_thread(hold: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """For the block, another thread inside ``with hold():`` (entered before the block starts); after the block it
    lets go and is joined."""
    inside, release = threading.Event(), threading.Event()

    def holder() -> None:
        with hold():
            inside.set()
            release.wait(20)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert inside.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def ctrl_c_while_giving_back_wakes_the_waiter(files, setup: Callable[[], tuple]) -> None:
    """Ctrl-C at each point where CPython handles it in ``files`` while this thread gives back what it holds, another
    thread waiting for it: the other thread still gets it (a Ctrl-C inside ``Condition.notify_all``, Python code,
    left it asleep for good). ``setup()`` gives ``(mine, want, cond)``: this thread's context manager (entered
    here), the other thread's (a factory), and the condition the other one sleeps in."""

    def other(want, waiting, got):
        waiting.set()
        with want():
            got.set()

    for attempt in ctrl_c_at_each_check(files):
        mine, want, cond = setup()
        got, waiting = threading.Event(), threading.Event()
        mine.__enter__()
        thread = threading.Thread(target=other, args=(want, waiting, got), daemon=True)
        thread.start()
        assert waiting.wait(10)
        while not cond._waiters:  # (the other thread asleep in the condition)
            time.sleep(0.001)
        with attempt:
            mine.__exit__(None, None, None)
            attempt.reached()
        attempt.error = mine = None  # (one at the start of __exit__: the generator closed with the traceback)
        assert got.wait(5), (attempt.n, "the waiting thread was never woken")
        thread.join(10)
