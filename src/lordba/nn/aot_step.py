"""One compiled decode step of :class:`lordba.nn.aot.AotDecode`: the static-cache wrapper transformers exports,
its AOTInductor package (:mod:`lordba.nn.aot_package`) and the live tensors the package reads; and the KV cache
dtypes a decoder takes."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lordba.errors import ConfigError, LoRDBAError
from lordba.nn.aot_group import group_siblings
from lordba.nn.aot_package import compiled_package
from lordba.nn.attention import reduced_cache


class _StaticView:
    """``model`` as transformers' exporter reads it while building its wrapper: every attribute the model's, but its
    own copy of the generation config, with the static cache the exporter asks for. The model's config is never
    written: another thread's ``generate`` (or a model sharing that config) would see the static cache meanwhile, and
    two decoders of one model building at once (each under its own lock) left it set for good (the second kept the
    first's temporary value and put it back last)."""

    def __init__(self, model: nn.Module) -> None:
        self._viewed = model  # (not ``model``: the exporter may read a causal LM's own ``.model``)
        self.generation_config = copy.deepcopy(model.generation_config)
        self.generation_config.use_cache, self.generation_config.cache_implementation = True, "static"

    def __getattr__(self, name: str) -> object:
        return getattr(self._viewed, name)


def _static_wrapper(model: nn.Module, length: int) -> nn.Module:
    """transformers' exportable wrapper of ``model`` on a static cache of ``length`` positions, built from a
    :class:`_StaticView` of it, then wrapping the model itself."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    view = _StaticView(model)
    wrapper = TorchExportableModuleForDecoderOnlyLM(view, batch_size=1, max_cache_len=length)
    if getattr(wrapper.model, "model", None) is not view:
        raise LoRDBAError("transformers' exportable wrapper keeps the model it wraps elsewhere than in .model.model")
    wrapper.model.model = model
    return wrapper


KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def kv_cache_dtype(name: torch.dtype | str) -> torch.dtype:
    """The KV cache dtype for ``name`` (a dtype or one of :data:`KV_DTYPES`' names).

    Raises:
        ConfigError: anything else.
    """
    dtype = KV_DTYPES.get(name) if isinstance(name, str) else name
    if dtype not in KV_DTYPES.values():
        raise ConfigError(f"the KV cache dtype must be one of {sorted(KV_DTYPES)}, got {name!r}")
    return dtype


class CompiledStep:
    """One cache length: the wrapper holding the static cache, the loaded package and the tensors it reads."""

    def __init__(
        self, model: nn.Module, length: int, folder: Path, log: Callable[[str], None], kv_dtype: torch.dtype
    ) -> None:
        wrapper = _static_wrapper(model, length)
        self.module = wrapper.model
        self.length = length
        cache = getattr(self.module, "static_cache", None)  # sliding-window layers (Gemma): the hybrid wrapper's
        self.cache = cache if cache is not None else self.module.cache  # full-length layers, the window in the mask
        for i, (keys, values) in enumerate(reduced_cache(self.cache.layers, kv_dtype)):  # the module's buffers
            self.module.register_buffer(f"key_cache_{i}", keys, persistent=False)
            self.module.register_buffer(f"value_cache_{i}", values, persistent=False)
        start = time.perf_counter()
        with torch.no_grad():
            program = wrapper.export(input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]))
        self.grouped = group_siblings(program)  # q/k/v, gate/up: one call each (lordba.nn.aot_group)
        self.export_seconds = time.perf_counter() - start
        held = self._tensors()
        lifted = sorted(name for name in program.constants if name not in held)
        if lifted:  # (the package holds no tensor: it could never load them)
            raise ConfigError(
                f"the decode step reads tensors that are no parameter or buffer of the model ({', '.join(lifted[:3])}: "
                "a plain tensor attribute, such as long RoPE's long_inv_freq), which a compiled step cannot read live"
            )
        self.path, self.compile_seconds = compiled_package(program, self._tensors(), folder, log)
        try:
            self.runner = torch._inductor.aoti_load_package(str(self.path))
        except RuntimeError as err:  # e.g. an empty JSON entry: its CRC is right, what it holds is not
            if self.compile_seconds:
                raise LoRDBAError(f"the decode step just compiled to {self.path} does not load: {err}") from err
            log(f"the compiled decode step {self.path} does not load ({err}): compiling it again")
            self.path.unlink(missing_ok=True)
            self.path, self.compile_seconds = compiled_package(program, self._tensors(), folder, log)
            self.runner = torch._inductor.aoti_load_package(str(self.path))
        self.refresh()

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.module.named_parameters(remove_duplicate=False))
        named.update(self.module.named_buffers(remove_duplicate=False))
        return named

    def refresh(self) -> None:
        named = self._tensors()
        wanted = self.runner.get_constant_fqns()
        missing = [n for n in wanted if n not in named]
        if missing:
            raise ConfigError(f"the compiled decode step reads tensors the model no longer has: {missing[:3]}")
        self.constants = {n: named[n] for n in wanted}  # kept alive: the package reads them in place
        self.runner.load_constants(self.constants, check_full_update=True, user_managed=True)
