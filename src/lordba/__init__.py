"""lordba: Low-Rank Double-Binary Adaptation (LoRDBA) for PyTorch.

LoRA adapters with both factors replaced by 1-bit sign matrices and the magnitudes kept in three
channel-wise scale vectors: ``ΔW = s · diag(a) S_B diag(m) S_A diag(b)``. About 8× (fp16 scales)
to over 10× (8-bit scales) smaller than fp16 LoRA at the same rank, trainable on a frozen
quantized base, and exportable to plain PEFT LoRA.
"""

__version__ = "0.1.0"

from .config import LoRDBAConfig
from .convert import ConversionReport, convert_lora
from .errors import (
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
from .export import export_lora
from .footprint import SizeReport, size_report
from .io import AdapterState, read_adapter
from .layer import DoubleBinaryAdapter, LoRDBALinear
from .model import LoRDBAModel, get_lordba_model
from .packing import pack_signs, unpack_signs

__all__ = [
    "AdapterFormatError",
    "AdapterState",
    "AdapterStateError",
    "ConfigError",
    "ConversionError",
    "ConversionReport",
    "DataError",
    "DoubleBinaryAdapter",
    "LoRDBAConfig",
    "LoRDBAError",
    "LoRDBALinear",
    "LoRDBAModel",
    "ShapeMismatchError",
    "SizeReport",
    "TargetModulesError",
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
