"""nn.routing's row index cache (one mapping per composition and device, bounded) and the gate's order: a call
queued behind a waiting routing stays behind it, a nested switch is not joined, another thread's routing is not
applied.

Round 5 of the hand-made mutants (nn/routing.py, each applied to a copy of src and the tests run against it): these
kill the cache keyed without the device (r03), by the set of names (r04) or by the row count (r05: the previous
batch's mapping reused), evicting the newest entry (r08) or unbounded (r10); a call let in unless every call queued
ahead waits for another routing (r11), or not queued at all (r12); a call joining another thread's nested switch
(r20); the gate's routing applied outside this thread's calls (r17)."""

import threading

import torch

from lordba.nn.routing import RoutingGate, current_routing, route_index, routing

A = routing(None, False, ("a",))
B = routing(None, False, ("b",))


CPU = torch.device("cpu")


def rows(names: tuple[str, ...]) -> dict[str, list[int]]:
    """``route_index``'s rows of each name, on the CPU."""
    return {name: index.tolist() for name, index in route_index(names, CPU).items()}


def test_each_composition_gets_its_own_rows_whatever_came_before_it():
    assert rows(("m1", "m2", "m1")) == {"m1": [0, 2], "m2": [1]}
    assert rows(("m2", "m1", "m1")) == {"m2": [0], "m1": [1, 2]}  # the same names in another order
    assert rows(("m3", "m4", "m4")) == {"m3": [0], "m4": [1, 2]}  # other names, as many rows
    assert rows(("m1", "m2")) == {"m1": [0], "m2": [1]}


def test_the_row_indices_are_on_the_device_asked_for():
    names = ("d1", "d2", "d1")
    on_meta = route_index(names, torch.device("meta"))
    on_cpu = route_index(names, CPU)
    assert {t.device.type for t in on_meta.values()} == {"meta"}
    assert {t.device.type for t in on_cpu.values()} == {"cpu"} and on_cpu["d1"].tolist() == [0, 2]


def test_the_row_index_cache_is_bounded():
    first = route_index(("bounded", "x"), CPU)
    for i in range(1000):
        route_index(("bounded", f"other-{i}"), CPU)
    assert route_index(("bounded", "x"), CPU) is not first  # dropped long ago, made again


def wait_until(condition, what: str) -> None:
    """Poll ``condition`` (a state the test brings about, not a timing) for up to 30 s."""
    done = threading.Event()
    for _ in range(3000):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"never: {what}")


def test_a_call_behind_a_queued_routing_and_a_queued_call_of_its_own_waits_behind_both():
    """A runs; a B call waits, then an A call queues behind it: a third A call, the queue ahead of it [B, A], must
    wait too (only the calls ahead all of its routing let it join), so B goes before both A calls."""
    gate, order, release = RoutingGate(), [], threading.Event()

    def call(value, name: str, hold: threading.Event | None = None) -> threading.Thread:
        def run() -> None:
            with gate.enter(value):
                order.append(name)
                if hold is not None:
                    hold.wait(30)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [call(A, "A0", release)]
    wait_until(lambda: order == ["A0"], "A0 inside")
    threads.append(call(B, "B"))
    wait_until(lambda: len(gate._queue) == 1, "B queued")
    threads.append(call(A, "A1"))
    wait_until(lambda: len(gate._queue) == 2, "A1 queued")
    threads.append(call(A, "A2"))
    wait_until(lambda: len(gate._queue) == 3 or "A2" in order, "A2 queued or inside")
    release.set()
    for thread in threads:
        thread.join(30)
    assert order[:2] == ["A0", "B"] and sorted(order[2:]) == ["A1", "A2"], order
    assert gate.routing is None


def test_another_threads_call_does_not_join_a_nested_switch_to_its_routing():
    """A thread's call of A runs a nested call of B: another thread's B call waits until the thread has left the
    model (it cannot join B, which ends when the nested call does, A then running again)."""
    gate, inside, leave_nested = RoutingGate(), [], threading.Event()
    nested = threading.Event()

    def owner() -> None:
        with gate.enter(A):
            with gate.enter(B):
                nested.set()
                leave_nested.wait(30)
            inside.append(("owner back in", gate.routing))

    def other() -> None:
        with gate.enter(B):
            inside.append(("other", gate.routing))

    first = threading.Thread(target=owner)
    first.start()
    assert nested.wait(30)
    second = threading.Thread(target=other)
    second.start()
    wait_until(lambda: len(gate._queue) == 1 or inside, "the other call queued or inside")
    leave_nested.set()
    first.join(30)
    second.join(30)
    assert inside == [("owner back in", A), ("other", B)]
    assert gate.routing is None


def test_a_layer_outside_this_threads_calls_does_not_apply_another_threads_routing():
    gate, entered, leave = RoutingGate(), threading.Event(), threading.Event()

    def other() -> None:
        with gate.enter(A):
            assert current_routing(gate) is A
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert entered.wait(30)
        assert gate.routing is A and current_routing(gate) is None
    finally:
        leave.set()
        thread.join(30)
