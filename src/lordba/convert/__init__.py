"""Post-training conversion (PTQ) of LoRA adapters into LoRDBA adapters.

* :func:`convert_lora`: a PEFT LoRA adapter (directory or ``peft.PeftModel``) → ``(AdapterState,
  ConversionReport)``; :func:`save_converted` writes both atomically.
* :func:`convert_factors` / :func:`convert_factors_batched`: one LoRA pair (or a batch of equal
  shape) → signs and scales, e.g. to initialise ``qat-from-lora`` training.
* :func:`collect_input_moments`: calibration statistics for the activation-weighted objective.

The math lives in :mod:`lordba.convert.factorize`; the solver in :mod:`lordba.convert.solver`; the
algorithm and its measurements are in ``docs/conversion.md``.
"""

from lordba.convert import combine as combine  # registers the dense combiner of add_weighted_adapter
from lordba.convert.calibrate import collect_input_moments
from lordba.convert.factors import FactorResult, convert_factors, convert_factors_batched
from lordba.convert.gauge import GAUGES
from lordba.convert.groups import METHODS, SolverOptions
from lordba.convert.peft_reader import LoraAdapter, LoraLayer
from lordba.convert.pipeline import check_output_dir, convert_lora, default_config, read_lora, save_converted
from lordba.convert.report import SIDECAR_NAME, ConversionReport, LayerReport

__all__ = [
    "GAUGES",
    "METHODS",
    "SIDECAR_NAME",
    "ConversionReport",
    "FactorResult",
    "LayerReport",
    "LoraAdapter",
    "LoraLayer",
    "SolverOptions",
    "check_output_dir",
    "collect_input_moments",
    "convert_factors",
    "convert_factors_batched",
    "convert_lora",
    "default_config",
    "read_lora",
    "save_converted",
]
