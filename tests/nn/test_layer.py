import numpy as np
import pytest
import torch
from torch import nn

from lordba import AdapterStateError, ShapeMismatchError, kernels
from lordba.core.scales import get_codec
from lordba.core.ste import STE
from lordba.nn.adapter import TrainableAdapter
from lordba.nn.layer import LoRDBALinear, Routing


def make_layer(in_f=21, out_f=13, names=("a", "b"), r=3, scale_dtype="float32"):
    torch.manual_seed(0)
    layer = LoRDBALinear(nn.Linear(in_f, out_f))
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        ad = TrainableAdapter(in_f, out_f, r + i, 2.0, get_codec(scale_dtype), STE(), init="random")
        with torch.no_grad():
            ad.scale_in.uniform_(0.5, 1.5)
            ad.scale_mid.uniform_(0.5, 1.5)
            ad.scale_out.normal_(0, 0.5)
        layer.add_adapter(name, ad)
    layer.set_adapter(names[0])
    return layer


def dense_delta_numpy(ad) -> np.ndarray:
    """ΔW from the adapter's own tensors, computed independently in float64 numpy."""
    if isinstance(ad, TrainableAdapter) and ad.has_latent_signs:
        S_A = np.where(ad.latent_A.detach().numpy() >= 0, 1.0, -1.0)
        S_B = np.where(ad.latent_B.detach().numpy() >= 0, 1.0, -1.0)
    else:
        bits = lambda t, shape: np.unpackbits(t.numpy())[: np.prod(shape)].reshape(shape) * 2.0 - 1.0  # noqa: E731
        S_A, S_B = bits(ad.sign_A, (ad.r, ad.in_features)), bits(ad.sign_B, (ad.out_features, ad.r))
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
    with layer.gate.enter(Routing(adapter_names=names)):
        with torch.no_grad():
            mixed = layer(x)
    with torch.no_grad():
        for i, name in enumerate(names):
            layer.set_adapter([] if name == "__base__" else [name])
            torch.testing.assert_close(mixed[i], layer(x[i : i + 1])[0], rtol=1e-6, atol=1e-6)


def test_disabled_routing_is_base_only_and_refused_when_merged():
    layer = make_layer()
    x = torch.randn(2, 21)
    with layer.gate.enter(Routing(disabled=True)):
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base_layer(x))
        layer.merge()
        with pytest.raises(AdapterStateError, match="merged"):
            layer(x)


def test_mixed_batch_size_mismatch_and_shape_errors():
    layer = make_layer()
    with layer.gate.enter(Routing(adapter_names=("a",))):
        with pytest.raises(ShapeMismatchError, match="1 entries for a batch of 2"):
            layer(torch.randn(2, 21))
    with pytest.raises(ShapeMismatchError):
        layer.add_adapter("c", TrainableAdapter(20, 13, 2, 1.0, get_codec("float16"), STE()))
    with pytest.raises(ShapeMismatchError, match="not a supported linear"):
        LoRDBALinear(nn.Conv1d(2, 3, 1))


def test_packed_adapter_in_a_layer_matches_the_dense_delta_and_merges():
    layer = make_layer()
    layer.add_adapter("a", layer.lordba_adapters["a"].pack())
    ad = layer.lordba_adapters["a"]
    x = torch.randn(4, 21)
    expected = layer.base_layer(x).double() + x.double() @ torch.tensor(dense_delta_numpy(ad)).t()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer.base_layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_many_adapters_in_one_batch_run_in_one_kernel_call_and_equal_their_own_calls(monkeypatch):
    """32 rows over 12 packed adapters (and base rows): one ``packed_branch_rows`` call, each row
    bit-identical to its adapter's own call on its rows (decode and prefill lengths)."""
    names = tuple(f"ad{k}" for k in range(12))
    layer = make_layer(in_f=40, out_f=24, names=names, r=4, scale_dtype="int8")
    for name in names:
        layer.add_adapter(name, layer.lordba_adapters[name].pack())
    calls = []
    real = kernels.packed_branch_rows
    monkeypatch.setattr(kernels, "packed_branch_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = tuple(names[(5 * i) % 12] if i % 7 else "__base__" for i in range(32))
    for tokens in (1, 20):
        x = torch.randn(32, tokens, 40)
        with torch.no_grad():
            base = layer.base_layer(x)
            with layer.gate.enter(Routing(adapter_names=rows)):
                mixed = layer(x)
            for name in set(rows):
                index = torch.tensor([i for i, n in enumerate(rows) if n == name])
                want = base[index] if name == "__base__" else layer.lordba_adapters[name](x[index], base[index])
                assert torch.equal(mixed[index], want)
    assert len(calls) == 2 if kernels.cpu_available() else True


def test_rows_of_adapters_that_need_their_own_call_take_it():
    """A trained bias (or a gradient) keeps the per-adapter path, with the same outputs."""
    layer = make_layer(names=("a", "b", "c"))
    layer.lordba_adapters["b"].attach_bias(torch.randn(13))
    x = torch.randn(4, 21)
    rows = ("a", "b", "c", "a")
    with torch.no_grad(), layer.gate.enter(Routing(adapter_names=rows)):
        mixed = layer(x)
    with torch.no_grad():
        for i, name in enumerate(rows):
            layer.set_adapter([name])
            torch.testing.assert_close(mixed[i], layer(x[i : i + 1])[0], rtol=1e-6, atol=1e-6)


def _packed_layer(scale_dtype="int8"):
    layer = make_layer(names=("a", "b", "c"), scale_dtype=scale_dtype)
    for name in ("a", "b", "c"):
        layer.add_adapter(name, layer.lordba_adapters[name].pack())
    return layer


def _rows_alone(layer, x, names):
    out = []
    for i, name in enumerate(names):
        layer.set_adapter([] if name == "__base__" else [name])
        out.append(layer(x[i : i + 1])[0])
    return torch.stack(out)


def _mixed(layer, x, names):
    with layer.gate.enter(Routing(adapter_names=names)):
        return layer(x)


@torch.no_grad()
def test_a_repeated_batch_reuses_its_prepared_call_and_sees_every_change():
    layer = _packed_layer()
    x = torch.randn(4, 1, 21)
    names = ("a", "b", "c", "a")
    first = _mixed(layer, x, names)
    assert len(layer._prepared) == 1
    torch.testing.assert_close(_mixed(layer, x, names), first, rtol=0, atol=0)
    assert len(layer._prepared) == 1  # the same composition: the same prepared call

    b = layer.lordba_adapters["b"]
    b.sign_B.bitwise_not_()  # in place (a hot-swap copies into the buffers): seen without a rebuild
    torch.testing.assert_close(_mixed(layer, x, names), _rows_alone(layer, x, names), rtol=1e-6, atol=1e-6)
    b.scaling = 5.0  # an attribute: the prepared call is rebuilt
    torch.testing.assert_close(_mixed(layer, x, names), _rows_alone(layer, x, names), rtol=1e-6, atol=1e-6)
    b.register_buffer("scale_mid", b.scale_mid.float() * 3)  # a new tensor (another scale dtype)
    torch.testing.assert_close(_mixed(layer, x, names), _rows_alone(layer, x, names), rtol=1e-6, atol=1e-6)

    replacement = make_layer(names=("z",), r=4).lordba_adapters["z"].pack()
    layer.add_adapter("c", replacement)  # another adapter under the same name
    torch.testing.assert_close(_mixed(layer, x, names), _rows_alone(layer, x, names), rtol=1e-6, atol=1e-6)
    layer.delete_adapter("c")  # rows of a removed adapter get the base alone, its tensors are let go
    assert not layer._prepared
    expected = _rows_alone(layer, x, ("a", "b", "__base__", "a"))
    torch.testing.assert_close(_mixed(layer, x, names), expected, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_the_one_active_adapter_runs_by_its_kept_kernel_call_and_sees_every_change():
    layer = _packed_layer()
    x = torch.randn(3, 1, 21)
    b = layer.lordba_adapters["b"]
    layer.set_adapter("b")

    def expected():
        return layer.base_layer(x) + b(x)

    torch.testing.assert_close(layer(x), expected(), rtol=1e-6, atol=1e-6)
    assert layer._decode and layer._decode[1] is not None  # the call is kept for the next token
    b.sign_A.bitwise_not_()  # in place: the kept call reads the same tensors
    torch.testing.assert_close(layer(x), expected(), rtol=1e-6, atol=1e-6)
    b.scaling = -3.0
    torch.testing.assert_close(layer(x), expected(), rtol=1e-6, atol=1e-6)
    with kernels.mode("torch"):  # another kernel mode: the adapter's own path
        torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)
    seen = []
    handle = b.register_forward_hook(lambda *args: seen.append(1))
    layer(x)
    assert seen == [1]  # hooks on the adapter still run
    handle.remove()
    layer.delete_adapter("b")
    assert not layer._decode
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


@torch.no_grad()
def test_on_a_plain_linear_base_the_kept_call_is_one_fused_op_and_sees_the_layers_changes():
    """An ``nn.Linear`` base and one active packed adapter: the layer's whole forward is one kept
    ``lordba::linear_branch`` call, the base layer then the branch (bit for bit for more than one token;
    up to float32 rounding for one, where the op computes the GEMV itself), and every change to the
    layer (active adapter, disabling, an in-place merge, the weight changed in place) is followed."""
    from lordba.nn import fastpath

    layer = _packed_layer()
    a, b = layer.lordba_adapters["a"], layer.lordba_adapters["b"]
    for tokens in (1, 5, 70):  # the sign path and the unpack path
        x = torch.randn(2, tokens, 21)
        got = layer(x)
        call = fastpath.decode_call(layer, None, x)
        assert call.__qualname__.startswith("PlainLinear.fused_branch")  # the one-op call
        assert torch.equal(got, a(x, layer.base_layer(x)))
    x = torch.randn(1, 1, 21)  # one float32 token: the op's own GEMV, equal up to float32 rounding
    layer.set_adapter("b")
    torch.testing.assert_close(layer(x), b(x, layer.base_layer(x)), rtol=1e-6, atol=1e-5)
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disable_adapters = False
    want = layer(x)
    layer.merge()  # in place into the float weight: the branch must not be added again
    assert layer.merged and torch.allclose(layer(x), want, atol=1e-5)
    layer.unmerge()
    layer.base_layer.weight.mul_(2.0)  # in place: the kept call reads the same tensor
    torch.testing.assert_close(layer(x), b(x, layer.base_layer(x)), rtol=1e-6, atol=1e-5)
    layer.set_adapter(["a", "b"])  # stacked: both branches, the ordinary path
    assert fastpath.decode_call(layer, None, x) is None
    assert torch.allclose(layer(x), b(x, a(x, layer.base_layer(x))), atol=1e-6)


@torch.no_grad()
def test_a_prompt_on_a_plain_linear_base_runs_the_branch_on_the_tile_unit_with_factors_kept(monkeypatch):
    """The ``fast`` branch compute on a CPU with the tile unit: a prompt's branch in bfloat16 on it, from
    the adapter's folded factors packed once (``tile_factors``) and kept for the next prompts, within
    bfloat16 rounding of the ``exact`` float32 branch (the default: the two calls' bits); one token and
    the sign path's few tokens never pack; an adapter tensor changed in place repacks, with a fresh
    layer's result. Where the tile unit is absent, ``fast`` is ``exact``."""
    import copy

    from lordba.kernels.q4 import amx_prefill_available
    from lordba.quant import backend

    made = []
    real = backend.tile_factors
    monkeypatch.setattr(backend, "tile_factors", lambda *args: made.append(args[0]) or real(*args))
    layer = _packed_layer()
    a = layer.lordba_adapters["a"]
    x = torch.randn(2, 70, 21)
    exact = layer(x)
    assert torch.equal(exact, a(x, layer.base_layer(x))) and not made
    with kernels.with_branch_compute("fast"):
        fast = layer(x)
        if not amx_prefill_available():
            assert torch.equal(fast, exact) and not made
            return
        base = layer.base_layer(x)
        assert not torch.equal(fast, exact)
        assert (fast - exact).norm() <= 1e-2 * (exact - base).norm()
        assert len(made) == 1 and torch.equal(layer(x), fast) and len(made) == 1  # kept
        layer(x[:, :1]), layer(x[:, :3])
        assert len(made) == 1  # one token, a few (sign path): nothing packed
        a._buffers["sign_A"].bitwise_not_()  # in place: the kept factors are stale
        changed = layer(x)
        assert len(made) == 2 and not torch.equal(changed, fast)
        assert torch.equal(copy.deepcopy(layer)(x), changed)
    assert torch.equal(layer(x), a(x, layer.base_layer(x)))  # exact again


@torch.no_grad()
def test_a_linear_subclass_with_its_own_forward_is_not_fused():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    layer = LoRDBALinear(Doubled(21, 13))
    src = _packed_layer().lordba_adapters["a"]
    layer.add_adapter("a", src)
    layer.set_adapter("a")
    x = torch.randn(1, 1, 21)
    assert torch.equal(layer(x), src(x, 2.0 * nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)))


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 5])
def test_a_deep_copy_computes_with_its_own_tensors_not_the_originals_kept_call(tokens):
    """``copy.deepcopy`` of a layer that has kept its call (decode): the copy's kept call was the
    original's closure over the original's base layer and adapter tensors, with a key the copy's state
    still matched, so the copy computed with the original's tensors: edits to the copy were ignored, and
    edits to the original changed the copy's output. Each must compute with its own tensors."""
    import copy
    import pickle

    layer = _packed_layer()
    layer.set_adapter("b")
    x = torch.randn(2, tokens, 21)
    layer(x)  # kept (and, for the one-adapter path, the branch's arguments too)
    twin = copy.deepcopy(layer)
    twin.lordba_adapters["b"].sign_A.bitwise_not_()  # the copy's adapter, in place
    twin.base_layer.weight.mul_(2.0)  # the copy's base, in place
    tb = twin.lordba_adapters["b"]
    torch.testing.assert_close(twin(x), tb(x, twin.base_layer(x)), rtol=1e-6, atol=1e-5)
    b = layer.lordba_adapters["b"]
    torch.testing.assert_close(layer(x), b(x, layer.base_layer(x)), rtol=1e-6, atol=1e-5)
    b.scale_out.zero_()  # the original's: the copy is unchanged
    torch.testing.assert_close(twin(x), tb(x, twin.base_layer(x)), rtol=1e-6, atol=1e-5)
    restored = pickle.loads(pickle.dumps(layer))  # a kept call is a closure: never pickled with the layer
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


def test_a_layer_moved_to_its_device_loads_the_kernels_that_tracing_cannot(monkeypatch):
    """Tracing cannot load the kernels (their loaders are compiler-disabled), so a layer loads them where it is
    built, for its weights' device; a layer built elsewhere (meta, or the CPU before ``.cuda()``) and then moved
    loads them on the move, else ``torch.compile(fullgraph=True)`` of the moved layer failed at its first call
    ("Skip calling torch.compiler.disable()d function")."""
    monkeypatch.setattr(kernels._STATE, "cpu", None)  # a fresh process's state: nothing loaded yet
    monkeypatch.setattr(kernels._STATE, "triton", None)
    with torch.device("meta"):
        layer = LoRDBALinear(nn.Linear(24, 16))
    assert kernels._STATE.cpu is None and kernels._STATE.triton is None  # nothing to load for a meta layer
    layer.to_empty(device="cpu")
    assert kernels._STATE.cpu is not None
    torch.manual_seed(3)
    with torch.no_grad():
        layer.base_layer.weight.normal_()
        layer.base_layer.bias.normal_()
    ad = TrainableAdapter(24, 16, 3, 2.0, get_codec("int8"), STE(), init="random")
    layer.add_adapter("a", ad.pack())
    layer.set_adapter("a")
    x = torch.randn(3, 24)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))
    kernels.preload(torch.device("cuda"))  # where a layer is built on or moved to a GPU: Triton's availability
    assert kernels._STATE.triton is not None
    torch._dynamo.reset()
    monkeypatch.setattr(kernels._STATE, "triton", None)
    layer.to(torch.device("cpu"))
    assert kernels._STATE.triton is None  # only a GPU needs it


@torch.no_grad()
@pytest.mark.parametrize("convert", ["half", "double"])
def test_a_merged_layer_cast_then_unmerged_restores_its_bias_in_the_new_dtype(convert):
    """Merging an adapter with a trained bias keeps the base's bias for :meth:`unmerge` outside the module
    tree; ``.half()`` between merge and unmerge left it float32, and unmerge put it back into the half base:
    every forward then failed with a dtype error ("self and mat2 must have the same dtype")."""
    layer = make_layer(names=("a",))
    layer.lordba_adapters["a"].attach_bias(torch.randn(13))
    x = torch.randn(4, 21)
    before = layer(x)
    layer.merge()
    getattr(layer, convert)()
    layer.unmerge()
    dtype = layer.base_layer.weight.dtype
    assert layer.base_layer.bias.dtype == dtype and isinstance(layer.base_layer.bias, nn.Parameter)
    torch.testing.assert_close(layer(x.to(dtype)).float(), before, rtol=2e-2, atol=2e-2)


@torch.no_grad()
def test_an_adapter_set_or_removed_through_the_module_dict_is_what_the_next_call_runs():
    """``layer.lordba_adapters[name] = other`` (PEFT-style, ``lora_A[name] = ...``) or ``del`` on it: the
    layer's kept call (one active adapter, gradients off) still ran the adapter it was made for, silently."""
    other = make_layer(names=("z",), r=3).lordba_adapters["z"]
    other.scale_out.mul_(-3.0)
    other = other.pack()
    layer = _packed_layer()
    layer.set_adapter("a")
    x = torch.randn(2, 1, 21)
    layer(x)  # the kept call is made
    layer.lordba_adapters["a"] = other
    torch.testing.assert_close(layer(x), other(x, layer.base_layer(x)), rtol=1e-6, atol=1e-5)
    layer.lordba_adapters.pop("a")
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.lordba_adapters.update({"a": other})
    torch.testing.assert_close(layer(x), other(x, layer.base_layer(x)), rtol=1e-6, atol=1e-5)
    del layer.lordba_adapters["a"]
    assert torch.equal(layer(x), layer.base_layer(x))


def test_tying_weights_through_an_adapted_layer_sets_its_base_layers_and_a_new_shape_is_refused(input_ids):
    """transformers ties an output head to the input embeddings by ``setattr(lm_head, "weight", embeddings)``
    (``tie_weights``: ``post_init``, ``resize_token_embeddings``, the Trainer after loading a checkpoint). On an
    adapted ``lm_head`` that failed inside torch with ``KeyError: "attribute 'weight' already exists"`` (the
    layer's read-only ``weight`` property). The tensor is set on the base layer (the tie holds, outputs
    unchanged); one of another shape (a resized vocabulary) is refused: the adapters were made for the old one,
    as is a new ``out_features`` (what resizing a tied head sets; its forward then failed on mismatched sizes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lordba import LoRDBAConfig, get_lordba_model

    from conftest import TINY

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": True})).eval()
    torch.manual_seed(3)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random", target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        want = lm(input_ids=input_ids).logits
    model.tie_weights()
    assert isinstance(model.lm_head, LoRDBALinear) and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(lm(input_ids=input_ids).logits, want)
    with pytest.raises(ShapeMismatchError, match=r"adapted Linear cannot become 104: its adapters are 40→101"):
        model.resize_token_embeddings(104)  # the base model itself (the wrapper refuses before: test_model_peft)
    layer = make_layer()
    with pytest.raises(ShapeMismatchError, match=r"bias of an adapted Linear cannot become \(14,\): .* 21→13"):
        layer.bias = nn.Parameter(torch.zeros(14))
    with pytest.raises(ShapeMismatchError, match=r"weight .* cannot become \(13, 20\)"):
        layer.weight = nn.Parameter(torch.zeros(13, 20))
    bias = nn.Parameter(torch.ones(13))
    layer.bias = bias
    assert layer.base_layer.bias is bias and "bias" not in layer._parameters


def test_a_name_given_twice_to_a_layers_merge_merges_once_and_unmerges_exactly():
    """``layer.merge(["a", "a"])`` added a's update twice but recorded it once (this stop's merge flag follows the
    weight), so an unmerge left one update in the weight: a name given twice merges once."""
    layer = make_layer()
    x = torch.randn(4, 21)
    base = layer.base_layer.weight.detach().clone()
    layer.set_adapter("a")
    with torch.no_grad():
        expected = layer(x)
        layer.merge(["a", "a"])
        assert layer.merged_adapters == ["a"]
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base, rtol=0, atol=1e-6)
