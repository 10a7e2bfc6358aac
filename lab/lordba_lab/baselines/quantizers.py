"""The baseline quantizers of LoRA factors; see the package docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lordba.errors import ConfigError

_SCALE_BYTES = 2  # one fp16 number


@dataclass
class QuantizedLoRA:
    """Dequantized factors (float32) of one layer and the bytes their storage takes."""

    A: torch.Tensor
    B: torch.Tensor
    nbytes: int


def _rtn_rows(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, int]:
    """Asymmetric min-max RTN of each row of ``x`` in groups of ``group_size``; returns (dequantized, bytes)."""
    rows, cols = x.shape
    pad = (-cols) % group_size
    g = torch.nn.functional.pad(x, (0, pad)).reshape(rows, -1, group_size)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    step = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
    q = torch.clamp(torch.round((g - lo) / step), 0, levels)
    deq = (q * step + lo).reshape(rows, -1)[:, :cols]
    groups = g.shape[0] * g.shape[1]
    return deq, math.ceil(x.numel() * bits / 8) + groups * 2 * _SCALE_BYTES


def _sign_mean_rows(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """1-bit sign × mean|·| of each row of ``x`` in groups; returns (dequantized, bytes)."""
    rows, cols = x.shape
    pad = (-cols) % group_size
    g = torch.nn.functional.pad(x, (0, pad)).reshape(rows, -1, group_size)
    counts = torch.full((rows, g.shape[1], 1), float(group_size))
    if pad:
        counts[:, -1] = group_size - pad
    scale = g.abs().sum(dim=-1, keepdim=True) / counts
    deq = (torch.where(g >= 0, 1.0, -1.0) * scale).reshape(rows, -1)[:, :cols]
    return deq, math.ceil(x.numel() / 8) + g.shape[0] * g.shape[1] * _SCALE_BYTES


def rtn(A: torch.Tensor, B: torch.Tensor, bits: int, group_size: int = 64) -> QuantizedLoRA:
    """Round-to-nearest of both factors, in groups along each factor's long dimension."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"RTN bits must be in 1..8, got {bits}")
    qa, na = _rtn_rows(A.float(), bits, group_size)
    qb, nb = _rtn_rows(B.float().t().contiguous(), bits, group_size)  # B grouped along its output dim
    return QuantizedLoRA(qa, qb.t().contiguous(), na + nb)


def bitdelta(A: torch.Tensor, B: torch.Tensor) -> QuantizedLoRA:
    """Sign × one L2-optimal scale (mean |·|) per factor matrix."""
    out = []
    for F in (A.float(), B.float()):
        out.append(torch.where(F >= 0, 1.0, -1.0) * F.abs().mean())
    return QuantizedLoRA(out[0], out[1], math.ceil(A.numel() / 8) + math.ceil(B.numel() / 8) + 2 * _SCALE_BYTES)


def loraquant(
    A: torch.Tensor, B: torch.Tensor, high_bits: int = 2, energy: float = 0.8, group_size: int = 128
) -> QuantizedLoRA:
    """LoRAQuant-style mixed precision: re-parameterise ``BA = (U√S)(√S Vᵀ)``; the first ``h``
    components (cumulative energy ≥ ``energy``) get RTN at ``high_bits``, the rest 1-bit sign ×
    mean|·| per group. (The paper's optional gradient refinement of the head is not applied.)"""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().t())
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t())
    root = S.sqrt()
    Bp = (Qb @ U * root).float()  # out × r
    Ap = (root[:, None] * (Vh @ Qa.t())).float()  # r × in
    cum = torch.cumsum(S**2, 0) / (S**2).sum().clamp(min=1e-30)
    h = max(1, int((cum < energy).sum()) + 1)
    h = min(h, A.shape[0])
    head_A, n1 = _rtn_rows(Ap[:h], high_bits, group_size)
    head_B, n2 = _rtn_rows(Bp[:, :h].t().contiguous(), high_bits, group_size)
    parts_A, parts_B, nbytes = [head_A], [head_B.t()], n1 + n2
    if h < A.shape[0]:
        tail_A, n3 = _sign_mean_rows(Ap[h:], group_size)
        tail_B, n4 = _sign_mean_rows(Bp[:, h:].t().contiguous(), group_size)
        parts_A.append(tail_A)
        parts_B.append(tail_B.t())
        nbytes += n3 + n4
    return QuantizedLoRA(torch.cat(parts_A, 0), torch.cat(parts_B, 1).contiguous(), nbytes)


def svd_truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> QuantizedLoRA:
    """fp16 LoRA of rank ``k`` closest to ``BA`` (truncated SVD), zero-padded back to rank r.

    The matched-bytes fp16 baseline that needs no training: ``k`` fp16 components cost
    ``2·k·(in + out)`` bytes, so ``k`` = 1–2 lands at LoRDBA's size for r = 16.
    """
    r = A.shape[0]
    if not 1 <= k <= r:
        raise ConfigError(f"truncation rank must be in 1..{r}, got {k}")
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().t())
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t())
    root = S[:k].sqrt()
    Bk = torch.zeros_like(B, dtype=torch.float32)
    Ak = torch.zeros_like(A, dtype=torch.float32)
    Bk[:, :k] = (Qb @ U[:, :k] * root).half().float()
    Ak[:k] = (root[:, None] * (Vh[:k] @ Qa.t())).half().float()
    return QuantizedLoRA(Ak, Bk, 2 * k * (A.shape[1] + B.shape[0]))
