"""Batched conversion of layers of equal shape: gauge → solver → storage codec → statistics.

Scaling convention (used by every public entry point): the LoRA computes ``ΔW = scaling · B A``,
the LoRDBA adapter ``ΔW' = s · diag(a) S_B diag(m) S_A diag(b)`` with its own ``s = alpha / r``.
The solver fits ``D = diag(a) S_B diag(m) S_A diag(b)`` to ``T = (scaling / s) · B A``, so the
difference of the two scalings is folded into the scales and ``ΔW' ≈ ΔW``.

Activation-aware weighting: with input second moments ``i`` (mean ``x_j²`` per input channel) the
objective becomes ``‖(T − D) diag(√i)‖_F``. Since ``D diag(w) = diag(a) S_B diag(m) S_A diag(b ⊙ w)``
this is the unweighted problem for ``T diag(w)`` with ``b' = b ⊙ w``; ``b = b' / w`` at the end.

After solving, the scales go through the storage codec (fp16/bf16 rounding or int8 codes), ``m``
is refitted by least squares against the rounded ``a, b``, and every reported error is computed in
float64 on what is stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from lordba.convert.admm import admm
from lordba.convert.factorize import Factors, Target, ls_scale_mid, relative_error, rmr
from lordba.convert.gauge import GAUGES, initial_factors
from lordba.convert.solver import solve
from lordba.core.scales import ScaleCodec
from lordba.errors import ConfigError, ConversionError

METHODS = ("bcd", "admm", "admm+bcd", "init")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SolverOptions:
    """How to solve. ``gauge``: ``svd`` | ``lora`` | ``rotation`` | ``best`` (solve from ``svd`` and
    ``lora``, keep the lower error per layer); ``method``: ``admm+bcd`` (default: ``admm_iters``
    DBF-style ADMM iterations, kept only where they beat the start, then exact block-coordinate
    descent), ``bcd`` (block-coordinate descent alone: exact sign updates + least-squares scales),
    ``admm`` (ADMM + least-squares scales), or ``init`` (the gauge's closed form only, Eq. 7 for
    ``svd``); ``iters``/``tol``: BCD iteration cap and relative-improvement stop; ``dtype``: working
    precision (``float32`` or ``float64``; statistics are always float64). The defaults were picked
    by measurement (``docs/conversion.md``): ``admm+bcd`` with 20 ADMM iterations of one inner
    step each (``admm_inner``; DBF uses 3) beats ``bcd`` on every adapter measured, at about the
    same time."""

    gauge: str = "svd"
    method: str = "admm+bcd"
    iters: int = 30
    tol: float = 1e-3
    max_sweeps: int = 16
    dtype: str = "float32"
    rotation_steps: int = 100
    admm_iters: int = 20
    admm_inner: int = 1

    def __post_init__(self) -> None:
        if self.gauge not in (*GAUGES, "best"):
            raise ConfigError(f"gauge must be one of {(*GAUGES, 'best')}, got {self.gauge!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        for name in ("iters", "admm_iters", "admm_inner", "rotation_steps", "max_sweeps"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not (self.tol >= 0):
            raise ConfigError(f"tol must be >= 0, got {self.tol!r}")


@dataclass
class GroupResult:
    """Per layer of a batch [L]: the stored factors (decoded, float32) and statistics."""

    factors: Factors
    rel_error: torch.Tensor  # ‖ΔW − ΔW'‖/‖ΔW‖ on the stored values (unweighted)
    rel_error_float: torch.Tensor  # before the codec
    rel_error_init: torch.Tensor  # of the starting point (before the codec; unweighted)
    rel_error_weighted: torch.Tensor | None
    target_norm: torch.Tensor  # ‖factor · B A‖_F (float64)
    rmr_A: torch.Tensor  # of the LoRA factors as given
    rmr_B: torch.Tensor
    rmr_A_gauge: torch.Tensor  # of the seeding pair of the gauge used
    rmr_B_gauge: torch.Tensor
    iterations: torch.Tensor
    gauges: list[str] = field(default_factory=list)

    def check_stored(self, scale_dtype: str | None, names: Sequence[str]) -> None:
        """:class:`ConversionError` naming the first layer (``names``, one per layer) whose scales the codec could
        not hold: they overflowed it (an error of NaN) or underflowed to zero (the stored ΔW' is 0 where the
        unrounded factors fit), e.g. a ΔW of norm 1e15 or 1e-25 with ``scale_dtype="float16"``."""
        for i, name in enumerate(names):
            err, unrounded = float(self.rel_error[i]), float(self.rel_error_float[i])
            if float(self.target_norm[i]) > 0 and not (math.isfinite(err) and (err < 0.999 or unrounded >= 0.99)):
                raise ConversionError(
                    f"{name}: its scales do not fit scale_dtype {scale_dtype!r} (ΔW's norm "
                    f"{float(self.target_norm[i]):.3g}: the stored adapter's error is {err:.3g}, the unrounded "
                    f"factors' {unrounded:.3g}); convert with scale_dtype 'int8' or 'float32'"
                )


def _error64(t64: Target, f: Factors) -> torch.Tensor:
    """:func:`relative_error` in float64 (``t64``: the target in float64). In float32 the Gram identity's
    cancellation (``‖T‖² − 2⟨T, D⟩ + ‖D‖²``) leaves errors below ~1e-3 as noise: comparisons of near-exact
    fits (ADMM against its start, one gauge against another) picked the worse one."""
    return relative_error(t64, Factors(*(x.double() for x in (f.sign_A, f.sign_B, f.b, f.m, f.a))))


def _solve_from(
    t: Target, r: int, gauge: str, opts: SolverOptions, t64: Target, plain64: Target, w: torch.Tensor | None
) -> tuple[Factors, dict[str, torch.Tensor], str]:
    """Solve the (weighted) target ``t`` from gauge ``gauge``; the statistics' ``"init"`` is the start's
    error on the unweighted target ``plain64`` (ΔW, as every reported error), ``w`` the weights of ``t``;
    ``t64``, ``plain64``: the targets in float64, in which the errors are compared."""
    f, rho_A, rho_B, used = initial_factors(t, r, gauge, opts.rotation_steps)
    init_err = _error64(t64, f)
    init_plain = init_err if w is None else _error64(plain64, replace(f, b=f.b / w))
    iters = torch.zeros_like(init_err, dtype=torch.long)
    live = (t.norm2 > 0).nonzero()[:, 0]  # a zero target is fitted exactly by the start
    if opts.method in ("admm", "admm+bcd") and opts.admm_iters > 0 and live.numel():
        sub = t.select(live)
        g = admm(sub, f.select(live), iters=opts.admm_iters, inner=opts.admm_inner)
        # ADMM is not monotone: keep its result only where it beats the start (never worse than Eq. 7)
        wins = (_error64(t64.select(live), g) < init_err[live]).nonzero()[:, 0]
        f.assign(live[wins], g.select(wins))
        iters += opts.admm_iters
    if opts.method in ("bcd", "admm+bcd"):
        iters += solve(t, f, opts.iters, opts.tol, opts.max_sweeps).iterations
    stats = {"init": init_plain, "rho_A": rho_A, "rho_B": rho_B, "iters": iters}
    return f, stats, used


def _balance(f: Factors) -> None:
    """Equalise the RMS of ``a``, ``m``, ``b`` (their product is unchanged): keeps every vector well
    inside the fp16 range whatever the magnitude of ΔW."""
    rms = [v.double().pow(2).mean(-1).sqrt() for v in (f.a, f.m, f.b)]  # float64: x² of a float32 1e20 is inf
    ok = (rms[0] > 0) & (rms[1] > 0) & (rms[2] > 0)
    g = (rms[0] * rms[1] * rms[2]).clamp(min=1e-300).pow(1.0 / 3.0)
    f.a, f.m, f.b = (
        torch.where(ok[:, None], v * (g / x.clamp(min=1e-300)).to(v.dtype)[:, None], v)
        for v, x in zip((f.a, f.m, f.b), rms)
    )


def _stored(t: Target, f: Factors, codec: ScaleCodec | None, w: torch.Tensor | None, unit: torch.Tensor) -> Factors:
    """Factors as the codec stores them, with ``m`` refitted (against the weighted target ``t``, which is
    the target divided by ``unit``) to the rounded ``a`` and ``b``; ``f`` and the result are in the
    unweighted gauge."""
    if codec is None:
        return f

    def roundtrip(b: torch.Tensor, m: torch.Tensor, a: torch.Tensor) -> list[torch.Tensor]:
        # per layer: a codec scales each vector by its own maximum (int8)
        per_layer = [codec.decode(*codec.encode(*v)) for v in zip(b, m, a)]
        return [torch.stack([x[i] for x in per_layer]).to(f.b.dtype) for i in range(3)]

    b, m, a = roundtrip(f.b, f.m, f.a)
    q = Factors(f.sign_A, f.sign_B, b if w is None else b * w, m, a / unit[:, None])
    b, m, a = roundtrip(b, ls_scale_mid(t, q), a)
    return Factors(f.sign_A, f.sign_B, b, m, a)


def solve_group(
    B: torch.Tensor,
    A: torch.Tensor,
    r: int,
    factor: torch.Tensor,
    codec: ScaleCodec | None,
    opts: SolverOptions,
    input_moments: torch.Tensor | None = None,
) -> GroupResult:
    """Convert a batch of LoRA pairs ``B`` [L, out, k], ``A`` [L, k, in] to rank ``r``, fitting
    ``factor[l] · B[l] A[l]`` (``factor = scaling / s``), optionally weighted by ``input_moments`` [L, in]."""
    dt = _DTYPES[opts.dtype]
    P64 = B.double() * factor.double()[:, None, None]
    Q = A.to(dt)
    w = None
    if input_moments is not None:
        w = input_moments.to(torch.float64).clamp(min=0).sqrt()
        w = w / w.mean(-1, keepdim=True).clamp(min=1e-300)
        w = w.clamp(min=1e-6).to(dt)
        Q = Q * w[:, None, :]
    # solved for T / ‖T‖ (‖a‖ carries the norm back): a ΔW of 1e-18 gave float32 Gram entries below the normal
    # range and fell under ADMM's absolute floor, which lost accuracy (a relative error of 0.59 for 0.56)
    norm = Target.of(P64, Q.double()).norm2.sqrt()
    unit = torch.where(norm > 0, norm, 1.0)
    P = (P64 / unit[:, None, None]).to(dt)
    # ΔW's rounding tail is the factors' own (float32 LoRA factors solved in float64: their 1e-7, not 1e-16), at
    # most float32's: an exactly rank-4 LoRA of rank 16 read as rank 16, Eq. 7 spent 12 components on its noise
    source_eps = min(max(torch.finfo(A.dtype).eps, torch.finfo(B.dtype).eps), torch.finfo(torch.float32).eps)
    t = Target.of(P, Q, max(source_eps, torch.finfo(dt).eps))
    t64 = Target.of(P.double(), Q.double())
    plain64 = t64 if w is None else Target.of(P.double(), A.to(dt).double())
    gauges = ["svd", "lora"] if opts.gauge == "best" else [opts.gauge]
    best, stats, used = _solve_from(t, r, gauges[0], opts, t64, plain64, w)
    used_per_layer = [used] * B.shape[0]
    for gauge in gauges[1:]:
        f, st, g = _solve_from(t, r, gauge, opts, t64, plain64, w)
        win = _error64(t64, f) < _error64(t64, best)
        best.assign(win.nonzero()[:, 0], f.select(win.nonzero()[:, 0]))
        for key in stats:
            stats[key] = torch.where(win, st[key], stats[key])
        used_per_layer = [g if wi else u for wi, u in zip(win.tolist(), used_per_layer)]
    if w is not None:
        best.b = best.b / w
    best.a = best.a * unit.to(dt)[:, None]
    _balance(best)
    stored = _stored(t, best, codec, w, unit.to(dt))
    final, rel_float, weighted, norm = _errors(B, A, factor, stored, best, w)
    out = Factors(*(x.float() for x in (stored.sign_A, stored.sign_B, stored.b, stored.m, stored.a)))
    return GroupResult(
        factors=out,
        rel_error=final.float(),
        rel_error_float=rel_float.float(),
        rel_error_init=stats["init"].float(),
        rel_error_weighted=None if weighted is None else weighted.float(),
        target_norm=norm,
        rmr_A=rmr(A).float(),
        rmr_B=rmr(B).float(),
        rmr_A_gauge=stats["rho_A"].float(),
        rmr_B_gauge=stats["rho_B"].float(),
        iterations=stats["iters"],
        gauges=used_per_layer,
    )


def _errors(
    B: torch.Tensor, A: torch.Tensor, factor: torch.Tensor, stored: Factors, solved: Factors, w: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Float64 relative errors of the stored and of the unrounded factors (same signs), of the
    stored ones on the weighted objective, and the target's norm."""
    signs = (stored.sign_A.double(), stored.sign_B.double())

    def as64(f: Factors, b: torch.Tensor | None = None) -> Factors:
        return Factors(*signs, (f.b if b is None else b).double(), f.m.double(), f.a.double())

    t64 = Target.of(B.double() * factor.double()[:, None, None], A.double())
    final = relative_error(t64, as64(stored))
    rel_float = relative_error(t64, as64(solved))
    weighted = None
    if w is not None:
        w64 = w.double()
        tw = Target.of(t64.P, t64.Q * w64[:, None, :])
        weighted = relative_error(tw, as64(stored, stored.b.double() * w64))
    return final, rel_float, weighted, t64.norm2.sqrt()
