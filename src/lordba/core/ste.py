"""Straight-through estimators for the sign of the latent factors (SPEC §3, QAT).

The forward is always ``sign(x)`` with ``sign(0) = +1``. The backward is a surrogate derivative:

* ``smoothsign`` (the author-side port's default): ``d/dx tanh(k x) = k (1 - tanh(k x)^2)``.
* ``identity``: the classic clipped identity, ``1{|x| <= clip}`` (BinaryConnect).

Only the surrogate derivative is defined here; the fused adapter function in :mod:`lordba.core.autograd`
applies it, so no autograd graph is built for the sign itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lordba.errors import ConfigError

STE_KINDS = ("smoothsign", "identity")


def hard_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1``, in ``x``'s dtype."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@dataclass(frozen=True)
class STE:
    """A straight-through estimator: ``kind``, the smoothsign sharpness ``k`` and the identity ``clip``."""

    kind: str = "smoothsign"
    k: float = 100.0
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in STE_KINDS:
            raise ConfigError(f"ste must be one of {STE_KINDS}, got {self.kind!r}")
        if not (self.k > 0 and self.clip > 0):
            raise ConfigError(f"ste_k and ste_clip must be > 0, got {self.k!r} and {self.clip!r}")

    def grad(self, latent: torch.Tensor, grad_sign: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the latent given the gradient w.r.t. its sign."""
        if self.kind == "smoothsign":  # at least float32: 1 - tanh² cancels to 0 early in bfloat16 / float16
            wide = torch.promote_types(latent.dtype, torch.float32)
            t = torch.tanh(self.k * latent.to(wide))
            return (grad_sign.to(wide) * (self.k * (1.0 - t * t))).to(grad_sign.dtype)
        return grad_sign * (latent.abs() <= self.clip).to(grad_sign.dtype)


class SignSTE(torch.autograd.Function):
    """``sign`` with a straight-through backward, for code that needs the sign tensor itself."""

    @staticmethod
    def forward(latent: torch.Tensor, ste: STE) -> torch.Tensor:
        return hard_sign(latent)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[0])
        ctx.ste = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        (latent,) = ctx.saved_tensors
        return ctx.ste.grad(latent, grad), None
