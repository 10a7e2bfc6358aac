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
