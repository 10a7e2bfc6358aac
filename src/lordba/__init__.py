"""lordba: Low-Rank Double-Binary Adaptation (LoRDBA) for PyTorch.

LoRA adapters with both factors replaced by 1-bit sign matrices and the magnitudes kept in three
channel-wise scale vectors: ``ΔW = s · diag(a) S_B diag(m) S_A diag(b)``. About 8× (fp16 scales)
to over 10× (8-bit scales) smaller than fp16 LoRA at the same rank, trainable on a frozen
quantized base, and exportable to plain PEFT LoRA.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lordba._version import __version__
from lordba.errors import (
    AdapterFormatError,
    AdapterStateError,
    BaseModelWarning,
    ConfigError,
    ConversionError,
    DataError,
    LoRDBAError,
    ShapeMismatchError,
    TargetModulesError,
    TrainingError,
)

# The public names below torch are imported on first use (PEP 562), so that `import lordba.cli`
# (the command line's parser, `lordba --help`) does not pay for torch. name -> defining module.
_LAZY = {
    "LoRDBAConfig": "lordba.config",
    "ConversionReport": "lordba.convert",
    "convert_lora": "lordba.convert",
    "export_lora": "lordba.convert.export",
    "pack_signs": "lordba.core.packing",
    "unpack_signs": "lordba.core.packing",
    "AdapterState": "lordba.format.adapter",
    "read_adapter": "lordba.format.adapter",
    "SizeReport": "lordba.format.sizes",
    "size_report": "lordba.format.sizes",
    "PackedAdapter": "lordba.nn.adapter",
    "TrainableAdapter": "lordba.nn.adapter",
    "LoRDBALinear": "lordba.nn.layer",
    "LoRDBAModel": "lordba.nn.model",
    "get_lordba_model": "lordba.nn.model",
    "AutoLoRDBAModelForCausalLM": "lordba.nn.auto",
    "LoRDBACallback": "lordba.train.hf_trainer",
    "get_lordba_model_state_dict": "lordba.nn.model_status",
    "set_lordba_model_state_dict": "lordba.nn.model_status",
}

if TYPE_CHECKING:
    from lordba.config import LoRDBAConfig
    from lordba.convert import ConversionReport, convert_lora
    from lordba.convert.export import export_lora
    from lordba.core.packing import pack_signs, unpack_signs
    from lordba.format.adapter import AdapterState, read_adapter
    from lordba.format.sizes import SizeReport, size_report
    from lordba.nn.adapter import PackedAdapter, TrainableAdapter
    from lordba.nn.auto import AutoLoRDBAModelForCausalLM
    from lordba.nn.layer import LoRDBALinear
    from lordba.nn.model import LoRDBAModel, get_lordba_model
    from lordba.nn.model_status import get_lordba_model_state_dict, set_lordba_model_state_dict
    from lordba.train.hf_trainer import LoRDBACallback


def __getattr__(name: str) -> Any:
    """A public name of :data:`_LAZY` (imported once, then cached in the module), or a subpackage."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AdapterFormatError",
    "AdapterState",
    "AdapterStateError",
    "AutoLoRDBAModelForCausalLM",
    "BaseModelWarning",
    "ConfigError",
    "ConversionError",
    "ConversionReport",
    "DataError",
    "LoRDBACallback",
    "LoRDBAConfig",
    "LoRDBAError",
    "LoRDBALinear",
    "LoRDBAModel",
    "PackedAdapter",
    "ShapeMismatchError",
    "SizeReport",
    "TargetModulesError",
    "TrainableAdapter",
    "TrainingError",
    "__version__",
    "convert_lora",
    "export_lora",
    "get_lordba_model",
    "get_lordba_model_state_dict",
    "pack_signs",
    "read_adapter",
    "set_lordba_model_state_dict",
    "size_report",
    "unpack_signs",
]
