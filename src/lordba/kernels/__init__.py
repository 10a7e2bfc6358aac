"""Inference kernels of the adapter branch (no gradient needed); see ``docs/kernels.md``.

Pure tensor ops: :func:`packed_branch` takes ``(x, packed signs, scales, scaling, base)`` and
returns the output; it knows nothing of modules, and the adapter modules (:mod:`lordba.nn.adapter`)
keep whatever they cache (signs packed from latents, decoded scales, folded dense factors, the
dispatch limit). The implementation follows the device and the kernel mode (:func:`set_mode`,
:func:`mode`, or ``$LORDBA_KERNEL``):

* ``auto`` (default): on CPU the compiled kernels (:mod:`.cpu`), which choose per call between the
  fused sign-accumulation path (few tokens) and unpack + BLAS (many tokens), see
  :func:`sign_max_tokens`; on CUDA the Triton kernels (:mod:`.triton`) with the same split;
  elsewhere, or where neither is available, the pure-PyTorch fallback (:mod:`.reference`).
* ``sign`` / ``unpack``: force one of the two compiled paths (benchmarks, tests).
* ``dense``: the modules fold the scales into dense factors once and call :func:`dense_branch`
  (fastest prefill, but ``r·(in+out)`` activation-dtype elements per adapter stay in memory: 32×
  the packed signs in float32; the modules' ``cache_nbytes`` reports it).
* ``torch``: the pure-PyTorch reference (unpack on every call).
* ``triton``: the Triton kernels on any device (on CPU only under ``TRITON_INTERPRET=1``: tests).

Scales come as float tensors or as the int8 format's stored tensors (int8 codes), which the CPU
kernels read directly and the other paths decode per call. If the CPU extension cannot be built, a
:class:`KernelFallbackWarning` says why (once) and ``torch`` runs. Under ``torch.compile`` the
CPU op is opaque to dynamo (registered with a fake implementation, :mod:`._fake`). The settings, the
loading of the compiled kernels and the CPU dispatch rule are in :mod:`.runtime` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lordba.core.scales import get_codec
from lordba.kernels import reference
from lordba.kernels.runtime import (
    _NATIVE_DTYPES,
    _STATE,
    BRANCH_COMPUTE,
    BRANCH_COMPUTE_ENV,  # noqa: F401  (re-exported)
    CPU_MODES,
    MODES,
    KernelFallbackWarning,
    bound_calls,
    branch_compute,
    cpu_available,
    cpu_branch_op,  # noqa: F401  (re-exported)
    cpu_isa,
    decode_attention_op,  # noqa: F401  (re-exported)
    dispatch_limit,
    get_mode,
    load_cpu,
    mode,
    preload,
    set_branch_compute,
    set_mode,
    sign_max_tokens,
    triton_available,
    with_branch_compute,
)


def float_scales(
    scale_in: torch.Tensor, scale_mid: torch.Tensor, scale_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 ``(b, m, a)`` from scales as the kernels take them: float tensors, or the int8 scale
    format's stored tensors (int8 codes of ``b`` and ``a`` meaning ``code / 127``, ``m`` in float32)."""
    if scale_in.dtype == torch.int8:
        return get_codec("int8").decode(scale_in, scale_mid, scale_out)
    return scale_in.float(), scale_mid.float(), scale_out.float()


_OP_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def _op_scales(*scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scales as the compiled CPU op reads them: float32 / float16 / bfloat16 / int8 codes as they are, other
    float dtypes (float64: a float64 solver's factors) as their float32 values, which the other paths compute."""
    return tuple(v if v.dtype in _OP_SCALE_DTYPES else v.float() for v in scales)


def packed_branch(
    x: torch.Tensor,
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    scale_in: torch.Tensor,
    scale_mid: torch.Tensor,
    scale_out: torch.Tensor,
    scaling: float,
    base: torch.Tensor | None = None,
    sign_max_tokens: int | None = None,
) -> torch.Tensor:
    """``[base +] s · a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))`` for ``x`` of shape ``[..., in]``: a pure tensor op.

    Args:
        x: the input activations.
        sign_A, sign_B: packed signs (uint8, SPEC §6 order) of the ``r × in`` and ``out × r`` sign matrices.
        scale_in, scale_mid, scale_out: ``b`` (in), ``m`` (r), ``a`` (out): float tensors, or the
            int8 format's stored tensors (see :func:`float_scales`), which the CPU kernels read as they are.
        scaling: ``s``.
        base: the base layer's output for ``x``; then ``base + branch`` in ``base``'s dtype is
            returned (the add is fused into the kernel), else the branch alone in ``x``'s dtype.
        sign_max_tokens: the CPU dispatch limit (:func:`dispatch_limit`), computed when ``None``.

    Returns the output tensor. No gradient flows to ``x`` or the adapter tensors (the kernels have
    no backward; the adapter modules use :mod:`lordba.core.autograd` when one is needed); one still
    flows to ``base``. The implementation follows the kernel mode (module docstring); ``dense`` is
    the modules' business (they keep the folded factors) and runs the reference here.
    """
    if base is not None and base.requires_grad:  # the kernels have no backward: add outside them
        branch = packed_branch(x, sign_A, sign_B, scale_in, scale_mid, scale_out, scaling, None, sign_max_tokens)
        return base + branch.to(base.dtype)
    name = _STATE.mode
    dtype = x.dtype
    native = name not in ("torch", "dense") and dtype in _NATIVE_DTYPES
    native = native and (base is None or base.dtype in _NATIVE_DTYPES)
    if native and x.is_cpu and name != "triton" and (_STATE.cpu.ok if _STATE.cpu is not None else cpu_available()):
        if sign_max_tokens is None:
            sign_max_tokens = dispatch_limit(scale_in.numel(), scale_out.numel(), scale_mid.numel(), dtype, name)
        scale_in, scale_mid, scale_out = _op_scales(scale_in, scale_mid, scale_out)
        return _STATE.op(x, sign_A, sign_B, scale_in, scale_mid, scale_out, scaling, sign_max_tokens, base)
    b, m, a = float_scales(scale_in, scale_mid, scale_out)
    if native and (name == "triton" or (x.is_cuda and triton_available())):
        from lordba.kernels import triton as tri

        return tri.packed_branch(x, sign_A, sign_B, b, m, a, scaling, name, base)
    return reference.packed_branch(x, sign_A, sign_B, b, m, a, scaling, base)


def packed_branch_rows(
    x: torch.Tensor,
    index: torch.Tensor,
    tensors: Sequence[Sequence[torch.Tensor]],
    scalings: Sequence[float],
    base: torch.Tensor,
    sign_max_tokens: Sequence[int] | None = None,
) -> torch.Tensor:
    """``base`` plus, for every batch row ``i`` (dimension 0), the branch of adapter ``index[i]``
    (``-1``: none): many adapters in one call (S-LoRA/Punica's batched LoRA, on packed signs).

    Args:
        x: the input activations ``[B, ..., in]``.
        index: int64 ``[B]``, each row's adapter (a position in ``tensors``) or ``-1``.
        tensors: per adapter, ``(sign_A, sign_B, scale_in, scale_mid, scale_out)`` as
            :func:`packed_branch` takes them.
        scalings: per adapter, ``s``.
        base: the base layer's output ``[B, ..., out]``.
        sign_max_tokens: per adapter, the CPU dispatch limit (:func:`dispatch_limit`), computed when ``None``.

    Returns ``base + branch`` per row, in ``base``'s dtype: each adapter's rows equal, bit for bit,
    :func:`packed_branch` called on those rows alone with their base (the compiled op groups rows by
    adapter and runs each group as that call does; elsewhere this is those calls). No gradient.
    Raises :class:`~lordba.errors.ShapeMismatchError` for an index outside ``[-1, len(tensors))``.
    """
    from lordba.errors import ShapeMismatchError

    count = len(tensors)
    if index.shape != (x.shape[0],):
        raise ShapeMismatchError(f"index must hold one adapter position in [-1, {count}) per batch row of x")
    if sign_max_tokens is None:
        sign_max_tokens = [dispatch_limit(t[2].numel(), t[4].numel(), t[3].numel(), x.dtype) for t in tensors]
    name = _STATE.mode
    native = name in CPU_MODES and x.dtype in _NATIVE_DTYPES and base.dtype in _NATIVE_DTYPES
    # no tokens (an empty batch, or rows of none): the base as it is, from the loop below (the op wants rows,
    # and with rows of no tokens its sign path divided by zero: SIGFPE killed the process)
    native = native and x.numel() > 0
    if (
        native
        and x.is_cpu
        and not base.requires_grad
        and (_STATE.cpu.ok if _STATE.cpu is not None else cpu_available())
    ):
        parts = zip(*((*t[:2], *_op_scales(*t[2:])) for t in tensors)) if tensors else ((),) * 5
        try:
            return _STATE.rows_op(x, index, *parts, scalings, sign_max_tokens, base)
        except RuntimeError as err:  # the op's checks of its arguments (the index range among them)
            if "lordba::branch" not in str(err):
                raise
            raise ShapeMismatchError(str(err).splitlines()[0]) from None
    if index.numel() and not (-1 <= int(index.min()) and int(index.max()) < count):
        raise ShapeMismatchError(f"index must hold one adapter position in [-1, {count}) per batch row of x")
    out = base.clone()
    for k in range(count):
        rows = (index == k).nonzero().flatten()
        if rows.numel():
            y = packed_branch(x[rows], *tensors[k], scalings[k], base[rows], sign_max_tokens[k])
            out[rows] = y.to(out.dtype)
    return out


def dense_branch(
    x: torch.Tensor, folded_A: torch.Tensor, folded_B: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """The branch from folded dense factors ``A' = S_A diag(b)`` (r×in), ``B' = s diag(a) S_B diag(m)``
    (out×r), as :func:`lordba.core.autograd.fold_factors` makes them (the ``dense`` kernel mode)."""
    if base is not None and base.requires_grad:
        return base + reference.dense_branch(x, folded_A, folded_B).to(base.dtype)
    return reference.dense_branch(x, folded_A, folded_B, base)


__all__ = [
    "BRANCH_COMPUTE",
    "CPU_MODES",
    "MODES",
    "KernelFallbackWarning",
    "bound_calls",
    "branch_compute",
    "cpu_available",
    "cpu_isa",
    "dense_branch",
    "dispatch_limit",
    "float_scales",
    "get_mode",
    "load_cpu",
    "mode",
    "packed_branch",
    "packed_branch_rows",
    "preload",
    "set_branch_compute",
    "set_mode",
    "sign_max_tokens",
    "triton_available",
    "with_branch_compute",
]
