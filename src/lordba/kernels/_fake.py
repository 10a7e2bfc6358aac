"""Shape-only ("fake") implementation of the branch ops, so that ``torch.compile`` traces through them.

:func:`branch_fake` serves both ``lordba::branch`` (the CPU op, registered by :func:`register_cpu`
once the compiled library that defines it is loaded: :func:`lordba.kernels.load_cpu`) and
``lordba::triton_branch``; :func:`branch_rows_fake` serves ``lordba::branch_rows``.
"""

from __future__ import annotations

import torch


def branch_fake(
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
    """An empty tensor of the op's output shape and dtype: ``base``'s, else ``[..., out]`` in ``x``'s."""
    torch._check(x.shape[-1] == b.shape[0], lambda: "lordba::branch: x's last dimension must equal len(b)")
    if base is not None:
        return torch.empty_like(base, memory_format=torch.contiguous_format)
    return x.new_empty((*x.shape[:-1], a.shape[0]))


def branch_rows_fake(
    x: torch.Tensor,
    index: torch.Tensor,
    sign_A: list[torch.Tensor],
    sign_B: list[torch.Tensor],
    b: list[torch.Tensor],
    m: list[torch.Tensor],
    a: list[torch.Tensor],
    scaling: list[float],
    sign_max_tokens: list[int],
    base: torch.Tensor,
) -> torch.Tensor:
    """An empty tensor of ``lordba::branch_rows``'s output: ``base``'s shape and dtype."""
    torch._check(index.shape[0] == x.shape[0], lambda: "lordba::branch_rows: one index per batch row")
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def decode_attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """An empty tensor of ``lordba::decode_attention``'s output: ``q``'s shape, float32."""
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def linear_branch_fake(x: torch.Tensor, weight: torch.Tensor, *args: object) -> torch.Tensor:
    """An empty tensor of ``lordba::linear_branch``'s output: ``x``'s leading shape, the weight's out_features."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_REGISTERED: list[bool] = []


def register_cpu() -> None:
    """Register the fakes of ``lordba::branch``, ``lordba::branch_rows``, ``lordba::decode_attention`` and
    ``lordba::linear_branch`` (once per process)."""
    if not _REGISTERED:
        torch.library.register_fake("lordba::branch")(branch_fake)
        torch.library.register_fake("lordba::branch_rows")(branch_rows_fake)
        torch.library.register_fake("lordba::decode_attention")(decode_attention_fake)
        torch.library.register_fake("lordba::linear_branch")(linear_branch_fake)
        _REGISTERED.append(True)
