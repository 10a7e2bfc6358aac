"""Inference kernels of the adapter branch (no gradient needed); see ``docs/kernels.md``.

:func:`packed_branch` is the one entry point the layer calls. It picks an implementation by device
and by the kernel mode (:func:`set_mode`, :func:`mode`, or ``$LORDBA_KERNEL``):

* ``auto`` (default): on CPU the compiled kernels (:mod:`.cpu`), which choose per call between the
  fused sign-accumulation path (few tokens) and unpack + BLAS (many tokens), see
  :func:`sign_max_tokens`; on CUDA the Triton kernels (:mod:`.triton`) with the same split;
  elsewhere, or where neither is available, the pure-PyTorch fallback (:mod:`.reference`).
* ``sign`` / ``unpack``: force one of the two compiled paths (benchmarks, tests).
* ``dense``: fold the scales into dense factors once per adapter and keep them (fastest prefill,
  but ``r·(in+out)`` activation-dtype elements per adapter stay in memory: 32× the packed signs in
  float32; :func:`cache.cache_nbytes` reports it).
* ``torch``: the pure-PyTorch reference (unpack on every call).
* ``triton``: the Triton kernels on any device (on CPU only under ``TRITON_INTERPRET=1``: tests).

Only packed signs and decoded scales are kept in memory in every mode but ``dense``; a compact
adapter (:meth:`~lordba.nn.layer.DoubleBinaryAdapter.compact`, what loading for inference gives) keeps
its scales as stored (int8 codes), which the CPU kernels read directly and other paths decode per call. If the CPU
extension cannot be built, a :class:`KernelFallbackWarning` says why (once) and ``torch`` runs.
A latent adapter without gradient runs the same kernel on its signs packed on the fly, so an
adapter gives bit-identical outputs in latent and in packed form (save → load is exact).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from lordba.kernels import cache, reference
from lordba.kernels.cpu import BuildResult

if TYPE_CHECKING:
    from lordba.nn.layer import DoubleBinaryAdapter

MODES = ("auto", "sign", "unpack", "dense", "torch", "triton")
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALL_TOKENS = 1 << 62


class KernelFallbackWarning(UserWarning):
    """The compiled kernels are unavailable and the (slower) pure-PyTorch branch runs instead."""


class _State:
    mode: str = os.environ.get("LORDBA_KERNEL", "auto")
    cpu: BuildResult | None = None  # None: not tried yet
    isa: str = "portable"  # instruction set the CPU kernels were built for
    op: object = None  # torch.ops.lordba.branch.default, bound once
    triton: bool | None = None


_STATE = _State()
if _STATE.mode not in MODES:
    warnings.warn(f"LORDBA_KERNEL={_STATE.mode!r} is not one of {MODES}; using 'auto'", stacklevel=1)
    _STATE.mode = "auto"


def get_mode() -> str:
    """The current kernel mode (one of :data:`MODES`)."""
    return _STATE.mode


def set_mode(name: str) -> None:
    """Set the kernel mode for every adapter (see the module docstring)."""
    from lordba.errors import ConfigError

    if name not in MODES:
        raise ConfigError(f"kernel mode must be one of {MODES}, got {name!r}")
    _STATE.mode = name


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Run the block in kernel mode ``name``, then restore the previous mode."""
    previous = get_mode()
    set_mode(name)
    try:
        yield
    finally:
        _STATE.mode = previous


@torch.compiler.disable
def load_cpu(build: bool = True, warn: bool = True) -> BuildResult:
    """Load the CPU extension, compiling it first if needed and ``build``; remembered for the process
    once it has loaded or a build was attempted. Warns (:class:`KernelFallbackWarning`) on failure."""
    from lordba.kernels import cpu

    if _STATE.cpu is not None:
        return _STATE.cpu
    result = cpu.load(build=build)
    if result.ok or build:
        _STATE.cpu = result
    if result.ok:
        from lordba.kernels import _fake  # noqa: F401  (fake implementation for torch.compile)

        _STATE.isa = torch.ops.lordba.isa()
        _STATE.op = torch.ops.lordba.branch.default
    elif build and warn:
        warnings.warn(
            f"lordba: compiled CPU kernels unavailable ({result.message.splitlines()[0]}); using the "
            "pure-PyTorch branch (slower at decode). `lordba build-kernels` shows the details.",
            KernelFallbackWarning,
            stacklevel=3,
        )
    return result


def cpu_available() -> bool:
    """Whether the compiled CPU kernels are loaded (building them on first call)."""
    result = _STATE.cpu
    if result is None:
        result = load_cpu()
    return result.ok


@torch.compiler.disable
def _load_triton() -> bool:
    from lordba.kernels import triton as tri

    _STATE.triton = tri.available()
    return _STATE.triton


def triton_available() -> bool:
    """Whether the Triton kernels can run (``triton`` importable and a CUDA device present)."""
    return _STATE.triton if _STATE.triton is not None else _load_triton()


def sign_max_tokens(in_features: int, out_features: int, r: int, dtype: torch.dtype, isa: str | None = None) -> int:
    """``auto`` rule on CPU: the fused sign path for at most this many tokens, unpack + BLAS above.

    Crossovers measured on a Xeon (Sapphire Rapids), one thread, float32 and bfloat16, shapes of
    SmolLM2 and Llama-7B, r ∈ {8, 16, 64} (see docs/kernels.md). With AVX-512 the masked-add sign
    path wins up to ~16-24 float32 tokens (~32 at ``in`` = 4096), and about twice that in
    bfloat16, whose small BLAS calls are slow. The AVX2 build wins at a single float32 token only.
    ``isa``: ``torch.ops.lordba.isa()``.
    """
    isa = isa or _STATE.isa
    low = dtype != torch.float32
    if isa == "avx512":
        limit = 32 if 2048 < in_features <= 4096 else 16
        return 2 * limit if low else limit
    if low:
        return 16 if in_features <= 2048 else 4
    return 1


def _limit(name: str, adapter: DoubleBinaryAdapter, dtype: torch.dtype) -> int:
    if name == "sign":
        return _ALL_TOKENS
    if name == "unpack":
        return -1
    return sign_max_tokens(adapter.in_features, adapter.out_features, adapter.r, dtype)


def packed_branch(
    x: torch.Tensor,
    adapter: DoubleBinaryAdapter,
    b: torch.Tensor | None = None,
    m: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Branch output of ``adapter`` (packed, or latent: packed on the fly) for ``x`` ``[..., in]``.

    ``b, m, a``: decoded scales (default: the adapter's, cached until its parameters change).
    With ``base`` (the base layer's output for ``x``) returns ``base + branch`` in ``base``'s dtype,
    fused into the kernel; else the branch alone in ``x``'s dtype. No gradient flows to the adapter
    or ``x`` (the layer takes this path only when none is needed); one still flows to ``base``.
    """
    if base is not None and base.requires_grad:  # the kernels have no backward: add outside them
        return base + packed_branch(x, adapter, b, m, a).to(base.dtype)
    if torch.compiler.is_compiling():
        return _traced(x, adapter, b, m, a, base)
    name = _STATE.mode
    if name == "dense":
        folded_A, folded_B = cache.dense(adapter, x.dtype)
        return reference.dense_branch(x, folded_A, folded_B, base)
    buffers = adapter._buffers  # direct dict access: this runs once per layer and token
    stored = b is None and "scale_in" in buffers  # compact: the CPU kernels read its stored scales
    if stored:
        b, m, a = buffers["scale_in"], buffers["scale_mid"], buffers["scale_out"]
    elif b is None:
        b, m, a = cache.scales(adapter)
    sign_A, sign_B = cache.signs(adapter)
    dtype = x.dtype
    native = name != "torch" and dtype in _NATIVE_DTYPES and (base is None or base.dtype in _NATIVE_DTYPES)
    if native and x.is_cpu and name != "triton" and (_STATE.cpu.ok if _STATE.cpu is not None else cpu_available()):
        limit = cache.limit(adapter, (name, dtype), lambda: _limit(name, adapter, dtype))
        return _STATE.op(x, sign_A, sign_B, b, m, a, adapter.scaling, limit, base)
    if stored:  # the other paths take float32 scales
        b, m, a = adapter.codec.decode(b, m, a)
    if native and (name == "triton" or (x.is_cuda and triton_available())):
        from lordba.kernels import triton as tri

        return tri.branch(x, sign_A, sign_B, b, m, a, adapter.scaling, name, base)
    return reference.branch(x, sign_A, sign_B, b, m, a, adapter.scaling, base)


def _traced(
    x: torch.Tensor,
    adapter: DoubleBinaryAdapter,
    b: torch.Tensor | None,
    m: torch.Tensor | None,
    a: torch.Tensor | None,
    base: torch.Tensor | None,
) -> torch.Tensor:
    """Under ``torch.compile``: no caches (version counters do not trace); the op is opaque to dynamo."""
    if b is None:
        b, m, a = adapter.scales()
    name = _STATE.mode
    native = x.dtype in _NATIVE_DTYPES and (base is None or base.dtype in _NATIVE_DTYPES)
    if adapter.is_packed and name not in ("torch", "dense") and native:
        sign_A, sign_B = adapter.sign_A, adapter.sign_B
        if name == "triton" or (x.device.type == "cuda" and triton_available()):
            from lordba.kernels import triton as tri

            return tri.branch(x, sign_A, sign_B, b, m, a, adapter.scaling, name, base)
        if x.device.type == "cpu" and cpu_available():
            limit = _limit(name, adapter, x.dtype)
            return torch.ops.lordba.branch(x, sign_A, sign_B, b, m, a, adapter.scaling, limit, base)
    sign_A, sign_B = adapter.signs(x.dtype)
    from lordba.core.autograd import reference_delta

    delta = reference_delta(x, sign_A, sign_B, b, m, a, adapter.scaling)
    return delta if base is None else base + delta.to(base.dtype)


_ROUTES: dict[tuple, dict[str, torch.Tensor]] = {}


def route_index(names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """``{adapter name: row indices}`` for a mixed batch, built once per distinct ``names`` and
    shared by every layer of a forward (a small bounded cache)."""
    key = (tuple(names), device)
    found = _ROUTES.get(key)
    if found is None:
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)
        found = {n: torch.tensor(r, dtype=torch.long, device=device) for n, r in rows.items()}
        if len(_ROUTES) >= 64:
            _ROUTES.pop(next(iter(_ROUTES)))
        _ROUTES[key] = found
    return found


__all__ = [
    "MODES",
    "KernelFallbackWarning",
    "cache",
    "cpu_available",
    "get_mode",
    "load_cpu",
    "mode",
    "packed_branch",
    "route_index",
    "set_mode",
    "sign_max_tokens",
    "triton_available",
]
