"""Adapter size accounting (SPEC §2): bytes, bits per weight on two bases, ratio to fp16 LoRA.

* payload: packed signs ``r·(in+out)/8`` plus the stored scale vectors, per module (the bytes of
  the tensors :func:`lordba.format.compact.file_shapes` describes: ``int4`` codes take half a byte);
* file: the exact ``lordba_model.safetensors`` size, headers included, in the format version that
  saves write (:data:`~lordba.config.DEFAULT_FORMAT_VERSION`, the compact version 3) or another;
* the fp16 LoRA of reference rank ``r_ref`` (default: the same rank): ``2·r_ref·(in+out)`` bytes
  per module, and the exact size of the ``adapter_model.safetensors`` PEFT would write for it.

BPW on the **LoRA basis** is ``bits / (r_ref·(in+out))`` (fp16 LoRA = 16; comparable with
LoRAQuant), on the **ΔW basis** ``bits / (in·out)`` (DBF's convention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lordba.config import COMPACT_FORMAT_VERSION, DEFAULT_FORMAT_VERSION, FORMAT_VERSION
from lordba.core.scales import NIBBLE_DTYPES
from lordba.errors import ConfigError
from lordba.format.compact import compact_metadata, file_shapes, kind_specs
from lordba.format.header import ModuleRecord, lordba_metadata
from lordba.format.tensorfile import file_size, nbytes

_SIGNS = ("sign_A", "sign_B")


def peft_lora_key(module_path: str, factor: str) -> str:
    """The tensor name PEFT writes for a LoRA factor (``"A"`` or ``"B"``) of a module."""
    return f"base_model.model.{module_path}.lora_{factor}.weight"


def stored_bytes(in_features: int, out_features: int, r: int, scale_dtype: str) -> dict[str, int]:
    """Bytes of each of the five tensors a file stores for a module of these dims and rank, ``{kind:
    bytes}`` (:func:`~lordba.format.compact.file_shapes`); :class:`ConfigError` for an unknown ``scale_dtype``."""
    return {
        kind: nbytes(dtype, shape)
        for kind, (dtype, shape) in file_shapes(in_features, out_features, r, scale_dtype).items()
    }


def payload_bytes(in_features: int, out_features: int, r: int, scale_dtype: str) -> int:
    """Payload bytes of one module (packed signs plus stored scales, no file header); raises as
    :func:`stored_bytes`."""
    return sum(stored_bytes(in_features, out_features, r, scale_dtype).values())


def lora_file_bytes(dims: dict[str, tuple[int, int, int]]) -> int:
    """Exact size of the ``adapter_model.safetensors`` PEFT writes for an fp16 LoRA with
    ``dims`` = ``{module path: (in, out, r)}``."""
    entries = []
    for path, (in_f, out_f, r) in dims.items():
        entries.append((peft_lora_key(path, "A"), torch.float16, (r, in_f)))
        entries.append((peft_lora_key(path, "B"), torch.float16, (out_f, r)))
    return file_size(entries, {"format": "pt"})


def adapter_file_bytes(
    dims: dict[str, tuple[int, int, int]], scale_dtype: str, format_version: int = DEFAULT_FORMAT_VERSION
) -> int:
    """Exact size of the ``lordba_model.safetensors`` of an adapter with ``dims`` = ``{module path:
    (in, out, r)}`` in ``format_version`` (1: one entry per module and kind; 3: the compact file),
    headers included, without extra tensors; raises as :func:`stored_bytes`, and :class:`ConfigError` for
    a version saves would not write here (not 1 or 3; ``int4`` scales in version 1)."""
    if format_version not in (FORMAT_VERSION, COMPACT_FORMAT_VERSION) or isinstance(format_version, bool):
        raise ConfigError(
            f"size_report: format_version must be {FORMAT_VERSION} or {COMPACT_FORMAT_VERSION} (a file without "
            f"extra tensors), got {format_version!r}"
        )
    if format_version != COMPACT_FORMAT_VERSION and scale_dtype in NIBBLE_DTYPES:
        raise ConfigError(
            f"size_report: scale_dtype {scale_dtype!r} is stored only in format version {COMPACT_FORMAT_VERSION} "
            f"files, not version {format_version}"
        )
    records = {p: ModuleRecord(p, *dims[p]) for p in sorted(dims)}
    if format_version == COMPACT_FORMAT_VERSION:
        kinds = [(kind, dtype, shape) for kind, (dtype, shape, _) in kind_specs(records, scale_dtype).items()]
        return file_size(kinds, compact_metadata(scale_dtype, records, "0" * 64))
    entries = [
        (f"{p}.{kind}", dtype, shape)
        for p, rec in records.items()
        for kind, (dtype, shape) in rec.expected(scale_dtype).items()
    ]
    return file_size(entries, lordba_metadata(scale_dtype, records, "0" * 64))  # a sha256 digest: 64 hex digits


@dataclass
class ModuleSize:
    """Footprint of one adapted module."""

    path: str
    in_features: int
    out_features: int
    r: int
    r_ref: int
    sign_bytes: int
    scale_bytes: int
    payload_bytes: int
    fp16_lora_bytes: int
    bpw_lora: float
    bpw_dw: float
    ratio: float


@dataclass
class SizeReport:
    """Footprint of a whole adapter, per module and in total."""

    scale_dtype: str
    modules: list[ModuleSize]
    payload_bytes: int
    file_bytes: int
    fp16_lora_payload_bytes: int
    fp16_lora_file_bytes: int
    bpw_lora: float
    bpw_dw: float
    ratio_payload: float
    ratio_file: float

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (modules as a list of dicts)."""
        return asdict(self)

    def summary(self) -> str:
        """A one-paragraph human summary of the totals."""
        return (
            f"{len(self.modules)} modules, scale_dtype={self.scale_dtype}: file {self.file_bytes:,} bytes "
            f"(payload {self.payload_bytes:,}) vs fp16 LoRA {self.fp16_lora_file_bytes:,} bytes -> "
            f"{self.ratio_file:.2f}x smaller on files, {self.ratio_payload:.2f}x on payload; "
            f"BPW {self.bpw_lora:.3f} (LoRA basis), {self.bpw_dw:.4f} (dW basis)"
        )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_dims(dims: dict[str, tuple[int, int, int]], r_ref: int | None) -> None:
    """Refuse what :func:`size_report` cannot describe (see there)."""
    if not dims:
        raise ConfigError("size_report: no modules")
    for path, dim in dims.items():
        if not (isinstance(dim, (tuple, list)) and len(dim) == 3 and all(_positive_int(v) for v in dim)):
            raise ConfigError(f"size_report: module {path!r} needs (in, out, r), three positive integers, got {dim!r}")
    if r_ref is not None and not _positive_int(r_ref):
        raise ConfigError(f"size_report: r_ref must be a positive integer (or None: each module's rank), got {r_ref!r}")


def size_report(
    dims: dict[str, tuple[int, int, int]],
    scale_dtype: str,
    file_bytes: int | None = None,
    r_ref: int | None = None,
    format_version: int = DEFAULT_FORMAT_VERSION,
) -> SizeReport:
    """Footprint of an adapter with ``dims`` = ``{module path: (in, out, r)}``.

    ``file_bytes`` is the real weights-file size if known (else computed exactly for the file
    ``format_version``, by default the one saves write);
    ``r_ref`` is the rank of the fp16 LoRA to compare with (default: each module's own rank).

    Raises:
        ConfigError: no modules, a module whose dimensions are not three positive integers, or an ``r_ref``
            that is not a positive integer (the ratios would divide by zero or come out negative); without
            ``file_bytes``, a ``format_version`` other than 1 or 3, or ``int4`` scales in version 1 (saves write
            neither).
    """
    _check_dims(dims, r_ref)
    rows: list[ModuleSize] = []
    for path in sorted(dims):
        in_f, out_f, r = dims[path]
        ref = r_ref or r
        stored = stored_bytes(in_f, out_f, r, scale_dtype)
        signs = sum(stored[kind] for kind in _SIGNS)
        payload = sum(stored.values())
        scales = payload - signs
        lora = 2 * ref * (in_f + out_f)
        rows.append(
            ModuleSize(
                path,
                in_f,
                out_f,
                r,
                ref,
                signs,
                scales,
                payload,
                lora,
                bpw_lora=8 * payload / (ref * (in_f + out_f)),
                bpw_dw=8 * payload / (in_f * out_f),
                ratio=lora / payload,
            )
        )
    if file_bytes is None:
        file_bytes = adapter_file_bytes(dims, scale_dtype, format_version)
    payload = sum(m.payload_bytes for m in rows)
    lora_payload = sum(m.fp16_lora_bytes for m in rows)
    lora_file = lora_file_bytes({m.path: (m.in_features, m.out_features, m.r_ref) for m in rows})
    return SizeReport(
        scale_dtype=scale_dtype,
        modules=rows,
        payload_bytes=payload,
        file_bytes=file_bytes,
        fp16_lora_payload_bytes=lora_payload,
        fp16_lora_file_bytes=lora_file,
        bpw_lora=8 * file_bytes / sum(m.r_ref * (m.in_features + m.out_features) for m in rows),
        bpw_dw=8 * file_bytes / sum(m.in_features * m.out_features for m in rows),
        ratio_payload=lora_payload / payload,
        ratio_file=lora_file / file_bytes,
    )
