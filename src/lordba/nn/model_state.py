"""The torch state dict of a :class:`~lordba.nn.model.LoRDBAModel` (a mixin of the model): its adapters' tensors
only, as PEFT's adapter state dict, also where the model sits inside another module (``DistributedDataParallel``);
and the model's ``forward`` as tools that inspect it see it (the wrapped model's signature)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lordba._util.arena import own_storage
from lordba.errors import AdapterStateError


def adapter_key(key: str) -> bool:
    """Whether a state-dict key names an adapter's tensor (not the base's)."""
    return ".lordba_adapters." in key or ".lordba_saved." in key


_COMPILED = "_orig_mod."  # what torch.compile's module puts before the paths of the module it compiled


def path_key(key: str, prefix: str = "") -> str:
    """``key`` of a state dict (below ``prefix``) as the uncompiled model names it: without the ``_orig_mod.`` of a
    base compiled in place (``lm.base_model = torch.compile(lm.base_model)``), as the wrapper's state dict and files
    name it."""
    base = prefix + "base_model."
    if not key.startswith(base + _COMPILED):
        return key
    rest = key[len(base) :]
    while rest.startswith(_COMPILED):
        rest = rest[len(_COMPILED) :]
    return base + rest


def note_loading_prefix(module: torch.nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
    """A :class:`~lordba.nn.model.LoRDBAModel`'s load pre-hook: keep the prefix of its keys in the loaded state dict,
    and give its keys the module paths the base has (``_orig_mod.`` put in for a base compiled in place, taken out
    for one that is not), also where it is loaded inside another module (``DistributedDataParallel``)."""
    module.__dict__["_loading_prefix"] = prefix  # for base_keys_not_missing, run after its children loaded
    clean, real = prefix + "base_model.", prefix + module._base_prefix()
    for key in [k for k in state_dict if k.startswith(clean)]:  # (torch loads a copy of the caller's dict)
        mapped = real + path_key(key, prefix)[len(clean) :]
        if mapped != key:
            state_dict[mapped] = state_dict.pop(key)


def base_keys_not_missing(module: torch.nn.Module, incompatible: Any) -> None:
    """A :class:`~lordba.nn.model.LoRDBAModel`'s load post-hook: the base's keys are not missing (its state dict
    holds its adapters' tensors only), also where it is loaded inside another module (``DistributedDataParallel``);
    the adapters' missing keys are named as its state dict names them (:func:`path_key`)."""
    prefix = module.__dict__.pop("_loading_prefix", "")
    missing = incompatible.missing_keys
    missing[:] = [path_key(k, prefix) for k in missing if not k.startswith(prefix) or adapter_key(k[len(prefix) :])]


class ForwardWithSignature:
    """``LoRDBAModel.forward`` with the wrapped model's signature, so tools that inspect it (the
    HF ``Trainer`` keeps only dataset columns named in it) see the real argument names."""

    def __init__(self, owner: nn.Module, signature: inspect.Signature) -> None:
        self._owner = owner
        self.__signature__ = signature

    @property
    def __code__(self) -> Any:
        """The code of the frame it runs (``torch.export``, without ``strict``, names its trace by it)."""
        return self._owner._forward.__code__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] is self._owner:  # bound to the model as a method (accelerate's unwrap_model rebinds it)
            args = args[1:]
        return self._owner._forward(*args, **kwargs)


def with_adapter_names(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` with a keyword-only ``adapter_names`` (before any ``**kwargs``)."""
    params = [p for p in signature.parameters.values() if p.name != "adapter_names"]
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_kw = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=[*rest, extra, *var_kw])


class StateDictMixin:
    """``state_dict`` / ``load_state_dict`` of :class:`~lordba.nn.model.LoRDBAModel` (which provides ``_lock``,
    ``_root`` and ``_lordba_layers``)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The adapters' tensors only (latents, packed signs, scales), like PEFT's adapter state dict.

        The frozen base is not part of the wrapper's state: it comes from the base model's own files.
        This keeps ``transformers.Trainer`` checkpoints of a LoRDBA model small and resumable (the
        Trainer saves ``model.state_dict()`` for models that are not ``PreTrainedModel``s). Also inside another
        module (``DistributedDataParallel``), whose ``state_dict`` has its children fill one dict: the base's
        tensors are taken out of that dict too."""
        given = kwargs.get("destination", args[0] if args else None)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        before = set(given) if given is not None else set()
        with self._lock.read():  # (another thread adding or deleting adapters changes the module dicts it walks)
            full = super().state_dict(*args, **kwargs)
        for key in [k for k in full if k not in before]:  # (in order: each one taken out and put back at the end)
            value = full.pop(key)
            if not adapter_key(key):
                continue
            if not isinstance(value, nn.Parameter):
                # an inference-form adapter's tensors are views of one buffer (uint8 signs beside float16 scales),
                # which torch.save refuses: those are copies (not parameters: nothing is trained through them)
                value = own_storage(value)
            full[path_key(key, prefix)] = value  # a base compiled in place: the uncompiled model's keys
        return full

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load adapter tensors saved by :meth:`state_dict` (the base is left as it is).

        Raises:
            AdapterStateError: keys that do not match the adapters' (``strict``), tensors of an adapter merged into
                the base (unmerging would then subtract the new update, not the merged one), or an adapter's tensor
                of another shape or scale form than held; nothing is loaded.
        """
        with self._lock.write():  # checked and loaded at once; a forward of another thread sees all of it or none
            return self._load_state_dict(state_dict, strict, assign)

    def _base_prefix(self) -> str:
        """The prefix of the base's own state-dict keys: ``base_model.``, with ``_orig_mod.`` after it for each
        ``torch.compile`` of the base in place."""
        module, prefix, root = self.base_model, "base_model.", self._root()
        while module is not root:
            module, prefix = module._orig_mod, prefix + _COMPILED
        return prefix

    def _load_state_dict(self, state_dict: dict[str, Any], strict: bool, assign: bool) -> Any:
        state_dict = {path_key(k): v for k, v in state_dict.items()}  # keys of a compiled base's state dict load too
        base = "base_model"  # (the pre-hook gives the keys the base's paths: "_orig_mod." where it is compiled)
        merged = [
            f"{base}.{p}.lordba_adapters.{n}." for p, layer in self._lordba_layers() for n in layer.merged_adapters
        ]
        held = sorted(k for k in state_dict if k.startswith(tuple(merged)))
        if held:
            raise AdapterStateError(
                f"load_state_dict: {held[0]!r} is a tensor of an adapter merged into the base weights: "
                "unmerge_adapter() before loading into it"
            )
        own = set(self.state_dict())
        unexpected = sorted(set(state_dict) - own)
        missing = sorted(own - set(state_dict))
        if strict and (unexpected or missing):
            raise AdapterStateError(
                f"state dict does not match the adapters: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for path, layer in self._lordba_layers():  # every adapter's tensors checked before any is loaded
            for name, adapter in layer.lordba_adapters.items():
                adapter.check_loadable(state_dict, f"{base}.{path}.lordba_adapters.{name}.")
        result = super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False, assign=assign)
        return type(result)(missing, unexpected)
