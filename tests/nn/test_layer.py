import numpy as np
import pytest
import torch
from torch import nn

from lordba import AdapterStateError, ShapeMismatchError
from lordba.core.scales import get_codec
from lordba.core.ste import STE
from lordba.nn.layer import ROUTING, DoubleBinaryAdapter, LoRDBALinear, Routing


def make_layer(in_f=21, out_f=13, names=("a", "b"), r=3, scale_dtype="float32"):
    torch.manual_seed(0)
    layer = LoRDBALinear(nn.Linear(in_f, out_f))
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        ad = DoubleBinaryAdapter(in_f, out_f, r + i, 2.0, get_codec(scale_dtype), STE(), init="random")
        with torch.no_grad():
            ad.scale_in.uniform_(0.5, 1.5)
            ad.scale_mid.uniform_(0.5, 1.5)
            ad.scale_out.normal_(0, 0.5)
        layer.add_adapter(name, ad)
    layer.set_adapter(names[0])
    return layer


def dense_delta_numpy(ad: DoubleBinaryAdapter) -> np.ndarray:
    S_A = np.where(ad.latent_A.detach().numpy() >= 0, 1.0, -1.0) if not ad.is_packed else ad.signs()[0].numpy()
    S_B = np.where(ad.latent_B.detach().numpy() >= 0, 1.0, -1.0) if not ad.is_packed else ad.signs()[1].numpy()
    b, m, a = (t.detach().double().numpy() for t in ad.scales())
    return ad.scaling * np.diag(a) @ S_B @ np.diag(m) @ S_A @ np.diag(b)


def test_forward_is_base_plus_independent_dense_delta():
    layer = make_layer()
    x = torch.randn(4, 21)
    expected = (
        layer.base_layer(x).double() + x.double() @ torch.tensor(dense_delta_numpy(layer.lordba_adapters["a"])).t()
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        layer.get_delta_weight("a").numpy(), dense_delta_numpy(layer.lordba_adapters["a"]), rtol=1e-5, atol=1e-6
    )


def test_packed_form_gives_bit_identical_outputs_and_keeps_signs():
    layer = make_layer()
    ad = layer.lordba_adapters["a"]
    x = torch.randn(5, 21)
    with torch.no_grad():
        before = layer(x)
    signs = [s.clone() for s in ad.signs()]
    ad.pack()
    assert ad.is_packed and ad.latent_A is None and ad.sign_A.dtype == torch.uint8
    assert ad.sign_A.numel() == (3 * 21 + 7) // 8
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    ad.unpack_to_latent(0.02)
    assert not ad.is_packed and all(torch.equal(s, t) for s, t in zip(ad.signs(), signs))
    assert torch.equal(ad.latent_A.abs(), torch.full_like(ad.latent_A, 0.02))


def test_merge_unmerge_round_trip():
    layer = make_layer()
    x = torch.randn(6, 21)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["a"]
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base_layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_stacked_adapters_add_their_branches():
    layer = make_layer()
    x = torch.randn(3, 21)
    with torch.no_grad():
        base = layer.base_layer(x)
        da = layer.lordba_adapters["a"](x)
        db = layer.lordba_adapters["b"](x)
        layer.set_adapter(["a", "b"])
        torch.testing.assert_close(layer(x), base + da + db)


def test_mixed_batch_routes_each_row_to_its_adapter():
    layer = make_layer()
    x = torch.randn(5, 4, 21)
    names = ("b", "__base__", "a", "b", "a")
    token = ROUTING.set(Routing(adapter_names=names))
    try:
        with torch.no_grad():
            mixed = layer(x)
    finally:
        ROUTING.reset(token)
    with torch.no_grad():
        for i, name in enumerate(names):
            layer.set_adapter([] if name == "__base__" else [name])
            torch.testing.assert_close(mixed[i], layer(x[i : i + 1])[0], rtol=1e-6, atol=1e-6)


def test_disabled_routing_is_base_only_and_refused_when_merged():
    layer = make_layer()
    x = torch.randn(2, 21)
    token = ROUTING.set(Routing(disabled=True))
    try:
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base_layer(x))
        layer.merge()
        with pytest.raises(AdapterStateError, match="merged"):
            layer(x)
    finally:
        ROUTING.reset(token)


def test_mixed_batch_size_mismatch_and_shape_errors():
    layer = make_layer()
    token = ROUTING.set(Routing(adapter_names=("a",)))
    try:
        with pytest.raises(ShapeMismatchError, match="1 entries for a batch of 2"):
            layer(torch.randn(2, 21))
    finally:
        ROUTING.reset(token)
    with pytest.raises(ShapeMismatchError):
        layer.add_adapter("c", DoubleBinaryAdapter(20, 13, 2, 1.0, get_codec("float16"), STE()))
    with pytest.raises(ShapeMismatchError, match="not a supported linear"):
        LoRDBALinear(nn.Conv1d(2, 3, 1))


def test_packed_signs_cannot_train():
    layer = make_layer()
    ad = layer.lordba_adapters["a"]
    ad.pack()
    with pytest.raises(AdapterStateError, match="unpack_to_latent"):
        ad.set_trainable(signs=True, scales=True)
    ad.set_trainable(signs=False, scales=True)
    x = torch.randn(3, 21)
    layer(x).sum().backward()
    assert ad.scale_out.grad is not None and ad.scale_in.grad is not None


@pytest.mark.parametrize("scale_dtype", ["int8", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kernel", ["auto", "sign", "unpack", "torch", "dense"])
def test_compact_form_computes_exactly_what_the_packed_form_does(scale_dtype, kernel):
    from lordba import kernels

    layer = make_layer(in_f=37, out_f=19, names=("a",), r=5, scale_dtype=scale_dtype)
    ad = layer.lordba_adapters["a"]
    ad.pack()
    ad.load_stored(ad.stored_tensors())  # as loaded from a file
    ad.requires_grad_(False)
    x = torch.randn(3, 37)
    with torch.no_grad(), kernels.mode(kernel):
        packed, stored = layer(x), ad.stored_tensors()
        ad.compact()
        assert ad.is_compact and not any(True for _ in ad.parameters())
        assert ad.scale_in.dtype == get_codec(scale_dtype).stored_dtypes[0]
        assert torch.equal(layer(x), packed)
        for name, tensor in ad.stored_tensors().items():
            assert torch.equal(tensor, stored[name]), name
        merged = layer.base_layer.weight + ad.delta_weight()
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, merged)
        layer.unmerge()
        torch.testing.assert_close(layer(x), packed, rtol=1e-5, atol=1e-5)


def test_compact_int8_adapter_holds_its_file_size_and_expands_back_exactly():
    from lordba import kernels

    layer = make_layer(in_f=64, out_f=48, names=("a",), r=8, scale_dtype="int8")
    ad = layer.lordba_adapters["a"]
    ad.pack()
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = layer(x)
        ad.compact()
        assert kernels.cache.cache_nbytes(layer)["total"] == 0  # the old cache is dropped with the parameters
        held = sum(t.numel() * t.element_size() for t in ad.buffers())
        assert held == (8 * 64 + 48 * 8) // 8 + 64 + 4 * 8 + 48  # signs, int8 b and a, float32 m
        assert torch.equal(layer(x), before)
        ad.expand()
        assert not ad.is_compact and all(p.dtype == torch.float32 and not p.requires_grad for p in ad.parameters())
        assert torch.equal(layer(x), before)
    ad.compact()
    ad.set_trainable(signs=False, scales=True)  # training the scales brings float32 parameters back
    assert not ad.is_compact and ad.scale_in.requires_grad
    ad.compact()
    with pytest.raises(AdapterStateError, match="packed signs cannot train"):
        ad.set_trainable(signs=True, scales=False)
    ad.set_trainable(signs=False, scales=False)
    assert ad.is_compact
    ad.unpack_to_latent()
    assert not ad.is_compact and not ad.is_packed


def test_compact_adapter_hot_swaps_across_scale_formats_and_refuses_a_float_state():
    layer = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype="int8")
    ad = layer.lordba_adapters["a"]
    ad.pack()
    ad.compact()
    other = make_layer(in_f=30, out_f=20, names=("a",), r=4, scale_dtype="float16").lordba_adapters["a"]
    other.pack()
    ad.codec = other.codec  # what hotswap_adapter does before loading the new tensors
    ad.load_stored(other.stored_tensors())
    assert ad.scale_in.dtype == ad.scale_mid.dtype == torch.float16
    x = torch.randn(3, 30)
    with torch.no_grad():
        torch.testing.assert_close(ad(x), other(x), rtol=0, atol=0)
    state = {k: v.float() for k, v in layer.state_dict().items()}
    with pytest.raises(AdapterStateError, match="compact adapter"):
        layer.load_state_dict(state)
