"""Single-layer (and batched) conversion of a LoRA pair, for training initialisation (``qat-from-lora``).

Scaling convention::

    lordba_scaling · diag(scale_out) sign_B diag(scale_mid) sign_A diag(scale_in)  ≈  scaling · B A

``scaling`` is the LoRA's (PEFT: ``lora_alpha / r``, or ``/ √r`` with rsLoRA), ``lordba_scaling``
the LoRDBA adapter's own ``s = alpha / r``; their ratio is folded into the scales. With
``scale_dtype`` given, the returned scales are exactly what that codec stores (``decode(encode(·))``,
with ``scale_mid`` refitted after rounding), so a layer initialised with them and run through the
codec's ``fake_quant`` reproduces the reported error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lordba.convert.groups import SolverOptions, solve_group
from lordba.core.scales import get_codec
from lordba.errors import ConversionError, ShapeMismatchError


@dataclass
class FactorResult:
    """A converted layer: ±1 float32 signs, float32 scales and statistics."""

    sign_A: torch.Tensor  # [r, in], entries ±1
    sign_B: torch.Tensor  # [out, r], entries ±1
    scale_in: torch.Tensor  # b [in]
    scale_mid: torch.Tensor  # m [r]
    scale_out: torch.Tensor  # a [out]
    rel_error: float  # ‖ΔW − ΔW'‖_F / ‖ΔW‖_F with the returned (stored) scales
    rel_error_init: float  # of the closed-form starting point
    rel_error_weighted: float | None  # of the activation-weighted objective, if weighted
    rmr_A: float  # residual-to-magnitude ratio of A as given
    rmr_B: float
    rmr_A_gauge: float  # of the pair that seeded the solver (the gauge used)
    rmr_B_gauge: float
    iterations: int
    gauge: str

    def delta_weight(self, lordba_scaling: float = 1.0) -> torch.Tensor:
        """The dense ``out × in`` ΔW' (for checks on small layers)."""
        left = self.scale_out[:, None] * self.sign_B * self.scale_mid[None, :]
        return lordba_scaling * left @ (self.sign_A * self.scale_in[None, :])


def _check(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ShapeMismatchError(
            f"expected A [L, r0, in] and B [L, out, r0] with the same L and r0, got {tuple(A.shape)} and "
            f"{tuple(B.shape)}"
        )
    if type(r) is not int or r < 1:
        raise ShapeMismatchError(f"r must be a positive integer, got {r!r}")
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise ConversionError("the LoRA factors hold NaN or infinite values")


def convert_factors_batched(
    A: torch.Tensor,
    B: torch.Tensor,
    r: int,
    scaling: float | torch.Tensor = 1.0,
    lordba_scaling: float | torch.Tensor = 1.0,
    *,
    scale_dtype: str | None = None,
    input_moments: torch.Tensor | None = None,
    options: SolverOptions | None = None,
) -> list[FactorResult]:
    """Convert ``L`` LoRA pairs of equal shape (``A`` [L, r0, in], ``B`` [L, out, r0]) in one batch;
    ``scaling`` and ``lordba_scaling`` are scalars or [L]; ``input_moments`` [L, in] optional. Raises
    :class:`ConversionError` for a pair whose scales ``scale_dtype`` cannot hold (overflow, or underflow to 0)."""
    _check(A, B, r)
    n = A.shape[0]
    factor = torch.as_tensor(scaling, dtype=torch.float64).expand(n) / torch.as_tensor(
        lordba_scaling, dtype=torch.float64
    ).expand(n)
    codec = get_codec(scale_dtype) if scale_dtype is not None else None
    res = solve_group(B.detach(), A.detach(), r, factor, codec, options or SolverOptions(), input_moments)
    res.check_stored(scale_dtype, [f"pair {i}" for i in range(n)])
    f = res.factors
    out = []
    for i in range(n):
        weighted = None if res.rel_error_weighted is None else float(res.rel_error_weighted[i])
        out.append(
            FactorResult(
                sign_A=f.sign_A[i],
                sign_B=f.sign_B[i],
                scale_in=f.b[i],
                scale_mid=f.m[i],
                scale_out=f.a[i],
                rel_error=float(res.rel_error[i]),
                rel_error_init=float(res.rel_error_init[i]),
                rel_error_weighted=weighted,
                rmr_A=float(res.rmr_A[i]),
                rmr_B=float(res.rmr_B[i]),
                rmr_A_gauge=float(res.rmr_A_gauge[i]),
                rmr_B_gauge=float(res.rmr_B_gauge[i]),
                iterations=int(res.iterations[i]),
                gauge=res.gauges[i],
            )
        )
    return out


def convert_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    r: int,
    scaling: float = 1.0,
    lordba_scaling: float = 1.0,
    *,
    scale_dtype: str | None = None,
    input_moments: torch.Tensor | None = None,
    options: SolverOptions | None = None,
) -> FactorResult:
    """Convert one LoRA pair ``A`` [r0, in], ``B`` [out, r0] to a rank-``r`` double-binary factorisation
    with ``lordba_scaling · diag(a) S_B diag(m) S_A diag(b) ≈ scaling · B A`` (module docstring)."""
    if A.dim() != 2 or B.dim() != 2:
        raise ShapeMismatchError(f"expected A [r0, in] and B [out, r0], got {tuple(A.shape)} and {tuple(B.shape)}")
    moments = None if input_moments is None else input_moments[None]
    return convert_factors_batched(
        A[None], B[None], r, scaling, lordba_scaling, scale_dtype=scale_dtype, input_moments=moments, options=options
    )[0]
