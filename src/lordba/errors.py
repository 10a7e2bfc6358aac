"""The library's exceptions: one base class, :class:`LoRDBAError`, that callers can catch.

Every message names what is wrong (the file, tensor, module or config field), so a user can act on
it without a stack trace.
"""

from __future__ import annotations


class LoRDBAError(Exception):
    """Base class of every error raised on purpose by lordba."""


class ConfigError(LoRDBAError, ValueError):
    """A configuration value (``LoRDBAConfig`` field or ``adapter_config.json`` entry) is invalid."""


class TargetModulesError(LoRDBAError, ValueError):
    """Target modules match nothing, or match layers that cannot be adapted."""


class ShapeMismatchError(LoRDBAError, ValueError):
    """A tensor's shape, rank or size does not fit the module it is meant for."""


class AdapterFormatError(LoRDBAError, ValueError):
    """An adapter directory or file is missing, corrupt, truncated, tampered with or of an unknown version."""


class AdapterStateError(LoRDBAError, RuntimeError):
    """The requested operation does not fit the adapter's current state (unknown name, merged, ...)."""


class ConversionError(LoRDBAError, ValueError):
    """A LoRA adapter cannot be converted (unsupported method, bad factors, ...)."""


class TrainingError(LoRDBAError, RuntimeError):
    """Training cannot go on (non-finite loss, bad data, ...)."""


class DataError(LoRDBAError, ValueError):
    """A data file or data set is malformed."""


class BaseModelWarning(UserWarning):
    """An adapter is loaded onto a base model other than the one its config records (``base_model_name_or_path``)."""
