"""Putting something back whatever Ctrl-C (``KeyboardInterrupt``) comes: :class:`PutBack`, the calls a ``finally``
or an ``except`` repeats until all are made, SIGINT held back meanwhile.

CPython 3.11 raises a pending Ctrl-C at a function's start, as a call returns and as a loop jumps back, the last
with the position before the loop's top: in a retry loop (``while True: try: ... except KeyboardInterrupt: ...``)
that is outside its ``try``, so a second Ctrl-C that came while the ``except`` ran ended the loop and left the
put-back half done. :class:`PutBack` gives SIGINT, for as long as it puts back, a handler that only notes the
signal (its first step, inside the caller's ``try``), then puts the handler back and runs it for a signal it noted:
the Ctrl-C comes once the put-back is done. A Ctrl-C pending as the put-back begins is raised before the handler is
replaced (at the call's start, or by ``signal.signal``, which handles pending signals first): the caller makes its
first try apart, before the loop, so that only a third Ctrl-C, before the handler is replaced in the loop's first
try, could still end the loop. Only the main thread runs signal handlers (nothing is held back in another one; a
``KeyboardInterrupt`` comes there only from ``PyThreadState_SetAsyncExc``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
_FREE = object()  # (``PutBack.handler`` while SIGINT is not held back)


class PutBack:
    """Calls that put something back, ``function(item)`` for each of ``items``: each call of this object makes those
    not made yet, in turn, so one that a Ctrl-C cut short goes on from where it stopped (each call must be one that
    can be made twice). Its caller tries it once, then repeats it until it returns, each in a ``try`` whose
    ``except KeyboardInterrupt`` keeps the interrupt in :attr:`interrupted`, then calls :meth:`done`::

        try:
            put_back()
        except KeyboardInterrupt as err:
            put_back.interrupted = err
            while True:
                try:
                    put_back()
                    break
                except KeyboardInterrupt as err:
                    put_back.interrupted = err
        put_back.done()

    (a ``finally`` calling a function that does it all would stop at the function's start: a Ctrl-C is handled there
    too). In the main thread SIGINT is held back from its first call until :meth:`done` (or a failing call): a Ctrl-C
    meanwhile comes after, and the loop no longer ends half done as it jumps back (outside its ``try``)."""

    __slots__ = ("caught", "function", "handler", "interrupted", "items", "made")

    def __init__(self, function: Callable[[T], object], items: Iterable[T]) -> None:
        self.function, self.items, self.made = function, list(items), 0
        self.interrupted: KeyboardInterrupt | None = None
        self.caught: dict[int, Any] = {}  # SIGINT -> the frame it came in, while held back
        self.handler: Any = _FREE  # SIGINT's handler before it was held back

    def __call__(self) -> None:
        """Make the calls not made yet, in turn (SIGINT held back first). One failing (not a Ctrl-C) gives SIGINT
        its handler back (the caller's loop ends with that error, :meth:`done` not called)."""
        try:
            if self.handler is _FREE and threading.current_thread() is threading.main_thread():
                self._hold()
            while self.made < len(self.items):
                self.function(self.items[self.made])
                self.made += 1
        except KeyboardInterrupt:
            raise
        except BaseException:
            self._release()
            raise

    def done(self) -> None:
        """SIGINT's handler back, run for a signal that came while it was held back (Python's raises
        ``KeyboardInterrupt``); else the Ctrl-C that came while the calls were made raised, if one did."""
        self._release()
        if self.interrupted is not None:
            raise self.interrupted

    def _hold(self) -> None:
        """SIGINT's handler replaced by one that notes the signal (a C function: no Python code where a Ctrl-C is
        handled). ``signal.signal`` raises a pending one first, with the old handler: then nothing is held."""
        if signal.getsignal(signal.SIGINT) is not None:  # (None: a handler not set from Python, left alone)
            self.handler = signal.signal(signal.SIGINT, self.caught.__setitem__)

    def _release(self) -> None:
        """SIGINT's handler back if :meth:`_hold` replaced it, run for a signal noted meanwhile."""
        handler, self.handler = self.handler, _FREE
        if handler is _FREE:
            return
        signal.signal(signal.SIGINT, handler)  # (a signal pending now is noted first, then the handler is back)
        if signal.SIGINT in self.caught:
            frame = self.caught.pop(signal.SIGINT)
            if callable(handler):
                handler(signal.SIGINT, frame)
            elif handler == signal.SIG_DFL:  # (the default action: the process ends, as it would have)
                signal.raise_signal(signal.SIGINT)
