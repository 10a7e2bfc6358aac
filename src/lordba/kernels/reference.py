"""Pure-PyTorch branch: the fallback where no compiled kernel applies, and the oracle of the tests.

It unpacks the signs on every call and runs the five stages in the order of
:func:`lordba.core.autograd.reference_delta`. It needs nothing but torch, runs on every device and dtype,
and traces under ``torch.compile``; it is slow at decode (a dozen small ops per call).
"""

from __future__ import annotations

import torch

from lordba.core.autograd import reference_delta
from lordba.core.packing import unpack_signs


def packed_branch(
    x: torch.Tensor,
    sign_A: torch.Tensor,
    sign_B: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[base +] s · a ⊙ (S_B (m ⊙ (S_A (b ⊙ x))))`` from packed ``sign_A``/``sign_B`` bytes."""
    r, in_f, out_f = m.numel(), b.numel(), a.numel()
    s_a = unpack_signs(sign_A, (r, in_f), x.dtype)
    s_b = unpack_signs(sign_B, (out_f, r), x.dtype)
    delta = reference_delta(x, s_a, s_b, b, m, a, scaling)
    return delta if base is None else base + delta.to(base.dtype)


def dense_branch(
    x: torch.Tensor, folded_A: torch.Tensor, folded_B: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """The branch from folded dense factors ``A' = S_A diag(b)``, ``B' = s diag(a) S_B diag(m)``."""
    h = x @ folded_A.t()
    if base is None:
        return h @ folded_B.t()
    if base.dtype == x.dtype and base.dim() == 2:
        return torch.addmm(base, h, folded_B.t())
    return base + (h @ folded_B.t()).to(base.dtype)
