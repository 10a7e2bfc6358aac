"""The adapter registry: names that stay inside the folder, loading on first use, the LRU within a
memory budget that never evicts an adapter in use, and unloads that wait for their last request."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from lordba import LoRDBAModel
from lordba.serve.adapter_files import adapter_bytes, payload_bytes
from lordba.serve.errors import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterMemoryError,
    BadRequestError,
    UnknownAdapterError,
)
from lordba.serve.registry import AdapterRegistry

from .serve_helpers import make_served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory)


@pytest.fixture
def model(served):
    return LoRDBAModel(AutoModelForCausalLM.from_pretrained(served[0]).eval())


@pytest.fixture
def folder(served, tmp_path):
    copy = tmp_path / "adapters"
    shutil.copytree(served[1], copy)
    return copy


@pytest.mark.parametrize("name", ["../a", "a/../b", ".", "..", ".hidden", "a.b", "", "x" * 200])
def test_names_never_leave_the_folder(model, folder, name):
    registry = AdapterRegistry(model, folder, reserved=("base",))
    with pytest.raises(BadRequestError, match="invalid adapter name"):
        registry.acquire(name)
    assert not model.peft_config


@pytest.mark.parametrize("name", ["__base__", "base"])
def test_a_reserved_name_is_no_served_model_and_cannot_be_registered(model, folder, name):
    """``model: "__base__"`` (the engine's route to the base, a name ``/v1/models`` never lists) was a 400 'invalid
    adapter name ... use letters, digits, '_' and '-'' where every other name not served is a 404 naming it."""
    shutil.copytree(folder / "a", folder / name)
    registry = AdapterRegistry(model, folder, reserved=("base",))
    with pytest.raises(UnknownAdapterError, match=f"The model '{name}' does not exist") as err:
        registry.acquire(name)
    assert err.value.status == 404 and err.value.param == "model"
    with pytest.raises(BadRequestError, match="reserved") as err:
        registry.register(name, folder / "a")
    assert err.value.param == "lora_name" and name not in registry.names()
    assert not model.peft_config


def test_symlink_out_of_the_folder_and_paths_outside_are_refused(model, folder, served, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(served[1] / "a", outside)
    os.symlink(outside, folder / "escape")
    registry = AdapterRegistry(model, folder)
    with pytest.raises(UnknownAdapterError, match="escape"):
        registry.acquire("escape")
    for path in ("../outside", str(outside), "escape"):
        with pytest.raises(BadRequestError, match="outside the --adapters folder"):
            registry.register("x", path)
    assert "escape" not in registry.names() and not model.peft_config


@pytest.mark.parametrize("path", ["a\x00b", "\x00", "a\ud800"])
def test_a_lora_path_that_is_no_file_system_path_is_a_400_naming_it(model, folder, path):
    """``Path.resolve`` raises ValueError ('embedded null byte'; UnicodeEncodeError for a lone surrogate) on such
    a path: POST /v1/load_lora_adapter answered a JSON string holding \\u0000 or \\ud800 with a 500 internal
    error instead of a 400 naming ``lora_path``."""
    registry = AdapterRegistry(model, folder)
    with pytest.raises(BadRequestError, match="lora_path") as err:
        registry.register("x", path)
    assert err.value.param == "lora_path"
    assert "x" not in registry.names() and not model.peft_config


@pytest.mark.parametrize("path", ["loop", "loop/a", "{folder}/loop"])
def test_a_lora_path_through_a_symlink_loop_is_a_400_naming_it(model, folder, path):
    """A link loop in the folder (``loop -> loop``): ``Path.resolve`` raises RuntimeError ('Symlink loop from ...'),
    which POST /v1/load_lora_adapter answered with a 500 internal error instead of a 400 naming ``lora_path``."""
    os.symlink("loop", folder / "loop")
    registry = AdapterRegistry(model, folder)
    with pytest.raises(BadRequestError, match="lora_path") as err:
        registry.register("x", path.format(folder=folder))
    assert err.value.param == "lora_path"
    assert "x" not in registry.names() and not model.peft_config


def test_first_use_loads_and_names_list_the_folder(model, folder):
    registry = AdapterRegistry(model, folder)
    assert registry.names() == ["a", "b", "c"] and not model.peft_config
    registry.acquire("b")
    assert list(model.peft_config) == ["b"] and registry.loads == 1
    registry.acquire("b")  # resident: no second load
    assert registry.loads == 1
    with pytest.raises(UnknownAdapterError, match="'zz'"):
        registry.acquire("zz")


def test_lru_never_evicts_an_adapter_in_use(model, folder):
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))
    registry.acquire("a")  # held by a request
    with pytest.raises(AdapterMemoryError, match="in use"):
        registry.acquire("b")
    assert list(model.peft_config) == ["a"]
    registry.release("a")
    registry.acquire("b")
    assert list(model.peft_config) == ["b"] and registry.evictions == 1
    registry.release("b")
    registry.acquire("a")
    registry.acquire("a")
    assert list(registry.resident()) == ["a"] and registry.evictions == 2


def test_unload_waits_for_the_last_request_and_register_refuses_duplicates(model, folder):
    registry = AdapterRegistry(model, folder)
    registry.register("mine", "a")
    with pytest.raises(AdapterConflictError, match="already been loaded"):
        registry.register("mine", "b")
    registry.acquire("mine")
    registry.unload("mine")
    assert "mine" in model.peft_config  # still in use
    with pytest.raises(UnknownAdapterError):
        registry.acquire("mine")
    registry.release("mine")
    assert "mine" not in model.peft_config
    with pytest.raises(UnknownAdapterError, match="cannot be found"):
        registry.unload("mine")


def test_a_register_whose_load_fails_outside_the_loaders_checks_leaves_no_name(model, folder, monkeypatch):
    """register forgot the name only when the load raised a library error: a lora_path too long for the file
    system (the loader's stat raised OSError ENAMETOOLONG) was a 500, and the name stayed registered for good:
    listed by /v1/models, every request for it loading the bad path again, and a register of that name with a
    good path refused as 'already been loaded'. Any other failure of the load (here a RuntimeError) left it too."""
    registry = AdapterRegistry(model, folder)
    with pytest.raises(AdapterLoadError, match=r"'z' cannot be loaded.*too long"):
        registry.register("z", "x" * 5000)
    assert "z" not in registry.names() and not model.peft_config
    real = model.load_adapter
    monkeypatch.setattr(model, "load_adapter", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="broken"):
        registry.register("z", "a")
    assert "z" not in registry.names() and not model.peft_config
    monkeypatch.setattr(model, "load_adapter", real)
    registry.register("z", "a")  # the name is free: a good path is served under it
    assert "z" in registry.names() and "z" in model.peft_config


def test_a_corrupt_file_is_refused_with_its_name_and_nothing_is_installed(model, folder):
    weights = folder / "c" / "lordba_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    registry = AdapterRegistry(model, folder)
    with pytest.raises(AdapterLoadError, match="adapter 'c'"):
        registry.acquire("c")
    assert not model.peft_config and registry.resident() == {}
    registry.acquire("a")
    assert list(model.peft_config) == ["a"]


def test_a_folder_adapter_unloaded_while_held_is_taken_back_by_a_new_request(model, folder):
    registry = AdapterRegistry(model, folder)
    registry.acquire("a")
    registry.unload("a")  # still held: it drains
    registry.acquire("a")  # a new request for the folder's "a" takes it back instead of reloading it
    registry.release("a")
    registry.release("a")
    registry.acquire("a")
    assert list(registry.resident()) == ["a"] and registry.loads == 1 and "a" in model.peft_config


def test_a_folder_adapter_unloaded_while_held_after_its_files_changed_is_not_taken_back(model, folder, served):
    """The documented way to serve new files under a folder adapter's name is to unload it; with a request still
    holding it, the next request took the draining adapter back: it was served the old weights, and kept serving them
    (resident again) until evicted. Its files changed since it was loaded: a 503 until the drain ends, then the new
    files load."""
    from lordba.serve.errors import UnavailableError

    registry = AdapterRegistry(model, folder)
    registry.acquire("a")  # a request in flight
    shutil.rmtree(folder / "a")
    shutil.copytree(served[1] / "b", folder / "a")  # the new version
    registry.unload("a")
    with pytest.raises(UnavailableError, match="'a'") as err:
        registry.acquire("a")
    assert err.value.status == 503 and registry._draining["a"].refs == 1
    registry.release("a")  # the drain ends
    registry.acquire("a")
    assert registry.loads == 2
    assert_serves(model, "a", served, "b")


def test_loads_stay_out_of_the_collector_once_the_server_froze_its_heap(model, folder):
    """``lordba serve`` freezes its heap at startup (``freeze_heap``); a thousand resident adapters
    are ~4 million objects, which every full collection would otherwise walk while serving."""
    import gc

    gc.unfreeze()  # what an earlier test froze (harmless: the objects return to the collector)
    registry = AdapterRegistry(model, folder)
    registry.acquire("a")  # not asked to: loads leave the collector alone
    assert gc.get_freeze_count() == 0
    gc.freeze()
    registry.freeze_loads = True  # what freeze_heap(state) sets
    try:
        before = gc.get_freeze_count()
        registry.acquire("b")
        assert gc.get_freeze_count() > before
        adapter = next(iter(model.adapter_modules("b").values()))
        assert not any(obj is adapter for obj in gc.get_objects())  # in the permanent generation
    finally:
        gc.unfreeze()


def test_a_load_on_a_frozen_heap_does_not_freeze_the_garbage_pending(model, folder):
    """With the heap frozen each load froze every object alive, cyclic garbage not yet collected included
    (a request's exception and its traceback, a frame): frozen, never collected, so a server loading and
    evicting adapters for days grew by whatever garbage was pending at each load."""
    import gc
    import weakref

    class Cyclic:
        def __init__(self) -> None:
            self.me = self

    gc.unfreeze()
    gc.collect()
    gc.freeze()
    registry = AdapterRegistry(model, folder)
    registry.freeze_loads = True
    try:
        registry.acquire("a")  # (the first load allocates enough to run the collector itself)
        garbage = Cyclic()
        dead = weakref.ref(garbage)
        del garbage  # unreachable, but only a collection frees it
        registry.acquire("b")
        gc.collect()  # (frozen, it would stay: a collection never walks the permanent generation)
        assert dead() is None
    finally:
        gc.unfreeze()


def test_a_fifo_for_the_weights_is_refused_without_hanging_the_registry(model, folder):
    """The LRU's size estimate opened the weights file before the loader's checks: a FIFO there hung
    the request while it held the load lock (every later load, unload and drain behind it)."""
    import threading

    weights = folder / "c" / "lordba_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    registry = AdapterRegistry(model, folder, max_bytes=10**9)
    outcome: list[BaseException | None] = []

    def acquire() -> None:
        try:
            registry.acquire("c")
            outcome.append(None)
        except BaseException as err:  # reported below
            outcome.append(err)

    thread = threading.Thread(target=acquire, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # let the blocked open() return so the thread ends
        with open(weights, "wb"):
            pass
        thread.join(10)
        pytest.fail("acquire hung on a FIFO in place of the weights file")
    assert isinstance(outcome[0], AdapterLoadError) and "not a regular file" in str(outcome[0])
    assert payload_bytes(weights) == 0
    registry.acquire("a")
    assert list(model.peft_config) == ["a"]


def test_a_drained_adapter_reloaded_before_its_drain_deletes_is_kept(model, folder):
    """The last release of an unloaded adapter left the registry's lock before taking the load lock
    to delete it; a new request loading the folder's adapter in between was then deleted under it
    (the registry said resident, the model had no such adapter: the request's step failed)."""
    import threading

    registry = AdapterRegistry(model, folder)
    registry.acquire("a")
    registry.unload("a")  # held: it drains
    real_lock, reloaded = registry._load_lock, threading.Event()

    class Gate:  # the draining release reaches the load lock only once the new request has loaded
        def __enter__(self) -> None:
            if threading.current_thread().name == "drain":
                reloaded.wait(10)
            real_lock.acquire()

        def __exit__(self, *exc: object) -> None:
            real_lock.release()

    registry._load_lock = Gate()
    drain = threading.Thread(target=registry.release, args=("a",), name="drain")
    drain.start()
    deadline = time.monotonic() + 10
    while "a" in registry._draining and time.monotonic() < deadline:
        time.sleep(0.001)  # until the release has left the registry's lock: the name is free
    registry.acquire("a")  # a new request: the folder's "a" loads again
    reloaded.set()
    drain.join(10)
    assert registry.resident() == {"a": registry._entries["a"].nbytes} and registry._entries["a"].refs == 1
    assert "a" in model.peft_config  # what the registry says is resident is on the model


def test_a_folder_adapter_removed_from_disk_is_no_longer_listed_or_loaded(model, folder):
    """A folder adapter seen once stayed in the registry: after its directory was removed,
    ``/v1/models`` still listed it and a request got the loader's 400 'missing' instead of a 404."""
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))
    weights = folder / "c" / "lordba_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterLoadError):
        registry.acquire("c")  # seen, refused
    registry.acquire("b")
    registry.release("b")
    registry.acquire("a")  # evicts b
    registry.release("a")
    shutil.rmtree(folder / "b")
    shutil.rmtree(folder / "c")
    assert registry.names() == ["a"]
    for gone in ("b", "c"):
        with pytest.raises(UnknownAdapterError, match=f"'{gone}'"):
            registry.acquire(gone)
    registry.register("mine", "a")  # registered names stay listed while loaded
    assert registry.names() == ["a", "mine"]


def test_a_registered_name_unloaded_while_held_is_not_taken_back_as_the_folders_adapter(model, folder, served):
    """A name registered from another directory (``load_lora_adapter`` of ``a`` with ``lora_path`` ``b``) and
    unloaded while a request held it drained; a new request for ``a`` found the folder's ``a`` and took the
    draining entry back: it was served ``b``'s weights under the folder's name (silently the wrong adapter), and
    the unloaded registration came back. It is a 503 until the drain ends; then the folder's ``a`` loads."""
    from lordba.serve.errors import UnavailableError

    registry = AdapterRegistry(model, folder)
    registry.register("a", "b")
    registry.acquire("a")
    registry.unload("a")  # held: it drains, b's weights still on the model under "a"
    with pytest.raises(UnavailableError, match="'a'") as err:
        registry.acquire("a")
    assert err.value.status == 503 and "a" in registry._draining and registry._draining["a"].refs == 1
    registry.release("a")  # the drain ends: b's weights leave the model
    assert "a" not in model.peft_config
    registry.acquire("a")  # now the folder's a
    assert registry._entries["a"].from_folder and registry._entries["a"].path == folder.resolve() / "a"
    fresh = LoRDBAModel(AutoModelForCausalLM.from_pretrained(served[0]).eval())
    fresh.load_adapter(folder / "a", "a")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, adapter_names=["a"]).logits, fresh(input_ids=ids, adapter_names=["a"]).logits
        )


def test_an_adapter_larger_than_the_whole_budget_is_a_400_naming_it_not_a_retry_later(model, folder):
    """An adapter whose size alone exceeds --max-adapter-memory was an AdapterMemoryError, a 503 'retry later'
    (adapter_memory_full): no retry can ever succeed. It is a 400 naming the adapter, its size and the budget;
    nothing is evicted and the others are still served."""
    from lordba.serve.errors import AdapterTooLargeError

    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))
    registry.acquire("a")
    registry.release("a")
    big = folder / "big"
    shutil.copytree(folder / "b", big)
    registry.max_bytes = size - 1  # b's twin no longer fits even an empty budget (a stays resident: no eviction)
    with pytest.raises(AdapterTooLargeError) as err:
        registry.acquire("big")
    assert err.value.status == 400 and err.value.code == "adapter_too_large" and err.value.param == "model"
    assert all(word in str(err.value) for word in ("'big'", str(size), str(size - 1)))
    assert not isinstance(err.value, AdapterMemoryError)  # not the 503 a client retries
    assert list(model.peft_config) == ["a"] and registry.evictions == 0
    registry.acquire("a")  # still served
    with pytest.raises(AdapterTooLargeError, match="'big2'") as err:
        registry.register("big2", "big")
    assert err.value.param == "lora_name" and "big2" not in registry.names()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "mismatched"])
def test_a_bad_adapter_evicts_nobody_and_is_loaded_fresh_once_fixed(model, folder, served, damage):
    """The LRU made room before the loader checked the file: a corrupt, truncated or mismatched adapter
    evicted every idle adapter for a load that then failed (the next requests reloaded them all). A bad
    file evicts nobody, is not left resident, and once the file is fixed it loads fresh."""
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(2.5 * size))
    for name in ("a", "b"):
        registry.acquire(name)
        registry.release(name)
    weights = folder / "c" / "lordba_model.safetensors"
    good = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(good[:-10])
    elif damage == "flipped":
        weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    else:  # another base's adapter: its layers' shapes differ from this model's
        from transformers import LlamaConfig, LlamaForCausalLM

        from lordba import LoRDBAConfig, get_lordba_model

        other = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=99,
                hidden_size=32,
                intermediate_size=40,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        shutil.rmtree(folder / "c")
        get_lordba_model(other, LoRDBAConfig(r=4, alpha=16, init="random")).save_pretrained(folder / "c")
    with pytest.raises(AdapterLoadError, match="adapter 'c'"):
        registry.acquire("c")
    assert list(registry.resident()) == ["a", "b"] and registry.evictions == 0
    assert sorted(model.peft_config) == ["a", "b"] and "c" not in model.peft_config
    shutil.rmtree(folder / "c")
    shutil.copytree(served[1] / "c", folder / "c")  # fixed
    registry.acquire("c")
    assert "c" in model.peft_config and registry.resident()["c"] > 0 and registry.evictions == 1
    assert_serves(model, "c", served, "c")


def test_registering_a_name_whose_unloaded_adapter_still_drains_is_a_503_not_already_loaded(model, folder):
    """``unload_lora_adapter`` of a name a request still held, then ``load_lora_adapter`` of that name (a new
    version): the draining adapter made it a 400 'has already been loaded' (adapter_already_loaded), though the
    client had just unloaded it and the same call succeeds once the request ends. It is a 503 (retry) naming it."""
    from lordba.serve.errors import UnavailableError

    registry = AdapterRegistry(model, folder)
    registry.register("mine", "a")
    registry.acquire("mine")
    registry.unload("mine")  # held: it drains
    with pytest.raises(UnavailableError, match="'mine' is being unloaded") as err:
        registry.register("mine", "b")
    assert err.value.status == 503 and err.value.param == "lora_name"
    registry.release("mine")  # the drain ends
    registry.register("mine", "b")  # the same call now succeeds
    assert registry._entries["mine"].path == folder.resolve() / "b" and "mine" in model.peft_config


def test_load_lora_adapter_refusals_name_lora_name_not_model(model, folder):
    """``POST /v1/load_lora_adapter`` (which has no ``model`` field) refused while every resident adapter was in use
    (a 503 adapter_memory_full) or for bad files (a 400 adapter_invalid) with ``param: "model"``: the errors of a
    request's own adapter. They name ``lora_name``, as its other refusals do; a request's load still names ``model``."""
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))
    registry.acquire("a")  # held: nothing can be evicted
    with pytest.raises(AdapterMemoryError) as err:
        registry.register("mine", "b")
    assert err.value.status == 503 and err.value.param == "lora_name" and "mine" not in registry.names()
    with pytest.raises(AdapterMemoryError) as err:
        registry.acquire("b")
    assert err.value.param == "model"
    registry.release("a")
    (folder / "c" / "lordba_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterLoadError, match="adapter 'bad'") as err:
        registry.register("bad", "c")
    assert err.value.param == "lora_name"
    with pytest.raises(AdapterLoadError) as err:
        registry.acquire("c")
    assert err.value.param == "model"


def test_the_fixture_adapters_are_not_all_the_same(served):
    """make_adapter seeded torch, then built the model with tiny_model(), which seeds torch again (0): every
    fixture adapter (a, b, c here, the soak's eight) had the same weights whatever its seed, so the tests that an
    adapter's rows get its own output (not a neighbour's) could not see a wrong routing."""
    from lordba.format.adapter import read_adapter

    def tensors(name: str) -> list[torch.Tensor]:
        adapter = read_adapter(served[1] / name)
        return [t for rec in adapter.modules.values() for _, t in sorted(rec.tensors.items())]

    a, b, c = tensors("a"), tensors("b"), tensors("c")
    for other in (b, c):
        assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=True))


def test_an_adapter_that_trains_a_module_in_full_counts_its_copy_within_the_budget(model, folder):
    """An adapter with ``modules_to_save`` (here the output head) holds its own copy of that module, most of its
    bytes: the registry counted only its LoRDBA branches (3472 of its 22480 bytes), so --max-adapter-memory sized
    for two such adapters let three stay resident (67440 bytes) without evicting, and
    lordba_resident_adapter_bytes said 10416. Every byte of the copy it holds counts, as its file's size says."""
    from lordba import LoRDBAConfig, get_lordba_model

    from .serve_helpers import tiny_model

    for i, name in enumerate(("h1", "h2", "h3")):
        base = tiny_model()
        torch.manual_seed(20 + i)
        config = LoRDBAConfig(r=4, alpha=16, init="random", modules_to_save=["lm_head"])
        get_lordba_model(base, config).save_pretrained(folder / name)
    size = payload_bytes(folder / "h1" / "lordba_model.safetensors")
    head = model.base_model.lm_head.weight.nbytes
    registry = AdapterRegistry(model, folder, max_bytes=2 * size)
    for name in ("h1", "h2", "h3"):
        registry.acquire(name)
        registry.release(name)
    assert all(nbytes >= head for nbytes in registry.resident().values())
    assert list(registry.resident()) == ["h2", "h3"] and registry.evictions == 1
    assert sum(registry.resident().values()) <= 2 * size


def test_int4_scales_are_counted_as_the_bytes_they_take_once_loaded(model, folder):
    """An ``int4`` adapter's file stores two scale codes per byte; loaded, they take one byte each (2240 bytes
    held for a 1568-byte payload). The LRU made room for the payload: with room for one such adapter and a
    payload more, a second one loaded without evicting (4480 bytes resident within a 3808-byte budget), and a
    budget between the two sizes let one adapter hold more than all of it."""
    from lordba import LoRDBAConfig, get_lordba_model
    from lordba.serve.errors import AdapterTooLargeError

    from .serve_helpers import tiny_model

    for i, name in enumerate(("q1", "q2")):
        base = tiny_model()
        torch.manual_seed(30 + i)
        get_lordba_model(base, LoRDBAConfig(r=4, alpha=16, init="random", scale_dtype="int4")).save_pretrained(
            folder / name
        )
    payload = payload_bytes(folder / "q1" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder)
    registry.acquire("q1")
    held = registry.resident()["q1"]
    assert held > payload
    registry.release("q1")
    registry.unload("q1")
    registry.max_bytes = held + payload
    for name in ("q1", "q2"):
        registry.acquire(name)
        registry.release(name)
    assert list(registry.resident()) == ["q2"] and registry.evictions == 1
    registry.max_bytes = payload  # the file fits, what it holds does not
    with pytest.raises(AdapterTooLargeError, match=rf"'q1' \({held} bytes\)"):
        registry.acquire("q1")
    assert list(model.peft_config) == ["q2"] and registry.evictions == 1


def test_the_caches_an_adapters_forwards_build_count_within_the_budget(model, folder):
    """In the ``dense`` kernel mode an adapter's first forward folds its factors into dense matrices it keeps
    (3472 bytes at load, 24976 once used). The registry sized each adapter once, at its load: with a budget of
    two unused adapters, a second one loaded beside a used one without evicting it (28448 bytes resident within
    6944) and lordba_resident_adapter_bytes said 6944. Resident adapters are sized again whenever room is made."""
    from lordba import kernels

    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=2 * size)
    with kernels.mode("dense"):
        registry.acquire("a")
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]), adapter_names=["a"])
        registry.release("a")
        registry.acquire("b")
    assert list(registry.resident()) == ["b"] and registry.evictions == 1
    assert sum(registry.resident().values()) <= 2 * size


def test_the_resident_bytes_gauge_shows_the_bytes_a_503_was_decided_on(model, folder):
    """A load refused for want of room (503) sizes the resident adapters again first: ``a``, held and used in the
    ``dense`` kernel mode, had grown from 3472 to 24976 bytes, but lordba_resident_adapter_bytes still said 3472
    after the 503, which was decided on 24976."""
    from lordba import kernels
    from lordba.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=2 * size, observer=metrics)
    with kernels.mode("dense"):
        registry.acquire("a")
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]), adapter_names=["a"])
        with pytest.raises(AdapterMemoryError):
            registry.acquire("b")  # a is held and no longer fits beside it
    grown = adapter_bytes(model, "a")
    assert grown > 2 * size
    assert metrics.resident_bytes._value.get() == grown == registry.resident()["a"]
    assert metrics.resident._value.get() == 1


def test_only_the_adapters_held_since_they_were_sized_are_sized_again(model, folder, monkeypatch):
    """Every load and every report sized every resident adapter again (~3 ms each on SmolLM2): with a thousand
    resident, each load of a new adapter took seconds. Only those a request held since are sized again."""
    from lordba.serve import registry as registry_module

    registry = AdapterRegistry(model, folder, max_bytes=1 << 40)
    for name in ("a", "b"):
        registry.acquire(name)
        registry.release(name)
    registry._measure()
    sized = []
    real = registry_module.adapter_bytes
    monkeypatch.setattr(registry_module, "adapter_bytes", lambda m, n: sized.append(n) or real(m, n))
    registry._measure()
    assert sized == []
    registry.acquire("a")
    registry._measure()
    registry.release("a")
    registry._measure()  # held when last sized: sized once more
    registry._measure()
    assert sized == ["a", "a"]


def test_an_adapter_directory_given_as_the_adapters_folder_is_refused_naming_it(model, folder):
    """``--adapters DIR`` where DIR is one adapter's directory (not the folder holding it) served no adapter and said
    nothing: every request for it was a 404."""
    with pytest.raises(BadRequestError, match=r"an adapter directory, not a folder of them.*'a'"):
        AdapterRegistry(model, folder / "a")


def assert_serves(model, name, served, source):
    """``model``'s adapter ``name`` gives the logits of ``served``'s adapter ``source`` loaded alone on a fresh base."""
    fresh = LoRDBAModel(AutoModelForCausalLM.from_pretrained(served[0]).eval())
    fresh.load_adapter(served[1] / source, source)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=[name]).logits
        assert torch.equal(got, fresh(input_ids=ids, adapter_names=[source]).logits)


def test_listing_the_folder_reads_only_the_configs_changed_since_the_last_listing(model, folder, monkeypatch):
    """Every GET /v1/models read every adapter's config in the folder (its ``peft_type``): 0.2 s a call with a
    thousand adapters. A config unchanged since the last listing is not read again; one rewritten (here as a PEFT
    LoRA's, then back) or removed is seen at the next listing."""
    import json

    from lordba.serve import adapter_files

    registry = AdapterRegistry(model, folder)
    assert registry.names() == ["a", "b", "c"]
    read = []
    real = adapter_files.other_peft_type
    monkeypatch.setattr(adapter_files, "other_peft_type", lambda path: read.append(path.name) or real(path))
    assert registry.names() == ["a", "b", "c"] and read == []
    config = folder / "b" / "adapter_config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "peft_type": "LORA"}))
    assert registry.names() == ["a", "c"] and read == ["b"]
    config.write_text(original)
    assert registry.names() == ["a", "b", "c"] and read == ["b", "b"]
    (folder / "c" / "adapter_config.json").unlink()
    assert registry.names() == ["a", "b"] and read == ["b", "b"]


def test_the_adapters_folder_removed_while_serving_lists_what_is_loaded_and_says_so_once(model, folder, caplog):
    """The --adapters folder deleted (or renamed) while serving made names() raise FileNotFoundError: GET /v1/models
    and /v1/models/{name} were a 500. They list what is loaded (the folder's adapters not loaded are gone: a 404);
    the log says once that the folder cannot be listed, and again once it came back and went again."""
    registry = AdapterRegistry(model, folder)
    registry.register("mine", "b")
    moved = folder.with_name("moved")
    folder.rename(moved)
    with caplog.at_level("WARNING", logger="lordba.serve"):
        assert registry.names() == ["mine"] and registry.names() == ["mine"]
        with pytest.raises(UnknownAdapterError, match="'a'"):
            registry.acquire("a")
        registry.acquire("mine")
        registry.release("mine")
        said = [r.getMessage() for r in caplog.records if "cannot be listed" in r.getMessage()]
        assert len(said) == 1 and str(folder.resolve()) in said[0]
        moved.rename(folder)
        assert registry.names() == ["a", "b", "c", "mine"]
        shutil.rmtree(folder)
        assert registry.names() == ["mine"]
        assert len([r for r in caplog.records if "cannot be listed" in r.getMessage()]) == 2


def test_a_registered_adapter_evicted_whose_files_were_removed_is_not_listed_and_a_request_is_a_404(model, folder):
    """A name registered by load_lora_adapter, evicted by the LRU, whose directory was then removed stayed listed in
    /v1/models; a request for it was a 400 'adapter_invalid' naming the server's path. It is not listed (nor is the
    folder adapter its name masks), a request is a 404 naming it (the folder's adapter of that name is not served in
    its place), and the name can be registered again or unloaded."""
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))
    registry.register("mine", "b")
    registry.register("a", "c")  # masks the folder's a
    registry.acquire("b")  # evicts mine and a
    registry.release("b")
    assert registry.resident() == {"b": registry._entries["b"].nbytes}
    shutil.rmtree(folder / "c")
    os.rename(folder / "b", folder / "old-b")  # b stays resident: still served
    assert registry.names() == ["b", "old-b"]
    for name in ("mine", "a"):
        with pytest.raises(UnknownAdapterError, match=f"'{name}'.*removed") as err:
            registry.acquire(name)
        assert err.value.status == 404 and str(folder) not in str(err.value)
    registry.register("mine", "old-b")  # evicts b, whose folder no longer has it
    registry.unload("a")
    assert registry.names() == ["a", "mine", "old-b"]
    registry.acquire("a")  # the folder's own a now
    assert registry._entries["a"].from_folder


def test_an_adapter_recording_another_quantized_base_is_refused_naming_both_unless_allowed(
    served, folder, tmp_path, caplog
):
    """An adapter loaded after startup (first use, load_lora_adapter) that records another base quantization than
    the served one ran on it with a warning that named no adapter (printed once per process): its outputs were not
    the ones it was trained for. On a quantized base it is a 400 naming both bases, unless the server allows it
    (--allow-base-mismatch: logged with its name); an unquantized base serves it, logged with its name."""
    from lordba.quant import quantize_model

    from conftest import set_config

    q4 = {"backend": "q4", "bits": 4, "group_size": 64}
    set_config(folder / "a", base_quantization=q4)
    set_config(folder / "b", base_quantization={"backend": "hqq", "bits": 2, "group_size": 16})
    base = AutoModelForCausalLM.from_pretrained(served[0]).eval()
    quantized = LoRDBAModel(quantize_model(base, backend="q4", group_size=64))
    registry = AdapterRegistry(quantized, folder)
    assert registry.base == q4
    registry.acquire("a")  # the base it records: no word
    with pytest.raises(AdapterLoadError, match=r"'b' was trained on a base quantized as .*'hqq'.*'q4'") as err:
        registry.acquire("b")
    assert err.value.status == 400 and "--allow-base-mismatch" in str(err.value) and "b" not in quantized.peft_config
    with pytest.raises(AdapterLoadError, match="'mine' was trained") as err:
        registry.register("mine", "b")
    assert err.value.param == "lora_name" and "mine" not in registry.names()
    with caplog.at_level("WARNING", logger="lordba.serve"):
        AdapterRegistry(quantized, folder, allow_base_mismatch=True).acquire("b")
        plain = LoRDBAModel(AutoModelForCausalLM.from_pretrained(served[0]).eval())
        AdapterRegistry(plain, folder).acquire("b")
    said = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert len(said) == 2 and all(s.startswith("adapter 'b' was trained on") for s in said), said
    assert "the served base is {'backend': 'q4'" in said[0] and "the served base is unquantized" in said[1]


def test_a_load_while_an_unloaded_adapters_last_request_ends_stays_within_the_budget(model, folder):
    """release() of an unloaded adapter's last request took it off the draining list, then waited for the load lock
    to delete it: a load that took the lock first counted its bytes nowhere and loaded beside it, one adapter over
    --max-adapter-memory. It counts until it is deleted: the load is a 503 (retry later) or waits for the lock."""
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))
    registry.acquire("a")
    registry.unload("a")  # a request still holds it: it drains
    seen = []

    class LoadFirst:  # a load in another thread takes the lock just before release() does
        def __init__(self, lock):
            self.lock, self.pending = lock, True

        def __enter__(self):
            if self.pending:
                self.pending = False
                try:
                    registry.acquire("b")
                except AdapterMemoryError as err:
                    seen.append(err)
                seen.append(sum(adapter_bytes(model, n) for n in model.peft_config))
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    registry._load_lock = LoadFirst(registry._load_lock)
    registry.release("a")
    assert isinstance(seen[0], AdapterMemoryError) and seen[1] <= registry.max_bytes, seen
    assert not model.peft_config and registry.resident() == {} and not registry._draining
    registry.acquire("b")  # the room is there now
    assert list(model.peft_config) == ["b"]


@pytest.mark.parametrize("path", ["gone", "a/gone", "a/adapter_config.json"])
def test_load_lora_adapter_of_a_path_holding_no_adapter_is_a_404_naming_the_adapter(model, folder, path):
    """vLLM answers ``load_lora_adapter`` of a path where no adapter is found with a 404 (NotFoundError); this server
    answered a 400 ``adapter_invalid``, the loader's message about a directory that is not there."""
    registry = AdapterRegistry(model, folder)
    with pytest.raises(UnknownAdapterError, match="No adapter found for the lora adapter 'x'") as err:
        registry.register("x", path)
    assert err.value.status == 404 and err.value.param == "lora_path"
    assert str(folder) not in str(err.value) and path not in str(err.value)
    assert "x" not in registry.names() and not model.peft_config


def test_refusals_name_the_adapter_not_the_servers_paths_which_the_log_keeps(model, folder, caplog):
    """A client got the server's absolute paths: load_lora_adapter of a missing directory was a 400 "adapter 'x'
    cannot be loaded: /srv/.../adapters/c: not a directory", a truncated file's error named its full path, a link
    loop's 400 the folder's. They name the adapter and its files within it; the log keeps the paths."""
    weights = folder / "b" / "lordba_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    os.symlink("loop", folder / "loop")
    registry = AdapterRegistry(model, folder)
    root = str(folder.resolve())
    with caplog.at_level("WARNING", logger="lordba.serve"):
        with pytest.raises(UnknownAdapterError, match="'x'") as missing:
            registry.register("x", "gone")
        with pytest.raises(AdapterLoadError, match="'b' cannot be loaded") as truncated:
            registry.acquire("b")
    with pytest.raises(BadRequestError, match="lora_path") as loop:
        registry.register("y", "loop")
    for err in (missing, truncated, loop):
        assert root not in str(err.value) and str(folder) not in str(err.value), err.value
    assert "lordba_model.safetensors" in str(truncated.value) and "--adapters" in str(loop.value)
    logged = [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(logged) == 2 and root in logged[0] and root in logged[1], logged


def test_load_lora_adapter_of_a_loaded_name_is_the_conflict_whatever_the_path(model, folder):
    """vLLM answers the name's conflict first; the 404 for a path with no adapter was checked before it."""
    registry = AdapterRegistry(model, folder)
    registry.register("mine", "a")
    with pytest.raises(AdapterConflictError, match="already been loaded"):
        registry.register("mine", "gone")


@pytest.mark.parametrize("name", ["train", "eval", "keys"])
def test_a_folder_adapter_named_as_no_adapter_can_be_is_not_listed_nor_served(model, folder, name):
    """Each layer holds its adapters in an nn.ModuleDict, which refuses its own attributes as keys: a folder adapter
    named ``train`` was listed by /v1/models and every request for it answered 400."""
    shutil.copytree(folder / "a", folder / name)
    registry = AdapterRegistry(model, folder)
    assert name not in registry.names() and "a" in registry.names()
    with pytest.raises(UnknownAdapterError):
        registry.acquire(name)
    with pytest.raises(BadRequestError, match="reserved"):
        registry.register(name, "a")


def test_a_failed_register_over_a_registration_whose_files_are_gone_leaves_it_as_it_was(model, folder):
    """A name registered by load_lora_adapter whose files were removed masks the folder's adapter of that name (a
    request is a 404 saying so). Registering it again with a path that failed to load dropped the old registration
    too: the name then silently served the folder's adapter, another one than the client registered. A failed
    register leaves the registry as it was: the name still a 404 saying its files were removed."""
    size = payload_bytes(folder / "a" / "lordba_model.safetensors")
    registry = AdapterRegistry(model, folder, max_bytes=int(1.5 * size))
    registry.register("a", "c")  # masks the folder's a
    registry.acquire("b")  # evicts it
    registry.release("b")
    shutil.rmtree(folder / "c")
    shutil.copytree(folder / "b", folder / "bad")
    weights = folder / "bad" / "lordba_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterLoadError, match="'a' cannot be loaded"):
        registry.register("a", "bad")
    assert "a" not in registry.names() and "a" not in model.peft_config
    with pytest.raises(UnknownAdapterError, match=r"'a'.*removed"):
        registry.acquire("a")
    assert "a" not in model.peft_config
    registry.register("a", "b")  # a good path is served under it
    assert registry._entries["a"].path == (folder / "b").resolve() and not registry._entries["a"].from_folder
