"""Frozen base layers behind one small interface (SPEC §4).

A LoRDBA layer wraps a *base* linear layer: a plain ``nn.Linear``, a GPT-2-family ``Conv1D``, or a
low-bit quantized linear from a maintained library (HQQ, the default on CPU; bitsandbytes NF4 and
int8). Everything the adapter needs from its base goes through a :class:`BaseBackend`: feature
sizes, a dense float copy of the weight (for merging and conversion), merge, and a description of
its quantization for the adapter's config. :func:`quantize_model` makes a model's linear
layers low-bit in place.
"""

from __future__ import annotations

from lordba.quant.backend import BaseBackend, register_backend, resolve_backend
from lordba.quant.bnb import BnbInt8Backend, BnbNF4Backend
from lordba.quant.conv1d import Conv1DBackend
from lordba.quant.hqq import HQQBackend
from lordba.quant.q4 import Q4Backend, Q4Linear, set_compute
from lordba.quant.quantize import QUANT_BACKENDS, base_bits, describe_base, quantize_model

register_backend(Conv1DBackend())
register_backend(BnbInt8Backend())
register_backend(BnbNF4Backend())
register_backend(HQQBackend())
register_backend(Q4Backend())

__all__ = [
    "QUANT_BACKENDS",
    "BaseBackend",
    "Q4Linear",
    "base_bits",
    "describe_base",
    "quantize_model",
    "register_backend",
    "resolve_backend",
    "set_compute",
]
