"""PEFT's LoRA ``Linear`` on lordba's q4 layers (imported with PEFT, only where a PEFT LoRA is made)."""

from __future__ import annotations

from peft.tuners.lora.layer import Linear, LoraLayer
from torch import nn

from lordba.quant.q4 import Q4Linear


class Q4LoraLinear(Linear):
    """PEFT's LoRA ``Linear`` that reads a :class:`~lordba.quant.q4.Q4Linear`'s ``in_features`` / ``out_features``
    itself: PEFT's own reading warned "Unsupported layer type" for each, a warning lordba silenced with
    ``warnings.catch_warnings``, which is not thread-safe (other threads' warnings were silenced meanwhile, and the
    filter could outlive it). PEFT asks the layer from 0.19 on (:func:`reads_features`)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int] | tuple[None, None]:
        if isinstance(module, Q4Linear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)


def reads_features() -> bool:
    """Whether PEFT asks its LoRA layer for the base layer's in/out features (``LoraLayer._get_in_out_features``,
    PEFT 0.19 on), so that :class:`Q4LoraLinear` answers for a q4 layer; an earlier PEFT reads them itself and warns
    "Unsupported layer type" for each q4 layer."""
    return hasattr(LoraLayer, "_get_in_out_features")
