"""The routing gate: calls with one routing share it, other routings wait, nesting switches and restores."""

import contextlib
import sys
import threading
import time

import pytest
import torch

from _interrupts import (
    Attempt,
    ctrl_c_at_each_check,
    ctrl_c_while_giving_back_wakes_the_waiter,
    held_by_another_thread,
)
from lordba import AdapterStateError
from lordba.nn.routing import RoutingGate, route_index, routing

A = routing(None, False, ("a",))
B = routing(None, False, ("b",))


def test_equal_routings_are_one_object_and_disabled_ignores_the_rest():
    assert routing(None, False, ("a",)) is A
    assert routing(("x",), True, ("a",)) is routing(None, True, None)


def test_the_routing_stays_while_any_caller_with_it_is_inside():
    gate = RoutingGate()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gate.enter(A):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with gate.enter(A):
        thread.start()
        assert inside.wait(10)
    assert gate.routing is A  # the first caller left; the other is still inside with A
    release.set()
    thread.join(10)
    assert gate.routing is None


def test_another_routing_waits_until_the_calls_in_flight_leave():
    gate = RoutingGate()
    seen = []

    def other():
        with gate.enter(B):
            seen.append(gate.routing)

    with gate.enter(A):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and not seen  # waiting
        assert gate.routing is A
    thread.join(10)
    assert seen == [B] and gate.routing is None


def test_nested_call_of_the_only_thread_switches_and_restores():
    gate = RoutingGate()
    with gate.enter(A):
        with gate.enter(B):
            assert gate.routing is B
        assert gate.routing is A
    assert gate.routing is None


def test_nested_switch_while_other_threads_are_inside_is_refused():
    gate = RoutingGate()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gate.enter(A):
            inside.set()
            release.wait(10)

    with gate.enter(A):
        thread = threading.Thread(target=other)
        thread.start()
        assert inside.wait(10)
        with pytest.raises(AdapterStateError, match="different adapter routing"):
            with gate.enter(B):
                pass
        assert gate.routing is A
        release.set()
    thread.join(10)
    assert gate.routing is None


def test_row_indices_of_many_compositions_are_made_safely_by_threads_at_once():
    """``route_index``'s cache is shared by every model and thread (models with gates of their own, calls of one
    routing in several threads): threads making indices for more compositions than it keeps evicted the same
    oldest entry twice (KeyError) or iterated it while another thread changed it (RuntimeError)."""
    errors, cpu = [], torch.device("cpu")

    def work(seed: int) -> None:
        try:
            for i in range(20000):
                names = ("a", f"b{seed}-{i}", "a")
                assert route_index(names, cpu)[names[1]].tolist() == [1]
        except BaseException as err:  # reported below
            errors.append(repr(err))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the interleavings that break show up in a few seconds
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def test_a_waiting_routing_is_not_starved_by_calls_that_keep_joining_the_one_in_flight():
    """Threads that keep calling with the routing in flight, their calls overlapping, left a thread waiting for
    another routing (another batch composition, another adapter) waiting for ever: each new call joined the
    calls in flight. Once a thread waits, later calls wait behind it: the calls in flight finish, it runs, then
    they do (first come, first served by routing)."""
    gate = RoutingGate()
    order, stop, first_inside = [], threading.Event(), threading.Event()

    def loop() -> None:  # overlapping calls with routing A, as a thread pool serving one composition makes
        while not stop.is_set():
            with gate.enter(A):
                first_inside.set()
                order.append("A")
                time.sleep(0.002)

    def other() -> None:
        with gate.enter(B):
            order.append("B")

    looping = [threading.Thread(target=loop) for _ in range(2)]
    for thread in looping:
        thread.start()
    assert first_inside.wait(10)
    waiting = threading.Thread(target=other)
    waiting.start()
    deadline = time.monotonic() + 30  # (counted once B waits: a thread a loaded machine starts late is not behind)
    while not gate._queue and "B" not in order and time.monotonic() < deadline:
        time.sleep(0.0005)
    before = len(order)
    waiting.join(5)
    stop.set()
    for thread in (*looping, waiting):
        thread.join(10)
    assert "B" in order
    assert order.index("B") <= before + 4, (before, order.index("B"))  # after the calls in flight (2), not at the end
    assert gate.routing is None


def test_the_row_index_cache_keeps_the_composition_in_use_while_others_come_and_go():
    """The cache evicted its oldest entry first: the composition of a running batch, used every step, was dropped
    (and built again) after 64 other compositions, however often it was used in between. It evicts the least
    recently used one."""
    cpu = torch.device("cpu")
    running = ("a", "b", "running")
    held = route_index(running, cpu)
    for i in range(200):
        route_index(("a", f"other-{i}"), cpu)
        assert route_index(running, cpu) is held, i


@pytest.mark.parametrize("nested", [False, True])
def test_a_ctrl_c_anywhere_while_entering_the_gate_leaves_it_free(nested):
    """Ctrl-C at each point where Python handles it while entering the gate, in turn: the gate is free after it
    (was: one in ``Condition.__exit__`` kept its mutex, and one after the holder was counted and before the ``try``
    kept it counted: every later call of the model, from any thread, waited forever; one in contextlib's
    ``__enter__`` as the gate's generator yielded kept it entered while the traceback lived, as a notebook keeps it)."""
    from lordba._util import interrupts
    from lordba.nn import lock as lock_module
    from lordba.nn import routing as routing_module

    files = {routing_module.__file__, threading.__file__, contextlib.__file__, lock_module.__file__}
    files.add(interrupts.__file__)  # (the lock's and the gate's context managers: GeneratorBlock)
    for attempt in ctrl_c_at_each_check(files):
        gate, n = RoutingGate(), attempt.n
        outer = gate.enter(A) if nested else None
        if outer is not None:
            outer.__enter__()
        inner = gate.enter(B)
        with attempt, inner:
            attempt.reached()
        held = ({threading.get_ident(): 1}, A) if nested else ({}, None)
        state = (gate._holders, gate.routing, gate._switches, gate._queue, gate._blocks, gate._mutex.locked())
        assert state == (*held, 0, [], 0, False), (n, state)
        if outer is not None:
            outer.__exit__(None, None, None)
            assert (gate._holders, gate.routing) == ({}, None), n


@pytest.mark.parametrize("how", ["call", "nested", "block"])
def test_a_ctrl_c_anywhere_while_leaving_the_gate_leaves_it_free(how):
    """Ctrl-C at each point where Python handles it while a call leaves the gate, in turn: once the interrupt's
    traceback is gone, the gate is free (was: one at the start of the leaving method kept the thread a holder of the
    gate for good, its routing published: every call of another routing, from any thread, waited forever, and a
    layer called outside a model call in this thread applied the stale routing; one just after the holder was taken
    out kept the block or nested switch counted, and the outer call's leaving raised KeyError)."""
    from lordba._util import interrupts
    from lordba.nn import lock as lock_module
    from lordba.nn import routing as routing_module

    files = {routing_module.__file__, threading.__file__, contextlib.__file__, lock_module.__file__}
    files.add(interrupts.__file__)  # (the lock's and the gate's context managers: GeneratorBlock)
    for attempt in ctrl_c_at_each_check(files):
        gate, n = RoutingGate(), attempt.n
        outer = gate.enter(A) if how == "nested" else None
        if outer is not None:
            outer.__enter__()
        with attempt:
            with gate.enter(B, block=how == "block"):
                pass
            attempt.reached()
        attempt.error = None  # (the traceback gone: a generator it held is closed)
        held = ({threading.get_ident(): 1}, A) if outer is not None else ({}, None)
        state = (gate._holders, gate.routing, gate._switches, gate._queue, gate._blocks, gate._mutex.locked())
        assert state == (*held, 0, [], 0, False), (n, state)
        if outer is not None:
            outer.__exit__(None, None, None)
            assert (gate._holders, gate.routing) == ({}, None), n


def test_a_ctrl_c_anywhere_while_leaving_the_gate_still_wakes_a_thread_waiting_for_another_routing():
    """Ctrl-C at each point where Python handles it while this thread's call leaves the gate, in turn, another thread
    waiting to run another routing: the other thread runs (was: one inside ``Condition.notify_all``, Python code, left
    it asleep for good)."""
    from lordba._util import interrupts
    from lordba.nn import lock as lock_module
    from lordba.nn import routing as routing_module

    files = {routing_module.__file__, threading.__file__, contextlib.__file__, lock_module.__file__}
    files.add(interrupts.__file__)  # (the lock's and the gate's context managers: GeneratorBlock)

    def setup():
        gate = RoutingGate()
        return gate.enter(A), lambda: gate.enter(B), gate._cond

    ctrl_c_while_giving_back_wakes_the_waiter(files, setup)


def test_a_ctrl_c_anywhere_while_waiting_for_the_gate_leaves_the_queue_and_its_mutex():
    """Ctrl-C at each of the first points where Python handles it while a call waits for another thread's routing
    to leave, in turn: the call raises KeyboardInterrupt and leaves the queue, the mutex free (was: one as the wait
    ended left its place queued for good, so every later call of another routing waited forever; one inside
    ``Condition.wait`` after it gave the mutex back raised RuntimeError: release unlocked lock)."""
    from lordba._util import interrupts
    from lordba.nn import lock as lock_module
    from lordba.nn import routing as routing_module

    files = {routing_module.__file__, threading.__file__, contextlib.__file__, lock_module.__file__}
    files.add(interrupts.__file__)  # (the lock's and the gate's context managers: GeneratorBlock)

    for n in range(1, 40):
        gate = RoutingGate()
        with held_by_another_thread(lambda gate=gate: gate.enter(A)):
            attempt = Attempt(n, files)
            with attempt, gate.enter(B):  # (a RuntimeError would come out)
                attempt.reached()
            assert isinstance(attempt.error, KeyboardInterrupt) and not attempt.finished, n
            assert (gate._queue, gate._mutex.locked()) == ([], False), n
        assert (gate._holders, gate.routing, gate._queue) == ({}, None, []), n
