"""4-bit (and 8-bit) weight-only linear ops: the fast frozen base on CPU (``kernels/cpu/q4.cpp``).

A weight ``out × in`` is stored per output row, padded to a multiple of the group size ``G`` (a
multiple of 32), as codes ``q`` with a float16 scale ``s`` and offset ``m`` per group:
``w = s · q + m`` (affine, so HQQ's optimised scale/zero carry over exactly). 4-bit codes are two
per byte (in every 32-input chunk, byte ``j`` holds input ``j`` in its low nibble and input
``j + 16`` in its high nibble); 8-bit codes (the output head) one per byte.

:func:`q4_linear` is differentiable with respect to its input (QAT on a frozen 4-bit base needs
``dL/dx = dL/dy · W``), traceable by ``torch.compile`` (fake implementations registered), and has a
plain PyTorch reference (dequantize, then ``F.linear``) used where the compiled kernels are absent.

Three ways to compute (``compute``), chosen per layer by :class:`~lordba.quant.q4.Q4Linear`:

* ``exact``: the dequantized weight's result up to float32 rounding (decode: the nibbles widened
  to float32; :data:`GEMM_MIN_TOKENS` tokens or more: float32 blocks of rows and the float32 GEMM);
* ``fast`` (the default, :func:`default_compute`): bfloat16 operands where the CPU has native
  bfloat16 dot products (AVX512_BF16 or AMX): the GEMM (2.5x faster prefill, held-out loss unchanged
  within 0.002 nats) and, where the build has AVX512_BF16, one token's input (the 4-bit nibbles and
  8-bit codes are exact in bfloat16; ``vdpbf16ps``, float32 accumulation): SmolLM2-135M's 211 layers
  per token in ~0.65x the float32 kernel's time, token-by-token loss +0.004 nats (the 4-bit weights
  cost 0.29; docs/kernels.md);
* ``fast-int8``: ``fast``, but one token of a 4-bit layer on the int8 kernel where the build has
  AVX512-VNNI or AVX2 (the input quantized to int8 per weight group, as llama.cpp's Q8 blocks, ``vpdpbusd``
  with the nibbles, or ``vpmaddubsw`` on AVX2: the same integer sums): ~0.9x the bfloat16 kernel's time,
  but +0.04 nats of token-by-token loss (top-1 agreement with ``exact`` 88%, ``fast`` 98%), so not the
  default.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from lordba.errors import ConfigError
from lordba.kernels import cpu_available

CHUNK = 32
GEMM_MIN_TOKENS = 16  # from this many tokens on, dequantize blocks of rows and use the GEMM (measured)
COMPUTE = ("exact", "fast", "fast-int8")
COMPUTE_ENV = "LORDBA_Q4_COMPUTE"


# oneDNN's ISA limits (``$ONEDNN_MAX_CPU_ISA``) that leave its bfloat16 dot products out
_NO_BF16_ISAS = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AVX512_BF16 or AMX-BF16), where
    oneDNN's bfloat16 GEMM is ~4x its float32 GEMM (1 thread, SmolLM2's prefill shapes). False where
    ``$ONEDNN_MAX_CPU_ISA`` (or ``$DNNL_MAX_CPU_ISA``) keeps oneDNN below them (``AVX2``, for instance:
    how an AVX2 machine is measured on a newer one, docs/kernels.md).

    x86 flags only: ARM's bfloat16 (``bf16`` in a Graviton 3/4's ``Features``, Apple M2's ``FEAT_BF16``) keeps
    False, the float32 prefill. There the bfloat16 GEMM would be torch's own (``at::mm``: oneDNN with ACL in
    Linux aarch64 wheels, nothing like Accelerate's float32 GEMM on macOS), never measured against float32, and
    the one-token bfloat16 kernel is AVX512_BF16 code (``fast`` would round the prompt's operands, maybe for
    nothing)."""
    from lordba.kernels.cpu import cpu_flags

    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if limit.strip().lower() in _NO_BF16_ISAS:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


def int8_dot_available() -> bool:
    """Whether the compiled kernels have the int8 one-token kernel (built with AVX512-VNNI or AVX2)."""
    return cpu_available() and hasattr(torch.ops.lordba, "q4_int8_dot") and bool(torch.ops.lordba.q4_int8_dot())


def bf16_dot_available() -> bool:
    """Whether the compiled kernels have the bfloat16 one-token kernel (built with AVX512_BF16)."""
    return cpu_available() and hasattr(torch.ops.lordba, "q4_bf16_dot") and bool(torch.ops.lordba.q4_bf16_dot())


def amx_prefill_available() -> bool:
    """Whether the bfloat16 prefill computes the adapter's ``h = x A'ᵀ`` on the CPU's tile unit (AMX-BF16:
    built with it, and Linux granted this process the tile state); else by a GEMM call of its own. The
    kernels are asked once per process (a prompt's fused calls read this per layer)."""
    return cpu_available() and hasattr(torch.ops.lordba, "q4_amx") and _tile_unit_granted()


@functools.cache
def _tile_unit_granted() -> bool:
    return bool(torch.ops.lordba.q4_amx())  # amx_ready() asks the OS once; its answer does not change


def check_compute(name: str, what: str = "compute") -> str:
    """``name`` if it is one of :data:`COMPUTE`.

    Raises:
        ConfigError: it is not (``what`` names the setting in the message).
    """
    if name not in COMPUTE:
        raise ConfigError(f"{what} must be one of {COMPUTE}, got {name!r}")
    return name


def default_compute() -> str:
    """The q4 layers' ``compute`` unless told: ``$LORDBA_Q4_COMPUTE``, else ``fast``.

    Raises:
        ConfigError: ``$LORDBA_Q4_COMPUTE`` is not one of :data:`COMPUTE`.
    """
    return check_compute(os.environ.get(COMPUTE_ENV) or "fast", f"${COMPUTE_ENV}")


def compute_flags(compute: str) -> tuple[bool, bool]:
    """``(bf16, int8_dot)`` of the op for ``compute`` on this machine."""
    fast = check_compute(compute) != "exact"
    return fast and native_bfloat16(), compute == "fast-int8" and int8_dot_available()


def pack_codes(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """``uint8 [out, in_padded]`` codes below ``2**bits`` (``in_padded`` a multiple of 32) → the
    stored ``uint8 [out, in_padded * bits / 8]``."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    out, padded = codes.shape
    chunks = codes.reshape(out, padded // CHUNK, 2, CHUNK // 2).to(torch.uint8)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(out, padded // 2).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [out, in_padded]`` codes."""
    if bits == 8:
        return qweight
    out, half = qweight.shape
    chunks = qweight.reshape(out, half // (CHUNK // 2), 1, CHUNK // 2)
    return torch.cat([chunks & 15, chunks >> 4], dim=2).reshape(out, half * 2)


def dequantize_reference(
    qweight: torch.Tensor, scale: torch.Tensor, minus: torch.Tensor, in_features: int, bits: int = 4
) -> torch.Tensor:
    """The float32 ``out × in`` weight, in plain PyTorch."""
    codes = unpack_codes(qweight, bits).float()
    out, padded = codes.shape
    groups = scale.shape[1]
    w = codes.reshape(out, groups, padded // groups) * scale.float().unsqueeze(-1) + minus.float().unsqueeze(-1)
    return w.reshape(out, padded)[:, :in_features]


def cpu_op_runs(t: torch.Tensor) -> bool:
    """Whether the compiled q4 ops run for a tensor on ``t``'s device (CPU, kernels loaded)."""
    return t.device.type == "cpu" and cpu_available() and hasattr(torch.ops.lordba, "q4_linear")


def q4_dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, minus: torch.Tensor, in_features: int, bits: int = 4
) -> torch.Tensor:
    """The float32 ``out × in`` weight (compiled kernel on CPU, else the reference)."""
    if cpu_op_runs(qweight):
        return torch.ops.lordba.q4_dequant(qweight, scale, minus, in_features, bits)
    return dequantize_reference(qweight, scale, minus, in_features, bits)


class _Q4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scale, minus, in_features, bits, bf16, int8):  # noqa: ANN001
        ctx.save_for_backward(qweight, scale, minus)
        ctx.in_features, ctx.bits = in_features, bits
        if cpu_op_runs(x):
            return torch.ops.lordba.q4_linear(x, qweight, scale, minus, in_features, GEMM_MIN_TOKENS, bits, bf16, int8)
        weight = dequantize_reference(qweight, scale, minus, in_features, bits)
        return F.linear(x.float(), weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        qweight, scale, minus = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = q4_dequantize(qweight, scale, minus, ctx.in_features, ctx.bits)
            grad_x = (grad.float() @ weight).to(grad.dtype)
        return grad_x, None, None, None, None, None, None, None


def q4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    minus: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    bits: int = 4,
    bf16: bool = False,
    int8_dot: bool = False,
) -> torch.Tensor:
    """``x @ Wᵀ (+ bias)`` for a 4-bit (or 8-bit) weight; differentiable with respect to ``x`` (the
    weight is frozen; the input gradient is computed in float32).

    Args:
        x: ``[..., in_features]`` float32 / bfloat16 / float16 input.
        qweight, scale, minus: the packed weight (see the module docstring).
        in_features: the unpadded input size.
        bias: optional ``[out]`` bias.
        bits: 4 or 8 (the codes' width).
        bf16: bfloat16 operands (CPU kernels): from :data:`GEMM_MIN_TOKENS` tokens on the GEMM's; one
            token's input where the build has the bfloat16 kernel (:func:`bf16_dot_available`).
        int8_dot: one token on the int8 kernel, where built (see the module docstring; the reference
            and other builds compute in float32). :func:`compute_flags` gives both for ``compute``.

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    if x.requires_grad and torch.is_grad_enabled():
        y = _Q4Linear.apply(x, qweight, scale, minus, in_features, bits, bf16, int8_dot)
    elif cpu_op_runs(x):  # inference: the op alone (an autograd.Function call costs ~5 µs per layer)
        y = torch.ops.lordba.q4_linear(x, qweight, scale, minus, in_features, GEMM_MIN_TOKENS, bits, bf16, int8_dot)
    else:
        y = F.linear(x.float(), dequantize_reference(qweight, scale, minus, in_features, bits)).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


_FAKES: list[bool] = []


def register_fakes() -> None:
    """Shape-only implementations of the q4 ops, so ``torch.compile`` traces through them (once)."""
    if _FAKES or not hasattr(torch.ops.lordba, "q4_linear"):
        return

    @torch.library.register_fake("lordba::q4_linear")
    def _linear_fake(x, qweight, scale, minus, in_features, gemm_min_tokens, bits, bf16=False, int8_dot=False):  # noqa: ANN001
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("lordba::q4_branch")
    def _branch_fake(x, qweight, *args, **kwargs):  # noqa: ANN001
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("lordba::q4_group")
    def _group_fake(x, qweight, *args, **kwargs):  # noqa: ANN001
        return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in qweight)))

    @torch.library.register_fake("lordba::q4_prefill_factors")
    def _factors_fake(sign_A, sign_B, b, m, a, scaling):  # noqa: ANN001
        r, out = m.shape[0], a.shape[0]
        return b.new_empty((r, b.shape[0]), dtype=torch.bfloat16), b.new_empty((out, r), dtype=torch.bfloat16)

    @torch.library.register_fake("lordba::q4_dequant")
    def _dequant_fake(qweight, scale, minus, in_features, bits):  # noqa: ANN001
        return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)

    _FAKES.append(True)
