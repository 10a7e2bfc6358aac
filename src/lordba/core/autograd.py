"""The double-binary adapter branch as one autograd function (SPEC §1, five stages).

    h0 = x ⊙ b;  h1 = h0 S_Aᵀ;  h2 = h1 ⊙ m;  h3 = h2 S_Bᵀ;  δ = s · (h3 ⊙ a)

Written as a single :class:`torch.autograd.Function` so that training saves only ``x`` (which the
base layer's caller keeps anyway) and ``h1`` (tokens × r), like a LoRA branch, instead of every
stage's activation. The backward needs no tokens × in or tokens × out temporary besides the input
gradient itself (but for float16 inputs, whose backward runs in float32: the parameters' gradients sum over
every token, beyond float16's range):

    P = g1ᵀ x (r×in):   ∂S_A = P ⊙ b,   ∂b = Σ_k S_A ⊙ P,   ∂x = g1 (S_A ⊙ b)
    Q = gᵀ h2 (out×r):  ∂S_B = (s a) ⊙ Q, ∂a = s Σ_k S_B ⊙ Q, g2 = g (S_B ⊙ s a)

Sign sources are either latent float factors (trained through a straight-through estimator,
signs recomputed in the backward instead of being saved) or fixed ±1 tensors. The backward is
itself differentiable (``create_graph=True``: gradient penalties, MAML): it then recomputes ``h1``
from ``x`` and ``b``, whose saved copy carries no graph.
"""

from __future__ import annotations

import torch

from lordba.core.ste import STE, hard_sign


def reference_delta(
    x: torch.Tensor,
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The branch output in ``x``'s dtype from ±1 tensors ``sign_A`` (r×in), ``sign_B`` (out×r)."""
    dt = x.dtype
    h = (x * b.to(dt)) @ sign_A.to(dt).t()
    h = (h * m.to(dt)) @ sign_B.to(dt).t()
    return h * (a.to(dt) * scaling)


class DoubleBinaryBranch(torch.autograd.Function):
    """Fused forward/backward of the branch; see the module docstring."""

    @staticmethod
    def forward(x, src_A, src_B, b, m, a, scaling: float, ste: STE | None):  # noqa: ANN001
        dt = x.dtype
        sign_A = hard_sign(src_A).to(dt)
        sign_B = hard_sign(src_B).to(dt)
        h1 = (x * b.to(dt)) @ sign_A.t()
        out = ((h1 * m.to(dt)) @ sign_B.t()) * (a.to(dt) * scaling)
        return out, h1

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, src_A, src_B, b, m, a, scaling, ste = inputs
        ctx.save_for_backward(x, output[1], src_A, src_B, b, m, a)
        ctx.scaling = scaling
        ctx.ste = ste
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_h1: torch.Tensor | None):  # noqa: ANN001
        x, h1, src_A, src_B, b, m, a = ctx.saved_tensors
        need = ctx.needs_input_grad
        in_dtype = x.dtype
        if in_dtype == torch.float16:  # in float32: the parameters' gradients sum over every token, and in float16
            x, h1, grad_out = x.float(), h1.float(), grad_out.float()  # small ones flush, large ones overflow
        dt = x.dtype
        s = ctx.scaling
        sign_A = hard_sign(src_A).to(dt)
        sign_B = hard_sign(src_B).to(dt)
        bd, md, sa = b.to(dt), m.to(dt), a.to(dt) * s

        in_f, out_f, r = x.shape[-1], grad_out.shape[-1], h1.shape[-1]
        g = grad_out.reshape(-1, out_f)
        x2 = x.reshape(-1, in_f)
        if torch.is_grad_enabled():  # create_graph: h1 as a function of x and b (the saved one has no graph)
            h1 = (x * bd) @ sign_A.t()
        h1_2 = h1.reshape(-1, r)
        h2 = h1_2 * md

        q = g.t() @ h2  # out × r
        g2 = g @ (sign_B * sa[:, None])  # tokens × r
        g1 = g2 * md
        grad_x = grad_A = grad_B = grad_b = grad_m = grad_a = None
        if need[0]:
            grad_x = (g1 @ (sign_A * bd[None, :])).reshape(x.shape).to(in_dtype)
        if need[1] or need[3]:
            p = g1.t() @ x2  # r × in
            if need[1]:
                grad_A = _latent_grad(ctx.ste, src_A, p * bd)
            if need[3]:
                grad_b = (sign_A * p).sum(0).to(b.dtype)
        if need[2]:
            grad_B = _latent_grad(ctx.ste, src_B, q * sa[:, None])
        if need[4]:
            grad_m = (g2 * h1_2).sum(0).to(m.dtype)
        if need[5]:
            grad_a = ((sign_B * q).sum(1) * s).to(a.dtype)
        return grad_x, grad_A, grad_B, grad_b, grad_m, grad_a, None, None


def _latent_grad(ste: STE | None, latent: torch.Tensor, grad_sign: torch.Tensor) -> torch.Tensor:
    if ste is None:
        raise RuntimeError("a gradient w.r.t. a sign source needs a straight-through estimator")
    return ste.grad(latent, grad_sign.to(latent.dtype))


def sign_branch(
    x: torch.Tensor,
    src_A: torch.Tensor,
    src_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    ste: STE | None = None,
) -> torch.Tensor:
    """The branch output ``s · a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))`` with signs taken from ``src_A``/``src_B``.

    ``src_*`` are latent float factors (then their gradient goes through ``ste``) or ±1 tensors.
    """
    return DoubleBinaryBranch.apply(x, src_A, src_B, b, m, a, float(scaling), ste)[0]


def fold_factors(
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter as two dense factors: ``A' = S_A diag(b)`` (r×in) and ``B' = s·diag(a) S_B diag(m)``
    (out×r) in ``dtype``, from ±1 tensors ``sign_A`` (r×in), ``sign_B`` (out×r) and float scales;
    ``ΔW = B' A'``. The one place where scales are folded into factors (merge, the ``dense``
    kernel mode)."""
    folded_A = (sign_A * b[None, :]).to(dtype)
    folded_B = (sign_B * (scaling * a)[:, None] * m[None, :]).to(dtype)
    return folded_A.contiguous(), folded_B.contiguous()
