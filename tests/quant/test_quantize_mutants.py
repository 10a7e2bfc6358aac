"""Fast tests of quant.quantize and quant.backend (which layers quantize_model replaces and at what, its checks, the
record it keeps; the backends' registry order, the plain layer's matching, size and fused calls) that kill the mutants
test_backends.py, test_q4_base.py, test_q4_mutants.py, test_hqq.py and test_conv1d_int8.py let survive.

Round 4 (hand-made mutants of quant/quantize.py and quant/backend.py, each applied to a copy of src and this file run
against it): every one of the 24 below is killed here. quantize.py: q4 bits other than 4 accepted (m08); bnb's alike
check keyed by the given group size (m12); skip matched on the whole path (m13); the head alone unchecked for meta /
NaN (m17, m18); a Conv1D's bias dropped (m35, survived the GPT-2 test: GPT-2's biases start at zero); base_bits
unweighted (m36); describe_base giving the minority or the last description (m37, m38); kept-in-float names matched as
substrings (m32); group_size=True (m02); hqq groups of a multiple of 4 (m06); head_bits 2 / 16 refused only later,
under Q4Linear's name (m10); the head found by name only or by object only (m28, m30, m31). backend.py: the plain
backend tried first, later registrations appended (b01, b02); nn.Linear subclasses unmatched (b04); plain bits per
weight fixed at 32 (b06); the fused / bound call taken for another dtype or a subclass (b09, b10, b11); dequantize
keeping the weight's dtype (b17). Untestable on a CPU without the tile unit (AMX): prompt_tiles' and tile_elements'
thresholds (the tiles are never asked for there).
"""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lordba import ConfigError
from lordba.quant import Q4Linear, base_bits, describe_base, quantize_model, resolve_backend
from lordba.quant import backend as backends

from conftest import tiny_llama


class Scaled(nn.Linear):
    """An ``nn.Linear`` subclass computing otherwise (twice the product), its weight a plain float Parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class HeadNamedOut(nn.Module):
    """A model whose output head (``get_output_embeddings``) is named ``out``, not one of the usual head names, and
    which keeps ``wo`` in float (``_keep_in_fp32_modules``) but not ``wout``."""

    _keep_in_fp32_modules = ("wo",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.wo, self.wout, self.out = (nn.Linear(64, 64) for _ in range(4))

    def get_output_embeddings(self) -> nn.Module:
        return self.out


def test_the_q4_backend_refuses_bits_other_than_4():
    with pytest.raises(ConfigError, match="bits=8"):
        quantize_model(tiny_llama(0), backend="q4", bits=8)


def test_a_group_size_that_is_a_bool_is_refused_for_every_backend():
    with pytest.raises(ConfigError, match="group_size"):
        quantize_model(tiny_llama(0), backend="none", group_size=True)


def test_an_output_head_bit_width_other_than_4_or_8_is_refused_naming_head_bits():
    for head_bits in (2, 16):
        with pytest.raises(ConfigError, match=f"head_bits={head_bits}"):
            quantize_model(tiny_llama(0), backend="q4", head_bits=head_bits)


def test_skip_names_the_last_component_of_a_layers_path():
    model = quantize_model(tiny_llama(0), backend="q4", skip=("down_proj",))
    kinds = {name: type(m) for name, m in model.named_modules() if name.endswith("_proj")}
    assert {n for n, k in kinds.items() if k is nn.Linear} == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    assert sum(k is Q4Linear for k in kinds.values()) == 12


def test_an_output_head_alone_on_the_meta_device_is_refused_naming_it():
    model = tiny_llama(0)
    model.lm_head.to("meta")  # (accelerate offloading the head alone)
    with pytest.raises(ConfigError, match=r"lm_head.*meta"):
        quantize_model(model, backend="q4")
    assert not any(isinstance(m, Q4Linear) for m in model.modules())


def test_an_output_head_alone_holding_nan_is_refused_naming_it():
    model = tiny_llama(0)
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
    with pytest.raises(ConfigError, match=r"lm_head.*inf or NaN"):
        quantize_model(model, backend="q4")
    assert not any(isinstance(m, Q4Linear) for m in model.modules())


def test_a_conv1d_layer_keeps_its_bias():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=101, n_positions=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 1)  # (GPT-2 starts its biases at zero)
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = conv(x)
    quantize_model(model, backend="q4")
    layer = model.transformer.h[0].mlp.c_fc
    layer.compute = "exact"
    with torch.no_grad():
        assert torch.equal(layer.bias, conv.bias)
        torch.testing.assert_close(layer(x), x @ layer.dequantize().T + conv.bias)
        assert float((layer(x) - want).norm() / want.norm()) < 0.1


def test_base_bits_weighs_each_layer_by_its_size():
    """The q4 base's 8-bit head (at 8.5 bits per weight in groups of 64) counts for its 4040 weights, the 4-bit layers
    (4.5) for their 22080."""
    model = quantize_model(tiny_llama(0), backend="q4")
    sizes = [
        (resolve_backend(m).bits_per_weight(m), m.in_features * m.out_features)
        for m in model.modules()
        if isinstance(m, Q4Linear)
    ]
    assert sorted(set(sizes)) == [(4.5, 800), (4.5, 1600), (4.5, 2080), (8.5, 4040)]
    assert base_bits(model) == pytest.approx({"q4": (22080 * 4.5 + 4040 * 8.5) / (22080 + 4040)})


def test_an_unquantized_bfloat16_base_counts_16_bits_per_weight():
    model = quantize_model(tiny_llama(0).to(torch.bfloat16), backend="none")
    assert base_bits(model) == {"none": 16.0}


def test_describe_base_gives_the_description_most_layers_share():
    weight = torch.randn(16, 64)
    four, eight = (Q4Linear.from_weight(weight, group_size=32, bits=bits) for bits in (4, 8))
    want = {"backend": "q4", "bits": 4, "group_size": 32}
    assert describe_base([four, nn.Linear(64, 16), four, eight]) == want
    assert describe_base([eight, four, four]) == want
    assert describe_base([nn.Linear(4, 4)]) is None


def test_a_module_kept_in_float_is_matched_by_whole_names_only():
    model = quantize_model(HeadNamedOut(), backend="q4", head_bits=0)
    assert type(model.wo) is nn.Linear
    assert isinstance(model.wout, Q4Linear) and isinstance(model.proj, Q4Linear)


def test_an_output_head_under_another_name_is_the_head():
    """``get_output_embeddings`` names the head whatever its name: kept (``head_bits=0``), else 8-bit; quantizing the
    model again alike is no refusal (the head is no layer quantized otherwise)."""
    model = quantize_model(HeadNamedOut(), backend="q4", head_bits=0)
    assert type(model.out) is nn.Linear
    model = quantize_model(HeadNamedOut(), backend="q4")
    assert isinstance(model.out, Q4Linear) and model.out.bits == 8 and model.proj.bits == 4
    quantize_model(model, backend="q4")
    assert model.out.bits == 8


def test_a_classification_head_without_output_embeddings_stays_unquantized():
    model = nn.Sequential()
    model.add_module("dense", nn.Linear(64, 64))
    model.add_module("classifier", nn.Linear(64, 3))
    quantize_model(model, backend="q4")
    assert isinstance(model.dense, Q4Linear) and type(model.classifier) is nn.Linear


def test_a_layer_group_size_is_refused_by_hqq_unless_a_multiple_of_8():
    with pytest.raises(ConfigError, match="multiple of 8"):
        quantize_model(tiny_llama(0), backend="hqq", bits=8, group_size=4)


@pytest.fixture
def registry(monkeypatch):
    """The backends' registry, restored after the test."""
    monkeypatch.setattr(backends, "_BACKENDS", list(backends._BACKENDS))
    return backends


def test_the_latest_registered_backend_is_tried_first_before_the_plain_linear(registry):
    class Mine(registry.BaseBackend):
        def __init__(self, name: str) -> None:
            self.name = name

        def matches(self, module: nn.Module) -> bool:
            return isinstance(module, Scaled)

    assert resolve_backend(Scaled(4, 4)).name == "none"  # a plain subclass: the plain backend
    registry.register_backend(Mine("first"))
    assert resolve_backend(Scaled(4, 4)).name == "first"
    registry.register_backend(Mine("second"))
    assert resolve_backend(Scaled(4, 4)).name == "second"
    assert resolve_backend(nn.Linear(4, 4)).name == "none"


def test_the_plain_backend_dequantizes_to_float32_and_declines_what_its_op_does_not_compute():
    """The fused call (``lordba::linear_branch``: ``at::linear``'s product) is for an ``nn.Linear`` itself (a
    subclass computes otherwise) and an input of its weight's dtype; the bound one alike."""
    from lordba import kernels
    from lordba.core.scales import get_codec
    from lordba.core.ste import STE
    from lordba.nn.adapter import TrainableAdapter
    from lordba.nn.epoch import _EPOCH

    plain = backends.PlainLinear()
    assert plain.dequantize(nn.Linear(8, 4).to(torch.bfloat16)).dtype == torch.float32
    if backends.linear_branch_op() is None:
        pytest.skip("the CPU kernels are unavailable")
    torch.manual_seed(0)
    x = torch.randn(1, 1, 40)
    adapter = TrainableAdapter(40, 24, 4, 2.0, get_codec("float32"), STE(), init="random").pack()
    tensors, scaling, limit = adapter._routed(False, (kernels.get_mode(), x.dtype))
    linear = nn.Linear(40, 24)
    call = plain.fused_branch(linear, x, tensors, scaling, limit)
    assert call is not None
    torch.testing.assert_close(call(x), adapter(x, linear(x)), rtol=1e-5, atol=1e-5)
    assert plain.fused_branch(Scaled(40, 24), x, tensors, scaling, limit) is None
    assert plain.fused_branch(linear.to(torch.float64), x, tensors, scaling, limit) is None
    if kernels.bound_calls() is not None:
        checks = (("token",), _EPOCH, _EPOCH[0], torch.float32, [])
        assert plain.bound_branch(linear, tensors, scaling, limit, checks, call) is None  # a float64 weight


def test_an_nf4_model_quantized_again_alike_is_no_refusal_whatever_group_size_is_given():
    """bitsandbytes' NF4 takes no group size (blocks of 64): a second ``quantize_model(backend="bnb")`` is alike."""
    pytest.importorskip("bitsandbytes")
    model = quantize_model(tiny_llama(0), backend="bnb")
    layers = dict(model.named_modules())
    quantize_model(model, backend="bnb", group_size=32)
    assert dict(model.named_modules()) == layers
