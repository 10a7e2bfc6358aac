"""Storage formats ("codecs") of the three scale vectors ``b = scale_in``, ``m = scale_mid``, ``a = scale_out``.

The forward pass always uses ``decode(encode(params))`` (with a straight-through estimator for
rounding), so the model that trains is exactly the model that is stored: save → load reproduces
the logits bit for bit, whatever the format (on a q4 base with ``compute="fast"``, prompts of the
training form compute the branch outside the base's bfloat16 GEMM: docs/kernels.md, "Equality of the two forms").

Formats (``scale_dtype``):

* ``float32``, ``float16``, ``bfloat16``: the three vectors in that dtype.
* ``int8``: ``scale_in`` and ``scale_out`` as int8 codes in [-127, 127] meaning ``code / 127``
  (each vector normalised by its own max-abs value), and ``scale_mid`` in float32 carrying the
  product of those two max-abs values. The gauge freedom of ``diag(a) S_B diag(m) S_A diag(b)``
  makes this exact up to rounding of the codes, without extra tensors (SPEC §6 allows one extra
  tensor per vector; this format needs none). At r = 16 it gives ≈1.5 bits per LoRA parameter.
* ``int4``: the ``int8`` format restricted to 15 of its codes, :data:`INT4_LEVELS` and their
  negatives (``round(127 k / 7)``: a 4-bit grid on the int8 one), so that each code fits in 4 bits.
  In memory the codes are int8 codes like ``int8``'s (the kernels read them as they are); a file
  (format version 3) stores the 4-bit index ``±k`` of each code, two per byte
  (:func:`pack_nibbles`). At r = 16 it gives ≈1.27 bits per LoRA parameter, at r = 8 ≈1.5
  (≈0.76 on the basis of an r = 16 LoRA).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lordba._util.dtypes import DTYPES
from lordba.errors import ConfigError

SCALE_DTYPES = ("float32", "float16", "bfloat16", "int8", "int4")
CODE_DTYPES = ("int8", "int4")  # formats holding int8 codes in memory (code / 127)
NIBBLE_DTYPES = ("int4",)  # formats a file stores as 4-bit indices, two per byte (format version 3 only)
_INT8_MAX = 127.0
# The int4 format's code magnitudes (int8 codes, index k = 0..7): round(127 k / 7). Chosen by
# measured error per byte (docs/format.md): on the converted SmolLM2 r = 16 adapter this grid gave
# a relative ΔW error of 0.098 against 0.136 for a log grid of ratio 2^-1/2 and 0.291 for powers of 2,
# and the lowest held-out loss of the 4-bit grids tried (a log grid of ratio 2^-1/3, a fitted one).
INT4_LEVELS = (0, 18, 36, 54, 73, 91, 109, 127)
_INT4_MID = torch.tensor([(x + y) / 2 for x, y in itertools.pairwise(INT4_LEVELS)])
_INT4_TABLE = torch.tensor(INT4_LEVELS, dtype=torch.float32)
# nibble (two's complement 4-bit index, 0..15) -> int8 code; nibble 8 (index -8) is invalid: -128
_NIBBLE_CODES = torch.tensor([*INT4_LEVELS, -128, *(-v for v in INT4_LEVELS[7:0:-1])], dtype=torch.int8)
# int8 code + 128 -> nibble (255 where the code is not an int4 code)
_CODE_NIBBLES = torch.full((256,), 255, dtype=torch.uint8)
for _k, _v in enumerate(INT4_LEVELS):
    _CODE_NIBBLES[128 + _v] = _k
    _CODE_NIBBLES[128 - _v] = (16 - _k) % 16


class _RoundSTE(torch.autograd.Function):
    """``round`` in the forward, identity in the backward."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


class _CastSTE(torch.autograd.Function):
    """``x`` rounded to ``dtype`` and back to float32 in the forward, identity in the backward (a cast's own
    backward would round the gradient to ``dtype`` too: float16 flushes small ones to zero, overflows large ones)."""

    @staticmethod
    def forward(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype).float()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


@dataclass(frozen=True)
class ScaleCodec:
    """How one adapter's scale vectors are stored; see the module docstring."""

    name: str

    @property
    def stored_dtypes(self) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        """Dtypes of the stored ``(scale_in, scale_mid, scale_out)`` tensors."""
        if self.name in CODE_DTYPES:
            return (torch.int8, torch.float32, torch.int8)
        dt = DTYPES[self.name]
        return (dt, dt, dt)

    def _int8_parts(
        self, b: torch.Tensor, m: torch.Tensor, a: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes of ``b`` and ``a`` (as floats) and the rescaled ``m``; one computation for encode and forward."""
        # An all-zero vector (the cold start's a = 0) keeps step 1, so m is not zeroed with it
        # and gradients still reach the vector: ã·m̃ = a·m·max|b| exactly as if unquantized. A NaN
        # maximum stays NaN and reaches m (codes would cast NaN to 0): a save refuses the module.
        max_b = b.abs().amax()
        max_a = a.abs().amax()
        max_b = torch.where(max_b == 0, torch.ones_like(max_b), max_b)
        max_a = torch.where(max_a == 0, torch.ones_like(max_a), max_a)
        code_b = rounding(_unit_ratio(b, max_b))
        code_a = rounding(_unit_ratio(a, max_a))
        return code_b, m * max_b * max_a, code_a

    def _rounding(self, ste: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """Rounding of ``127 · v / max|v|`` to this format's codes (with a straight-through gradient)."""
        if self.name == "int4":
            return _snap_int4_ste if ste else _snap_int4
        return _RoundSTE.apply if ste else torch.round

    def fake_quant(
        self, b: torch.Tensor, m: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable ``decode(encode(b, m, a))`` in float32 (rounding, to codes or to a float16 / bfloat16
        value, passes gradients straight through, in float32)."""
        if self.name in CODE_DTYPES:
            code_b, mid, code_a = self._int8_parts(b.float(), m.float(), a.float(), self._rounding(True))
            return code_b / _INT8_MAX, mid, code_a / _INT8_MAX
        dt = DTYPES[self.name]
        if dt == torch.float32:
            return b.float(), m.float(), a.float()
        return tuple(_CastSTE.apply(v, dt) for v in (b, m, a))  # type: ignore[return-value]

    @torch.no_grad()
    def encode(
        self, b: torch.Tensor, m: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored tensors for scale vectors ``b, m, a`` (any float dtype)."""
        if self.name in CODE_DTYPES:
            code_b, mid, code_a = self._int8_parts(b.float(), m.float(), a.float(), self._rounding(False))
            return code_b.to(torch.int8), mid.float(), code_a.to(torch.int8)
        dt = DTYPES[self.name]
        return b.detach().to(dt), m.detach().to(dt), a.detach().to(dt)

    def decode(
        self, scale_in: torch.Tensor, scale_mid: torch.Tensor, scale_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 scale vectors from stored tensors; ``fake_quant`` of the result returns it unchanged."""
        if self.name in CODE_DTYPES:
            return scale_in.float() / _INT8_MAX, scale_mid.float(), scale_out.float() / _INT8_MAX
        return scale_in.float(), scale_mid.float(), scale_out.float()


def _unit_ratio(v: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """``127 · v / peak``, with ``v`` and ``peak`` first scaled by the same power of two where ``peak > 1``: the same
    float as unscaled (scaling by a power of two is exact), but ``127 · v`` cannot overflow float32 (``|v|`` above
    ~2.7e36 made it infinite, ``inf / peak`` a NaN, and its code 0)."""
    _, exponent = torch.frexp(peak.detach())
    unit = torch.ldexp(torch.ones_like(peak), -exponent.clamp_min(0))
    return _INT8_MAX * (v * unit) / (peak * unit)


def get_codec(scale_dtype: str) -> ScaleCodec:
    """The codec for a ``scale_dtype`` name; :class:`ConfigError` for an unknown one."""
    if scale_dtype not in SCALE_DTYPES:
        raise ConfigError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    return ScaleCodec(scale_dtype)


def _snap_int4(x: torch.Tensor) -> torch.Tensor:
    """``x`` (values in [-127, 127]) rounded to the nearest int4 code (ties to the larger magnitude)."""
    index = torch.bucketize(x.abs(), _INT4_MID.to(x.device, x.dtype), right=True)
    return torch.sign(x) * _INT4_TABLE.to(x.device, x.dtype)[index]


def _snap_int4_ste(x: torch.Tensor) -> torch.Tensor:
    """:func:`_snap_int4` in the forward, identity in the backward."""
    return x + (_snap_int4(x.detach()) - x).detach()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int4-format codes (1-D int8, each ``±INT4_LEVELS[k]``) as their 4-bit indices ``±k`` (two's
    complement), two per byte, the first in the high nibble, a zero low nibble after an odd count.
    Raises :class:`ValueError` for a code outside the format."""
    nibbles = _CODE_NIBBLES.to(codes.device)[codes.reshape(-1).to(torch.int64) + 128]
    if bool((nibbles == 255).any()):
        raise ValueError("an int8 code outside the int4 format's codes")
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The int8 codes of every nibble of ``packed`` (uint8, 1-D), two per byte (high nibble first):
    ``2 · len(packed)`` codes, ``-128`` for the invalid nibble 8; the caller drops a padding nibble."""
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    return _NIBBLE_CODES.to(packed.device)[nibbles.to(torch.int64)]
