"""A model's own tensors are ordinary tensors, even where they are made under ``torch.inference_mode``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def ordinary_tensors() -> Iterator[None]:
    """Inside, new tensors are ordinary ones even under ``torch.inference_mode``; grad mode stays the
    caller's (off under inference mode). Usable as a decorator: ``@ordinary_tensors()``.

    An inference tensor has no version counter and cannot be saved for backward. A model's buffers made
    as inference tensors would have their folded prompt factors made again at every prompt (they are kept
    by version: :func:`lordba.quant.backend.kept_factors`; SmolLM2's q4 prefill overhead 1.03 → 1.07,
    docs/kernels.md), could not be trained, and the latent form's caches (keyed by version) fail on them.
    Loading, adding, converting (pack, unpack), quantizing and moving a model's tensors run inside this.
    Never raises."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield
