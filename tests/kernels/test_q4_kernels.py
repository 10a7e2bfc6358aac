"""The 4-bit base kernels: packing, the compiled kernel against the PyTorch reference (every token
count, padded inputs), the input gradient, and torch.compile tracing."""

import os
import sys

import pytest
import torch

from lordba.kernels import cpu_available
from lordba.kernels.q4 import dequantize_reference, pack_codes, q4_dequantize, q4_linear, unpack_codes

needs_cpu_kernels = pytest.mark.skipif(not cpu_available(), reason="compiled CPU kernels unavailable")


def packed(out, in_features, group, seed=0, bits=4):
    """Random codes of ``bits`` (4 or 8), float16 scales (a tenth as large for 8-bit codes) and offsets,
    packed; and the codes."""
    g = torch.Generator().manual_seed(seed)
    padded = -(-in_features // group) * group
    codes = torch.randint(0, 2**bits, (out, padded), generator=g, dtype=torch.uint8)
    size = 1.0 if bits == 4 else 0.1
    scale = (torch.rand(out, padded // group, generator=g) * (0.02 * size) + 0.001 * size).half()
    minus = (torch.randn(out, padded // group, generator=g) * 0.05).half()
    return pack_codes(codes, bits), scale, minus, codes


def test_pack_and_unpack_are_inverse_and_the_reference_is_affine():
    qweight, scale, minus, codes = packed(5, 64, 32)
    assert qweight.shape == (5, 32) and torch.equal(unpack_codes(qweight), codes)
    w = dequantize_reference(qweight, scale, minus, 64)
    want = codes.float().reshape(5, 2, 32) * scale.float()[..., None] + minus.float()[..., None]
    torch.testing.assert_close(w, want.reshape(5, 64))


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(7, 40, 64), (33, 96, 32), (64, 128, 128)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9, 15, 16, 40])
def test_kernel_equals_the_reference(shape, tokens):
    out, in_features, group = shape
    qweight, scale, minus, _ = packed(out, in_features, group, seed=tokens)
    x = torch.randn(2, tokens, in_features)
    bias = torch.randn(out)
    want = x @ dequantize_reference(qweight, scale, minus, in_features).t() + bias
    got = q4_linear(x, qweight, scale, minus, in_features, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        q4_dequantize(qweight, scale, minus, in_features), dequantize_reference(qweight, scale, minus, in_features)
    )


@needs_cpu_kernels
def test_bfloat16_input_keeps_its_dtype():
    qweight, scale, minus, _ = packed(16, 64, 64)
    x = torch.randn(3, 64).bfloat16()
    y = q4_linear(x, qweight, scale, minus, 64)
    assert y.dtype == torch.bfloat16
    want = x.float() @ dequantize_reference(qweight, scale, minus, 64).t()
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens", [1, 20])
def test_input_gradient_is_dy_times_w(tokens):
    qweight, scale, minus, _ = packed(24, 40, 32)
    x = torch.randn(tokens, 40, requires_grad=True)
    dy = torch.randn(tokens, 24)
    q4_linear(x, qweight, scale, minus, 40).backward(dy)
    torch.testing.assert_close(x.grad, dy @ dequantize_reference(qweight, scale, minus, 40), rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
def test_compiled_call_equals_eager():
    qweight, scale, minus, _ = packed(24, 64, 32)
    x = torch.randn(3, 64)

    def f(x):
        return torch.relu(q4_linear(x, qweight, scale, minus, 64))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(7, 40, 64), (33, 20, 64), (64, 128, 128), (5, 96, 32), (4, 600, 64)])
def test_one_token_decode_path_equals_the_reference(shape):
    """One token runs the decode kernel (rows in blocks of 4 plus the remainder; a partly and a
    wholly padded chunk of inputs)."""
    out, in_features, group = shape
    qweight, scale, minus, _ = packed(out, in_features, group, seed=out)
    x = torch.randn(1, 1, in_features) * 3
    want = x @ dequantize_reference(qweight, scale, minus, in_features).t()
    torch.testing.assert_close(q4_linear(x, qweight, scale, minus, in_features), want, rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
def test_one_token_of_any_layout_or_dtype_gives_its_float32_contiguous_result():
    """The one-token path reads a contiguous float32 token in place and converts any other: the same bits
    either way, the output in x's dtype and leading shape."""
    qweight, scale, minus, _ = packed(24, 96, 32, seed=3)
    wide = torch.randn(1, 1, 2 * 96)
    x = wide[..., ::2]  # one token, not contiguous
    want = q4_linear(x.contiguous(), qweight, scale, minus, 96)
    assert want.shape == (1, 1, 24)
    assert torch.equal(q4_linear(x, qweight, scale, minus, 96), want)
    assert torch.equal(q4_linear(x.reshape(96).contiguous(), qweight, scale, minus, 96), want.reshape(24))
    half = x.contiguous().bfloat16()
    got = q4_linear(half, qweight, scale, minus, 96)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, q4_linear(half.float(), qweight, scale, minus, 96).bfloat16())


@needs_cpu_kernels
@pytest.mark.parametrize("tokens", [1, 3, 20])
def test_eight_bit_codes_equal_the_reference(tokens):
    g = torch.Generator().manual_seed(tokens)
    out, in_features = 21, 72  # groups of 32: 3 per padded row of 96
    codes = torch.randint(0, 256, (out, 96), generator=g, dtype=torch.uint8)
    scale = (torch.rand(out, 3, generator=g) * 0.001 + 0.0001).half()
    minus = (torch.randn(out, 3, generator=g) * 0.05).half()
    qweight = pack_codes(codes, 8)
    w = dequantize_reference(qweight, scale, minus, in_features, 8)
    torch.testing.assert_close(w[:, :32], codes[:, :32].float() * scale[:, :1].float() + minus[:, :1].float())
    x = torch.randn(tokens, in_features)
    torch.testing.assert_close(
        q4_linear(x, qweight, scale, minus, in_features, bits=8), x @ w.t(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(q4_dequantize(qweight, scale, minus, in_features, 8), w)


@needs_cpu_kernels
def test_inference_calls_skip_the_autograd_function(monkeypatch):
    """Without a gradient to compute the op is called alone (an autograd.Function costs per call);
    with one, the function (and its backward) is used."""
    from lordba.kernels import q4 as q4_module

    qweight, scale, minus, _ = packed(9, 40, 32)
    x = torch.randn(1, 40)
    want = q4_linear(x, qweight, scale, minus, 40)
    calls = []
    original = q4_module._Q4Linear.apply
    monkeypatch.setattr(q4_module._Q4Linear, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        torch.testing.assert_close(q4_linear(x.requires_grad_(), qweight, scale, minus, 40), want)
    with torch.inference_mode():
        torch.testing.assert_close(q4_linear(x.detach(), qweight, scale, minus, 40), want)
    assert calls == []
    y = q4_linear(x, qweight, scale, minus, 40)
    assert calls == [1] and y.requires_grad


@needs_cpu_kernels
@pytest.mark.parametrize("tokens", [2, 15, 16, 40])
def test_bfloat16_gemm_rounds_the_gemm_operands_only_from_sixteen_tokens(tokens):
    """``bf16``: from 16 tokens on the GEMM runs on bfloat16 operands (error of the order of
    bfloat16's rounding, well above float32's); 2-15 tokens are the float32 decode path, unchanged;
    the input gradient stays float32."""
    qweight, scale, minus, _ = packed(48, 96, 32, seed=tokens)
    x = torch.randn(tokens, 96, requires_grad=True)
    w = dequantize_reference(qweight, scale, minus, 96)
    exact = x.detach().double() @ w.double().t()
    rounded = (x.detach().bfloat16().double() @ w.bfloat16().double().t()).bfloat16().double()
    got = q4_linear(x, qweight, scale, minus, 96, bf16=True)
    assert got.dtype == torch.float32
    err = (got.double() - exact).norm() / exact.norm()
    if tokens < 16:
        torch.testing.assert_close(got, q4_linear(x.detach(), qweight, scale, minus, 96))
    else:
        torch.testing.assert_close(got.double(), rounded, rtol=1e-2, atol=1e-3)
        assert 1e-5 < err < 1e-2  # rounded (float32 is ~1e-7 here), but only to bfloat16's precision
    dy = torch.randn(tokens, 48)
    got.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w, rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(48, 96, 32), (37, 100, 64), (1536, 576, 64)])
@pytest.mark.parametrize("tokens", [16, 40, 512])
def test_bfloat16_gemm_block_is_the_float32_weight_rounded(shape, tokens, bits):
    """The bfloat16 GEMM's weight block, dequantized straight to bfloat16, is the float32 dequantized weight
    rounded to bfloat16 (to nearest even) bit for bit: the output equals the GEMM on those operands exactly,
    padded inputs (``in`` not a multiple of 32) and 8-bit codes included."""
    out, in_features, group = shape
    qweight, scale, minus, _ = packed(out, in_features, group, seed=tokens + bits, bits=bits)
    x = torch.randn(tokens, in_features)
    w = q4_dequantize(qweight, scale, minus, in_features, bits)
    want = torch.mm(x.bfloat16(), w.bfloat16().t()).float()
    got = q4_linear(x, qweight, scale, minus, in_features, bits=bits, bf16=True)
    assert torch.equal(got, want)


@needs_cpu_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(7, 40, 64), (33, 20, 64), (64, 128, 128), (5, 96, 32), (4, 600, 64)])
def test_bfloat16_one_token_kernel_is_the_rounded_inputs_arithmetic(shape, bits):
    """``bf16`` with one token (AVX512_BF16 builds): the products of the codes with the input rounded
    to bfloat16, summed in float32, plus the offset term on the exact input — for 4-bit rows and the
    8-bit head's (two nibbles per code); within bfloat16's rounding of the exact result. Other builds
    compute in float32."""
    from lordba.kernels.q4 import bf16_dot_available

    out, in_features, group = shape
    qweight, scale, minus, codes = packed(out, in_features, group, seed=out, bits=bits)
    x = torch.randn(1, in_features) * 3
    x[0, 0] = 40.0  # an outlier costs nothing here: each input is rounded on its own
    w = dequantize_reference(qweight, scale, minus, in_features, bits).double()
    exact = x.double() @ w.t()
    got = q4_linear(x, qweight, scale, minus, in_features, bits=bits, bf16=True)
    if not bf16_dot_available():
        torch.testing.assert_close(got, q4_linear(x, qweight, scale, minus, in_features, bits=bits))
        return
    codes = codes.double()
    padded = codes.shape[1]
    xr = torch.nn.functional.pad(x[0].double(), (0, padded - in_features))
    xe = xr.clone()
    xr = xr.float().bfloat16().double()
    dots = (codes.reshape(out, -1, group) * xr.reshape(-1, group)).sum(-1)
    want = (dots * scale.double()).sum(-1) + (minus.double() * xe.reshape(-1, group).sum(-1)).sum(-1)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-4)
    # bfloat16 keeps 8 significant bits: each input off by at most 2^-9 of itself, each product s_g q x
    sq = (codes.reshape(out, -1, group) * scale.double()[..., None]).reshape(out, -1)
    bound = (sq * xe.abs()).sum(-1) * 2.0**-9
    err = (got[0].double() - exact[0]).abs()
    assert bool((err <= bound + 1e-4).all()) and float(err.max()) > 1e-6
    x3 = x.expand(3, in_features)  # more tokens: float32
    torch.testing.assert_close(q4_linear(x3, qweight, scale, minus, in_features, bits=bits, bf16=True),
                               q4_linear(x3, qweight, scale, minus, in_features, bits=bits))  # fmt: skip


def _int8_reference(x, qweight, scale, minus, in_features, group):
    """The int8 kernel's arithmetic in float64: x quantized per group (step max|x_g| / 127, rounded to
    nearest), dotted with the codes, scaled by s_g and the step; the offset term on the exact x."""
    codes = unpack_codes(qweight).double()
    out, padded = codes.shape
    xp = torch.zeros(padded, dtype=torch.float64)
    xp[:in_features] = x.double()
    xg = xp.reshape(-1, group)
    step = xg.abs().amax(dim=1, keepdim=True) / 127
    xq = torch.where(step > 0, torch.round(xg / torch.where(step > 0, step, 1)), 0)
    dots = (codes.reshape(out, -1, group) * xq).sum(-1) * step.squeeze(1) * scale.double()
    return dots.sum(-1) + (minus.double() * xg.sum(-1)).sum(-1)


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(7, 40, 64), (33, 20, 64), (64, 128, 128), (5, 96, 32), (4, 600, 64)])
def test_int8_one_token_kernel_equals_its_arithmetic_and_stays_close_to_float32(shape):
    """``int8_dot`` (AVX512-VNNI and AVX2 builds): one token equals the int8 arithmetic done in float64, and
    differs from the exact result by the int8 rounding only (a fraction of a percent); other builds
    and more tokens ignore it."""
    from lordba.kernels.q4 import int8_dot_available

    out, in_features, group = shape
    qweight, scale, minus, _ = packed(out, in_features, group, seed=out)
    x = torch.randn(1, in_features) * 3
    exact = x.double() @ dequantize_reference(qweight, scale, minus, in_features).double().t()
    got = q4_linear(x, qweight, scale, minus, in_features, int8_dot=True)
    if not int8_dot_available():
        torch.testing.assert_close(got, q4_linear(x, qweight, scale, minus, in_features))
        return
    # each input is off by at most half its group's step, so output o by at most sum_k s_g q_ok step_g / 2
    codes = unpack_codes(qweight).double().reshape(out, -1, group)
    xg = torch.nn.functional.pad(x[0].double(), (0, codes.shape[1] * group - in_features)).reshape(-1, group)
    bound = (codes.sum(-1) * scale.double() * xg.abs().amax(-1) / 254).sum(-1)
    err = (got[0].double() - exact[0]).abs()
    assert bool((err <= bound + 1e-4).all()) and float(err.max()) > 1e-6
    x[0, 0] = 40.0  # an outlier: its group's step is coarse, the arithmetic the same
    for v in (x, torch.zeros_like(x)):  # an all-zero group has no step
        want = _int8_reference(v[0], qweight, scale, minus, in_features, group)
        torch.testing.assert_close(q4_linear(v, qweight, scale, minus, in_features, int8_dot=True)[0].double(),
                                   want, rtol=1e-5, atol=1e-4)  # fmt: skip
    x3 = x.expand(3, in_features)
    torch.testing.assert_close(q4_linear(x3, qweight, scale, minus, in_features, int8_dot=True),
                               q4_linear(x3, qweight, scale, minus, in_features))  # fmt: skip


def test_the_layers_compute_follows_the_environment_and_the_argument(monkeypatch):
    from lordba.errors import ConfigError
    from lordba.kernels import q4 as q4_module
    from lordba.quant.q4 import Q4Linear

    qweight, scale, minus, _ = packed(8, 32, 32)
    monkeypatch.delenv(q4_module.COMPUTE_ENV, raising=False)
    layer = Q4Linear(qweight, scale, minus, 32)
    assert layer.compute == "fast" == q4_module.default_compute()
    assert layer._flags == (q4_module.native_bfloat16(), False)
    layer.compute = "fast-int8"
    assert layer._flags == (q4_module.native_bfloat16(), q4_module.int8_dot_available())
    layer.compute = "exact"
    assert layer._flags == (False, False)
    monkeypatch.setenv(q4_module.COMPUTE_ENV, "exact")
    assert Q4Linear(qweight, scale, minus, 32).compute == "exact"
    assert Q4Linear(qweight, scale, minus, 32, compute="fast").compute == "fast"
    monkeypatch.setenv(q4_module.COMPUTE_ENV, "fp8")
    with pytest.raises(ConfigError, match="LORDBA_Q4_COMPUTE"):
        Q4Linear(qweight, scale, minus, 32)
    with pytest.raises(ConfigError, match="compute"):
        Q4Linear(qweight, scale, minus, 32, compute="half")


def _prefill_case(out, in_f, r, tokens, bias):
    """A random q4 layer and LoRDBA adapter of these sizes: ``(x, layer args, adapter tensors, bias,
    float64 weight, folded A', folded B')``."""
    from lordba.core.packing import pack_signs

    g = torch.Generator().manual_seed(tokens * 1000 + in_f)
    qweight, scale, minus, _ = packed(out, in_f, 32, seed=tokens)
    s_a, s_b = torch.randint(0, 2, (r, in_f), generator=g) * 2 - 1, torch.randint(0, 2, (out, r), generator=g) * 2 - 1
    b = torch.randint(-127, 128, (in_f,), generator=g, dtype=torch.int8)
    m, a = torch.rand(r, generator=g) * 0.05, torch.randn(out, generator=g) * 0.5
    bias_t = torch.randn(out, generator=g) if bias else None
    x = torch.randn(tokens, in_f, generator=g)
    tensors = (pack_signs(s_a.float()), pack_signs(s_b.float()), b, m, a)
    w = dequantize_reference(qweight, scale, minus, in_f).double()
    fa, fb = s_a.double() * (b.double() / 127), 2.0 * a.double()[:, None] * s_b.double() * m.double()
    return x, (qweight, scale, minus, in_f), tensors, bias_t, w, fa, fb


# (out, in, r): the tile unit's steps of 32 inputs exactly; a partial last step and two blocks of 16
# rank columns; an odd in (a pair's last value alone); two blocks of GEMM rows (2^20 / K < out)
PREFILL_SHAPES = [(48, 96, 8), (40, 80, 20), (24, 75, 5), (520, 2048, 8)]


@needs_cpu_kernels
@pytest.mark.parametrize("tokens", [15, 16, 42, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_bfloat16_prefill_joins_the_branch_to_the_gemm(tokens, bias, shape):
    """``q4_branch`` with ``bf16`` from 16 tokens on the unpack path: ``h = x A'ᵀ`` from bfloat16 ``x``
    and ``A'`` (float32 sums, on the tile unit where it runs), rounded to bfloat16, then one GEMM of
    ``[x | h]`` and ``[W | B']`` in bfloat16, its output rounded to bfloat16 once, then the bias: that
    arithmetic to float rounding, and as close to the float64 layer + branch as the two calls are. The
    same result bit for bit with the folded factors given (``q4_prefill_factors``, as a layer keeps
    them). 15 tokens (the decode kernels): bit for bit the two calls."""
    from lordba.kernels.q4 import native_bfloat16

    if not native_bfloat16():
        pytest.skip("the bfloat16 GEMM runs only where the CPU has native bfloat16 dot products")
    x, layer, tensors, bias_t, w, fa, fb = _prefill_case(*shape, tokens, bias)
    got = torch.ops.lordba.q4_branch(x, *layer, 16, 4, True, False, bias_t, *tensors, 2.0, 4)
    two = torch.ops.lordba.branch(x, *tensors, 2.0, 4, q4_linear(x, *layer, bias_t, bf16=True))
    bias_d = bias_t.double() if bias else 0.0
    exact = x.double() @ w.t() + (x.double() @ fa.t()) @ fb.t() + bias_d
    if tokens < 16:
        assert torch.equal(got, two)
        return
    folded = torch.ops.lordba.q4_prefill_factors(*tensors, 2.0)
    kept = torch.ops.lordba.q4_branch(x, *layer, 16, 4, True, False, bias_t, *tensors, 2.0, 4, *folded)
    assert torch.equal(kept, got)

    def bf(t):
        return t.bfloat16().double()

    h = bf(bf(x) @ bf(fa.float()).t())
    rounded = bf(torch.cat([bf(x), h], 1) @ torch.cat([bf(w.float()), bf(fb.float())], 1).t()) + bias_d
    # sums in another order may round an output (or h) to the neighbouring bfloat16: one unit (2^-8) of the largest
    torch.testing.assert_close(got.double(), rounded, rtol=1e-2, atol=float(rounded.abs().max()) * 2**-8)
    err, err_two = ((t.double() - exact).norm() / exact.norm() for t in (got, two))
    assert not torch.equal(got, two) and err < 2 * err_two + 1e-4, (err, err_two)


_WITHOUT_TILE_UNIT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_q4_kernels import _prefill_case
assert not torch.ops.lordba.q4_amx()
for shape in [(40, 80, 20), (24, 75, 5), (48, 96, 8)]:
    for tokens in (42, 64):
        x, layer, tensors, bias_t, w, fa, fb = _prefill_case(*shape, tokens, True)
        got = torch.ops.lordba.q4_branch(x, *layer, 16, 4, True, False, bias_t, *tensors, 2.0, 4)
        folded = torch.ops.lordba.q4_prefill_factors(*tensors, 2.0)
        kept = torch.ops.lordba.q4_branch(x, *layer, 16, 4, True, False, bias_t, *tensors, 2.0, 4, *folded)
        h = (x.bfloat16() @ fa.bfloat16().t()).bfloat16()
        want = (torch.cat([x.bfloat16(), h], 1) @ torch.cat([w.bfloat16(), fb.bfloat16()], 1).t()).float() + bias_t
        assert torch.equal(got, kept), (shape, tokens)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=float(want.abs().max()) * 2**-7)
print("ok")
"""


@needs_cpu_kernels
def test_bfloat16_prefill_without_the_tile_unit_joins_the_branch_correctly():
    """``LORDBA_AMX=0`` (and CPUs with AVX512_BF16 but no AMX): ``h = x A'ᵀ`` by oneDNN into the GEMM's input
    — right for every token (``at::mm`` on a strided view of the GEMM's input had computed whole tokens
    wrong there), the same with the folded factors given, close to the rounded arithmetic. In a
    subprocess: the switch is read once per process."""
    import os
    import subprocess
    from pathlib import Path

    from lordba.kernels.q4 import native_bfloat16

    if not native_bfloat16():
        pytest.skip("the bfloat16 GEMM runs only where the CPU has native bfloat16 dot products")
    env = {**os.environ, "LORDBA_AMX": "0"}
    here = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TILE_UNIT, here], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@needs_cpu_kernels
def test_prefill_factors_are_the_folded_factors_and_bad_ones_are_refused():
    """``q4_prefill_factors``: ``A' = S_A diag(b)`` and ``B' = s diag(a) S_B diag(m)`` in bfloat16;
    ``q4_branch`` refuses folded factors of other shapes or dtypes, naming the argument. Where
    the CPU has AMX-BF16 (Linux), the prefill's ``h`` runs on the tile unit (not silently on a GEMM)."""
    from lordba.kernels.cpu import cpu_flags
    from lordba.kernels.q4 import amx_prefill_available

    x, layer, tensors, _, _, fa, fb = _prefill_case(40, 80, 20, 32, False)
    folded_A, folded_B = torch.ops.lordba.q4_prefill_factors(*tensors, 2.0)
    assert folded_A.dtype == folded_B.dtype == torch.bfloat16
    assert torch.equal(folded_A, fa.float().bfloat16())
    torch.testing.assert_close(folded_B.double(), fb, rtol=2**-8, atol=0)
    call = torch.ops.lordba.q4_branch
    with pytest.raises(RuntimeError, match="folded_A must be bfloat16"):
        call(x, *layer, 16, 4, True, False, None, *tensors, 2.0, 4, folded_A.float(), folded_B)
    with pytest.raises(RuntimeError, match="folded_B must be bfloat16"):
        call(x, *layer, 16, 4, True, False, None, *tensors, 2.0, 4, folded_A, folded_B[:, :-1])
    native = os.environ.get("LORDBA_CPU_ARCH", "native") == "native"  # another -march's build has no tile code
    if "amx_bf16" in cpu_flags().split() and sys.platform == "linux" and native:
        assert amx_prefill_available()


@needs_cpu_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("out", "in_f", "r", "bits"), [(48, 96, 8, 4), (200, 96, 16, 4), (37, 40, 5, 4), (40, 64, 8, 8)]
)
@pytest.mark.parametrize("flags", [(False, False), (True, False), (True, True)])  # exact, fast, fast-int8
@pytest.mark.parametrize("bias", [False, True])
def test_one_token_q4_branch_adds_the_branch_inside_the_gemv_bit_for_bit(threads, out, in_f, r, bits, flags, bias):
    """One float32 token: each thread adds the bias and the branch to the rows it has just computed
    (inside the GEMV's parallel loop) — bit for bit the q4 call, the bias and the ``branch`` op, for
    outputs that are not a multiple of the 16-row block, a rank that is not a multiple of 8, 8-bit
    codes, every kernel, one and two threads. A bfloat16 input takes the two-call path (same result)."""
    from lordba.core.packing import pack_signs

    g = torch.Generator().manual_seed(out + r)
    qweight, scale, minus, _ = packed(out, in_f, 32, seed=r, bits=bits)
    s_a, s_b = torch.randint(0, 2, (r, in_f), generator=g) * 2 - 1, torch.randint(0, 2, (out, r), generator=g) * 2 - 1
    b = torch.randint(-127, 128, (in_f,), generator=g, dtype=torch.int8)
    m, a = torch.rand(r, generator=g) * 0.05, torch.randint(-127, 128, (out,), generator=g, dtype=torch.int8)
    tensors = (pack_signs(s_a.float()), pack_signs(s_b.float()), b, m, a)
    bias_t = torch.randn(out, generator=g) if bias else None
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in (torch.randn(1, in_f, generator=g), torch.randn(1, 1, in_f, generator=g).bfloat16()):
            got = torch.ops.lordba.q4_branch(x, qweight, scale, minus, in_f, 16, bits, *flags, bias_t, *tensors, 0.7, 4)
            base = q4_linear(x, qweight, scale, minus, in_f, bias_t, bits=bits, bf16=flags[0], int8_dot=flags[1])
            want = torch.ops.lordba.branch(x, *tensors, 0.7, 4, base)
            assert got.dtype == x.dtype and torch.equal(got, want)
            assert not torch.equal(got, base)
    finally:
        torch.set_num_threads(saved)


@needs_cpu_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("r", [8, 40, 64])  # one group of 8 rank components; more groups than threads
@pytest.mark.parametrize("scales", ["float32", "float16"])
def test_one_token_q4_branch_splits_its_first_stage_over_the_threads_bit_for_bit(threads, r, scales):
    """The first stage runs in groups of 8 rank components claimed by whichever thread of the GEMV's
    loop comes first: bit for bit the ``branch`` op however the groups fall, with float scales and
    strided (non-contiguous) adapter tensors too, and the same result call after call."""
    from lordba.core.packing import pack_signs

    out, in_f = 200, 160
    g = torch.Generator().manual_seed(r)
    qweight, scale, minus, _ = packed(out, in_f, 32, seed=r)
    s_a, s_b = torch.randint(0, 2, (r, in_f), generator=g) * 2 - 1, torch.randint(0, 2, (out, r), generator=g) * 2 - 1
    dtype = getattr(torch, scales)
    b = torch.rand(2 * in_f, generator=g).to(dtype)[::2]  # strided
    m = torch.rand(r, generator=g) * 0.05
    a = torch.rand(out, 2, generator=g).to(dtype)[:, 1]  # strided
    tensors = (pack_signs(s_a.float()), pack_signs(s_b.float()), b, m, a)
    assert not b.is_contiguous() and not a.is_contiguous()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, in_f, generator=g)
        base = q4_linear(x, qweight, scale, minus, in_f)
        want = torch.ops.lordba.branch(x, *tensors, 0.7, 4, base)
        layer = (qweight, scale, minus, in_f, 16, 4, False, False, None)
        for _ in range(3):
            assert torch.equal(torch.ops.lordba.q4_branch(x, *layer, *tensors, 0.7, 4), want)
    finally:
        torch.set_num_threads(saved)


@needs_cpu_kernels
@pytest.mark.parametrize("tokens", [1, 2, 40])  # the decode kernels (one token: the branch in the GEMV), the GEMM
def test_q4_branch_refuses_an_input_or_adapter_of_another_shape(tokens):
    from lordba.core.packing import pack_signs

    qweight, scale, minus, _ = packed(48, 96, 32)

    def adapter(out, r=4):
        signs = pack_signs(torch.ones(r, 96)), pack_signs(torch.ones(out, r))
        return *signs, torch.ones(96), torch.ones(r), torch.ones(out)

    def call(x, tensors):
        return torch.ops.lordba.q4_branch(x, qweight, scale, minus, 96, 16, 4, True, False, None, *tensors, 1.0, 4)

    assert call(torch.randn(tokens, 96), adapter(48)).shape == (tokens, 48)
    with pytest.raises(RuntimeError, match="x's last dimension must be 96"):
        call(torch.randn(tokens, 95), adapter(48))
    with pytest.raises(RuntimeError, match="lordba::branch"):
        call(torch.randn(tokens, 96), adapter(40))


def test_onednn_kept_below_bfloat16_turns_the_bfloat16_gemm_off(monkeypatch):
    """``$ONEDNN_MAX_CPU_ISA=AVX2`` (how an AVX2 machine is measured on a newer one): no native bfloat16
    GEMM, whatever the CPU's flags; an ISA with bfloat16 dot products leaves the flags to decide."""
    from lordba.kernels import q4 as q4_module

    monkeypatch.setattr("lordba.kernels.cpu.cpu_flags", lambda: "flags : avx512f avx512_bf16 amx_bf16")
    try:
        for limit, want in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_AMX", True), ("", True)):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
            q4_module.native_bfloat16.cache_clear()
            assert q4_module.native_bfloat16() is want, limit
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2_vnni")
        q4_module.native_bfloat16.cache_clear()
        assert not q4_module.native_bfloat16()
    finally:
        q4_module.native_bfloat16.cache_clear()
