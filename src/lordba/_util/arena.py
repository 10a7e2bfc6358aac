"""Many small tensors as views of one buffer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ALIGN = 8  # bytes: every dtype's alignment


def views_of_one_buffer(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` (all on one device) as views of one new uint8 buffer, in the given order,
    each at a multiple of 8 bytes, contiguous, of its own shape and dtype (no gradient).

    Raises:
        ValueError: the tensors are on more than one device.
    """
    if len({t.device for t in tensors}) > 1:
        raise ValueError("views_of_one_buffer: the tensors must be on one device")
    starts, total = [], 0
    for t in tensors:
        starts.append(total)
        total += -(-t.nbytes // _ALIGN) * _ALIGN
    buffer = torch.empty(total, dtype=torch.uint8, device=tensors[0].device if tensors else "cpu")
    views = []
    for t, start in zip(tensors, starts):
        view = buffer[start : start + t.nbytes].view(t.dtype).view(t.shape)
        with torch.no_grad():
            view.copy_(t)
        views.append(view)
    return views
