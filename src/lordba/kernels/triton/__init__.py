"""GPU path of the packed branch: Triton kernels behind the torch op ``lordba::triton_branch``.

Two strategies, as on CPU (chosen per call by the number of tokens T):

* fused (decode, ``T ≤ sign_max_tokens``): :func:`~.kernels.shrink` computes ``S_A (b ⊙ x)`` from the
  sign bits, split over ``in``; :func:`~.kernels.expand` sums the splits, scales by ``m``, applies
  ``S_B`` from its bits, scales by ``s·a`` and adds the base output. Two launches, nothing unpacked.
* unpack (prefill): :func:`~.kernels.unpack` writes the folded dense factors ``A' = S_A diag(b)``
  and ``B' = s diag(a) S_B diag(m)`` (fresh tensors from the caching allocator, which reuses their
  memory), then ``addmm(base, x A'ᵀ, B'ᵀ)`` runs on cuBLAS.

The op is registered with a fake implementation, so ``torch.compile`` traces through it. On CPU
tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET``): that is how the test suite
checks them without a GPU; it is slow and meant for tests only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from lordba.errors import ConfigError
from lordba.kernels._fake import branch_fake
from lordba.kernels.reference import dense_branch

# Fused kernels up to this many tokens, unpack + cuBLAS above, by the rank padded to a power of two
# (at least 16). Measured on an H200 (docs/results/gpu-h200, bfloat16, SmolLM2 and Llama-7B shapes,
# calls replayed from a CUDA graph): at r ≤ 16 the fused kernels win or tie up to 256 tokens, at
# r = 64 up to 16 (their (tokens × rank) tiles grow past what one program holds well); r = 32 lies
# between (64: interpolated, not measured).
DECODE_MAX_TOKENS = {16: 256, 32: 64}
DECODE_MAX_TOKENS_WIDE = 16  # rank above 32


def available() -> bool:
    """Whether the Triton path can run on a GPU here (``triton`` importable and CUDA present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=4096)
def _plan(T: int, in_f: int, r: int, out_f: int) -> tuple:
    """The fused kernels' launch of a shape, worked out once: ``(rp, bt, bk, k_split, splits, shrink grid,
    expand grid, bo)`` (the split over ``in`` keeps a single token filling the GPU)."""
    rp = _pow2(r, 16)
    bt = 16 if T <= 16 else 32 if T <= 32 else 64
    bk, bo = 128, 64
    t_blocks = triton_cdiv(T, bt)
    chunks = triton_cdiv(in_f, bk)
    splits = max(1, min(chunks, 128 // t_blocks))
    k_split = triton_cdiv(chunks, splits) * bk
    splits = triton_cdiv(in_f, k_split)
    return rp, bt, bk, k_split, splits, (t_blocks, splits), (t_blocks, triton_cdiv(out_f, bo)), bo


def _fused(
    k: dict,
    x2: torch.Tensor,
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    base2: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    T, in_f = x2.shape
    r, out_f = m.numel(), a.numel()
    rp, bt, bk, k_split, splits, grid_s, grid_e, bo = _plan(T, in_f, r, out_f)
    part = torch.empty((splits, T, rp), dtype=torch.float32, device=x2.device)
    k["shrink"][grid_s](x2, sign_A, b, part, T, in_f, r, k_split, BT=bt, BK=bk, RP=rp)
    y = torch.empty((T, out_f), dtype=out_dtype, device=x2.device)
    base_arg = base2 if base2 is not None else y
    k["expand"][grid_e](
        part,
        sign_B,
        m,
        a,
        base_arg,
        y,
        T,
        out_f,
        r,
        splits,
        float(scaling),
        HAS_BASE=base2 is not None,
        BT=bt,
        BO=bo,
        RP=rp,
    )
    return y


def _unpacked(
    k: dict,
    x2: torch.Tensor,
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    base2: torch.Tensor | None,
) -> torch.Tensor:
    in_f = x2.shape[1]
    r, out_f = m.numel(), a.numel()
    folded_A = torch.empty((r, in_f), dtype=x2.dtype, device=x2.device)
    folded_B = torch.empty((out_f, r), dtype=x2.dtype, device=x2.device)
    br, bc = 16, 128
    k["unpack"][(triton_cdiv(r, br), triton_cdiv(in_f, bc))](
        sign_A, b, b, folded_A, r, in_f, 1.0, HAS_ROW=False, BR=br, BC=bc
    )
    rc = _pow2(r, 16)
    k["unpack"][(triton_cdiv(out_f, 64), triton_cdiv(r, rc))](
        sign_B, a, m, folded_B, out_f, r, float(scaling), HAS_ROW=True, BR=64, BC=rc
    )
    return dense_branch(x2, folded_A, folded_B, base2)


_KERNELS: dict = {}


def _load_kernels() -> dict:
    """The Triton kernels, imported on first use (Triton decides then whether they are interpreted)."""
    from lordba.kernels.triton import kernels

    _KERNELS.update(shrink=kernels.shrink, expand=kernels.expand, unpack=kernels.unpack)
    return _KERNELS


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def triton_cdiv(n: int, d: int) -> int:
    """``ceil(n / d)`` for positive integers."""
    return -(-n // d)


def decode_max_tokens(r: int) -> int:
    """The ``auto`` rule: the fused sign kernels for at most this many tokens at rank ``r``."""
    return DECODE_MAX_TOKENS.get(_pow2(r, 16), DECODE_MAX_TOKENS_WIDE)


def _triton_branch(
    x: torch.Tensor,
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    sign_max_tokens: int,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[base +] s · a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))`` with Triton kernels (interpreter on CPU tensors)."""
    on_gpu = x.is_cuda
    if not on_gpu and not _interpreting():
        raise ConfigError(
            "kernel mode 'triton' (lordba::triton_branch) runs on CUDA tensors; on CPU only in Triton's interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported): use another kernel mode (lordba.kernels.set_mode)"
        )
    k = _KERNELS or _load_kernels()
    in_f, out_f = b.numel(), a.numel()
    shape = (*x.shape[:-1], out_f)
    x2 = x.reshape(-1, in_f).contiguous()
    base2 = None if base is None else base.reshape(-1, out_f).contiguous()
    out_dtype = x.dtype if base is None else base.dtype
    args = (
        sign_A.contiguous(),
        sign_B.contiguous(),
        b.float().contiguous(),
        m.float().contiguous(),
        a.float().contiguous(),
        scaling,
    )
    if x2.shape[0] == 0:  # no tokens: nothing to launch (the fused kernels' plan has no token blocks)
        return x2.new_empty(shape, dtype=out_dtype)
    # Triton launches on the current device: switch only where x lives elsewhere (the switch costs a few µs)
    other = on_gpu and x.get_device() != torch.cuda.current_device()
    with torch.cuda.device(x.device) if other else contextlib.nullcontext():
        if x2.shape[0] > sign_max_tokens:
            y = _unpacked(k, x2, *args, base2)
        else:
            y = _fused(k, x2, *args, base2, out_dtype)
    return y.reshape(shape)


triton_branch = torch.library.custom_op("lordba::triton_branch", _triton_branch, mutates_args=())
triton_branch.register_fake(branch_fake)


def packed_branch(
    x: torch.Tensor,
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    mode: str = "auto",
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton branch; ``mode`` ``sign``/``unpack`` forces a strategy, else :func:`decode_max_tokens`.

    Under ``torch.compile``, another tracer (``make_fx``, export: a dispatch mode is active) or a tensor
    subclass it is the op ``lordba::triton_branch`` (traced through its fake); run eagerly on plain
    tensors it calls the op's function directly: the dispatcher's per-call cost would otherwise be a
    large part of a decode step's time on a GPU (the kernels themselves take microseconds)."""
    limit = {"sign": 1 << 62, "unpack": -1}.get(mode)
    limit = decode_max_tokens(m.numel()) if limit is None else limit
    if type(x) is torch.Tensor and _current_dispatch_mode() is None and not torch.compiler.is_compiling():
        return _triton_branch(x, sign_A, sign_B, b, m, a, float(scaling), limit, base)
    return torch.ops.lordba.triton_branch(x, sign_A, sign_B, b, m, a, float(scaling), limit, base)
