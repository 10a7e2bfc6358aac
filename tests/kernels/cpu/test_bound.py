"""``lordba.kernels.cpu.bound``: the bound calls eager decode takes (a q4 layer's own forward, an adapted layer's
kept call) give the op call's result bit for bit, and decline (``None``: the caller's ordinary path) whatever
they do not cover or whatever changed since they were bound; they call the op through the dispatcher, so
dispatch modes see it."""

import copy
import pickle

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lordba import kernels
from lordba.kernels.q4 import GEMM_MIN_TOKENS, bf16_dot_available
from lordba.nn.epoch import _EPOCH
from lordba.quant import Q4Linear, set_compute

from conftest import tiny_q4

pytestmark = pytest.mark.skipif(kernels.bound_calls() is None, reason="bound calls unavailable")


def _layer(bias: bool = False, compute: str = "exact") -> Q4Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(80, 48, bias=bias)
    layer = Q4Linear.from_weight(linear.weight, linear.bias, group_size=64)
    layer.compute = compute
    return layer


def _op(layer: Q4Linear, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.lordba.q4_linear(x, layer.qweight, layer.scale, layer.minus, layer.in_features, GEMM_MIN_TOKENS,
                                   layer.bits, *layer._flags)  # fmt: skip
    return y if layer.bias is None else y + layer.bias


@pytest.mark.parametrize("compute", ["exact", "fast"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 15, 16, 40])
def test_a_q4_layers_bound_call_is_its_op_call(compute, bias, tokens):
    layer = _layer(bias, compute)
    x = torch.randn(1, tokens, 80)
    call = kernels.bound_calls().Q4Call(layer._buffers, layer._parameters, 80, GEMM_MIN_TOKENS, 4, layer._flags)
    with torch.no_grad():
        got = call(x, layer._flags)
        if tokens < GEMM_MIN_TOKENS:
            assert torch.equal(got, _op(layer, x))
        else:
            assert got is None  # a prompt (the GEMM) takes the Python call, as before the bound calls
        assert torch.equal(layer(x), _op(layer, x))
    assert layer.__dict__["_call"] is not None  # the forward made it


class _Sub(torch.Tensor):
    pass


class _Recorded(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_bound_call_declines_what_torch_ops_would_handle_in_python_and_what_changed():
    layer = _layer()
    x = torch.randn(2, 80)
    call = kernels.bound_calls().Q4Call(layer._buffers, layer._parameters, 80, GEMM_MIN_TOKENS, 4, layer._flags)
    flags = layer._flags
    assert call(x, flags) is not None
    assert call(x.as_subclass(_Sub), flags) is None  # a tensor subclass: __torch_function__
    with TorchFunctionMode():
        assert call(x, flags) is None
    assert call(x.requires_grad_(), flags) is None  # a gradient to record
    with torch.no_grad():
        assert call(x, flags) is not None
    x = x.detach()
    assert call(x.to("meta"), flags) is None
    assert call(x, (True, False)) is None  # other compute flags
    layer.register_buffer("scale", layer.scale.clone())  # a buffer replaced: checked by identity
    assert call(x, flags) is None


def test_dispatch_modes_see_the_bound_calls_op():
    layer = _layer()
    x = torch.randn(1, 80)
    with torch.no_grad():
        layer(x)
        assert layer.__dict__["_call"] is not None
        with _Recorded() as mode:
            y = layer(x)
    assert "lordba.q4_linear.default" in mode.ops and torch.equal(y, _op(layer, x))


def test_a_q4_layer_follows_its_changes_and_a_copy_binds_its_own():
    layer = _layer(bias=True)
    x = torch.randn(1, 80)
    with torch.no_grad():
        first = layer(x)
        layer.compute = "fast"  # a new compute: bound again
        assert "_call" not in layer.__dict__
        assert torch.equal(layer(x), _op(layer, x))
        # (fast computes one token in bfloat16 where the build has that kernel; elsewhere, AVX2, portable or ARM,
        # in float32, exactly as exact)
        assert torch.equal(layer(x), first) != bf16_dot_available()
        layer.bias = torch.nn.Parameter(layer.bias + 1, requires_grad=False)
        assert torch.equal(layer(x), _op(layer, x))
        layer.scale.mul_(2)  # in place: the same tensor, read by the call
        assert torch.equal(layer(x), _op(layer, x))
        copied = copy.deepcopy(layer)
        assert "_call" not in copied.__dict__
        copied.qweight.zero_()
        assert torch.equal(copied(x), _op(copied, x)) and torch.equal(layer(x), _op(layer, x))
        assert not torch.equal(copied(x), layer(x))
        loaded = pickle.loads(pickle.dumps(layer))
        assert torch.equal(loaded(x), layer(x))
        layer.to(torch.float64)  # the bias follows, the kernels' tensors stay
        assert "_call" not in layer.__dict__
        assert torch.equal(layer(x.double()), _op(layer, x.double()))


def test_an_adapted_layers_bound_call_declines_whatever_changed(monkeypatch):
    lm = tiny_q4(adapter=True, compute="fast")
    ids = torch.tensor([[5]])
    q = lm.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        lm(input_ids=ids)
        lm(input_ids=ids)
        fast = q.__dict__["_fast"]
        assert type(fast).__name__ == "LayerCall"
        x = torch.randn(1, 1, 40)
        with lm._calling(None):
            token = kernels_token()
            want = fast(x, token)
            assert want is not None
            assert fast(x, None) is None and fast(x, ("other",)) is None
            assert fast(x.double(), token) is None
            prompt = torch.randn(1, 64, 40)  # on the bfloat16 GEMM with kept factors: the Python call's
            assert torch.equal(fast(prompt, token), q._decode[1][0](prompt))
            _EPOCH[0] += 1
            assert fast(x, token) is None
            _EPOCH[0] -= 1
            assert torch.equal(fast(x, token), want)
            handle = q.base_layer.register_forward_pre_hook(lambda *a: None)
            assert fast(x, token) is None
            handle.remove()
            set_compute(lm, "exact")  # the base's flags: checked by identity
            assert fast(x, token) is None
            with torch.enable_grad():
                assert fast(x, token) is None


def kernels_token():
    from lordba.nn import fastpath

    return fastpath.ARMED.token


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_a_float32_bases_bound_call_equals_its_python_call(tokens, monkeypatch):
    from lordba import LoRDBAConfig, get_lordba_model

    from conftest import tiny_llama

    def model():
        torch.manual_seed(3)
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
        lm.pack()
        return lm.eval()

    ids = torch.randint(5, 90, (1, tokens))
    bound, python = model(), model()
    with torch.no_grad():
        for _ in range(3):
            got = bound(input_ids=ids).logits
        v = bound.get_base_model().model.layers[1].mlp.down_proj
        assert type(v.__dict__["_fast"]).__name__ == "LayerCall"
        with monkeypatch.context() as m:
            m.setattr(kernels, "bound_calls", lambda: None)
            for _ in range(3):
                want = python(input_ids=ids).logits
            kept = python.get_base_model().model.layers[1].mlp.down_proj.__dict__["_fast"]
            assert type(kept).__name__ == "_CheckedCall"
    assert torch.equal(got, want)


def test_clean_removes_the_extensions_build_outputs_only(tmp_path, monkeypatch):
    """``lordba build-kernels --force`` rebuilds the bound calls' module too: :func:`bound.clean` removes its
    library and object files (in its own build directory of the kernels' cache), nothing else."""
    from lordba.kernels import cpu
    from lordba.kernels.cpu import bound

    monkeypatch.setattr(cpu, "cache_root", lambda: tmp_path)
    assert bound.clean() is None  # never built here
    directory = bound.build_directory()
    assert directory.parent == tmp_path and directory.name == bound.extension_name()
    directory.mkdir()
    for name in (f"{directory.name}.so", "bound.o", "bound.o.d", ".ninja_log", "build.ninja", "keep.txt"):
        (directory / name).write_text("x")
    assert bound.clean() == directory
    assert sorted(p.name for p in directory.iterdir()) == ["build.ninja", "keep.txt"]
