"""Thread safety of LoRDBAModel (the contract is in docs/security.md and model.py's docstring).

Forward calls run concurrently; every operation that changes adapters is atomic with respect to
them (a forward sees the adapters before or after it, never a mix) and to each other. Outputs are
compared exactly with the same calls made single-threaded beforehand."""

import contextlib
import threading

import pytest
import torch

from lordba import AdapterStateError, LoRDBAConfig, get_lordba_model

from conftest import tiny_llama

ROUTES = {
    "mixed": ["a", "b", "__base__"],
    "a": ["a", "a", "a"],
    "b": ["b", "b", "b"],
}


def model_with_adapters(tmp_path):
    base = tiny_llama(0)  # seeds torch itself
    torch.manual_seed(1)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"), adapter_name="a")
    torch.manual_seed(2)
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random", target_modules=["q_proj", "down_proj"]))
    for i, seed in enumerate((3, 4)):
        other = tiny_llama(0)
        torch.manual_seed(seed)
        get_lordba_model(other, LoRDBAConfig(r=2, init="random")).save_pretrained(tmp_path / f"extra{i}")
    lm.pack()
    lm.set_adapter("a")
    return lm


def logits(lm, ids, **kw):
    with torch.no_grad():
        return lm(input_ids=ids, **kw).logits


def run_threads(*targets):
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except Exception as err:
                errors.append(repr(err))

        return run

    threads = [threading.Thread(target=guard(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_forwards_see_no_cross_talk_while_adapters_are_loaded_deleted_swapped_and_switched(tmp_path, input_ids):
    lm = model_with_adapters(tmp_path)
    ref = {name: logits(lm, input_ids, adapter_names=route) for name, route in ROUTES.items()}
    with lm.disable_adapter():
        ref["base"] = logits(lm, input_ids)
    active_refs = [logits(lm, input_ids)]
    lm.set_adapter("b")
    active_refs.append(logits(lm, input_ids))
    lm.set_adapter("a")
    stop = threading.Event()

    def reader(route):
        def run():
            while not stop.is_set():
                assert torch.equal(logits(lm, input_ids, adapter_names=ROUTES[route]), ref[route]), route

        return run

    def active_reader():
        while not stop.is_set():
            got = logits(lm, input_ids)
            assert any(torch.equal(got, want) for want in active_refs), "active adapter output"

    def disabled_reader():
        while not stop.is_set():
            with lm.disable_adapter():
                assert torch.equal(logits(lm, input_ids), ref["base"]), "disabled"

    def writer():
        try:
            for i in range(12):
                lm.load_adapter(tmp_path / f"extra{i % 2}", "c")  # never routed by the readers
                lm.hotswap_adapter(tmp_path / f"extra{(i + 1) % 2}", "c")
                lm.set_adapter("b" if i % 2 == 0 else "a")
                lm.delete_adapter("c")
                lm.add_adapter("d", LoRDBAConfig(r=2, target_modules=["v_proj"]))
                lm.delete_adapter("d")
        finally:
            stop.set()

    run_threads(reader("mixed"), reader("a"), reader("b"), active_reader, disabled_reader, writer)
    assert sorted(lm.peft_config) == ["a", "b"]


def test_merge_and_unmerge_while_other_threads_run_the_active_adapter(tmp_path, input_ids):
    """Merged or not, the active adapter gives the same outputs (up to float rounding of the
    merge); a thread in a mixed batch or in disable_adapter() during a merge gets a clean
    AdapterStateError, never a wrong result."""
    lm = model_with_adapters(tmp_path)
    want = logits(lm, input_ids)
    ref_mixed = logits(lm, input_ids, adapter_names=ROUTES["mixed"])
    stop = threading.Event()
    refused = []

    def active_reader():
        while not stop.is_set():
            torch.testing.assert_close(logits(lm, input_ids), want, atol=1e-4, rtol=1e-4)

    def mixed_reader():
        while not stop.is_set():
            try:
                got = logits(lm, input_ids, adapter_names=ROUTES["mixed"])
            except AdapterStateError as err:
                assert "unmerged" in str(err)
                refused.append(1)
                continue
            torch.testing.assert_close(got, ref_mixed, atol=1e-4, rtol=1e-4)

    def merger():
        try:
            for _ in range(15):
                lm.merge_adapter()
                lm.unmerge_adapter()
        finally:
            stop.set()

    run_threads(active_reader, mixed_reader, merger)
    assert not any(layer.merged for _, layer in lm._lordba_layers())


def test_concurrent_changes_of_the_same_adapter_are_serialised(tmp_path):
    """Two threads deleting (or loading) the same adapter at once: one succeeds, the other gets an
    AdapterStateError, and the model stays consistent (was: KeyError, or both loads 'succeeding')."""
    lm = model_with_adapters(tmp_path)
    for _ in range(15):
        outcomes = []
        barrier = threading.Barrier(2)

        def attempt(op, barrier=barrier, outcomes=outcomes):
            def run():
                barrier.wait()
                try:
                    op()
                    outcomes.append("ok")
                except AdapterStateError:
                    outcomes.append("refused")

            return run

        run_threads(*(attempt(lambda: lm.load_adapter(tmp_path / "extra0", "c")) for _ in range(2)))
        assert sorted(outcomes) == ["ok", "refused"]
        outcomes.clear()
        run_threads(
            attempt(lambda: lm.delete_adapter("c")),
            attempt(lambda: lm.hotswap_adapter(tmp_path / "extra1", "c")),
        )
        assert "ok" in outcomes and "c" not in lm.peft_config
        assert not any("c" in layer.lordba_adapters for _, layer in lm._lordba_layers())
        outcomes.clear()
        lm.load_adapter(tmp_path / "extra0", "c")
        run_threads(*(attempt(lambda: lm.delete_adapter("c")) for _ in range(2)))
        assert sorted(outcomes) == ["ok", "refused"]


def test_changing_adapters_from_inside_a_forward_is_refused(tmp_path, input_ids):
    lm = model_with_adapters(tmp_path)
    seen = []

    def hook(module, args, output):
        try:
            lm.set_adapter("b")
        except AdapterStateError as err:
            seen.append(str(err))

    handle = lm.base_model.model.layers[0].register_forward_hook(hook)
    logits(lm, input_ids)
    handle.remove()
    assert seen and "inside a forward" in seen[0]


@pytest.mark.parametrize("op", ["save", "state"])
def test_saving_while_another_thread_switches_and_swaps(tmp_path, op):
    """save_pretrained / adapter_state see one consistent adapter."""
    from lordba.format.adapter import read_adapter

    lm = model_with_adapters(tmp_path)
    lm.load_adapter(tmp_path / "extra0", "c")
    allowed = {read_adapter(tmp_path / "extra0").sha256, read_adapter(tmp_path / "extra1").sha256}
    stop = threading.Event()

    def swapper():
        try:
            for i in range(20):
                lm.hotswap_adapter(tmp_path / f"extra{(i + 1) % 2}", "c")
        finally:
            stop.set()

    def saver():
        while not stop.is_set():
            out = tmp_path / "saved"
            if op == "save":
                lm.save_pretrained(out, selected_adapters=["c"])
            else:
                lm.adapter_state("c").save_pretrained(out / "c")
            assert read_adapter(out / "c").sha256 in allowed

    run_threads(swapper, saver)


def test_add_weighted_adapter_reads_its_sources_as_one_snapshot_while_another_thread_hot_swaps_them(tmp_path):
    """The combination is that of the source before or after a concurrent hot-swap, never a mix of the two
    (was: the sources were read outside the lock, module by module: some modules old, some new, or a source
    changing between two reads of one module, which then took the solver, or raised without it)."""
    lm = model_with_adapters(tmp_path)
    lm.load_adapter(tmp_path / "extra0", "c")

    def combined(name):
        lm.add_weighted_adapter(["c"], [0.5], name)
        state = lm.adapter_state(name)
        lm.delete_adapter(name)
        return {(p, k): t for p, rec in state.modules.items() for k, t in rec.tensors.items()}

    refs = []
    for i in (1, 0):
        lm.hotswap_adapter(tmp_path / f"extra{i}", "c")
        refs.append(combined("ref"))
    stop = threading.Event()
    seen = []

    def swapper():
        i = 0
        while not stop.is_set():
            i += 1
            lm.hotswap_adapter(tmp_path / f"extra{i % 2}", "c")

    def combiner():
        try:
            for _ in range(40):
                got = combined("w")
                seen.append(any(all(torch.equal(t, ref[key]) for key, t in got.items()) for ref in refs))
        finally:
            stop.set()

    run_threads(swapper, combiner)
    assert all(seen), f"{seen.count(False)} of {len(seen)} combinations mixed the old and the new adapter"


def test_loading_an_adapter_with_a_module_trained_in_full_is_atomic_with_respect_to_forwards(tmp_path, input_ids):
    """A forward run while another thread loads an adapter that trains a module in full sees the adapter
    whole or not at all (was: its LoRDBA layers were installed and its name taken under one hold of the write
    lock and its module trained in full under a second, so a forward in between ran its layers with the
    original module: a wrong output, silently; a save there wrote the adapter without that module)."""
    from lordba.nn.lock import RWLock

    saved = "model.layers.1.mlp.down_proj"
    targets = ["q_proj", "v_proj"]
    config = LoRDBAConfig(r=4, init="random", target_modules=targets, modules_to_save=[saved])
    source = get_lordba_model(tiny_llama(0), config, "x")
    with torch.no_grad():
        source.base_model.get_submodule(saved).lordba_saved["x"].weight.add_(0.05)  # trained: not the original
    source.save_pretrained(tmp_path / "x", selected_adapters=["x"])
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", target_modules=targets), "a")
    lm.load_adapter(tmp_path / "x" / "x", "x")
    want = logits(lm, input_ids, adapter_names=["x"] * 3)
    lm.delete_adapter("x")
    seen = []

    class Watched(RWLock):
        """Runs a forward of another thread each time the loading thread lets go of the write lock."""

        @contextlib.contextmanager
        def write(self):
            with super().write():
                yield
            if self._writer is None:
                run_threads(forward)

    def forward():
        try:
            seen.append(logits(lm, input_ids, adapter_names=["x"] * 3))
        except AdapterStateError as err:
            assert "unknown adapter" in str(err)  # not loaded yet
            seen.append(None)

    lm._lock = Watched()
    lm.load_adapter(tmp_path / "x" / "x", "x")
    assert seen and all(got is None or torch.equal(got, want) for got in seen), "a forward saw half an adapter"
    assert seen[-1] is not None


def test_disable_adapter_held_across_an_await_disables_only_its_own_task(tmp_path, input_ids):
    """The block's state is a context variable: per asyncio task, so a coroutine of the same thread that runs while
    the block is suspended at an ``await`` gets its adapters; the block's own calls after the ``await`` the base."""
    import asyncio

    lm = model_with_adapters(tmp_path)
    want_adapter = logits(lm, input_ids)
    with lm.disable_adapter():
        want_base = logits(lm, input_ids)
    got = {}

    async def main() -> None:
        entered, other_done = asyncio.Event(), asyncio.Event()

        async def disabled() -> None:
            with lm.disable_adapter():
                entered.set()
                await other_done.wait()
                got["disabled"] = logits(lm, input_ids)

        async def other() -> None:
            await entered.wait()
            got["other"] = logits(lm, input_ids)
            got["other_rows"] = logits(lm, input_ids, adapter_names=["a"] * 3)
            other_done.set()

        await asyncio.wait_for(asyncio.gather(disabled(), other()), 60)

    asyncio.run(main())
    assert torch.equal(got["disabled"], want_base)
    assert torch.equal(got["other"], want_adapter) and torch.equal(got["other_rows"], want_adapter)


def adapter_and_base_logits(lm, input_ids):
    """The model's logits with its adapter, then within a disable_adapter block (the base's)."""
    with_adapter = logits(lm, input_ids)
    with lm.disable_adapter():
        return with_adapter, logits(lm, input_ids)


def test_another_threads_call_waits_for_a_disable_adapter_block_unless_it_runs_in_the_blocks_context(
    tmp_path, input_ids
):
    """A worker thread (a pool's, generate's with a streamer) does not inherit the block: its call wants the
    adapters and waits until the block ends (waiting for it inside the block would never end); run in the block's
    context (``contextvars.copy_context().run``, ``asyncio.to_thread``) it is part of the block and runs the base."""
    import concurrent.futures
    import contextvars

    lm = model_with_adapters(tmp_path)
    want_adapter, want_base = adapter_and_base_logits(lm, input_ids)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with lm.disable_adapter():
            inside = pool.submit(contextvars.copy_context().run, logits, lm, input_ids).result(timeout=60)
            waiting = pool.submit(logits, lm, input_ids)
            with pytest.raises(concurrent.futures.TimeoutError):
                waiting.result(timeout=0.5)  # (it cannot run before the block ends: no race)
        assert torch.equal(inside, want_base)
        assert torch.equal(waiting.result(timeout=60), want_adapter)


def test_a_call_in_a_disable_adapter_blocks_context_joins_it_while_another_routing_waits(tmp_path, input_ids):
    """The block's own calls from a worker thread (run in its context) join the block even when another thread's
    call waits for the block to end: the waiting call could not go before the block ends anyway, and the block
    may wait for the worker (it waited behind the other call, which waited for the block: a deadlock)."""
    import concurrent.futures
    import contextvars
    import time

    lm = model_with_adapters(tmp_path)
    want_adapter, want_base = adapter_and_base_logits(lm, input_ids)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with lm.disable_adapter():
            other = pool.submit(logits, lm, input_ids)  # wants the adapters: waits for the block
            deadline = time.monotonic() + 30
            while not lm._gate._queue and time.monotonic() < deadline:
                time.sleep(0.01)
            assert lm._gate._queue, "the other call should be waiting"
            inside = pool.submit(contextvars.copy_context().run, logits, lm, input_ids).result(timeout=20)
        assert torch.equal(inside, want_base)
        assert torch.equal(other.result(timeout=60), want_adapter)


def test_a_forward_during_load_state_dict_sees_the_adapters_before_or_after_never_a_mix(input_ids):
    """``load_state_dict`` (a Trainer resuming, a user restoring adapters) holds the write lock like every other
    change of adapters: a forward of another thread run while it loads sees the old adapters or the new, whole (was:
    it held no lock, so a forward in between ran the new tensors in the layers already loaded and the old in the
    rest: logits of neither)."""

    def packed(seed):
        base = tiny_llama(0)  # (seeds torch itself)
        torch.manual_seed(seed)
        lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"), "a")
        lm.pack()
        return lm

    lm, other = packed(1), packed(5)
    old, new = logits(lm, input_ids), logits(other, input_ids)
    assert not torch.equal(old, new)
    seen, threads = [], []

    def forward():
        seen.append(logits(lm, input_ids))

    def midway(module, *args):  # the last adapter is about to load: the others hold the new tensors already
        thread = threading.Thread(target=forward)
        thread.start()
        threads.append(thread)
        thread.join(1.0)  # runs now unless the load holds the model's lock

    handle = lm._lordba_layers()[-1][1].lordba_adapters["a"]._register_load_state_dict_pre_hook(midway)
    try:
        lm.load_state_dict(other.state_dict())
    finally:
        handle.remove()
    threads[0].join(60)
    assert torch.equal(logits(lm, input_ids), new)
    assert len(seen) == 1 and (torch.equal(seen[0], old) or torch.equal(seen[0], new)), "a forward saw a mix"


def test_saving_every_adapter_while_another_thread_deletes_one_saves_those_held_under_the_lock(tmp_path):
    """``save_pretrained()`` with no selection saves the adapters the model holds when it takes the lock (was: it
    listed them before, so an adapter deleted by another thread just before the save took the lock failed the save
    with AdapterStateError: unknown adapter, a name the caller never gave)."""

    lm = model_with_adapters(tmp_path)
    lm.load_adapter(tmp_path / "extra0", "c")

    lm._lock = lock = lock_letting_another_thread_in_first("read", lambda: lm.delete_adapter("c"))
    lm.save_pretrained(tmp_path / "all")
    assert not lock.first and "c" not in lm.peft_config
    assert (tmp_path / "all" / "b").is_dir() and not (tmp_path / "all" / "c").exists()


def test_set_lordba_model_state_dict_checks_and_loads_against_the_adapter_another_thread_hot_swapped(tmp_path):
    """set_lordba_model_state_dict snapshots, checks and loads under one hold of the write lock: a hot-swap of another
    thread to another scale format just before it is seen by the checks (an int8 state dict is refused for a float16
    adapter). Was: it checked against a snapshot taken before the lock, then loaded the int8 codes into the float16
    adapter, whose config and tensors then disagreed (its save failed: scale_in int8, expected float16)."""
    from lordba.errors import AdapterFormatError
    from lordba.nn.model_status import get_lordba_model_state_dict, set_lordba_model_state_dict

    for name, scale_dtype in (("i8", "int8"), ("f16", "float16")):
        base = tiny_llama(0)
        torch.manual_seed(3)
        get_lordba_model(base, LoRDBAConfig(r=2, init="random", scale_dtype=scale_dtype)).save_pretrained(
            tmp_path / name
        )
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"), "a")
    lm.load_adapter(tmp_path / "i8", "c")
    state = get_lordba_model_state_dict(lm, "c")

    lm._lock = lock = lock_letting_another_thread_in_first("write", lambda: lm.hotswap_adapter(tmp_path / "f16", "c"))
    with pytest.raises(AdapterFormatError, match=r"expected torch\.float16"):
        set_lordba_model_state_dict(lm, state, "c")
    assert not lock.first
    held = {a.scale_in.dtype for a in lm.adapter_modules("c").values()}
    assert lm.peft_config["c"].scale_dtype == "float16" and held == {torch.float16}
    lm.save_pretrained(tmp_path / "out", selected_adapters=["c"])


def test_state_dict_while_another_thread_loads_an_adapter_is_taken_under_the_read_lock(tmp_path):
    """``state_dict()`` (what a Trainer checkpoint saves) holds the read lock like a save: an adapter loaded by
    another thread meanwhile waits for it (was: the load added modules to the dicts state_dict was walking:
    RuntimeError: dictionary changed size during iteration)."""
    lm = model_with_adapters(tmp_path)
    threads = []

    def midway(module, *args):  # the walk is inside layer 0's q_proj adapters
        thread = threading.Thread(target=lambda: lm.load_adapter(tmp_path / "extra0", "c"))
        thread.start()
        threads.append(thread)
        thread.join(1.0)  # runs now unless state_dict holds the model's lock

    adapter = lm.base_model.model.layers[0].self_attn.q_proj.lordba_adapters["a"]
    handle = adapter._register_state_dict_hook(midway)
    try:
        state = lm.state_dict()
    finally:
        handle.remove()
    threads[0].join(60)
    assert "c" in lm.peft_config and not any(".lordba_adapters.c." in k for k in state)
    assert any(".lordba_adapters.b." in k for k in state)


def lock_letting_another_thread_in_first(kind: str, action):
    """A model lock whose first ``kind`` ("read" / "write") hold runs ``action`` in another thread just before it is
    taken: what another thread's change at that moment does to the call taking it."""
    from lordba.nn.lock import RWLock

    class Watched(RWLock):
        first = True

        @contextlib.contextmanager
        def hold(self, take):
            if self.first:
                self.first = False
                run_threads(action)
            with take():
                yield

        def read(self):
            return self.hold(super().read) if kind == "read" else super().read()

        def write(self):
            return self.hold(super().write) if kind == "write" else super().write()

    return Watched()


def test_trainable_parameter_counts_are_taken_under_the_read_lock(tmp_path):
    """get_nb_trainable_parameters (and print_trainable_parameters, get_model_status) walk the parameters under the
    read lock: an adapter another thread deletes meanwhile waits for the walk or is counted gone. Was: no lock; with
    a thread adding / deleting adapters the walk raised RuntimeError: dictionary changed size during iteration."""
    lm = model_with_adapters(tmp_path)
    lm.delete_adapter("b")
    expected = lm.get_nb_trainable_parameters()
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random", target_modules=["q_proj", "down_proj"]))
    assert lm.get_nb_trainable_parameters() != expected

    lm._lock = lock = lock_letting_another_thread_in_first("read", lambda: lm.delete_adapter("b"))
    assert lm.get_nb_trainable_parameters() == expected
    assert not lock.first


def test_merge_adapter_is_refused_while_another_thread_is_in_a_disable_adapter_block(tmp_path, input_ids):
    """A disable_adapter block of any thread refuses merge_adapter (nothing merged): a merged update cannot be turned
    off. Was: only the block's own thread was refused; another thread's merge went through and the block's next
    forward failed (AdapterStateError: adapters are merged into the base) inside a block it had opened fine."""
    lm = model_with_adapters(tmp_path)
    want_adapter, want_base = adapter_and_base_logits(lm, input_ids)
    errors = []

    def merge():
        try:
            lm.merge_adapter()
        except AdapterStateError as e:
            errors.append(str(e))

    with lm.disable_adapter():
        run_threads(merge)
        assert torch.equal(logits(lm, input_ids), want_base)
    assert errors and "another thread is in a disable_adapter() block" in errors[0]
    assert not any(layer.merged for _, layer in lm._lordba_layers())
    assert torch.equal(logits(lm, input_ids), want_adapter)


def test_merge_and_unload_is_refused_in_a_disable_adapter_block_of_another_thread(tmp_path, input_ids):
    """merge_and_unload while another thread is in a disable_adapter block is refused, model unchanged. Was: it went
    through and the block's later calls ran base + the merged adapter, silently, inside a block that promises the base
    alone. (In the caller's own block it merges, as PEFT's: nn/test_peft_merge_disabled.py.)"""
    lm = model_with_adapters(tmp_path)
    want_adapter, want_base = adapter_and_base_logits(lm, input_ids)
    errors = []

    def unload():
        try:
            lm.merge_and_unload()
        except AdapterStateError as e:
            errors.append(str(e))

    with lm.disable_adapter():
        run_threads(unload)
        assert torch.equal(logits(lm, input_ids), want_base)
    assert errors and errors[0].startswith("merge_and_unload: ")
    assert "another thread is in a disable_adapter() block" in errors[0]
    assert lm.peft_config and not any(layer.merged for _, layer in lm._lordba_layers())
    assert torch.equal(logits(lm, input_ids), want_adapter)


def test_a_disable_adapter_block_closed_by_another_thread_ends_in_the_thread_that_opened_it(tmp_path, input_ids):
    """A block entered in one thread and closed in another (a context manager handed over, a generator finished by
    another worker) ends for the thread that opened it. Was: the close raised ValueError (a token of another
    context) and the opening thread's calls kept running the base alone, silently, after the block was over."""
    lm = model_with_adapters(tmp_path)
    want_adapter, _ = adapter_and_base_logits(lm, input_ids)
    block = lm.disable_adapter()
    block.__enter__()
    run_threads(lambda: block.__exit__(None, None, None))
    assert torch.equal(logits(lm, input_ids), want_adapter)
    lm.merge_adapter()  # (no block left open: not refused)
