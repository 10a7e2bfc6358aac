"""Putting something back whatever Ctrl-C (``KeyboardInterrupt``) comes: :class:`PutBack`, the calls a ``finally``
or an ``except`` repeats until all are made, SIGINT held back meanwhile; :class:`GeneratorBlock`, the context manager
of a generator that changes something and puts it back (a lock taken, a model in eval mode), closed at once by a
Ctrl-C as it begins.

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

import functools
import operator
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
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


_ENDED = object()  # (what next() gives for a generator that ended)


def _finish(ref: weakref.ref, typ: type[BaseException] | None, value: object, traceback: object) -> bool:
    """A :class:`GeneratorBlock`'s end (its ``__exit__``), given the generator by a weak reference only: a Ctrl-C as
    this begins (Python code: before any of it runs) is kept in a traceback that does not hold the generator, which
    :class:`_Exit` alone held: it is closed, its ``finally`` puts back, as the ``with`` statement lets its exit go."""
    gen = ref()  # (a Ctrl-C as this returns: raised before the generator is stored, nothing here holds it)
    if typ is None:  # resumed: its blocks end as they would without an exception (cheaper than a close)
        if next(gen, _ENDED) is _ENDED:  # (no StopIteration handled: a Ctrl-C in such an ``except`` left
            return False  # it as the thread's handled exception, the __context__ of its later exceptions)
        gen.close()
        raise RuntimeError("generator didn't stop")
    gen.close()  # its ``finally`` puts back (it neither catches nor replaces an exception)
    return False


class _Exit(functools.partial):
    """A block's ``__exit__`` as a ``with`` statement calls it: C code (a ``partial``), the only holder of the
    generator once the block began, calling :func:`_finish` with a weak reference to it."""

    __slots__ = ("gen",)


class _ExitAttribute(property):
    """``GeneratorBlock.__exit__``: on a block, its :class:`_Exit`, got in C (``property`` with ``attrgetter``: the
    ``with`` statement's lookup runs no Python code); on the class, a function of the block and the exception, as
    ``contextlib.ExitStack`` calls it."""

    def __call__(self, block: GeneratorBlock, *exc: object) -> bool:
        return block.exit(*exc)


class GeneratorBlock:
    """The context manager of a generator that changes something before its ``yield`` (takes a lock, puts a model in
    eval mode) and puts it back in a ``finally`` (or an ``except``) around it, like ``contextlib.contextmanager``'s,
    whose ``__enter__`` is Python code: a Ctrl-C there just after the generator yielded left it suspended, the lock
    held or the model changed for as long as the traceback lives (a notebook keeps the last one: a later writer
    waited for ever). This one closes the generator at once. A block that ends with an exception closes the
    generator (its own ``close``, C: no Python code runs before the generator's ``finally``). Like contextlib's, it
    also decorates a function (each call runs in a new one).

    Its ``__exit__`` is C code (:class:`_Exit`) that holds the generator and calls Python code (:func:`_finish`)
    given a weak reference to it: a Ctrl-C as that begins, before any of it ran, leaves no frame of the traceback
    holding the generator (a Python ``__exit__``'s ``self`` kept it suspended, a lock held, while the traceback
    lived: every other thread's call waited), and the ``with`` statement lets go of the exit, the generator's only
    holder: it is closed, its ``finally`` puts back (a block also held elsewhere, as a variable: once that is let go).

    ``close()`` puts back what the generator holds now, if it still does (its ``finally``; nothing once the block
    ended or before it began): for a generator that holds such a block in a variable inside its own and catches an
    exception. It is the generator's own ``close`` (C): no Python code runs before it does its work."""

    __slots__ = ("call", "close", "exit", "gen")

    def __init__(self, gen: Iterator[Any], call: tuple) -> None:
        self.gen, self.call = gen, call  # (``call``: the generator function and its arguments, to make another)
        self.close = gen.close
        self.exit = _Exit(_finish, weakref.ref(gen))
        self.exit.gen = gen

    def __enter__(self) -> Any:
        try:  # (the value stored inside the ``try``: a Ctrl-C handled as ``next`` returns is raised in it)
            value = next(self.gen)
        except BaseException:  # (a Ctrl-C as ``next`` returned: the generator holds what it took)
            self.gen.close()
            raise
        return value

    __exit__ = _ExitAttribute(operator.attrgetter("exit"))

    def __call__(self, func: Callable[..., T]) -> Callable[..., T]:
        """``func`` run in the block at each call (``contextlib.ContextDecorator``)."""

        @functools.wraps(func)
        def inner(*args: object, **kwargs: object) -> T:
            make, given, named = self.call
            with GeneratorBlock(make(*given, **named), self.call):
                return func(*args, **kwargs)

        return inner


def generator_block(func: Callable[..., Iterator[Any]]) -> Callable[..., GeneratorBlock]:
    """``contextlib.contextmanager`` for a generator that changes something and puts it back (:class:`GeneratorBlock`:
    a Ctrl-C as the block begins or ends cannot leave it changed while the traceback lives)."""

    @functools.wraps(func)
    def block(*args: object, **kwargs: object) -> GeneratorBlock:
        return GeneratorBlock(func(*args, **kwargs), (func, args, kwargs))

    return block
