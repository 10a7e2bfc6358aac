"""``torch.compile`` gives the eager result for every routing and enable/disable state (or raises),
and hot-swapping after compiling does not recompile."""

import threading

import pytest
import torch

from lordba import AdapterStateError, LoRDBAConfig, LoRDBAModel, get_lordba_model

from conftest import tiny_llama

BACKENDS = ["eager", "aot_eager"]


def two_adapters() -> LoRDBAModel:
    torch.manual_seed(5)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"), adapter_name="a")
    torch.manual_seed(6)
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random"))
    lm.set_adapter("a")
    return lm


def run(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def states(lm, compiled_or_eager, ids):
    """Outputs of ``compiled_or_eager`` in each routing / enable state, in one order."""
    out = {}
    lm.set_adapter("a")
    out["a"] = run(compiled_or_eager, ids)
    out["rows"] = run(compiled_or_eager, ids, adapter_names=["a", "b", "__base__"])
    out["rows2"] = run(compiled_or_eager, ids, adapter_names=["b", "b", "a"])
    with lm.disable_adapter():
        out["disabled"] = run(compiled_or_eager, ids)
        out["disabled_rows"] = run(compiled_or_eager, ids, adapter_names=["a", "b", "a"])
    out["a_again"] = run(compiled_or_eager, ids)
    lm.set_adapter("b")
    out["b"] = run(compiled_or_eager, ids)
    lm.set_adapter(["a", "b"])
    out["stacked"] = run(compiled_or_eager, ids)
    lm.set_adapter("a")
    return out


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.long
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_equals_eager_for_every_routing_and_state(input_ids, backend):
    lm = two_adapters()
    eager = states(lm, lm, input_ids)
    # the states differ from each other (so equality below means something)
    assert not torch.allclose(eager["a"], eager["b"])
    assert not torch.allclose(eager["a"], eager["disabled"])
    assert torch.equal(eager["disabled"], eager["disabled_rows"])
    compiled = states(lm, torch.compile(lm, backend=backend), input_ids)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.long
def test_compiled_base_model_follows_the_wrappers_routing(input_ids):
    """Compiling the wrapped model (not the wrapper) still honours routing and disabling."""
    lm = two_adapters()
    eager = states(lm, lm, input_ids)
    lm.base_model = torch.compile(lm.base_model, backend="eager")  # the wrapper calls the compiled model
    compiled = states(lm, lm, input_ids)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_hotswap_after_compile_does_not_recompile(tmp_path, input_ids):
    lm = two_adapters()
    torch.manual_seed(9)
    other = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"), adapter_name="a")
    other.save_pretrained(tmp_path)
    lm.pack()
    compiled = torch.compile(lm, backend="eager")
    run(compiled, input_ids)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    lm.hotswap_adapter(tmp_path / "a", "a")
    got = run(compiled, input_ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    other.pack()
    torch.testing.assert_close(got, run(other, input_ids), rtol=1e-5, atol=1e-5)


def test_compiled_training_step_routes_gradients_like_eager(input_ids):
    """With per-row routing, a compiled backward gives each adapter the eager gradients."""

    def grads(compile_it):
        lm = two_adapters()
        model = torch.compile(lm, backend="aot_eager") if compile_it else lm
        out = model(input_ids=input_ids, labels=input_ids, adapter_names=["a", "b", "__base__"])
        out.loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    eager, compiled = grads(False), grads(True)
    assert eager.keys() == compiled.keys() and any(".b." in n for n in eager) and any(".a." in n for n in eager)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_threads_with_different_routings_each_get_their_own_result(input_ids):
    lm = two_adapters()
    compiled = torch.compile(lm, backend="eager")
    want = {"a": run(lm, input_ids), "rows": run(lm, input_ids, adapter_names=["b", "a", "__base__"])}
    run(compiled, input_ids)
    run(compiled, input_ids, adapter_names=["b", "a", "__base__"])  # both graphs built
    errors = []

    def worker(key):
        for _ in range(15):
            kw = {"adapter_names": ["b", "a", "__base__"]} if key == "rows" else {}
            if not torch.allclose(run(compiled, input_ids, **kw), want[key], rtol=1e-5, atol=1e-5):
                errors.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("a", "rows", "a", "rows")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.slow
def test_inductor_equals_eager_for_every_routing_and_state(input_ids):
    lm = two_adapters()
    lm.pack()
    eager = states(lm, lm, input_ids)
    compiled = states(lm, torch.compile(lm), input_ids)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_changes_after_compiling_are_seen_by_the_compiled_model(input_ids):
    """Each change made after compiling — an in-place edit of an adapter tensor, a ``.data`` replacement, a new
    scaling, a kernel mode, a deleted and re-added adapter, merge / unmerge — gives the eager logits (a guard
    fails and dynamo recompiles, or the graph reads the live tensor), never the old graph's."""
    from lordba import kernels

    lm = two_adapters()
    lm.pack()
    compiled = torch.compile(lm, backend="eager")
    first = next(iter(lm.adapter_modules("a").values()))

    def edit_in_place():
        with torch.no_grad():
            first.scale_out.mul_(5)

    def replace_data():
        first.sign_A.data = torch.bitwise_not(first.sign_A)

    def new_scaling():
        for adapter in lm.adapter_modules("a").values():
            adapter.scaling = 3.0

    def re_add():
        lm.delete_adapter("a")
        torch.manual_seed(7)
        lm.add_adapter("a", LoRDBAConfig(r=4, init="random"))
        lm.pack()
        lm.set_adapter("a")

    changes = [edit_in_place, replace_data, new_scaling, lambda: kernels.set_mode("torch"), re_add, lm.merge_adapter]
    changes.append(lm.unmerge_adapter)
    try:
        for change in changes:
            before = run(compiled, input_ids)
            change()
            want = run(lm, input_ids)
            name = getattr(change, "__name__", "kernel mode")
            torch.testing.assert_close(run(compiled, input_ids), want, rtol=1e-4, atol=1e-5, msg=name)
            if change in (edit_in_place, replace_data, new_scaling, re_add):  # (so equality means something)
                assert not torch.allclose(before, want, rtol=1e-3, atol=1e-4), name
    finally:
        kernels.set_mode("auto")


def _biased_llama() -> torch.nn.Module:
    """A tiny Llama with biases (always the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True)).eval()


def _biased_llama_with_adapters(seed: int = 1) -> LoRDBAModel:
    """:func:`_biased_llama` with two adapters (of ``seed``): trained biases, a saved module, a regex target."""
    base = _biased_llama()
    torch.manual_seed(seed)
    config = LoRDBAConfig(
        r=4, init="random", target_modules=["q_proj", "v_proj"], bias="all", modules_to_save=["lm_head"]
    )
    lm = get_lordba_model(base, config)
    lm.add_adapter("other", LoRDBAConfig(r=4, init="random", target_modules=r"model\.layers\.\d+\.mlp\.down_proj"))
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return lm


def _files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_base_compiled_in_place_saves_and_exports_the_files_of_the_uncompiled_model(tmp_path):
    """``lm.base_model = torch.compile(lm.base_model)`` (or ``torch.compile(lm)``) changes no saved or exported byte:
    the paths were saved as ``_orig_mod.model.layers...``, which no uncompiled model could load."""
    from lordba import export_lora

    eager, compiled = _biased_llama_with_adapters(), _biased_llama_with_adapters()
    compiled.base_model = torch.compile(compiled.base_model, backend="eager")
    eager.save_pretrained(tmp_path / "eager")
    compiled.save_pretrained(tmp_path / "compiled")
    torch.compile(eager, backend="eager").save_pretrained(tmp_path / "wrapper")
    assert _files(tmp_path / "eager") and _files(tmp_path / "compiled") == _files(tmp_path / "eager")
    assert _files(tmp_path / "wrapper") == _files(tmp_path / "eager")
    for name in ("default", "other"):
        export_lora(eager, tmp_path / f"eager-{name}", adapter_name=name)
        export_lora(compiled, tmp_path / f"compiled-{name}", adapter_name=name)
        export_lora(torch.compile(eager, backend="eager"), tmp_path / f"wrapper-{name}", adapter_name=name)
        assert _files(tmp_path / f"compiled-{name}") == _files(tmp_path / f"eager-{name}")
        assert _files(tmp_path / f"wrapper-{name}") == _files(tmp_path / f"eager-{name}")


def test_a_base_compiled_in_place_loads_hotswaps_and_adds_the_files_of_uncompiled_models(tmp_path, input_ids):
    """A normal file loads onto a compiled base (``from_pretrained``, ``load_adapter``) and hot-swaps into it with
    the eager logits; an adapter added to it finds its targets by their uncompiled paths (a regex matched none)."""
    source = _biased_llama_with_adapters()
    source.save_pretrained(tmp_path / "saved")
    eager = LoRDBAModel.from_pretrained(_biased_llama(), tmp_path / "saved")
    want = run(eager, input_ids)
    lm = LoRDBAModel.from_pretrained(torch.compile(_biased_llama(), backend="eager"), tmp_path / "saved")
    torch.testing.assert_close(run(lm, input_ids), want, rtol=1e-5, atol=1e-5)
    lm.load_adapter(tmp_path / "saved" / "other", "other")
    lm.set_adapter("other")
    eager.load_adapter(tmp_path / "saved" / "other", "other")
    eager.set_adapter("other")
    torch.testing.assert_close(run(lm, input_ids), run(eager, input_ids), rtol=1e-5, atol=1e-5)
    swapped = _biased_llama_with_adapters(seed=2)
    swapped.base_model = torch.compile(swapped.base_model, backend="eager")
    swapped.hotswap_adapter(tmp_path / "saved", "default")
    torch.testing.assert_close(run(swapped, input_ids), want, rtol=1e-5, atol=1e-5)
    lm.add_adapter("regex", LoRDBAConfig(r=4, target_modules=r"model\.layers\.\d+\.mlp\.gate_proj"))
    assert sorted(lm.adapter_modules("regex")) == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]


def test_a_base_compiled_in_place_refuses_a_state_dict_for_a_merged_adapter(input_ids):
    """``load_state_dict`` into a merged adapter is refused also where the keys read ``base_model._orig_mod.``: the
    check looked for ``base_model.<path>`` keys only and let it through (the loaded adapter never acted, even after
    ``unmerge_adapter()``: its update was subtracted from the base instead of the merged one)."""
    lm, other = two_adapters(), two_adapters()
    for model in (lm, other):
        model.base_model = torch.compile(model.base_model, backend="eager")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3) if p.requires_grad else None
    lm.merge_adapter()
    with pytest.raises(AdapterStateError, match="merged into the base weights"):
        lm.load_state_dict(other.state_dict())


def test_a_base_compiled_in_place_has_the_state_dict_of_the_uncompiled_model_and_loads_either():
    """``lm.state_dict()`` of a base compiled in place named its keys ``base_model._orig_mod.model...``: a strict
    ``load_state_dict`` of it into the uncompiled model (or of the uncompiled model's into it) was refused ("state dict
    does not match the adapters", every key missing). Its keys are the uncompiled model's (as its saved files are),
    also inside another module; a state dict with the ``_orig_mod.`` keys still loads."""
    eager, compiled = _biased_llama_with_adapters(seed=1), _biased_llama_with_adapters(seed=2)
    compiled.base_model = torch.compile(compiled.base_model, backend="eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    old = {k.replace("base_model.", "base_model._orig_mod.", 1): v for k, v in eager.state_dict().items()}
    compiled.load_state_dict(old)  # strict
    assert all(torch.equal(v, eager.state_dict()[k]) for k, v in compiled.state_dict().items())
    fresh = _biased_llama_with_adapters(seed=3)
    fresh.load_state_dict(compiled.state_dict())
    assert all(torch.equal(v, eager.state_dict()[k]) for k, v in fresh.state_dict().items())
    outer, other = torch.nn.ModuleDict({"m": compiled}), torch.nn.ModuleDict({"m": _biased_llama_with_adapters(4)})
    assert set(outer.state_dict()) == {f"m.{k}" for k in eager.state_dict()}
    other["m"].base_model = torch.compile(other["m"].base_model, backend="eager")
    torch.nn.ModuleDict({"m": fresh}).load_state_dict(outer.state_dict())  # strict, through torch's own walk
    other.load_state_dict({f"m.{k}": v for k, v in old.items()})
    assert all(torch.equal(v, eager.state_dict()[k]) for k, v in other["m"].state_dict().items())
