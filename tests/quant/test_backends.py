"""Quantized bases (HQQ, bitsandbytes NF4) and the unquantized one behind one interface."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lordba import ConfigError, LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.core.scales import get_codec
from lordba.core.ste import STE
from lordba.nn import fastpath
from lordba.nn.adapter import TrainableAdapter
from lordba.nn.layer import LoRDBALinear
from lordba.quant import base_bits, quantize_model, resolve_backend
from lordba.quant.cache import quantize_model_cached
from lordba.quant.hqq import quantize_linear_hqq

from conftest import TINY, tiny_llama

BACKENDS = [("hqq", 4), ("hqq", 2), ("bnb", 4), ("none", 32)]


def quantized(backend, bits):
    return quantize_model(tiny_llama(0), backend=backend, bits=min(bits, 8), group_size=8)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("backend,bits", BACKENDS)
def test_quantize_model_replaces_linears_and_keeps_the_head(backend, bits):
    model = quantized(backend, bits)
    names = {resolve_backend(m).name for n, m in model.named_modules() if n.endswith("_proj")}
    assert names == {backend}
    assert type(model.lm_head) is torch.nn.Linear
    assert not any(p.requires_grad for p in model.parameters())
    if backend != "none":
        assert abs(base_bits(model)[backend] - bits) < 1e-9


@pytest.mark.parametrize("backend,bits", BACKENDS)
def test_adapter_trains_on_a_frozen_quantized_base_that_stays_unmodified(backend, bits, input_ids):
    model = quantized(backend, bits)
    before = logits(model, input_ids)
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    torch.manual_seed(0)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random"))
    assert all(
        isinstance(lm.base_model.get_submodule(f"model.layers.0.self_attn.{n}"), LoRDBALinear) for n in ("q_proj",)
    )
    loss = lm(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = [p.grad for p in lm.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in lm.parameters() if not p.requires_grad)
    with lm.disable_adapter():
        assert torch.equal(logits(lm, input_ids), before)
    after = {k: v for k, v in lm.base_model.state_dict().items() if torch.is_tensor(v) and "lordba" not in k}
    for k, v in state.items():
        key = next(a for a in after if a.replace(".base_layer", "") == k)
        assert torch.equal(after[key], v), k


@pytest.mark.parametrize("backend,bits", BACKENDS)
def test_merge_equals_unmerged_within_the_quantizers_tolerance(backend, bits, input_ids):
    model = quantized(backend, bits)
    fp = logits(tiny_llama(0), input_ids)
    base_q = logits(model, input_ids)
    torch.manual_seed(1)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random"))
    with torch.no_grad():  # ‖ΔW‖ ≈ 0.4 ‖W‖: larger than a typical fine-tune, smaller than the base
        for ad in lm.adapter_modules("default").values():
            ad.scale_out.normal_(0, 0.0005)
    unmerged = logits(lm, input_ids)
    lm.merge_adapter()
    merged = logits(lm, input_ids)
    effect = (unmerged - base_q).norm()
    quant_error = (base_q - fp).norm()
    assert effect > 1.5 * quant_error if backend != "none" else effect > 0  # measurable vs quantization noise
    # the merge really applied the adapter (quanto's silent no-op would leave merged == base_q) ...
    assert (merged - base_q).norm() > 0.5 * effect
    # ... and differs from the unmerged model by no more than requantization noise
    tolerance = 1e-4 * unmerged.norm() if backend == "none" else 1.5 * quant_error
    assert (merged - unmerged).norm() <= tolerance
    lm.unmerge_adapter()
    if backend == "none":  # in-place subtraction: exact within float tolerance
        torch.testing.assert_close(logits(lm, input_ids), unmerged, rtol=1e-5, atol=1e-5)
    else:  # the original quantized module is restored: exact
        assert torch.equal(logits(lm, input_ids), unmerged)


@pytest.mark.parametrize("backend,bits", [("hqq", 4), ("bnb", 4)])
def test_save_and_reload_onto_a_quantized_base(backend, bits, input_ids, tmp_path):
    torch.manual_seed(2)
    lm = get_lordba_model(quantized(backend, bits), LoRDBAConfig(r=4, init="random"))
    want = logits(lm, input_ids)
    lm.save_pretrained(tmp_path)
    loaded = LoRDBAModel.from_pretrained(quantized(backend, bits), tmp_path)
    assert torch.equal(logits(loaded, input_ids), want)
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, LoRDBALinear) for m in merged.modules())
    assert {resolve_backend(m).name for n, m in merged.named_modules() if n.endswith("q_proj")} == {backend}


def test_bad_quantization_settings():
    with pytest.raises(ConfigError, match="NF4"):
        quantize_model(tiny_llama(0), backend="bnb", bits=2)
    with pytest.raises(ConfigError, match="backend"):
        quantize_model(tiny_llama(0), backend="gptq")
    with pytest.raises(ConfigError, match="bits"):
        quantize_model(tiny_llama(0), backend="hqq", bits=5)


def _hqq_layer(seed: int) -> LoRDBALinear:
    """A 4-bit HQQ layer (float32 compute) with one packed random adapter "a", active."""
    torch.manual_seed(seed)
    layer = LoRDBALinear(quantize_linear_hqq(nn.Linear(64, 40), 4, 32, torch.float32))
    adapter = TrainableAdapter(64, 40, 8, 2.0, get_codec("int8"), STE(), init="random")
    adapter.scale_out.normal_(0, 0.5)
    layer.add_adapter("a", adapter.pack())
    layer.set_adapter("a")
    return layer


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 5, 70])  # one token (the GEMV), the sign path, the unpack path
def test_an_hqq_layer_and_its_adapter_run_as_one_op_on_the_weight_hqq_dequantizes(tokens):
    """On an HQQ base (its PyTorch forward: the dequantized weight's product) the layer's kept call is
    ``lordba::linear_branch`` on that weight: HQQ's forward plus the branch up to float32 rounding, and a
    quantized weight changed in place is seen on the next call."""
    layer = _hqq_layer(0)
    x = torch.randn(1, tokens, 64)
    got = layer(x)
    call = fastpath.decode_call(layer, None, x)
    assert call is not None and call.__qualname__.startswith("HQQBackend.fused_branch")
    want = layer.lordba_adapters["a"](x, layer.base_layer(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - layer.base_layer(x)).abs().max() > 0.1  # the branch is there
    layer.base_layer.W_q.zero_()  # in place: the next call dequantizes the changed weight
    torch.testing.assert_close(layer(x), layer.lordba_adapters["a"](x, layer.base_layer(x)), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_an_hqq_prompt_with_the_fast_branch_compute_is_within_bfloat16_of_exact():
    """``fast`` on an HQQ base (float32 compute): a prompt's branch on the tile unit where it runs, within
    bfloat16 rounding of the float32 branch (not bit for bit); ``exact`` is HQQ's forward then the branch."""
    from lordba import kernels
    from lordba.kernels.q4 import amx_prefill_available

    layer = _hqq_layer(1)
    x = torch.randn(1, 70, 64)
    exact = layer(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(exact, layer.lordba_adapters["a"](x, base), rtol=1e-5, atol=1e-5)
    with kernels.with_branch_compute("fast"):
        fast = layer(x)
    assert (fast - exact).norm() <= 1e-2 * (exact - base).norm()
    assert torch.equal(fast, exact) != amx_prefill_available()


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_a_plain_linears_kept_call_is_bound_and_equals_its_python_call(tokens):
    """``PlainLinear.bound_branch`` binds ``lordba::linear_branch`` for an input of the weight's dtype (the checks'
    dtype, not their epoch): the bound call gives the Python call's result bit for bit, a prompt that may take the
    tile unit's factors going to that call, and declines an input of another dtype."""
    from lordba import kernels
    from lordba.nn.epoch import _EPOCH
    from lordba.quant.backend import PlainLinear, tile_elements

    if kernels.bound_calls() is None:
        pytest.skip("bound calls unavailable")
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    x = torch.randn(1, tokens, 40)
    adapter = TrainableAdapter(40, 24, 4, 2.0, get_codec("float32"), STE(), init="random").pack()
    tensors, scaling, limit = adapter._routed(False, (kernels.get_mode(), x.dtype))
    backend = PlainLinear()
    call = backend.fused_branch(linear, x, tensors, scaling, limit)
    calls = []

    def python(x):
        calls.append(x.shape)
        return call(x)

    token = ("token",)
    bound = backend.bound_branch(linear, tensors, scaling, limit, (token, _EPOCH, _EPOCH[0], x.dtype, []), python)
    assert type(bound).__name__ == "LayerCall"
    assert torch.equal(bound(x, token), call(x))
    prompt = x.numel() >= tile_elements(limit, 40)  # may take the tile unit's kept factors: the Python call's
    assert calls == ([x.shape] if prompt else [])  # else the op, bound
    assert bound(x.double(), token) is None


def test_an_nf4_layer_dequantizes_to_its_weight_after_an_inference_forward():
    """After one forward in eval mode without a gradient on a CPU with AVX512-BF16, bitsandbytes keeps an NF4
    layer's weight in its CPU kernel's layout (``packing_format_for_cpu``: codes reordered, absmax in bfloat16);
    the backend read that as the ordinary layout: ``dequantize`` gave another matrix (relative error ~1.4), so a
    merge into it (``merge_and_unload`` after evaluating) gave a wrong model and ``check_finite_merge`` checked
    the wrong weights. Where the CPU does not repack, the layer is put in that layout as its forward would."""
    bnb = pytest.importorskip("bitsandbytes")
    from lordba.quant.bnb import quantize_linear_bnb

    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = quantize_linear_bnb(linear, torch.float32).eval()
    backend = resolve_backend(layer)
    weight = backend.dequantize(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
    w = layer.weight
    if not getattr(w.quant_state, "packing_format_for_cpu", False):  # what that forward does (pure tensor ops)
        w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)
    with torch.no_grad():
        packed_y = layer(x)
    # the packed layout holds the absmax in bfloat16: the weight within its rounding
    torch.testing.assert_close(backend.dequantize(layer), weight, rtol=0, atol=2**-8 * float(weight.abs().max()))
    merged = backend.merge(layer, torch.zeros_like(weight))
    torch.testing.assert_close(backend.dequantize(merged), weight, rtol=0, atol=0.05 * float(weight.abs().max()))
    assert w.quant_state.packing_format_for_cpu  # reading it leaves the layer as it was
    with torch.no_grad():
        assert torch.equal(layer(x), packed_y)


def test_kept_factors_never_take_a_replaced_tensor_for_the_one_they_were_made_for():
    """Prompt factors are kept by (version, address) of the adapter's tensors. ``.data =`` keeps the version
    counter, and a replaced tensor's freed storage could go to the next one at the same address: the factors
    of the first were then taken for the second. The kept entry holds the storages it was made from."""
    from lordba.quant.backend import kept_factors

    t = torch.zeros(64)
    kept = []
    for i in range(200):
        assert torch.equal(kept_factors(kept, (t,), lambda: (t.clone(),))[0], t), i
        t.data = torch.full((64,), float(2 * i + 1))  # twice between calls: the first one's storage is freed
        t.data = torch.full((64,), float(2 * i + 2))


@pytest.mark.parametrize("backend", ["q4", "hqq", "none"])
def test_quantize_model_refuses_a_model_that_already_has_adapters(backend):
    # It used to replace the nn.Linear under each LoRDBA layer, which kept the nn.Linear's backend (merging then
    # raised AttributeError: 'Q4Linear' object has no attribute 'weight'; the config recorded no base quantization),
    # and (every backend, "none" too) froze the adapters' parameters.
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2))
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj.*before adding adapters"):
        quantize_model(lm, backend=backend)
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == trainable
    assert all(type(layer.base_layer) is nn.Linear for _, layer in lm._lordba_layers())  # unchanged

    with pytest.raises(ConfigError, match="before adding adapters"):
        quantize_model_cached(lm, "/nonexistent", backend=backend)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backend": "hqq", "group_size": 0}, "group_size"),  # ZeroDivisionError
        ({"backend": "hqq", "group_size": -8}, "group_size"),  # RuntimeError: invalid shape dimension -8
        ({"backend": "hqq", "group_size": 12}, "group_size"),  # (k_proj's 800 weights are no multiple of 12)
        ({"backend": "hqq", "bits": 8, "group_size": 4}, "group_size"),  # AssertionError in HQQ's BaseQuantizeConfig
        ({"backend": "q4", "group_size": None}, "group_size"),  # TypeError
        ({"backend": "q4", "group_size": 64.0}, "group_size"),  # TypeError in torch.zeros
        ({"backend": "q4", "skip": "q_proj"}, "skip"),  # a string: matched as a substring of each name
        ({"backend": "q4", "skip": [None]}, "skip"),
    ],
)
def test_quantize_model_names_a_bad_argument(kwargs, field):
    model = tiny_llama(0)
    with pytest.raises(ConfigError, match=field):
        quantize_model(model, **kwargs)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))  # unchanged
    with pytest.raises(ConfigError, match=r"nn\.Module"):
        quantize_model(None)


@pytest.mark.parametrize("in_f,out_f", [(48, 64), (64, 48), (64, 40), (40, 64), (96, 64), (64, 96), (64, 64)])
def test_an_nf4_layer_of_any_shape_runs_in_eval_mode_without_a_gradient(in_f, out_f):
    """bitsandbytes repacks an NF4 layer for its AVX512-BF16 CPU kernel on its first forward in eval mode without a
    gradient, which needs ``out % 32 == 0`` and ``in % 64 == 0``: another shape failed there (``RuntimeError: shape
    '[64, 0]' is invalid`` / ``AssertionError: N must be divisible by block_n``). Such a layer keeps bitsandbytes'
    ordinary CPU path (dequantize, then multiply), as every NF4 layer lordba makes does (see the next test)."""
    pytest.importorskip("bitsandbytes")
    from lordba.quant.bnb import quantize_linear_bnb

    torch.manual_seed(0)
    layer = quantize_linear_bnb(nn.Linear(in_f, out_f), torch.float32).eval()
    weight = resolve_backend(layer).dequantize(layer)
    x = torch.randn(3, in_f)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(x), x @ weight.t() + layer.bias, rtol=1e-2, atol=1e-2)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("bias", [False, True])
def test_an_nf4_layer_passes_its_gradient_after_an_inference_forward(bias):
    """After a forward in eval mode without a gradient on a CPU with AVX512-BF16, bitsandbytes (0.50) keeps an NF4
    layer in its CPU kernel's layout and computes every later forward with that kernel, which has no backward: training
    an adapter after evaluating (``model.train()`` does not undo it) silently lost the gradient through the base layer
    (``x.grad`` None; a warning only) or, with a bias, failed (an in-place add on a view of a leaf). The layers lordba
    makes keep bitsandbytes' ordinary CPU path (dequantize, then multiply) in every mode."""
    pytest.importorskip("bitsandbytes")
    from lordba.quant.bnb import quantize_linear_bnb

    torch.manual_seed(0)
    layer = quantize_linear_bnb(nn.Linear(64, 64, bias=bias), torch.float32).eval()
    weight = resolve_backend(layer).dequantize(layer)
    with torch.no_grad():
        layer(torch.randn(3, 64))
    layer.train()
    x = torch.randn(3, 64, requires_grad=True)
    layer(x * 1.0).pow(2).sum().backward()
    y = x.detach() @ weight.t() + (layer.bias if bias else 0)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 2 * y @ weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("evaluated_first", [False, True])
def test_an_adapter_on_a_foreign_nf4_layer_gets_its_gradient_after_an_inference_forward(evaluated_first):
    """A ``Linear4bit`` lordba did not make (transformers' ``BitsAndBytesConfig``: QLoRA) took bitsandbytes'
    AVX512-BF16 CPU kernel after one forward in eval mode without a gradient, and kept it for every forward: an adapter
    on an earlier layer lost its gradient through this one (silently). Wrapping it (``LoRDBALinear``) now keeps it on
    the ordinary path, and reads a layer already in that kernel's layout (``evaluated_first``) back into the ordinary
    one, with the weights it computed with."""
    bnb = pytest.importorskip("bitsandbytes")
    from lordba.nn.layer import LoRDBALinear

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 64) * 0.1, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()  # (quantizes)
    x0 = torch.randn(3, 64)
    if evaluated_first:
        with torch.no_grad():
            layer(x0)  # (in that kernel's layout now, its absmax rounded to bfloat16, where the CPU has it)
    weight = resolve_backend(layer).dequantize(layer)  # what the layer computes with
    expected = x0 @ weight.t() + layer.bias.detach()
    wrapped = LoRDBALinear(layer)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x0), expected, rtol=1e-4, atol=1e-4)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(resolve_backend(layer).dequantize(layer), weight)
    wrapped.train()
    x = torch.randn(3, 64, requires_grad=True)
    wrapped(x * 1.0).pow(2).sum().backward()
    assert x.grad is not None
    y = x.detach() @ weight.t() + layer.bias.detach()
    torch.testing.assert_close(x.grad, 2 * y @ weight, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["q4", "hqq", "bnb", "gpt2-q4", "gpt2-bnb"])
@pytest.mark.parametrize("training", [False, True])
def test_quantized_layers_take_the_mode_of_the_layers_they_replace(backend, training):
    """quantize_model made its layers in training mode inside a model in eval mode (``nn.Module``'s default): the
    model's own ``.eval()`` had not reached them (bitsandbytes' layers, for one, choose their path by their mode).
    Each new layer (a GPT-2 ``Conv1D``'s too, and the q4 output head) now has the mode of the one it replaces."""
    if "bnb" in backend:
        pytest.importorskip("bitsandbytes")
    if backend.startswith("gpt2"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101, n_positions=32))
        backend = backend.split("-")[1]
    else:
        model = tiny_llama(0)
    model.train(training)
    quantize_model(model, backend=backend, group_size=8 if backend == "hqq" else 32)
    assert [n for n, m in model.named_modules() if m.training != training] == []


@pytest.mark.parametrize("training", [False, True])
def test_a_requantized_merge_keeps_the_base_layers_mode(training):
    """Merging into a quantized base (HQQ, bitsandbytes) makes a new base layer: it has the mode of the one it
    replaces (it was in training mode inside an eval model)."""
    with torch.no_grad():
        layer = _hqq_layer(0).train(training)
    layer.merge(["a"])
    assert layer.base_layer is not layer._premerge_base[0]
    assert [n for n, m in layer.named_modules() if m.training != training] == []


@pytest.mark.parametrize("backend", ["q4", "hqq", "bnb"])
def test_quantize_model_names_a_layer_whose_weight_is_on_the_meta_device(backend):
    # A model made under torch.device("meta") or offloaded by accelerate (cpu_offload, device_map with "disk" or
    # "cpu" offload: its weights on "meta", held by hooks) raised bare NotImplementedError ("Cannot copy out of meta
    # tensor") or RuntimeError (hqq: "Tensor.item() cannot be called on meta tensors") from inside the quantizer.
    with torch.device("meta"):
        model = tiny_llama(0)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj.*meta"):
        quantize_model(model, backend=backend, group_size=8 if backend == "hqq" else 64)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))  # unchanged


@pytest.mark.parametrize("backend", ["q4", "hqq", "bnb"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_quantize_model_names_a_layer_whose_weight_holds_inf_or_nan(backend, value):
    # One NaN (a diverged fine-tune, a damaged checkpoint) was quantized without a word on every backend: its group's
    # scale and offset became NaN, and the quantized model's logits were NaN for every input.
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.down_proj.*inf or NaN"):
        quantize_model(model, backend=backend, group_size=8 if backend == "hqq" else 64)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))  # unchanged


@pytest.mark.parametrize(("first", "second"), [("q4", "hqq"), ("hqq", "q4"), ("bnb", "q4"), ("q4", "q4-g32")])
def test_quantizing_a_quantized_model_again_otherwise_is_refused(first, second):
    # The second call silently quantized nothing (q4 -> hqq: a model still on q4, recorded as hqq in
    # lordba_quantization) or quantized the head alone with the other backend (hqq -> q4: an 8-bit q4 head on an HQQ
    # base, recorded as a q4 base).
    settings = {"q4": {"backend": "q4"}, "q4-g32": {"backend": "q4", "group_size": 32}, "hqq": {"backend": "hqq"}}
    settings["bnb"] = {"backend": "bnb"}
    model = quantize_model(tiny_llama(0), **{"group_size": 8 if first == "hqq" else 64, **settings[first]})
    layers = {n: m for n, m in model.named_modules()}
    record = dict(model.lordba_quantization)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj.*already quantized"):
        quantize_model(model, **settings[second])
    assert {n: m for n, m in model.named_modules()} == layers  # unchanged
    assert model.lordba_quantization == record


def test_quantizing_a_quantized_model_again_alike_quantizes_only_what_is_left():
    model = tiny_llama(0)
    quantize_model(model, backend="q4", head_bits=0)
    layers = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    quantize_model(model, backend="q4")  # (the head now, at 8 bits)
    assert {n: m for n, m in model.named_modules() if n.endswith("_proj")} == layers
    assert resolve_backend(model.lm_head).describe(model.lm_head) == {"backend": "q4", "bits": 8, "group_size": 64}


@pytest.mark.parametrize("backend", ["q4", "hqq"])
def test_a_head_named_in_skip_stays_unquantized(backend):
    # quantize_model(skip=["lm_head"]) (as bitsandbytes' llm_int8_skip_modules names it) quantized the q4 head to
    # 8 bits anyway and untied it from the embeddings.
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": True})).eval()
    quantize_model(model, backend=backend, group_size=8 if backend == "hqq" else 64, skip=("lm_head",))
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings
    assert model.lordba_quantization["head_bits"] == 0


@pytest.mark.parametrize("backend", ["q4", "hqq", "bnb"])
def test_the_modules_a_model_keeps_in_float_stay_unquantized(backend):
    # T5's feed-forward casts its input to the dtype of `wo.weight` (transformers keeps `wo` in float32 through
    # `_keep_in_fp32_modules`, and its own quantizers skip it): on q4 / HQQ every forward raised AttributeError
    # ('Q4Linear' object has no attribute 'weight'), on NF4 it cast the hidden states to uint8 (logits off by 125%).
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    model = T5ForConditionalGeneration(config).eval()
    ids, decoder_ids = torch.randint(1, 100, (1, 6)), torch.randint(1, 100, (1, 4))
    with torch.no_grad():
        reference = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    quantize_model(model, backend=backend, group_size=64)
    assert type(model.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear
    assert resolve_backend(model.encoder.block[0].layer[1].DenseReluDense.wi).name == backend
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    assert ((logits - reference).norm() / reference.norm()) < 0.25


def test_a_tied_head_of_an_encoder_decoder_model_stays_tied():
    # UMT5 (like Switch Transformers, UDOP, T5Gemma) scales the decoder's output by d_model ** -0.5 only while
    # config.tie_word_embeddings is set: q4 quantized the tied head to 8 bits and untied it, and every logit came out
    # sqrt(d_model) = 8 times too large (relative error 7.0, silently).
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, tie_word_embeddings=True
    )
    model = UMT5ForConditionalGeneration(config).eval()
    ids, decoder_ids = torch.randint(1, 100, (1, 6)), torch.randint(1, 100, (1, 4))
    with torch.no_grad():
        reference = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    quantize_model(model, backend="q4", group_size=64)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.shared.weight
    assert model.config.tie_word_embeddings and model.lordba_quantization["head_bits"] == 0
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    assert ((logits - reference).norm() / reference.norm()) < 0.25


@pytest.mark.parametrize("backend", ["q4", "hqq", "bnb", "q4-over-hqq"])
def test_a_refused_quantize_model_leaves_the_parameters_trainable(backend):
    # Every parameter was frozen before the checks ran: a model refused for one NaN weight (or already quantized
    # otherwise) came back with all of its parameters frozen, though nothing was quantized.
    model = tiny_llama(0)
    if backend == "q4-over-hqq":
        model = quantize_model(model, backend="hqq", group_size=8)
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())  # the embeddings and norms, trained again
    else:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    with pytest.raises(ConfigError):
        quantize_model(model, backend=backend.split("-")[0], group_size=8 if backend == "hqq" else 64)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
