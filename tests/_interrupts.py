"""Helpers of the Ctrl-C (``KeyboardInterrupt``) tests: an interrupt after a chosen call of a method, and an interrupt
at each point in turn where CPython handles a pending signal in the code of some files."""

from __future__ import annotations

import contextlib
import dis
import signal
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


_BACKWARD_JUMPS = ("JUMP_BACKWARD", "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_TRUE")
_BACKWARD_JUMPS += ("POP_JUMP_BACKWARD_IF_NONE", "POP_JUMP_BACKWARD_IF_NOT_NONE")


class _Code:
    """What the tracer needs of a code object: each instruction's ``(opname, arg, offset of the next one, jump
    target)`` by offset, and the exception table (the handler a raise at an offset goes to)."""

    def __init__(self, code) -> None:
        self.ops, previous = {}, None
        for ins in dis.get_instructions(code):
            if previous is not None:
                self.ops[previous.offset] = (previous.opname, previous.arg, ins.offset, previous.argval)
            previous = ins
        if previous is not None:
            self.ops[previous.offset] = (previous.opname, previous.arg, None, previous.argval)
        self.table = [(e.start, e.end, e.target, e.depth, e.lasti) for e in dis._parse_exception_table(code)]

    def handler(self, offset: int):
        """The exception table entry for a raise at ``offset`` (``None``: none, it leaves the frame)."""
        return next(((t, d, lasti) for start, end, t, d, lasti in self.table if start <= offset < end), None)


def _inside(call, lasti: int) -> bool:
    """Whether a frame at ``lasti`` is in the call ``(offset, next offset)`` (its position is the call's last cache
    entry while the function it calls runs)."""
    return isinstance(call, tuple) and call[0] <= lasti < call[1]


def _ctrl_c(frame) -> None:
    """A Ctrl-C handled in ``frame``, as CPython handles it: in the main thread SIGINT's Python handler runs (Python's
    raises KeyboardInterrupt; one that a put-back set notes it); in another thread, none can: the KeyboardInterrupt
    an asynchronous raise gives (``PyThreadState_SetAsyncExc``)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def interrupt_at_check(n, files, functions=None, unmodelled=None):
    """A tracer handling a Ctrl-C (:func:`_ctrl_c`: in the main thread SIGINT's handler runs, Python's raising
    KeyboardInterrupt) at the ``n``-th point (``n`` a number, or several) of code from ``files`` (of its ``functions``
    by name, if given) where CPython 3.11 handles a pending signal (``CHECK_EVAL_BREAKER`` in ceval.c):

    - a function's start or a generator's resumption after ``yield`` (``RESUME`` 0 or 1; not after ``yield from``
      or ``await``: 2, 3), raised there;
    - the end of a call that returned (``CALL``, ``CALL_FUNCTION_EX``), raised with the call's exception handler: at
      the next instruction where that has the same one, else as the Python function it calls returns (``return f()``
      in a ``try`` / ``with``: the ``finally`` or ``__exit__`` runs); never after a call that raised (the handler's
      first instruction is no check point). CPython does not check after a call of a Python function it runs in
      the same loop (only at the function's own check points); the point stands for a Ctrl-C at the callee's last
      check (untraced code), which is raised from the call the same way;
    - a backward jump taken (``JUMP_BACKWARD``, ``POP_JUMP_BACKWARD_IF_*`` that jumps), whose interrupt CPython raises
      with the position just before the jump's target (``INSTR_OFFSET() - 1`` after ``JUMPBY``): at the loop's
      top that starts with ``try`` (``while True: try: ... except KeyboardInterrupt: ...``) it is not in the ``try``
      but in the code around the loop. It is raised at the target or, where the handler differs, at the jump itself
      (before an unconditional one runs) where that has the handler of the position before the target.

    A point it cannot raise in CPython's place (a C function's call before another handler: no Python code) is
    counted but not raised: it is added to ``unmodelled`` (a list, if given; :class:`Attempt` fails on one) as
    ``(file, function, offset)``."""
    count, last, codes, calling, raised = [0], {}, {}, {}, set()
    points = {n} if isinstance(n, int) else set(n)

    def info(code) -> _Code:
        if code not in codes:
            codes[code] = _Code(code)
        return codes[code]

    def check(frame, code: _Code, where: int, place: int) -> None:
        """Count a check point raised (by CPython) with ``where``'s handler; raise at ``place`` if that is the same."""
        count[0] += 1
        if count[0] not in points:
            return
        try:
            _ctrl_c(frame)
        except KeyboardInterrupt:
            if code.handler(where) == code.handler(place):
                if count[0] < max(points):  # (a trace function that raises is unset: set again at the next event)
                    sys.setprofile(rearm)
                raise
            if unmodelled is not None:
                unmodelled.append((frame.f_code.co_filename, frame.f_code.co_name, where))

    def local(frame, event, arg):
        if event != "opcode":
            callee(frame, event, arg)  # (a traced function called by such a call: its return)
            return local
        code, offset = info(frame.f_code), frame.f_lasti
        opname, oparg, after, target = code.ops.get(offset, ("", None, None, None))
        previous = last.get(id(frame))
        last[id(frame)] = offset
        if opname == "RESUME" and oparg < 2:
            check(frame, code, offset, offset)
        elif opname == "JUMP_BACKWARD" and code.handler(target - 2) != code.handler(target):
            check(frame, code, target - 2, offset)  # (taken: raised at the jump, which does nothing else)
            last[id(frame)] = None  # (its check is counted)
        elif opname in ("CALL", "CALL_FUNCTION_EX") and code.handler(offset) != code.handler(after):
            calling[id(frame)] = (offset, after)  # (its check raised from the Python function it calls, as it returns)
        if previous is None:
            return local
        p_opname, _, p_after, p_target = code.ops.get(previous, ("", None, None, None))
        if p_opname in ("CALL", "CALL_FUNCTION_EX") and offset == p_after:  # (returned: raised, no check)
            if calling.pop(id(frame), None) != -1:  # (not already counted as the callee returned)
                check(frame, code, previous, offset)
        elif p_opname in _BACKWARD_JUMPS and offset == p_target:  # (taken)
            check(frame, code, p_target - 2, offset)
        return local

    def callee(frame, event, arg):
        """The tracer of a Python function called by a traced frame's call whose next instruction has another
        handler: the caller's check after the call is counted, and raised, as the function returns (not raising)."""
        if event == "exception":
            raised.add(id(frame))
        elif event == "return" and id(frame) not in raised:
            caller = frame.f_back
            if caller is not None and _inside(calling.get(id(caller)), caller.f_lasti):
                calling[id(caller)] = -1  # (counted: not again at the caller's next instruction)
                check(caller, info(caller.f_code), caller.f_lasti, caller.f_lasti)
        elif event != "return":
            raised.discard(id(frame))
        return callee

    def tracer(frame, event, arg):
        if traced(frame):
            frame.f_trace_opcodes = True
            last.pop(id(frame), None)  # (a frame of the same id, ended)
            raised.discard(id(frame))
            return local(frame, "opcode", None) if event == "call" else local
        caller = frame.f_back
        if event == "call" and caller is not None and _inside(calling.get(id(caller)), caller.f_lasti):
            raised.discard(id(frame))
            return callee
        return None

    def traced(frame) -> bool:
        return frame.f_code.co_filename in files and (functions is None or frame.f_code.co_name in functions)

    def rearm(frame, event, arg):
        """The profile function set as the tracer raised (CPython then unsets it, and the raising frame's): at the
        next call or return, as the interrupt unwinds or after it was caught, tracing goes on for a second Ctrl-C."""
        sys.setprofile(None)
        sys.settrace(tracer)
        while frame is not None:
            if frame.f_trace is None and traced(frame):
                frame.f_trace, frame.f_trace_opcodes = local, True
            frame = frame.f_back

    return tracer


class Attempt:
    """One try of :func:`ctrl_c_at_each_check`: its block runs traced, the ``n``-th check a Ctrl-C (and the
    ``n + then``-th, if ``then``), until :meth:`reached` (or the block's end); the block's ``KeyboardInterrupt`` is
    swallowed and kept in ``error``, its traceback alive, as a notebook keeps the last one (``sys.last_traceback``):
    what its frames hold stays. In the main thread SIGINT has Python's handler meanwhile (a test run started in the
    background by a non-interactive shell inherits it ignored)."""

    def __init__(self, n: int, files, functions=None, then: int | None = None) -> None:
        self.n, self.files, self.functions, self.finished, self.error = n, files, functions, False, None
        self.points = (n,) if then is None else (n, n + then)
        self.unmodelled: list = []
        self.handler = None

    def __enter__(self) -> Attempt:
        if threading.current_thread() is threading.main_thread():
            self.handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.settrace(interrupt_at_check(self.points, self.files, self.functions, self.unmodelled))
        return self

    def __exit__(self, typ, value, traceback) -> bool:
        sys.settrace(None)
        sys.setprofile(None)
        if self.handler is not None:
            signal.signal(signal.SIGINT, self.handler)
        if self.unmodelled:  # (a check point the tracer could not raise in CPython's place: none tried there)
            pytest.fail(f"attempt {self.n}: a Ctrl-C at {self.unmodelled} cannot be raised where CPython raises it")
        if typ is KeyboardInterrupt:
            self.error = value
            return True
        return False

    def reached(self) -> None:
        """The code under test ran to here uninterrupted (every check point before was tried): tracing stops."""
        sys.settrace(None)
        sys.setprofile(None)
        self.finished = True


def ctrl_c_at_each_check(files, limit: int = 500, functions=None, then: int | None = None) -> Iterator[Attempt]:
    """A Ctrl-C at each point where CPython handles it in the code of ``files``, in turn (and a second one ``then``
    points after it, if given): one :class:`Attempt` per point, until an attempt's block :meth:`~Attempt.reached` its
    end (fails if none did in ``limit`` tries)."""
    for n in range(1, limit):
        attempt = Attempt(n, files, functions, then)
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
