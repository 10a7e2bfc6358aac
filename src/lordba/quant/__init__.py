"""Frozen base layers behind one small interface (SPEC §4).

A LoRDBA layer wraps a *base* linear layer: a plain ``nn.Linear`` or a low-bit quantized linear
from a maintained library. Everything the adapter needs from its base goes through a
:class:`BaseBackend`: the feature sizes, a dense float copy of the weight (for merging and for
conversion), and merge/unmerge of a dense delta. Backends are tried in order; the plain
``nn.Linear`` backend comes last, since quantized layers may subclass ``nn.Linear``.
"""

from __future__ import annotations

from .backend import BaseBackend, register_backend, resolve_backend

__all__ = ["BaseBackend", "register_backend", "resolve_backend"]
