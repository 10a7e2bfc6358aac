"""Reading, validating and writing the adapter directory of SPEC §6.

Files are untrusted input. Reading goes in this order, and nothing is allocated for the file's
bytes before its header has been checked to describe exactly its length:

1. ``adapter_config.json``: size limit, JSON, every field's type and value, format version.
2. Weights file: a regular file of the directory (no FIFO, device or link leaving it), whose header
   describes exactly its length (so a refusal costs a read of the header, not of the file), then
   the sha256 of its bytes (one read into one buffer, kept) against the config, and the config's
   digest stored in its metadata against the config's fields (:mod:`lordba.format.integrity`). If
   the pair is inconsistent but the backups of an interrupted save are consistent, those are read
   instead.
3. safetensors header: length bound, JSON, metadata (format, version, scale dtype, module
   dims), then every tensor's name, dtype, shape and byte range against the config and metadata
   (version 3: the five kind tensors, :mod:`lordba.format.compact`).
4. Tensor data (views of the buffer read in step 2: no second read): padding bits, finite scales,
   int8 codes, checked in one vectorised pass per tensor kind.

Steps 1 and 2 (the config and weights read as one checked pair, or an interrupted save's backups) are in
:mod:`lordba.format.pair`; steps 3 and 4, and what the header must describe, in :mod:`lordba.format.header`.

Writing serialises deterministically (same adapter, same bytes), in format version 3 unless told
otherwise, and commits weights and config crash-safely (:func:`lordba.format.commit.commit_files`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lordba._util.files import check_path, not_a_directory
from lordba._util.jsonio import safe_repr
from lordba._util.locks import wait_for_writer
from lordba._version import __version__
from lordba.config import COMPACT_FORMAT_VERSION, CONFIG_NAME, DEFAULT_FORMAT_VERSION, WEIGHTS_NAME, LoRDBAConfig
from lordba.core.scales import NIBBLE_DTYPES
from lordba.errors import AdapterFormatError, LoRDBAError
from lordba.format.commit import commit_file_sets, commit_files
from lordba.format.compact import check_compact_header, compact_metadata, compact_tensors, split_tensors
from lordba.format.extras import EXTRA_PREFIX, check_extra_values, extras_to_file, file_version
from lordba.format.header import (
    TENSOR_KINDS,
    ModuleRecord,
    check_all_values,
    check_header,
    check_module_path,
    check_modules,
    lordba_metadata,
    stored_shapes,
    tensor_views,
)
from lordba.format.integrity import config_digest
from lordba.format.pair import _consistent_pair, _Inconsistent, _open_verified, _pair_consistent, _stamp
from lordba.format.tensorfile import to_bytes

__all__ = [  # ModuleRecord, TENSOR_KINDS and stored_shapes are defined in lordba.format.header
    "TENSOR_KINDS",
    "AdapterFile",
    "AdapterState",
    "ModuleRecord",
    "adapter_files",
    "commit_adapter",
    "commit_adapters",
    "open_adapter",
    "read_adapter",
    "serialize",
    "stored_shapes",
    "write_adapter",
]

_ATTEMPTS = 3


@dataclass
class AdapterState:
    """An adapter in memory, independent of any base model: its config and, per module, the
    stored tensors. Conversion returns one; it can be saved, exported, or loaded onto a model
    (``LoRDBAModel.load_adapter_state``)."""

    config: LoRDBAConfig
    modules: dict[str, ModuleRecord]
    # Format version 2: tensors trained in full, ``{parameter path: tensor}`` (lordba.format.extras).
    extras: dict[str, torch.Tensor] = field(default_factory=dict, kw_only=True)

    def save_pretrained(self, directory: str | Path, format_version: int | None = None) -> Path:
        """Write the adapter directory (crash-safe, deterministic) in ``format_version`` (default
        :data:`~lordba.config.DEFAULT_FORMAT_VERSION`, see :func:`serialize`); returns it."""
        return write_adapter(directory, self.config, self.modules, self.extras, format_version)

    def dims(self) -> dict[str, tuple[int, int, int]]:
        """``{module path: (in, out, r)}``."""
        return {p: (m.in_features, m.out_features, m.r) for p, m in self.modules.items()}


@dataclass
class AdapterFile(AdapterState):
    """A validated adapter directory: an :class:`AdapterState` plus file facts.

    It holds the weights file's bytes, read once by :func:`open_adapter`, until :meth:`load_tensors`
    (or :meth:`close`): the checksum, the header and the tensors all come from the same bytes, even
    if a save replaces the directory's files in between."""

    directory: Path = Path(".")
    sha256: str = ""
    weights_path: Path = Path(".")
    weights_bytes: int = 0
    recovered: bool = False
    _data: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = field(
        default_factory=dict, repr=False, compare=False
    )
    format_version: int = 1

    def load_tensors(self) -> None:
        """Take every tensor from the file's bytes whose checksum was verified (views of that one
        buffer, no second read) and check their values; fills ``ModuleRecord.tensors``."""
        if all(rec.tensors for rec in self.modules.values()):
            return
        path = self.weights_path
        data = self._data
        if data is None:  # closed: read (and verify) again
            data = _open_verified(path, self.sha256)[0]
        self._data = None
        tensors = tensor_views(data, self._spans)
        kinds = {}
        try:
            if self.format_version == COMPACT_FORMAT_VERSION:  # views of the five kind tensors
                kinds = split_tensors(tensors, self.modules, self.config.scale_dtype, path)
            else:
                for rec in self.modules.values():
                    rec.tensors = {k: tensors[f"{rec.path}.{k}"] for k in TENSOR_KINDS}
            names = [k for k in self._spans if k.startswith(EXTRA_PREFIX)]  # format version 2 or 3
            self.extras = {k[len(EXTRA_PREFIX) :]: tensors[k] for k in sorted(names)}
            check_all_values(list(self.modules.values()), self.config.scale_dtype, path, kinds)
            check_extra_values(self.extras, str(path))
        except LoRDBAError:  # a refused file leaves no tensors: a second call reads and checks again
            for rec in self.modules.values():
                rec.tensors = {}
            self.extras = {}
            raise

    def close(self) -> None:
        """Drop the file's bytes held since :func:`open_adapter` (:meth:`load_tensors` does; needed
        only to free them without loading)."""
        self._data = None


def open_adapter(directory: str | Path, *, warn_recovered: bool = True) -> AdapterFile:
    """Validate an adapter directory up to the tensor headers (steps 1–3); tensors load lazily.

    ``warn_recovered=False``: no warning where an interrupted save's previous version is read (the result's
    ``recovered`` says so; for a writer checking what it has just written, which refuses that itself)."""
    check_path(directory, "the adapter directory")
    directory = Path(directory)
    try:
        found = directory.is_dir()
    except OSError as err:  # a name too long for the file system, a loop of links
        raise AdapterFormatError(f"{safe_repr(str(directory))}: cannot be read ({err.strerror or err})") from None
    if not found:
        raise AdapterFormatError(not_a_directory(directory))
    for attempt in range(_ATTEMPTS):
        last = attempt + 1 == _ATTEMPTS
        stamp = _stamp(directory / CONFIG_NAME)
        try:
            pair, recovered = _consistent_pair(directory)
        except _Inconsistent:
            # A save that finished while we read can leave us with the old config and the new
            # weights (a mismatch, and the backups gone): read again if the config changed, or
            # once a save still running (it holds the directory's lock) is done.
            if last or (_stamp(directory / CONFIG_NAME) == stamp and not wait_for_writer(directory)):
                raise
            continue
        if recovered and not last and wait_for_writer(directory):
            continue  # read between a running save's renames: read what it wrote, not its backups
        break
    if recovered and warn_recovered:
        warnings.warn(
            f"{directory}: an interrupted save left an inconsistent adapter; reading the previous, "
            "intact version (the next save restores it)",
            stacklevel=2,
        )
    head = pair.header
    size, header_len = head.size, head.length
    version = pair.config.file_version
    check = check_compact_header if version == COMPACT_FORMAT_VERSION else check_header
    modules, spans = check(head.entries, head.metadata, pair.config, pair.weights_path, size - 8 - header_len)
    spans = {
        name: (dtype, shape, 8 + header_len + start, 8 + header_len + stop)
        for name, (dtype, shape, start, stop) in spans.items()
    }
    return AdapterFile(
        pair.config, modules, directory, pair.sha, pair.weights_path, size, recovered, pair.data, spans, version
    )


def read_adapter(directory: str | Path, *, warn_recovered: bool = True) -> AdapterFile:
    """Fully read and validate an adapter directory (all four steps); ``warn_recovered`` as for
    :func:`open_adapter`."""
    adapter = open_adapter(directory, warn_recovered=warn_recovered)
    adapter.load_tensors()
    return adapter


def serialize(
    config: LoRDBAConfig,
    modules: dict[str, ModuleRecord],
    extras: dict[str, torch.Tensor] | None = None,
    format_version: int | None = None,
) -> tuple[bytes, bytes]:
    """``(weights bytes, config bytes)`` of an adapter; deterministic for the same content.

    ``format_version``: 3 (the default, :data:`~lordba.config.DEFAULT_FORMAT_VERSION`) writes the
    compact file (:mod:`lordba.format.compact`, ``extras`` included); 1 writes one tensor per module
    and kind, as version 2 when there are ``extras`` (:mod:`lordba.format.extras`). Raises
    :class:`AdapterFormatError` for another version, for ``int4`` scales in version 1, for modules
    the config does not describe (not targeted, excluded, another rank), or for tensors a reader
    would refuse (module path, dtype, shape, NaN or infinite values)."""
    layout = DEFAULT_FORMAT_VERSION if format_version is None else format_version
    version = file_version(extras or {}, layout)
    if version != COMPACT_FORMAT_VERSION and config.scale_dtype in NIBBLE_DTYPES:
        raise AdapterFormatError(
            f"cannot save scale_dtype {config.scale_dtype!r} in format version {version}: it needs version "
            f"{COMPACT_FORMAT_VERSION}"
        )
    tensors = checked_tensors(config, modules)
    # modules the config does not describe (target, exclusion, rank) would be refused by every reader
    check_modules({n: [m.in_features, m.out_features, m.r] for n, m in modules.items()}, config, "cannot save")
    if version == COMPACT_FORMAT_VERSION:
        tensors = compact_tensors(modules, config.scale_dtype)
    tensors.update(extras_to_file(extras or {}))
    fields = config.to_dict(version)  # the config's digest, in the weights' metadata, covers exactly these
    make_metadata = compact_metadata if version == COMPACT_FORMAT_VERSION else lordba_metadata
    metadata = make_metadata(config.scale_dtype, modules, config_digest(fields))
    weights = to_bytes(tensors, {**metadata, "format_version": str(version)})
    extra = {"weights_sha256": hashlib.sha256(weights).hexdigest(), "library_version": __version__}
    text = json.dumps({**fields, **extra}, indent=2) + "\n"
    return weights, text.encode()


def checked_tensors(
    config: LoRDBAConfig, modules: dict[str, ModuleRecord], where: str = "cannot save"
) -> dict[str, torch.Tensor]:
    """``{"P.kind": tensor}`` of every module, after refusing what a reader would refuse: a module path,
    a missing tensor, a dtype or shape, NaN or infinite scales, codes outside the format (int8 -128,
    int4 codes, a vector not reaching ±127). ``where`` begins the messages (saving; loading an
    in-memory state). Raises :class:`AdapterFormatError`."""
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        rec = modules[name]
        check_module_path(name, where)  # never write what the loader refuses
        for kind, (dtype, shape) in rec.expected(config.scale_dtype).items():
            t = rec.tensors.get(kind)
            if not isinstance(t, torch.Tensor):
                raise AdapterFormatError(f"{where} {name}.{kind}: missing")
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise AdapterFormatError(f"{where} {name}.{kind}: {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            tensors[f"{name}.{kind}"] = t.contiguous()
    on_cpu = [
        ModuleRecord(r.path, r.in_features, r.out_features, r.r, {k: t.cpu() for k, t in r.tensors.items()})
        for r in (modules[n] for n in sorted(modules))
    ]
    check_all_values(on_cpu, config.scale_dtype, where)  # one pass per kind, names the tensor at fault
    return tensors


def write_adapter(
    directory: str | Path,
    config: LoRDBAConfig,
    modules: dict[str, ModuleRecord],
    extras: dict[str, torch.Tensor] | None = None,
    format_version: int | None = None,
) -> Path:
    """Write an adapter directory crash-safely (``extras`` and ``format_version`` as in
    :func:`serialize`); returns the directory. Raises :class:`AdapterFormatError` as it does."""
    return commit_adapter(directory, adapter_files(config, modules, extras, format_version))


def adapter_files(
    config: LoRDBAConfig,
    modules: dict[str, ModuleRecord],
    extras: dict[str, torch.Tensor] | None = None,
    format_version: int | None = None,
) -> dict[str, bytes]:
    """The files :func:`write_adapter` commits, ``{name: bytes}`` (computed before anything is written, so
    that a save of several adapters can refuse one before writing any). Raises :class:`AdapterFormatError`
    as :func:`serialize` does, and for an adapter without modules."""
    if not modules:
        raise AdapterFormatError("refusing to save an adapter with no modules")
    weights, config_bytes = serialize(config, modules, extras, format_version)
    return {WEIGHTS_NAME: weights, CONFIG_NAME: config_bytes}


def commit_adapter(directory: str | Path, files: dict[str, bytes]) -> Path:
    """Replace an adapter directory's files with ``files`` (from :func:`adapter_files`) crash-safely;
    returns the directory."""
    commit_files(directory, files, _pair_consistent)
    return Path(directory)


def commit_adapters(saves: list[tuple[Path, dict[str, bytes]]]) -> None:
    """:func:`commit_adapter` for several adapter directories (a model's adapters, each ``(directory, files)``):
    every file of every adapter is written before any replaces one, so that a failing write leaves all as they were."""
    commit_file_sets(saves, _pair_consistent)
