"""What a long-running server keeps must stay bounded while adapters come and go: the registry's maps hold the
adapters resident, registered or in use, not every adapter directory the folder ever held."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoModelForCausalLM

from lordba import LoRDBAModel
from lordba.serve.adapter_files import payload_bytes
from lordba.serve.errors import AdapterLoadError
from lordba.serve.registry import AdapterRegistry

from .serve_helpers import make_served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory, names=("a",))


def test_the_registry_forgets_folder_adapters_evicted_or_refused_once_their_directories_go(served, tmp_path):
    """A folder whose adapters churn (written, served, evicted by the LRU, removed): the registry kept an entry for
    every directory the folder ever held, 1.1 MB more per 1,000 adapters, for the server's lifetime. An entry of a
    folder adapter that is not resident holds nothing: the adapter is found again on its next use."""
    folder = tmp_path / "adapters"
    shutil.copytree(served[1], folder)
    model = LoRDBAModel(AutoModelForCausalLM.from_pretrained(served[0]).eval())
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))  # room for one: each load evicts
    for i in range(60):
        name = f"user-{i}"
        shutil.copytree(folder / "a", folder / name)
        registry.acquire(name)
        registry.release(name)
        shutil.rmtree(folder / name)  # resident, still served; evicted by the next one
        bad = folder / f"bad-{i}"  # a corrupt adapter, refused (400), then removed
        shutil.copytree(folder / "a", bad)
        weights = bad / "lordba_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
        with pytest.raises(AdapterLoadError, match=f"'bad-{i}'"):
            registry.acquire(f"bad-{i}")
        shutil.rmtree(bad)
    assert len(registry._entries) <= 2 and list(registry.resident()) == ["user-59"]
    assert list(model.peft_config) == ["user-59"]
    registry.acquire("a")  # evicts user-59, and a folder adapter evicted comes back on use
    registry.release("a")
    assert list(registry._entries) == ["a"] and list(model.peft_config) == ["a"]


def test_what_was_alive_at_a_frozen_load_and_died_in_a_cycle_since_is_freed(served, tmp_path, monkeypatch):
    """Once the server froze its heap, each load froze every object alive: the connections of the requests in
    flight (asyncio transports, in a cycle with their sockets) were never freed after they closed, ~2 kB each, 3 per
    load with 5 clients (a server whose LRU loads on every few requests grew without bound). A full collection of
    the thawed heap every THAW_EVERY loads (here 16) frees them."""
    import gc
    import weakref

    from lordba.serve import registry as registry_module

    monkeypatch.setattr(registry_module, "THAW_EVERY", 16, raising=False)

    class Cyclic:  # a request's object, alive during a load, garbage (in a cycle) after it
        def __init__(self) -> None:
            self.me = self

    folder = tmp_path / "adapters"
    shutil.copytree(served[1], folder)
    shutil.copytree(folder / "a", folder / "b")
    model = LoRDBAModel(AutoModelForCausalLM.from_pretrained(served[0]).eval())
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))  # each acquire loads (and evicts)
    gc.collect()
    gc.freeze()
    registry.freeze_loads = True  # what freeze_heap(state) sets
    dead = []
    try:
        for i in range(64):
            in_flight = Cyclic()
            dead.append(weakref.ref(in_flight))
            registry.acquire("ab"[i % 2])
            registry.release("ab"[i % 2])
            del in_flight
        gc.collect()
        assert registry.loads == 64
        assert sum(ref() is not None for ref in dead) < 16  # 64 before: every one frozen, never freed
    finally:
        gc.unfreeze()
