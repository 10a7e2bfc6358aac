"""Bit packing of sign matrices (SPEC §6).

A sign matrix ``S`` (entries ±1) is flattened row-major and packed 8 signs per byte: bit 1 means
+1, the first element goes in the most significant bit, and the padding bits of the last byte are
0. The result is byte-identical to ``numpy.packbits(S.reshape(-1) > 0)``. For a general real
tensor the packed sign is ``sign(t)`` with ``sign(0) = +1`` (so ``-0.0`` and ``0.0`` pack as +1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lordba.errors import AdapterFormatError, ShapeMismatchError

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def packed_size(numel: int) -> int:
    """Bytes needed for ``numel`` packed signs: ``ceil(numel / 8)``."""
    return (int(numel) + 7) // 8


def pack_signs(t: torch.Tensor) -> torch.Tensor:
    """Pack ``sign(t)`` (``sign(0) = +1``) into a 1-D uint8 tensor, MSB first, zero padding.

    Raises :class:`ShapeMismatchError` if ``t`` holds NaN (a NaN has no sign).
    """
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        raise ShapeMismatchError("pack_signs: the tensor holds NaN, which has no sign")
    bits = (t.detach().reshape(-1) >= 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(bits.device)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of ``packed`` as a uint8 tensor of 0/1 (MSB first)."""
    shifts = _SHIFTS.to(packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel]


def unpack_signs(
    packed: torch.Tensor, shape: Sequence[int] | torch.Size, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unpack a tensor of the given ``shape`` with entries ±1 from :func:`pack_signs` output.

    Raises :class:`ShapeMismatchError` for a ``dtype`` that cannot hold -1 (unsigned, bool) or is no torch dtype."""
    if not isinstance(dtype, torch.dtype) or dtype == torch.bool or not (dtype.is_floating_point or dtype.is_signed):
        raise ShapeMismatchError(f"unpack_signs: dtype must be a torch dtype that holds -1, got {dtype!r}")
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ShapeMismatchError(
            f"unpack_signs: expected a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_size(numel):
        raise ShapeMismatchError(
            f"unpack_signs: {packed.numel()} bytes cannot hold shape {tuple(shape)} "
            f"(needs exactly {packed_size(numel)})"
        )
    bits = unpack_bits(packed, numel).to(dtype)
    return (bits * 2 - 1).reshape(tuple(shape))


def check_padding(packed: torch.Tensor, numel: int, what: str) -> None:
    """Refuse a packed tensor whose padding bits (beyond ``numel``) are not all zero (SPEC §6)."""
    pad = (-numel) % 8
    if pad and packed.numel() and int(packed[-1]) & ((1 << pad) - 1):
        raise AdapterFormatError(f"{what}: non-zero padding bits in the last byte (corrupt sign tensor)")
