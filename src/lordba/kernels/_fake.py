"""Shape-only ("fake") implementation of ``lordba::branch`` so that ``torch.compile`` traces through it.

Imported once the compiled library that defines the op is loaded (:func:`lordba.kernels.load_cpu`).
"""

from __future__ import annotations

import torch


@torch.library.register_fake("lordba::branch")
def _branch_fake(
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
    torch._check(x.shape[-1] == b.shape[0], lambda: "lordba::branch: x's last dimension must equal len(b)")
    if base is not None:
        return torch.empty_like(base, memory_format=torch.contiguous_format)
    return x.new_empty((*x.shape[:-1], a.shape[0]))
