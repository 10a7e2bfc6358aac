"""The q4 base: HQQ's weight error at the same group size, an adapter trains on it, merging
requantizes with a warning, and a whole model computes what its dequantized weights say."""

import gc
import weakref

import pytest
import torch

from lordba import ConfigError, LoRDBAConfig, get_lordba_model
from lordba.kernels.q4 import unpack_codes
from lordba.nn.merge import MergeRequantizationWarning
from lordba.quant import Q4Linear, quantize_model, resolve_backend, set_compute
from lordba.quant.hqq import quantize_linear_hqq

from conftest import tiny_llama


@pytest.mark.parametrize("bits", [4, 8])
def test_the_quantization_is_hqqs_own_at_the_same_group_size(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    weight = linear.weight.detach().clone()
    q4 = Q4Linear.from_weight(linear.weight, linear.bias, group_size=64, bits=bits)
    hqq_layer = quantize_linear_hqq(linear, bits, 64, torch.float32)  # releases linear's weight
    codes = unpack_codes(q4.qweight, bits)
    hqq_codes = hqq_layer.unpack(reshape=True, dtype=torch.float32)
    # the same codes (HQQ's settings for `bits`: its optimiser's rounded start at 4 bits) and scales; only
    # the float16 storage of the scales and offsets separates the weights
    assert torch.equal(codes.float(), hqq_codes)
    mine, hqqs = q4.dequantize(), hqq_layer.dequantize().float()
    assert torch.allclose(mine, hqqs, rtol=0, atol=2e-3 * weight.abs().max().item())
    assert (mine - weight).norm() < (0.12 if bits == 4 else 0.01) * weight.norm()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_large_weight_is_quantized_a_few_rows_at_a_time(monkeypatch, bits):
    """HQQ's optimiser holds ~10 float32 copies of the weight it is given: handed a whole output head at once
    (Llama-3.2-1B's 128256 x 2048), it peaked at 10.5 GB above the model; the rows go to it in chunks."""
    from hqq.core.quantize import Quantizer

    import lordba.quant.q4 as q4

    given = []
    quantize = Quantizer.quantize

    def recorded(tensor, *args, **kwargs):
        given.append(tensor.numel())
        return quantize(tensor, *args, **kwargs)

    monkeypatch.setattr(Quantizer, "quantize", recorded)
    monkeypatch.setattr(q4, "QUANTIZE_ELEMENTS", 20 * 128, raising=False)
    torch.manual_seed(0)
    weight, bias = torch.randn(100, 120), torch.randn(100)
    layer = Q4Linear.from_weight(weight, bias, group_size=64, bits=bits)
    assert max(given) <= 20 * 128 and sum(given) == 100 * 128  # (120 columns padded to 2 groups of 64)
    assert layer.qweight.shape == (100, 128 * bits // 8) and layer.scale.shape == layer.minus.shape == (100, 2)
    assert (layer.dequantize() - weight).norm() < (0.12 if bits == 4 else 0.01) * weight.norm()
    monkeypatch.setattr(q4, "QUANTIZE_ELEMENTS", 1 << 22, raising=False)
    whole = Q4Linear.from_weight(weight, bias, group_size=64, bits=bits)
    assert len(given) == 6  # 5 chunks of 20 rows, then all 100 at once
    torch.testing.assert_close(layer.dequantize(), whole.dequantize(), rtol=0, atol=0.1 * weight.std().item())
    torch.testing.assert_close(layer(torch.ones(3, 120)), whole(torch.ones(3, 120)), rtol=0.1, atol=0.5)


def test_round_zero_chooses_the_optimisers_start():
    torch.manual_seed(1)
    weight = torch.randn(64, 128)
    default = Q4Linear.from_weight(weight, group_size=64).dequantize()
    rounded = Q4Linear.from_weight(weight, group_size=64, round_zero=True).dequantize()
    unrounded = Q4Linear.from_weight(weight, group_size=64, round_zero=False).dequantize()
    assert torch.equal(default, rounded)  # HQQ's 4-bit setting
    assert (rounded - unrounded).norm() > 0.3 * (rounded - weight).norm()  # another quantization


def float_weights_held_while_copied(monkeypatch, model, quantize) -> int:
    """How many of ``model``'s projections' float weights are alive when ``quantize(model)`` copies the q4 weights
    into one buffer (:func:`~lordba.quant.q4.hold_weights_together`)."""
    import lordba.quant.q4 as q4

    weights = [weakref.ref(m.weight) for n, m in model.named_modules() if n.endswith("_proj")]
    held, hold = [], q4.hold_weights_together

    def counted(model):
        gc.collect()
        held.append(sum(w() is not None for w in weights))
        return hold(model)

    monkeypatch.setattr(q4, "hold_weights_together", counted)
    quantize(model)
    assert len(held) == 1 and len(weights) == 14
    return held[0]


def test_the_float_weights_are_freed_before_the_q4_weights_are_copied_together(monkeypatch):
    """``quantize_model`` kept every replaced float layer alive until it returned, and so through
    ``hold_weights_together``'s copy of the q4 weights: a float32 model's peak was its size plus two q4 copies of it
    (a 250M-parameter Llama: 1.04 GB + 2 x 0.14 GB), not one."""
    held = float_weights_held_while_copied(monkeypatch, tiny_llama(0), lambda m: quantize_model(m, "q4", group_size=32))
    assert held == 0


def test_quantize_model_q4_replaces_linears_and_matches_dequantized_weights(input_ids):
    model = quantize_model(tiny_llama(0), backend="q4", group_size=32)
    layers = [m for m in model.modules() if isinstance(m, Q4Linear)]
    assert len(layers) == 15 and resolve_backend(layers[0]).name == "q4"  # 14 projections + the 8-bit head
    weights = [getattr(m, n) for m in layers for n in ("qweight", "scale", "minus")]  # one buffer (huge pages)
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1 and all(w.data_ptr() % 64 == 0 for w in weights)
    reference = tiny_llama(0)
    for name, module in model.named_modules():
        if isinstance(module, Q4Linear):
            reference.get_submodule(name).weight.data = module.dequantize()
    assert input_ids.numel() >= 16  # the GEMM path
    with torch.no_grad():
        want = reference(input_ids=input_ids).logits
        assert set_compute(model, "exact") == 15
        torch.testing.assert_close(model(input_ids=input_ids).logits, want, rtol=1e-4, atol=1e-4)
        set_compute(model, "fast")
        got = model(input_ids=input_ids).logits
        assert float((got - want).norm() / want.norm()) < 2e-2  # bfloat16 / int8 rounding, and only that
    with pytest.raises(ConfigError, match="compute"):
        set_compute(model, "int8")
    with pytest.raises(ConfigError, match="q4"):
        quantize_model(tiny_llama(0), backend="q4", group_size=48)


def test_adapter_trains_on_a_q4_base_and_merging_warns(input_ids):
    model = quantize_model(tiny_llama(0), backend="q4", group_size=32)
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    lm = get_lordba_model(model, LoRDBAConfig(r=4))
    assert lm.peft_config["default"].base_quantization == {"backend": "q4", "bits": 4, "group_size": 32}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = lm(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, b in lm.base_model.named_buffers():
        if n.replace(".base_layer", "") in frozen:
            assert torch.equal(b, frozen[n.replace(".base_layer", "")]), n
    with torch.no_grad():
        before = lm(input_ids=input_ids).logits
    with pytest.warns(MergeRequantizationWarning):
        lm.merge_adapter()
    lm.unmerge_adapter()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=input_ids).logits, before)


def test_the_output_head_is_quantized_to_8_bits_and_untied(input_ids):
    from lordba.quant import resolve_backend

    model = tiny_llama(0)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize_model(model, backend="q4", group_size=32)
    head = model.get_output_embeddings()
    assert isinstance(head, Q4Linear) and head.bits == 8
    assert resolve_backend(head).bits_per_weight(head) == 9.0
    assert model.lordba_quantization["head_bits"] == 8
    assert not model.config.tie_word_embeddings and type(model.get_input_embeddings()) is torch.nn.Embedding
    reference = tiny_llama(0)
    for name, module in model.named_modules():
        if isinstance(module, Q4Linear):
            reference.get_submodule(name).weight = torch.nn.Parameter(module.dequantize())
    set_compute(model, "exact")  # ("fast": test above)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits, rtol=1e-4, atol=1e-4
        )
    kept = quantize_model(tiny_llama(0), backend="q4", group_size=32, head_bits=0)
    assert type(kept.get_output_embeddings()) is torch.nn.Linear
    with pytest.raises(ConfigError, match="head_bits"):
        quantize_model(tiny_llama(0), backend="hqq", bits=4, group_size=8, head_bits=8)


def test_holding_the_weights_together_keeps_every_output(input_ids):
    from lordba.quant.q4 import hold_weights_together

    model = quantize_model(tiny_llama(0), backend="q4", group_size=32)
    layers = [m for m in model.modules() if isinstance(m, Q4Linear)]
    for layer in layers:  # separate allocations again, as each layer made them
        for name in ("qweight", "scale", "minus"):
            layer.register_buffer(name, getattr(layer, name).clone())
    old = [weakref.ref(getattr(m, n)) for m in layers for n in ("qweight", "scale", "minus")]
    with torch.no_grad():
        want = [model(input_ids=ids).logits for ids in (input_ids, input_ids[:, :1])]  # the GEMM and one token
        held = hold_weights_together(model)
        gc.collect()
        assert all(r() is None for r in old)  # moved, not copied: nothing keeps the separate tensors
        assert held == sum(getattr(m, n).nbytes for m in layers for n in ("qweight", "scale", "minus"))
        assert len({m.qweight.untyped_storage().data_ptr() for m in layers}) == 1
        assert all(torch.equal(model(input_ids=ids).logits, w) for ids, w in zip((input_ids, input_ids[:, :1]), want))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_dtype_conversion_keeps_the_stored_scales_and_the_layer_runs(input_ids, dtype):
    """``model.float()`` / ``.to(dtype)`` (what a user does to a whole model) cast the q4 layers' float16
    ``scale`` / ``minus`` buffers too, and every later forward failed in the op ("scale and minus must be
    contiguous float16 tensors"), with or without an adapter, even converting a float32 model to float32.
    They are the layer's stored quantization, like a packed adapter's scales: they keep their dtype."""
    model = quantize_model(tiny_llama(0), backend="q4", group_size=64)
    layer = next(m for m in model.modules() if isinstance(m, Q4Linear))
    before = layer.dequantize()
    want = model(input_ids).logits
    model.to(dtype)
    assert layer.scale.dtype == layer.minus.dtype == torch.float16
    assert torch.equal(layer.dequantize(), before)
    got = model(input_ids).logits.float()
    tol = 1e-5 if dtype != torch.bfloat16 else 0.5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    model.float()  # (the float layers keep what bfloat16 rounded)
    torch.testing.assert_close(model(input_ids).logits, want, rtol=tol, atol=tol)


@torch.no_grad()
def test_to_empty_of_a_q4_layer_on_meta_keeps_the_stored_scales_and_loads_its_state_back():
    """``layer.to("meta")`` then ``to_empty(device="cpu")`` (materialize, then load a state dict) raised "Cannot copy
    out of meta tensor": a q4 layer's ``_apply`` took its held float16 ``scale`` / ``minus`` back and copied them off
    ``meta``."""
    torch.manual_seed(0)
    layer = Q4Linear.from_weight(torch.randn(24, 64), torch.randn(24), group_size=32)
    x = torch.randn(3, 64)
    want = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to("meta")
    layer.to_empty(device="cpu")
    assert layer.scale.dtype == layer.minus.dtype == torch.float16 and layer.scale.device.type == "cpu"
    layer.load_state_dict(state)
    assert torch.equal(layer(x), want)


def test_a_q4_models_state_dict_saves_with_torch_save_and_loads_back(tmp_path, input_ids):
    """``torch.save(model.state_dict(), path)`` of a q4 model (the usual checkpoint) raised "Cannot save multiple
    tensors or storages that view the same data as different types": the layers' uint8 codes and float16 scales
    are views of one buffer (hold_weights_together). ``torch.save(model)`` pickled its own copies already."""
    model = quantize_model(tiny_llama(0), backend="q4", group_size=32)
    with torch.no_grad():
        want = model(input_ids=input_ids).logits
    torch.save(model.state_dict(), tmp_path / "q4.pt")
    other = quantize_model(tiny_llama(5), backend="q4", group_size=32)
    other.load_state_dict(torch.load(tmp_path / "q4.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(other(input_ids=input_ids).logits, want)
    layer = next(m for m in model.modules() if isinstance(m, Q4Linear))
    assert layer.state_dict(keep_vars=True)["scale"] is layer.scale  # keep_vars: the layer's own tensors


def test_a_weight_beyond_float16s_range_is_refused_naming_the_layer():
    """The q4 base stores each group's scale and offset in float16: a group whose lowest weight is below -65504
    got an offset of -inf, and the layer (then the model's logits) gave NaN for every input, without a word."""
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[2, 7] = -7e4
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.o_proj.*float16"):
        quantize_model(model, backend="q4", group_size=32)
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[2, 7] = 7e4  # the offset in range: quantized as it is
    quantize_model(model, backend="q4", group_size=32)
    assert torch.isfinite(model.model.layers[0].self_attn.o_proj.dequantize()).all()


@pytest.mark.parametrize("where", ["model.layers.1.mlp.down_proj", "lm_head"])
def test_a_weight_beyond_float16s_range_on_a_late_layer_leaves_the_model_as_it_was(where):
    """The overflow was found when its layer was reached: every layer before it (here all but the last, or all but
    the head) was already replaced by a q4 layer, and the refused model was left half quantized."""
    model = tiny_llama(0)
    with torch.no_grad():
        model.get_submodule(where).weight[2, 7] = -7e4
    layers = dict(model.named_modules())
    with pytest.raises(ConfigError, match=where.replace(".", r"\.") + ".*float16"):
        quantize_model(model, backend="q4", group_size=32)
    assert dict(model.named_modules()) == layers
    assert not hasattr(model, "lordba_quantization")


def test_merging_an_update_beyond_float16s_range_into_a_q4_base_is_refused_and_changes_nothing(input_ids):
    """Merging requantizes with the float16 check quantize_model applies: an adapter whose merged weight overflows
    the q4 scales (here the last layer's o_proj, after layer 0's merged fine) is refused, naming the layer, and no
    layer stays merged. Was: merged, with a warning of an error of inf, and the model gave NaN logits."""
    from lordba import AdapterStateError

    model = quantize_model(tiny_llama(0), backend="q4", group_size=32)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random", target_modules=["o_proj"]))
    adapter = lm.adapter_modules("default")["model.layers.1.self_attn.o_proj"]
    with torch.no_grad():
        adapter.scale_mid.mul_(3e4)  # each scale within float16; the update up to ~9e4
        adapter.scale_in.mul_(3)
        before = lm(input_ids=input_ids).logits
    for merge in (lm.merge_adapter, lm.merge_and_unload):
        with pytest.raises(AdapterStateError, match=r"'default' into model\.layers\.1\.self_attn\.o_proj.*float16"):
            merge()
        assert not any(layer.merged for _, layer in lm._lordba_layers())
        with torch.no_grad():
            assert torch.equal(lm(input_ids=input_ids).logits, before)
