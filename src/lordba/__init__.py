"""lordba: Low-Rank Double-Binary Adaptation (LoRDBA) for PyTorch.

LoRA adapters with both factors replaced by 1-bit sign matrices and the magnitudes kept in three
channel-wise scale vectors: ``ΔW = s · diag(a) S_B diag(m) S_A diag(b)``. About 8× (fp16 scales)
to over 10× (8-bit scales) smaller than fp16 LoRA at the same rank, trainable on a frozen
quantized base, and exportable to plain PEFT LoRA.
"""

from lordba._version import __version__
from lordba.config import LoRDBAConfig
from lordba.convert import ConversionReport, convert_lora
from lordba.convert.export import export_lora
from lordba.core.packing import pack_signs, unpack_signs
from lordba.errors import (
    AdapterFormatError,
    AdapterStateError,
    ConfigError,
    ConversionError,
    DataError,
    LoRDBAError,
    ShapeMismatchError,
    TargetModulesError,
    TrainingError,
)
from lordba.format.adapter import AdapterState, read_adapter
from lordba.format.sizes import SizeReport, size_report
from lordba.nn.adapter import PackedAdapter, TrainableAdapter
from lordba.nn.layer import LoRDBALinear
from lordba.nn.model import LoRDBAModel, get_lordba_model

__all__ = [
    "AdapterFormatError",
    "AdapterState",
    "AdapterStateError",
    "ConfigError",
    "ConversionError",
    "ConversionReport",
    "DataError",
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
    "pack_signs",
    "read_adapter",
    "size_report",
    "unpack_signs",
]
