"""PEFT's LoRA ``Linear`` on lordba's q4 layers, and PEFT's HQQ LoRA layer on lordba's HQQ layers (imported with
PEFT, only where a PEFT LoRA is made)."""

from __future__ import annotations

import functools
import sys

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


def custom_modules() -> dict[type, type]:
    """lordba's quantized layers and the PEFT LoRA layers that read their features themselves (for
    ``LoraConfig._register_custom_module``): :class:`Q4LoraLinear` for q4, and, where hqq was imported (no model holds
    lordba's HQQ layer otherwise), PEFT's ``HqqLoraLinear`` for lordba's HQQ layer, whose class name PEFT does not
    know ("Unsupported layer type ... proceed at your own risk" for each, a new user's first demo run included)."""
    modules: dict[type, type] = {Q4Linear: Q4LoraLinear}
    if "hqq.core.quantize" in sys.modules:
        layer, lora = _hqq_lora_linear()
        modules[layer] = lora
    return modules


@functools.cache
def _hqq_lora_linear() -> tuple[type, type]:
    from peft.tuners.lora.hqq import HqqLoraLinear

    from lordba.quant import hqq

    class HQQLoraLinear(HqqLoraLinear):
        """PEFT's HQQ LoRA layer, reading lordba's HQQ layer's features itself."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int] | tuple[None, None]:
            if isinstance(module, hqq.LordbaHQQLinear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

    return hqq.LordbaHQQLinear, HQQLoraLinear
