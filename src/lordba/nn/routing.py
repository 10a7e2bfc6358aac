"""Per-call adapter routing: which adapters the layers of a model apply during one forward.

A call of :class:`~lordba.nn.model.LoRDBAModel` decides its :class:`Routing` (the active adapters,
whether adapters are disabled, and optionally one adapter per batch row) and publishes it through
the model's :class:`RoutingGate` for the duration of the call; every
:class:`~lordba.nn.layer.LoRDBALinear` of the model reads it there. ``torch.compile`` traces that
read and guards on the routing's value, so a compiled model computes exactly what the eager one
does for every routing and enable/disable state (one graph per distinct routing), with no graph
break. (A ``contextvars.ContextVar``, used before, cannot be traced: dynamo breaks the graph there.)

Calls with the same routing run concurrently; a call whose routing differs from the calls in
flight waits for them to finish (the gate holds one routing at a time; ``disable_adapter`` holds
it for its block), and while it waits later calls queue behind it (first come, first served by
routing: overlapping calls of one routing never starve another; a call joining an open ``disable_adapter`` block,
e.g. from a worker thread run in its context, goes first: the block holds the gate until it ends anyway). A layer
called outside a model call (its base model called directly) follows its own attributes; a standalone layer has a
gate of its own. :data:`DISABLED` carries a thread's ``disable_adapter`` blocks into the model calls of each
block's model (the model reads it, layers do not; another model's calls are not disabled).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lordba._util.state import ordinary_tensors
from lordba.errors import AdapterStateError
from lordba.nn.lock import Condition, holding

BASE_ROW = "__base__"  # an ``adapter_names`` entry that routes a row to the base model alone
# names no adapter can have: each layer holds its adapters in an nn.ModuleDict keyed by name, which refuses its own
# attributes (train, half, to, forward, ...) as keys
UNUSABLE_NAMES = frozenset(dir(torch.nn.ModuleDict()))


@dataclass(frozen=True)
class Routing:
    """Per-call adapter selection.

    ``active`` overrides the layers' active adapters, ``disabled`` turns every branch off, and
    ``adapter_names`` (one entry per batch row) routes rows to adapters; ``input_names``: in a ``generate``
    call that expands each input into beams or returned sequences, the names of the inputs before that
    (an encoder-decoder's encoder runs once per input: :func:`row_names`).
    """

    active: tuple[str, ...] | None = None
    disabled: bool = False
    adapter_names: tuple[str, ...] | None = None
    input_names: tuple[str, ...] | None = None


_DISABLED = Routing(None, True, None)


def routing(
    active: tuple[str, ...] | None,
    disabled: bool,
    adapter_names: tuple[str, ...] | None,
    input_names: tuple[str, ...] | None = None,
) -> Routing:
    """The :class:`Routing` for these values, interned (equal routings are one object, so compiled
    graphs guard on it cheaply and stay valid). Disabled routings ignore the rest."""
    return _DISABLED if disabled else _enabled(active, adapter_names, input_names)


@functools.lru_cache(maxsize=1024)
def _enabled(
    active: tuple[str, ...] | None, adapter_names: tuple[str, ...] | None, input_names: tuple[str, ...] | None
) -> Routing:
    return Routing(active, False, adapter_names, input_names)


def row_names(routing: Routing, rows: int) -> tuple[str, ...]:
    """The adapter of each of ``rows`` batch rows: ``routing.adapter_names``, or its ``input_names`` for a batch of
    the inputs before ``generate`` expanded them (the encoder of an encoder-decoder model: its decoder runs on the
    expanded rows)."""
    names, inputs = routing.adapter_names, routing.input_names
    return inputs if inputs is not None and len(names) != rows and len(inputs) == rows else names


# this thread's (asyncio task's) open ``disable_adapter`` blocks, each naming its model's gate: per model, so that a
# block of one model leaves another model's calls as they are
DISABLED: contextvars.ContextVar[frozenset[DisableBlock]] = contextvars.ContextVar(
    "lordba_disabled", default=frozenset()
)


class _Waiter:
    """A thread's place in a gate's queue: its routing (compared by identity, in C)."""

    __slots__ = ("routing",)

    def __init__(self, routing: Routing) -> None:
        self.routing = routing


class RoutingGate:
    """The routing of the model call(s) in flight, shared by the model's layers."""

    def __init__(self) -> None:
        self.routing: Routing | None = None
        # held through the C lock itself (``with self._mutex``): a Ctrl-C cannot stop in Condition.__exit__'s Python
        # code with the lock kept (every later call of the model waited forever); the condition shares it
        self._mutex = threading.Lock()
        self._cond = Condition(self._mutex)
        self._holders: dict[int, int] = {}  # thread id -> nesting depth
        self._switches = 0  # nested calls of the only thread inside that changed the routing
        self._queue: list[_Waiter] = []  # waiting threads' routings, oldest first
        self._blocks = 0  # open blocks (``disable_adapter``) among the holders: they hold the routing for their block

    def __deepcopy__(self, memo: dict) -> RoutingGate:
        return RoutingGate()

    def __reduce__(self) -> tuple:
        return (RoutingGate, ())

    def held_here(self) -> bool:
        """Whether the calling thread is inside a model call (eager check; not traced)."""
        return threading.get_ident() in self._holders

    def _may_enter(self, value: Routing, ahead: int) -> bool:
        """Whether a call with ``value`` may run now, the first ``ahead`` queued threads waiting before it: none
        of those waits for another routing (they go first), and the model is free or runs ``value`` (joined
        unless a nested switch is in force). A call joins an open block's routing before any queued call: those
        cannot go before the block ends, and the block may be waiting for this call (a worker thread run in its
        context). Called with the condition held."""
        if self._blocks and self._holders and self.routing == value and not self._switches:
            return True
        if any(self._queue[k].routing != value for k in range(ahead)):
            return False
        return not self._holders or (self.routing == value and not self._switches)

    def _wait_turn(self, value: Routing) -> None:
        """Wait in the queue until a call with ``value`` may run (:meth:`_may_enter`): later calls that would
        join the routing in flight wait behind it, so a waiting routing is never starved by overlapping calls
        of another. Called with the condition held."""
        entry = _Waiter(value)  # this thread's place (compared by identity: equal routings are distinct waiters)
        try:  # (queued and taken out by calls of C only, inside: a Ctrl-C cannot leave it queued for good)
            self._queue.append(entry)
            while not self._may_enter(value, self._queue.index(entry)):
                self._cond.wait()
        finally:
            self._queue.remove(entry)
            self._cond.notify_all()  # the threads behind it may go now (its routing joins, or it left)

    @holding
    def enter(self, value: Routing, block: bool = False) -> Iterator[None]:
        """Publish ``value`` for the block; wait while other threads run calls with another routing. ``block``: a
        block of user code holds it (``disable_adapter``), not one model call (:meth:`_may_enter`).

        Raises:
            AdapterStateError: a call nested in a call of the same thread asks for another routing
                while other threads are inside the model (it cannot wait for them without risking
                a deadlock).
        """
        me, entered = threading.get_ident(), False
        try:  # (entered inside: a Ctrl-C right after still leaves)
            with self._mutex:
                if me in self._holders:  # nested in a call of this thread: never waits
                    if self.routing != value and len(self._holders) > 1:
                        raise AdapterStateError(
                            "a model call nested in another asks for a different adapter routing while "
                            "other threads are inside the model"
                        )
                elif not self._may_enter(value, len(self._queue)):
                    self._wait_turn(value)
                switched = bool(self._holders) and self.routing != value  # this thread's nested switch
                previous, depth = self.routing, self._holders.get(me, 0) + 1
                # (no call from here to ``entered``: CPython handles no signal between these stores)
                self._switches += switched
                self.routing = value
                self._holders[me] = depth
                self._blocks += block
                entered = True
            yield
        finally:
            if entered:  # (left here, no call before it is done: a Ctrl-C cannot stop it half-way)
                with self._mutex:
                    depth = self._holders[me] - 1
                    self._blocks -= block
                    if depth:
                        self._holders[me] = depth
                    else:
                        del self._holders[me]
                    if switched:
                        self._switches -= 1
                        self.routing = previous
                    if not self._holders:
                        self.routing = None
                    self._cond.notify_all()


def current_routing(gate: RoutingGate) -> Routing | None:
    """The routing a layer applies now: that of the model call (or ``disable_adapter`` block) in
    flight in this thread, else ``None`` (the layer's own attributes). Under torch.compile the read
    is traced and guarded, without the thread check (call a compiled model through its wrapper when
    threads share it)."""
    if gate.routing is not None and (torch.compiler.is_compiling() or gate.held_here()):
        return gate.routing
    return None


_ROUTES: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()  # least recently used first; shared by threads


def route_index(names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """``{adapter name: row indices}`` for a mixed batch, built once per distinct ``names`` and
    shared by every layer of a forward (a small bounded cache; built fresh while compiling). The indices
    are ordinary tensors even when first built under ``torch.inference_mode``: a later training forward
    saves them for backward. Safe from several threads at once: each change of the cache is one atomic call
    (the least recently used entry evicted by ``popitem``, never looked up and then popped; a hit moved to the end,
    so the compositions of a running batch stay while others come and go)."""
    key, compiling = (tuple(names), device), torch.compiler.is_compiling()
    found = None if compiling else _ROUTES.get(key)
    if found is not None:
        with contextlib.suppress(KeyError):  # (another thread evicted it meanwhile)
            _ROUTES.move_to_end(key)
    if found is None:
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)
        with contextlib.nullcontext() if compiling else ordinary_tensors():  # a trace makes its own
            found = {n: torch.tensor(r, dtype=torch.long, device=device) for n, r in rows.items()}
        if not compiling:
            if len(_ROUTES) >= 64:
                with contextlib.suppress(KeyError):  # (another thread emptied it meanwhile)
                    _ROUTES.popitem(last=False)
            _ROUTES[key] = found
    return found


class DisableBlock:
    """One open ``disable_adapter`` block of a model, as :data:`DISABLED` carries it in the
    block's context. Closing the block marks it closed, so a context the block's end cannot reset (the block
    closed from another thread) stops running the base too."""

    def __init__(self, gate: RoutingGate) -> None:
        self.gate, self.open = gate, True


def in_disable_block(gate: RoutingGate) -> bool:
    """Whether this thread (asyncio task) is in an open ``disable_adapter`` block of the model of ``gate``."""
    return any(block.gate is gate and block.open for block in DISABLED.get())
