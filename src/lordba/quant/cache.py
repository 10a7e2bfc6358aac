"""A disk cache of quantized bases, so that slow quantizers run once per model and setting.

HQQ's half-quadratic optimiser takes minutes for a whole model on 2 CPU cores (about 0.5–1.7 s per
layer of SmolLM2) and gives ~20% lower weight error than plain rounding. Its quantized state is a
set of tensors, stored here as safetensors (no pickle) under ``cache_dir()/quantized/``, keyed by the
model's files, the model as loaded and the quantization settings, with a sha256 of the tensors checked on
every load (a damaged entry is quantized again, never used). The ``q4`` base uses the same optimiser and is cached
the same way. bitsandbytes quantizes in milliseconds: no cache.

Nothing is evicted: a changed model folder, other settings or another lordba version make a new entry beside the
old ones (a SmolLM2-135M entry is 67-90 MB, a 7B model's several GB). :func:`cache_entries` lists the entries with
their sizes; :func:`clear_cache` removes them (a process loading one keeps reading it: it is only unlinked; one
writing one renames its whole file into place after).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lordba._util.state import ordinary_tensors
from lordba._version import __version__
from lordba.errors import LoRDBAError
from lordba.format.atomic import atomic_write_path
from lordba.format.header import read_header
from lordba.format.tensorfile import ST_READ_DTYPES
from lordba.quant.quantize import (
    DEFAULT_BACKEND,
    check_no_adapters,
    install_quantized,
    quantizable,
    quantize_model,
    quantized_head,
)

_KEYED_SUFFIXES = (".safetensors", ".bin", ".json")  # the weights transformers loads (safetensors, PyTorch), configs


def _key(source: Path, backend: str, bits: int, group_size: int, model: list) -> str:
    """The cache entry's name: the model folder's weight and config files (:data:`_KEYED_SUFFIXES`: name, size,
    time), the settings, the model as loaded (``model``: :func:`_signature`; a bfloat16 copy quantizes to other
    codes and scales than the float32 one, a copy loaded with fewer layers has fewer), HQQ's and lordba's versions
    and the file layout."""
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.glob("*") if p.suffix in _KEYED_SUFFIXES
    )
    try:
        from importlib.metadata import version

        hqq_version = version("hqq")
    except Exception:
        hqq_version = "?"
    blob = json.dumps(
        [str(source.resolve()), files, backend, bits, group_size, model, hqq_version, __version__, _LAYOUT]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@ordinary_tensors()
def quantize_model_cached(
    model: nn.Module,
    source: str | Path,
    backend: str = DEFAULT_BACKEND,
    bits: int = 4,
    group_size: int = 64,
    progress: bool = False,
    compute: str | None = None,
) -> nn.Module:
    """:func:`quantize_model` for a model loaded from the folder ``source``, reusing a cached result; ``compute``:
    how its q4 layers compute (:func:`~lordba.quant.q4.set_compute`; None: their default)."""
    model = _quantized(model, source, backend, bits, group_size, progress)
    if compute:
        from lordba.quant import set_compute  # (lazily: the package imports this module)

        set_compute(model, compute)
    return model


def _quantized(
    model: nn.Module, source: str | Path, backend: str, bits: int, group_size: int, progress: bool
) -> nn.Module:
    """:func:`quantize_model_cached` but the compute mode."""
    from lordba._util.cachedir import cache_dir  # lazily: assets imports the library

    check_no_adapters(model)  # before a cached base is loaded under them
    source = Path(source)
    if backend not in _CACHED or not source.is_dir():
        return quantize_model(model, backend, bits, group_size, progress=progress)
    path = cache_dir() / "quantized" / f"{_key(source, backend, bits, group_size, _signature(model))}.safetensors"
    if path.is_file():
        try:
            _load(model, path, backend, bits, group_size)
            return model
        except Exception as err:  # a damaged cache entry is rebuilt, never fatal
            warnings.warn(f"quantized-base cache {path} could not be read ({err}); quantizing again", stacklevel=2)
            with contextlib.suppress(OSError):  # a read-only cache: quantized uncached, the write below warns
                path.unlink(missing_ok=True)
    wanted = set(_cached_layers(model, backend))  # the layers this call quantizes (of a partly quantized model too)
    quantize_model(model, backend, bits, group_size, progress=progress)
    state = {}
    for name, module in model.named_modules():
        if name in wanted and type(module).__name__ in _CACHED[backend]:
            for k, v in module.state_dict().items():
                state[f"{name}::{k}"] = v.detach().cpu().contiguous()
            if hasattr(module, "bits") and backend == "q4":
                state[f"{name}::bits"] = torch.tensor(module.bits)
    _store(state, path)
    return model


_ENTRY = re.compile(r"[0-9a-f]{20}\.safetensors")  # an entry's name (:func:`_key`); never a writer's temporary file


def cache_entries() -> list[tuple[Path, int]]:
    """The quantized-base cache's entries (``cache_dir()/quantized/``) and their sizes in bytes, oldest written
    first; ``[]`` where there is no cache."""
    from lordba._util.cachedir import cache_dir

    found = []
    with contextlib.suppress(OSError):
        for path in (cache_dir() / "quantized").iterdir():
            with contextlib.suppress(OSError):  # (removed meanwhile)
                if _ENTRY.fullmatch(path.name) and path.is_file():
                    st = path.stat()
                    found.append((st.st_mtime_ns, path, st.st_size))
    return [(path, size) for _, path, size in sorted(found)]


def clear_cache() -> int:
    """Remove every entry of the quantized-base cache (:func:`cache_entries`; the next load of a model quantizes it
    again); returns the bytes freed. An entry another process removed meanwhile is skipped.

    Raises:
        OSError: an entry that exists cannot be removed (a read-only cache).
    """
    freed = 0
    for path, size in cache_entries():
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed


def _store(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write the cache entry ``path`` through a temporary file of this call's own (:func:`atomic_write_path`: writers
    in other threads or processes each rename a whole, fsynced file of their own into place; safetensors streams the
    tensors to it). A write that fails (a read-only or full disk, a file where the folder should be) is a warning: the
    cache is a shortcut, the model is quantized."""
    try:
        with atomic_write_path(path) as tmp:
            save_file(state, str(tmp), metadata={"sha256": _digest(state)})
    except (OSError, SafetensorError, LoRDBAError) as err:
        warnings.warn(f"quantized-base cache {path} could not be written ({err}); continuing without it", stacklevel=3)


_CACHED = {"hqq": ("HQQLinear", "LordbaHQQLinear"), "q4": ("Q4Linear",)}  # backend -> the layer classes cached
_LAYOUT = 3  # of the cached files (2: the q4 base's output head is cached too; 3: q4 zero points rounded at 4 bits)


def _digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of an entry's tensors (names, dtypes, shapes and bytes, in name order): kept in its metadata and
    checked on load, so that a damaged entry (a flipped or zeroed byte) is quantized again, never loaded."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _load(model: nn.Module, path: Path, backend: str, bits: int, group_size: int, device: str | None = None) -> None:
    """Put the layers of the entry ``path`` in place in ``model``, each on the device of the layer it replaces (or on
    ``device``: a model whose float layers were never loaded, :mod:`lordba.quant.skeleton`)."""
    state, recorded = _read(path, _held_order(model, backend, device))
    if recorded != _digest(state):
        raise ValueError("its tensors do not match the checksum it was written with")
    names = sorted({k.split("::", 1)[0] for k in state})
    if names != _cached_layers(model, backend):  # checked before any layer is replaced
        raise ValueError("the cached layers are not the model's quantizable layers")
    linears = dict(quantizable(model))  # a GPT-2 Conv1D as the nn.Linear it quantizes as
    built = []  # every layer built before any is replaced: an entry failing part way leaves the model as it was
    for name in names:
        linear = linears.get(name) or model.get_submodule(name)  # (or the output head)
        prefix = f"{name}::"
        sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        where = device or str(linear.weight.device)
        new = _hqq_layer(linear, sd, bits, group_size, where) if backend == "hqq" else _q4_layer(linear, sd, where)
        built.append((name, new))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # (not replaced yet)
    head_bits = next((q.bits for n, q in built if backend == "q4" and model.get_submodule(n) is head), 0)
    state = sd = linears = linear = head = None  # the float layers and the read tensors: freed as they are replaced
    install_quantized(
        model, built, {"backend": backend, "bits": bits, "group_size": group_size, "head_bits": head_bits}
    )
    torch.nn.Module.train(model, model.training)


def _read(path: Path, held: list[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of the entry ``path`` and the sha256 its metadata records, each byte read once, without a mapping of
    the file: the tensors named in ``held`` straight into views of one buffer laid out as
    :func:`~lordba.quant.q4.hold_weights_together` lays them out (which then leaves them there; read whole, then
    copied there, the entry was held twice at the peak: a 36 MB entry's base peaked at 81 MB, now 48), the others each
    into its own tensor.

    Raises:
        AdapterFormatError: a header that cannot be read (:func:`~lordba.format.header.read_header`). ValueError: a
            header that does not describe the file (a damaged entry).
    """
    from lordba._util.arena import empty_views

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, metadata, length = read_header(f, path, size)
        recorded = metadata.get("sha256")
        specs = {
            name: (tuple(e["shape"]), ST_READ_DTYPES[e["dtype"]], *e["data_offsets"]) for name, e in header.items()
        }
        for name, (shape, dtype, begin, end) in specs.items():
            if not 0 <= begin <= end <= size - 8 - length or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"its header places {name!r} ({dtype}, {list(shape)}) at bytes {begin}-{end}")
        held = held if set(held) <= set(specs) else []
        views = dict(zip(held, empty_views([specs[n][:2] for n in held], align=64, huge_pages=True)))
        state = {}
        for name, (shape, dtype, begin, _) in sorted(specs.items(), key=lambda item: item[1][2]):  # in file order
            tensor = views[name] if name in views else torch.empty(shape, dtype=dtype)
            f.seek(8 + length + begin)
            into = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            while into.nbytes:
                got = f.readinto(into)
                if not got:
                    raise ValueError(f"it ends within {name!r}")
                into = into[got:]
            state[name] = tensor
    return state, recorded


def _held_order(model: nn.Module, backend: str, device: str | None) -> list[str]:
    """The names of a ``q4`` entry's tensors that :func:`~lordba.quant.q4.hold_weights_together` holds in one buffer
    once its layers are in place in ``model``, in its order (``[]`` where that is not known: another backend, layers
    not on the CPU, or q4 layers in ``model`` already)."""
    from lordba.quant.q4 import Q4Linear

    if backend != "q4" or any(isinstance(m, Q4Linear) for m in model.modules()):
        return []
    names = _cached_layers(model, backend)
    linears = dict(quantizable(model))
    modules = {name: linears.get(name) or model.get_submodule(name) for name in names}
    weights = [getattr(m, "weight", None) for m in modules.values()]
    if not all(isinstance(w, torch.Tensor) and (device or w.device.type) == "cpu" for w in weights):
        return []
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    if not set(names) <= set(order) or len({id(m) for m in modules.values()}) < len(names):
        return []
    return [f"{name}::{key}" for name in sorted(names, key=order.get) for key in ("qweight", "scale", "minus")]


def _signature(model: nn.Module) -> list:
    """What of the model itself a cache entry depends on: its parameters' dtypes, its quantizable layers' names and
    weight shapes, and its output head's (which the ``q4`` entry holds: a vocabulary resized after loading makes
    another head) and whether that is tied to the input embeddings."""
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(head, "weight", None)
    head_key = None
    if isinstance(weight, torch.Tensor):
        head_key = [list(weight.shape), weight is getattr(embeddings, "weight", None)]
    return [dtypes, [(name, list(m.weight.shape)) for name, m in quantizable(model)], head_key]


def _cached_layers(model: nn.Module, backend: str) -> list[str]:
    """The names of the layers an entry for ``model`` holds: its quantizable layers and, for ``q4``, its output
    head where :func:`quantize_model` quantizes it (:func:`~lordba.quant.quantize.quantized_head`)."""
    names = [n for n, _ in quantizable(model)]
    head = quantized_head(model) if backend == "q4" else None
    return sorted([*names, head[0]] if head else names)


def _hqq_layer(linear: nn.Linear, sd: dict[str, torch.Tensor], bits: int, group_size: int, device: str) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig

    from lordba.quant.hqq import hqq_layer_cls

    config = {**BaseQuantizeConfig(nbits=bits, group_size=group_size), "offload_meta": False}
    q = hqq_layer_cls()(None, config, compute_dtype=linear.weight.dtype, device=device, initialize=False)
    q.load_state_dict(sd)
    return q


def _q4_layer(linear: nn.Linear, sd: dict[str, torch.Tensor], device: str) -> nn.Module:
    """The cached q4 layer of ``linear``, on ``device`` (``linear``'s)."""
    from lordba.quant.q4 import Q4Linear

    bits = int(sd["bits"]) if "bits" in sd else 4
    layer = Q4Linear(sd["qweight"], sd["scale"], sd["minus"], linear.in_features, sd.get("bias"), bits)
    return layer.to(device)  # where quantize_model builds it (Q4Linear.from_weight): the linear's device
