"""A cached quantized base loaded without its float model: on a cache hit (:mod:`lordba.quant.cache`), the model is
built with its parameters on the ``meta`` device (its non-persistent buffers, such as rotary ``inv_freq``, computed
for real), the cached quantized layers are put in place, and only the tensors the entry does not hold (embeddings,
norms, biases, an unquantized head) are read from the model's safetensors files.

``AutoModelForCausalLM.from_pretrained`` then :func:`~lordba.quant.cache.quantize_model_cached` (what ``lordba
generate`` and ``lordba serve`` did on every start) held the whole float model first: SmolLM2-135M in float32 is
540 MB, a 1B model's ~5 GB, where their q4 bases are 0.1 and 0.8 GB. The model built here equals that one bit for
bit; anything this does not build as ``from_pretrained`` would (no entry yet, a ``.bin`` checkpoint, custom code, a
pre-quantized or adapter folder, checkpoint keys transformers renames or converts, ``_keep_in_fp32_modules``) gives
``None``: the caller takes that path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from lordba._util.state import ordinary_tensors

_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"  # transformers' names, in its order


@ordinary_tensors()
def load_cached_base(
    folder: str | Path,
    dtype: torch.dtype,
    backend: str,
    bits: int = 4,
    group_size: int = 64,
    compute: str | None = None,
) -> nn.Module | None:
    """The model of the transformers folder ``folder`` loaded in ``dtype`` and quantized per ``backend``, ``bits``
    and ``group_size`` from its cache entry, in eval mode, its q4 layers computing per ``compute`` (None: their
    default); ``None`` where there is no entry for it, or the model is not one built here (see the module). Never
    raises: a failure is ``None`` (the caller's path says what is wrong)."""
    from lordba.quant.cache import _CACHED

    folder = Path(folder)
    if backend not in _CACHED or (folder / "adapter_config.json").exists():
        return None
    try:
        return _load_cached_base(folder, dtype, backend, bits, group_size, compute)
    except Exception:  # anything unusual: from_pretrained's path, which says what is wrong
        return None


def _load_cached_base(
    folder: Path, dtype: torch.dtype, backend: str, bits: int, group_size: int, compute: str | None
) -> nn.Module | None:
    from lordba._util.cachedir import cache_dir
    from lordba.quant.cache import _key, _load, _signature

    files = _checkpoint(folder)
    if files is None:
        return None
    model = _skeleton(folder, dtype)
    if model is None or not set(files) <= set(model.state_dict()):  # a key transformers would rename, or drop
        return None
    path = cache_dir() / "quantized" / f"{_key(folder, backend, bits, group_size, _signature(model))}.safetensors"
    if not path.is_file():
        return None
    stored = {name for name, t in model.state_dict().items() if not t.is_meta and name in files}  # (buffers)
    _load(model, path, backend, bits, group_size, device="cpu")
    if not _load_the_rest(model, files, stored):
        return None
    if compute:
        from lordba.quant import set_compute

        set_compute(model, compute)
    return model


def _checkpoint(folder: Path) -> dict[str, Path] | None:
    """Each tensor name of the folder's safetensors checkpoint and its file, where transformers loads that one (its
    single file, else a sharded one's index); ``None`` where there is none."""
    from safetensors import safe_open

    if (folder / _SINGLE).is_file():
        with safe_open(str(folder / _SINGLE), framework="pt") as f:
            return dict.fromkeys(f.keys(), folder / _SINGLE)
    if (folder / _INDEX).is_file():
        weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    return None


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module | None:
    """The model of ``folder`` as ``from_pretrained`` builds it (class, config, dtype, generation config, eval mode),
    its parameters on the ``meta`` device; ``None`` for a model whose loading this does not repeat."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    unusual = ("auto_map", "quantization_config", "transformers_weights")  # custom code, pre-quantized, other files
    if any(getattr(config, name, None) for name in unusual) or getattr(type(config), "extra_files", None):
        return None
    config.name_or_path = str(folder)  # as from_pretrained records it
    model = _on_meta_while(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype))
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return None
    if _converted(model) or not hasattr(model, "adjust_generation_fn"):
        return None
    model.eval()
    if model.can_generate():  # the folder's generation_config.json, as from_pretrained reads it
        model.adjust_generation_fn(  # (by keyword: a renamed argument fails, and the caller's path runs)
            generation_config=None,
            from_auto_class=True,
            from_pipeline=False,
            pretrained_model_name_or_path=str(folder),
            cache_dir=None,
            force_download=False,
            proxies=None,
            local_files_only=True,
            token=None,
            revision="main",
            subfolder="",
            trust_remote_code=None,
        )
    return model


def _converted(model: nn.Module) -> bool:
    """Whether transformers converts this model's checkpoint tensors on loading (more than renaming them: renamed
    keys are not the model's, which :func:`_load_cached_base` refuses)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return False
    return any(not isinstance(c, WeightRenaming) for c in get_model_conversion_mapping(model))


T = TypeVar("T")
_BUILDING = threading.local()  # depth: how many skeletons this thread is building now
_HOOK: list = []  # the registration hook :func:`_on_meta_while` installs, once per process
_HOOK_LOCK = threading.Lock()


def _on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    """The parameter ``module`` registers, moved to the ``meta`` device where this thread is inside
    :func:`_on_meta_while`; ``None`` (registered as it is) elsewhere."""
    if param is None or param.is_meta or not getattr(_BUILDING, "depth", 0):
        return None
    return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


def _on_meta_while(build: Callable[[], T]) -> T:
    """``build()``, every parameter a module of this thread registers meanwhile moved to the ``meta`` device (its
    ``torch.empty`` is never written, so never resident); buffers stay real: non-persistent ones are not in the
    checkpoint. Modules other threads build meanwhile keep theirs: the move is torch's parameter registration hook,
    installed once and acting in the threads inside only (``nn.Module.register_parameter`` patched for the process
    while a skeleton was built gave a module of another thread meta parameters, and two builds at once could leave it
    patched). The count is taken and given back in this frame (a context manager's ``__enter__`` and ``__exit__`` are
    Python code: a Ctrl-C there, as contextlib's generator yielded, kept it while the traceback lived, and every
    module the thread built meanwhile got meta parameters)."""
    with _HOOK_LOCK:
        if not _HOOK:  # (never removed: a removal while another thread runs the hooks would fail its iteration)
            _HOOK.append(register_module_parameter_registration_hook(_on_meta))
    _BUILDING.depth = getattr(_BUILDING, "depth", 0) + 1  # (no call between this store and the ``try``)
    try:  # (the result stored inside the ``try``: a Ctrl-C handled as ``build`` returns is raised in it)
        built = build()
        return built
    finally:
        _BUILDING.depth -= 1


def _load_the_rest(model: nn.Module, files: dict[str, Path], stored: set[str] = frozenset()) -> bool:
    """Read every tensor of ``model`` still on the ``meta`` device, and the persistent buffers named in ``stored``
    (built with their initial value: Gemma 4's ``layer_scalar``, a MoE router's correction bias, which the checkpoint
    holds as ``from_pretrained`` reads them), from the checkpoint ``files``, cast to its dtype as ``from_pretrained``
    casts it, into every slot holding it (a tied head stays tied); ``False``, the model left part loaded, where one is
    not in the checkpoint or has another shape."""
    from safetensors import safe_open

    slots: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta or name in stored:
            slots.setdefault(id(tensor), (tensor, []))[1].append(name)
    wanted: dict[Path, list[tuple[torch.Tensor, str]]] = {}
    for tensor, names in slots.values():
        key = next((n for n in names if n in files), None)
        if key is None:  # from_pretrained would initialize it at random
            return False
        wanted.setdefault(files[key], []).append((tensor, key))
    loaded: dict[int, torch.Tensor] = {}
    for file, keys in wanted.items():
        with safe_open(str(file), framework="pt") as f:
            for tensor, key in keys:
                value = f.get_tensor(key)
                if value.shape != tensor.shape or value.is_floating_point() != tensor.is_floating_point():
                    return False
                value = value.to(tensor.dtype)
                loaded[id(tensor)] = (
                    nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
                )
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) in loaded:
                    table[name] = loaded[id(tensor)]
    return not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
