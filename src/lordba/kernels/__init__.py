"""Inference kernels for the packed adapter branch (no gradient needed).

:func:`packed_branch` is the one entry point the layer calls. It unpacks the signs and runs the
five stages in the same order as :func:`lordba.branch.reference_delta`, so a packed adapter gives
bit-identical outputs to the same adapter in latent form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..branch import reference_delta

if TYPE_CHECKING:
    from ..layer import DoubleBinaryAdapter


def packed_branch(
    x: torch.Tensor, adapter: DoubleBinaryAdapter, b: torch.Tensor, m: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """Branch output of a packed ``adapter`` for ``x`` with decoded scales ``b, m, a``."""
    sign_A, sign_B = adapter.signs(x.dtype)
    return reference_delta(x, sign_A, sign_B, b, m, a, adapter.scaling)
