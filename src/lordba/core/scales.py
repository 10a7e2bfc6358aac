"""Storage formats ("codecs") of the three scale vectors ``b = scale_in``, ``m = scale_mid``, ``a = scale_out``.

The forward pass always uses ``decode(encode(params))`` (with a straight-through estimator for
rounding), so the model that trains is exactly the model that is stored: save → load reproduces
the logits bit for bit, whatever the format.

Formats (``scale_dtype``):

* ``float32``, ``float16``, ``bfloat16``: the three vectors in that dtype.
* ``int8``: ``scale_in`` and ``scale_out`` as int8 codes in [-127, 127] meaning ``code / 127``
  (each vector normalised by its own max-abs value), and ``scale_mid`` in float32 carrying the
  product of those two max-abs values. The gauge freedom of ``diag(a) S_B diag(m) S_A diag(b)``
  makes this exact up to rounding of the codes, without extra tensors (SPEC §6 allows one extra
  tensor per vector; this format needs none). At r = 16 it gives ≈1.5 bits per LoRA parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lordba._util.dtypes import DTYPES
from lordba.errors import ConfigError

SCALE_DTYPES = ("float32", "float16", "bfloat16", "int8")
_INT8_MAX = 127.0


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


@dataclass(frozen=True)
class ScaleCodec:
    """How one adapter's scale vectors are stored; see the module docstring."""

    name: str

    @property
    def stored_dtypes(self) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        """Dtypes of the stored ``(scale_in, scale_mid, scale_out)`` tensors."""
        if self.name == "int8":
            return (torch.int8, torch.float32, torch.int8)
        dt = DTYPES[self.name]
        return (dt, dt, dt)

    def _int8_parts(
        self, b: torch.Tensor, m: torch.Tensor, a: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes of ``b`` and ``a`` (as floats) and the rescaled ``m``; one computation for encode and forward."""
        # An all-zero vector (the cold start's a = 0) keeps step 1, so m is not zeroed with it
        # and gradients still reach the vector: ã·m̃ = a·m·max|b| exactly as if unquantized.
        max_b = b.abs().amax()
        max_a = a.abs().amax()
        max_b = torch.where(max_b > 0, max_b, torch.ones_like(max_b))
        max_a = torch.where(max_a > 0, max_a, torch.ones_like(max_a))
        code_b = rounding(_INT8_MAX * b / max_b)
        code_a = rounding(_INT8_MAX * a / max_a)
        return code_b, m * max_b * max_a, code_a

    def fake_quant(
        self, b: torch.Tensor, m: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable ``decode(encode(b, m, a))`` in float32 (rounding passes gradients straight through)."""
        if self.name == "int8":
            code_b, mid, code_a = self._int8_parts(b.float(), m.float(), a.float(), _RoundSTE.apply)
            return code_b / _INT8_MAX, mid, code_a / _INT8_MAX
        dt = DTYPES[self.name]
        return tuple(v.to(dt).float() for v in (b, m, a))  # type: ignore[return-value]

    @torch.no_grad()
    def encode(
        self, b: torch.Tensor, m: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored tensors for scale vectors ``b, m, a`` (any float dtype)."""
        if self.name == "int8":
            code_b, mid, code_a = self._int8_parts(b.float(), m.float(), a.float(), torch.round)
            return code_b.to(torch.int8), mid.float(), code_a.to(torch.int8)
        dt = DTYPES[self.name]
        return b.detach().to(dt), m.detach().to(dt), a.detach().to(dt)

    def decode(
        self, scale_in: torch.Tensor, scale_mid: torch.Tensor, scale_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 scale vectors from stored tensors; ``fake_quant`` of the result returns it unchanged."""
        if self.name == "int8":
            return scale_in.float() / _INT8_MAX, scale_mid.float(), scale_out.float() / _INT8_MAX
        return scale_in.float(), scale_mid.float(), scale_out.float()


def get_codec(scale_dtype: str) -> ScaleCodec:
    """The codec for a ``scale_dtype`` name; :class:`ConfigError` for an unknown one."""
    if scale_dtype not in SCALE_DTYPES:
        raise ConfigError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    return ScaleCodec(scale_dtype)
