"""Frozen base layers behind one small interface (SPEC §4).

A LoRDBA layer wraps a *base* linear layer: a plain ``nn.Linear`` or a low-bit quantized linear
from a maintained library (HQQ, the default on CPU; bitsandbytes NF4). Everything the adapter
needs from its base goes through a :class:`BaseBackend`: feature sizes, a dense float copy of the
weight (for merging and conversion), and merge. :func:`quantize_model` makes a model's linear
layers low-bit in place.
"""

from __future__ import annotations

from lordba.quant.backend import BaseBackend, register_backend, resolve_backend
from lordba.quant.bnb import BnbNF4Backend
from lordba.quant.hqq import HQQBackend
from lordba.quant.quantize import QUANT_BACKENDS, base_bits, quantize_model

register_backend(BnbNF4Backend())
register_backend(HQQBackend())

__all__ = [
    "QUANT_BACKENDS",
    "BaseBackend",
    "base_bits",
    "quantize_model",
    "register_backend",
    "resolve_backend",
]
