"""Extra tensors an adapter file may hold beside its LoRDBA modules (format version 2): the weights of
the modules trained in full (``modules_to_save``, a task's head) and trained biases.

In the safetensors file each is stored as ``extra:<parameter path>`` (``extra:score.weight``,
``extra:model.layers.0.self_attn.q_proj.bias``), a float tensor (float32, float16 or bfloat16). A file
with extras is format version 2 (config and metadata); a file without keeps version 1, byte for byte
what older lordba versions write and read. Whether a name and shape fit a model is checked when the
adapter is loaded onto it (:mod:`lordba.nn.model_peft`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lordba._util.jsonio import safe_repr
from lordba.config import COMPACT_FORMAT_VERSION, EXTRAS_FORMAT_VERSION, FORMAT_VERSION
from lordba.errors import AdapterFormatError
from lordba.format.tensorfile import ST_DTYPES

EXTRA_PREFIX = "extra:"
MAX_MODULE_PATH = 256
_PATH_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERNAL = ("base_layer", "lordba_adapters", "lordba_saved", "original_module")


def check_extra_name(name: str, where: str) -> None:
    """Raise :class:`AdapterFormatError` unless ``name`` (without the prefix) is a parameter path:
    dot-separated names of letters, digits, ``_`` and ``-``, at most 256 characters, with at least a
    module and a parameter name, and not inside a LoRDBA layer."""
    ok = isinstance(name, str) and len(name) <= MAX_MODULE_PATH and _PATH_RE.fullmatch(name) is not None
    if not ok or "." not in name or any(part in _INTERNAL for part in name.split(".")):
        raise AdapterFormatError(f"{where}: extra tensor name {safe_repr(name)} is not a parameter path of the model")


def extra_entries(
    header: dict[str, Any], metadata: dict[str, str], path: Path
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The extra tensors a header describes, ``{file name: (dtype, shape)}``, checked: names, float
    dtypes, shapes, and the format version (in a version 1 or 2 file, 2 exactly when there are
    extras; a version 3 file may hold extras or not). Raises
    :class:`AdapterFormatError` naming the file and tensor."""
    found: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, entry in header.items():
        if not key.startswith(EXTRA_PREFIX):
            continue
        check_extra_name(key[len(EXTRA_PREFIX) :], f"{path}: tensor {safe_repr(key)}")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise AdapterFormatError(f"{path}: tensor {key}: malformed header entry")
        dtype = ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"{path}: tensor {key}: dtype {safe_repr(entry['dtype'])}, expected F32, F16 or BF16"
            )
        shape = entry["shape"]
        if not (
            isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 1 << 31 for d in shape)
        ):
            raise AdapterFormatError(f"{path}: tensor {key}: malformed shape {safe_repr(shape)}")
        found[key] = (dtype, tuple(shape))
    version = metadata.get("format_version")
    if version == str(COMPACT_FORMAT_VERSION):  # version 3 carries extras or not
        return found
    if found and version != str(EXTRAS_FORMAT_VERSION):
        raise AdapterFormatError(
            f"{path}: extra tensors in a format_version {safe_repr(version)} file (they need "
            f"version {EXTRAS_FORMAT_VERSION})"
        )
    if not found and version == str(EXTRAS_FORMAT_VERSION):
        raise AdapterFormatError(f"{path}: format_version {EXTRAS_FORMAT_VERSION} but no extra tensors")
    return found


def check_extra_values(extras: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`AdapterFormatError` unless every extra tensor is a finite float tensor (float32,
    float16 or bfloat16) under a valid name."""
    for name, t in extras.items():
        check_extra_name(name, where)
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"{where}: extra tensor {name}: {getattr(t, 'dtype', type(t).__name__)}, expected a float tensor"
            )
        if not bool(torch.isfinite(t).all()):
            raise AdapterFormatError(f"{where}: extra tensor {name}: holds NaN or infinite values")


def file_version(extras: dict[str, torch.Tensor], layout: int = FORMAT_VERSION) -> int:
    """The format version of a file holding ``extras`` in ``layout`` (1: one tensor per module and
    kind, 2 with extras, else 1; 3: the compact layout, with or without extras). Raises
    :class:`AdapterFormatError` for another layout, or layout 2 without extras."""
    exact = type(layout) is int  # 3.0 or True would be written as given, and no reader takes them
    if exact and layout == COMPACT_FORMAT_VERSION:
        return layout
    if (
        not exact
        or layout not in (FORMAT_VERSION, EXTRAS_FORMAT_VERSION)
        or (layout == EXTRAS_FORMAT_VERSION and not extras)
    ):
        raise AdapterFormatError(
            f"cannot save format_version {safe_repr(layout)}: lordba writes 1 (2 with extra tensors) or "
            f"{COMPACT_FORMAT_VERSION}"
        )
    return EXTRAS_FORMAT_VERSION if extras else FORMAT_VERSION


def extras_to_file(extras: dict[str, torch.Tensor], where: str = "cannot save") -> dict[str, torch.Tensor]:
    """``{"extra:<name>": contiguous CPU tensor}`` for writing, after :func:`check_extra_values`."""
    check_extra_values(extras, where)
    return {EXTRA_PREFIX + name: t.detach().cpu().contiguous() for name, t in sorted(extras.items())}
