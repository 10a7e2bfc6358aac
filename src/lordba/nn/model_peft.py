"""What a PEFT user expects of :class:`~lordba.nn.model.LoRDBAModel` beyond adapters on linear layers
(a mixin of the model): modules trained in full (``modules_to_save``, a task's head) and trained
biases, saved with the adapter as extra tensors (format version 2); the record of the base
quantization; ``enable_adapter_layers`` / ``disable_adapter_layers``; ``get_layer_status`` /
``get_model_status``; ``add_weighted_adapter`` (:mod:`lordba.nn.model_combine`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lordba._util.modules import offloaded_tensor, preloading_ancestor, replace_submodule
from lordba._util.patterns import matches
from lordba.config import LoRDBAConfig
from lordba.errors import AdapterFormatError, AdapterStateError, ShapeMismatchError, TargetModulesError
from lordba.format import adapter as adapter_files
from lordba.format.extras import check_extra_name
from lordba.nn.layer import LoRDBALinear
from lordba.nn.model_combine import CombineMixin
from lordba.nn.model_status import StatusMixin
from lordba.nn.saved import SavedModule
from lordba.nn.structure import ModuleIndex
from lordba.quant import describe_base, resolve_backend


class PeftFeaturesMixin(CombineMixin, StatusMixin):
    """Modules trained in full, trained biases, the base-quantization record, adapter combination and gradient
    checkpointing."""

    # ------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enable the wrapped model's gradient checkpointing (``None``: transformers' default arguments, which
        transformers 5 makes non-re-entrant and 4 re-entrant). Unless ``use_reentrant=False`` is given, the inputs
        are also made to require grad, which re-entrant checkpointing needs for gradients to reach the adapters of a
        frozen base (harmless for the other variant)."""
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)  # (the old name warns)
        if enable is not None:
            enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        kwargs = gradient_checkpointing_kwargs or {}
        if kwargs.get("use_reentrant", True) and hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    def _checkpointing(self) -> bool:
        """Whether the base recomputes its layers in backward (transformers' gradient checkpointing: training only)."""
        flag = getattr(self.base_model, "is_activation_checkpointing", None)  # (transformers 5; the old name warns)
        if flag is None:
            flag = getattr(self.base_model, "is_gradient_checkpointing", False)
        return self.base_model.training and bool(flag)

    # ------------------------------------------------------------------ add / load hooks
    def _prepare_config(self, config: LoRDBAConfig, targets: list[str]) -> LoRDBAConfig:
        """``config`` with the base quantization of its targets recorded (if it has none)."""
        if config.base_quantization is not None:
            return config
        found = describe_base([self._target(p)[0] for p in targets])
        return config if found is None else dataclasses.replace(config, base_quantization=found)

    def _saved_paths(self, config: LoRDBAConfig, targets: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
        """``{module path: saved parameter names (None: all)}`` that ``config`` trains beside its targets."""
        found: dict[str, tuple[str, ...] | None] = {}
        names = [n for n, _ in self._root().named_modules() if n and not _internal(n)]
        for entry in config.modules_to_save or []:
            hits = [n for n in names if matches([entry], n)]
            if not hits:
                raise TargetModulesError(f"modules_to_save entry {entry!r} matched no module of the model")
            found.update(dict.fromkeys(hits))
        heads = [h for h in config.saved_modules if h not in (config.modules_to_save or [])]
        found.update(dict.fromkeys(n for n in names if heads and matches(heads, n)))
        if config.bias == "all":
            for name in names:
                module = self._root().get_submodule(name)
                if name in found or name in targets or isinstance(module, (SavedModule, LoRDBALinear)):
                    continue
                if isinstance(getattr(module, "bias", None), nn.Parameter):
                    found[name] = ("bias",)
        self._check_saveable(found, targets)
        self._check_trainable(found)
        self._check_file_names(found)
        return found

    def _check_trainable(self, saved: dict[str, tuple[str, ...] | None]) -> None:
        """Refuse, before the model changes, a module to train in full that has no parameters (a quantized layer,
        such as the q4 base's 4-bit head, holds buffers): its copy would train nothing and no adapter file would
        hold it, silently."""
        for path, params in saved.items():
            module = self._root().get_submodule(path)
            module = module.original_module if isinstance(module, SavedModule) else module
            if params is None and next(module.parameters(), None) is None:
                raise TargetModulesError(
                    f"modules_to_save: module {path!r} ({type(module).__name__}) has no parameters to train (a "
                    "quantized layer holds buffers): leave it out, or keep it unquantized in the base"
                )

    def _check_file_names(self, saved: dict[str, tuple[str, ...] | None]) -> None:
        """Refuse, before anything trains, a tensor to train in full whose name an adapter file cannot hold
        (:func:`~lordba.format.extras.check_extra_name`: a ``ModuleDict`` key with a space or a ``:``): the
        adapter could be trained but not saved."""
        for path, params in saved.items():
            module = self._root().get_submodule(path)
            module = module.original_module if isinstance(module, SavedModule) else module
            for name in params or [n for n, _ in module.named_parameters()]:
                try:
                    check_extra_name(f"{path}.{name}", "modules_to_save / bias")
                except AdapterFormatError as err:
                    raise TargetModulesError(f"{err}: no adapter file can hold it, so it cannot be trained") from None

    def _check_saveable(self, paths: Iterable[str], targets: Iterable[str]) -> None:
        """Refuse, before the model changes, a module to train in full that is or contains a layer carrying
        LoRDBA adapters (of another adapter, or of this one: ``targets``): :meth:`_saved_module` could not
        wrap it, and a copy of a module above such a layer would copy its adapters too; and either kind below a
        module whose accelerate hook loads its tensors by name (the forward failed: a KeyError for the new names)."""
        targeted = list(targets)
        for path in [*targeted, *paths]:
            if (above := preloading_ancestor(self._root(), path)) is not None:
                raise TargetModulesError(
                    f"module {path!r} is inside {above or 'the model'!r}, whose accelerate hook loads each tensor "
                    "below it by name (dispatch_model's preload_module_classes): no adapter or trained copy can be "
                    "loaded there; dispatch without preload_module_classes for that module's class"
                )
        for path in paths:
            inside = [t for t in targeted if t == path or t.startswith(path + ".")]
            module = self._root().get_submodule(path)
            if inside or any(isinstance(m, LoRDBALinear) for m in module.modules()):
                raise TargetModulesError(f"module {path!r} carries LoRDBA adapters: it cannot also be trained in full")

    def _install_extras(
        self, adapter_name: str, config: LoRDBAConfig, saved: dict[str, tuple[str, ...] | None], adapters: dict
    ) -> None:
        """Dropout, trained biases and modules trained in full for a new adapter (``adapters``: its installed ones by
        module path; write lock held)."""
        for path, adapter in adapters.items():
            adapter.dropout = config.dropout  # _install put it in its layer's mode
            bias = self._layer_bias(path)
            if config.bias != "none" and bias is not None:
                adapter.attach_bias(torch.zeros_like(bias, dtype=torch.float32))
                adapter.bias_delta.requires_grad_(True)
        for path, params in saved.items():
            self._saved_module(path).add_copy(adapter_name, params)
        self._sync_saved()

    def _layer_bias(self, path: str) -> torch.Tensor | None:
        """The base bias of the adapted layer at ``path``, without the trained biases of merged adapters: what an
        adapter's trained bias is stored against (the merged one counted a merged adapter's change twice); for a layer
        offloaded by accelerate (its bias on ``meta``), the bias its hook loads."""
        layer = self._root().get_submodule(path)
        bias = layer.unmerged_bias if isinstance(layer, LoRDBALinear) else getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.is_meta:  # offloaded by accelerate: the value its hook loads
            bias = offloaded_tensor(layer.base_layer if isinstance(layer, LoRDBALinear) else layer, "bias")
        return bias if isinstance(bias, torch.Tensor) else None

    def _bias_delta(self, path: str, trained: torch.Tensor) -> torch.Tensor:
        """The ``bias_delta`` an adapter holds for a saved trained bias of the layer at ``path``: float32, on the
        CPU, against the layer's unmerged base bias (:meth:`_layer_bias`)."""
        return trained.float() - self._layer_bias(path).detach().float().cpu()

    def _saved_module(self, path: str) -> SavedModule:
        module = self._root().get_submodule(path)
        if isinstance(module, LoRDBALinear):
            raise TargetModulesError(f"module {path!r} carries LoRDBA adapters: it cannot also be trained in full")
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            module.gate = self._gate
            module.disable_adapters = self._layers_disabled
            module.train(module.original_module.training)
            replace_submodule(self._root(), path, module)
        return module

    def _saved_modules(self) -> list[tuple[str, SavedModule]]:
        return self._modules_of(SavedModule)

    def _modules_of(self, kind: type[nn.Module]) -> list[tuple[str, Any]]:
        """``(path, module)`` of the base model's modules of type ``kind``, from an index walked
        once per change of the model's structure (:mod:`lordba.nn.structure`)."""
        indexes = self.__dict__.setdefault("_module_indexes", {})  # not an nn.Module attribute
        index = indexes.get(kind)
        if index is None:
            index = indexes[kind] = ModuleIndex(kind)
        return index.get(self._root())

    def _check_one_saved_copy(self, names: tuple[str, ...]) -> None:
        """Refuse activating together adapters that each train the same module in full (``modules_to_save``): one
        module runs one copy, so all but the first would be left out silently (PEFT refuses it too)."""
        for path, module in self._saved_modules():
            both = [n for n in names if n in module.lordba_saved]
            if len(both) > 1:
                raise AdapterStateError(
                    f"adapters {both} each train {path!r} in full (modules_to_save): only one of them can be active "
                    "at a time (its copy of the module replaces the module)"
                )

    def _sync_saved(self) -> None:
        """Saved modules follow the model's active adapters; empty ones give their module back."""
        for path, module in self._saved_modules():
            for name in list(module.lordba_saved):
                if name not in self.peft_config and name not in getattr(self, "_adding", ()):
                    module.delete_copy(name)
            if not module.lordba_saved:
                replace_submodule(self._root(), path, module.original_module)
            module.active_adapters = list(self._active)

    def _unwrap_saved(self, merge: bool) -> None:
        """Give each module trained in full its plain module back (the caller holds the write lock):
        with ``merge`` the active adapter's trained copy (PEFT's ``merge_and_unload``), else the
        original (``unload``)."""
        for path, module in self._saved_modules():
            names = [n for n in self._active if n in module.lordba_saved] if merge else []
            chosen = module.lordba_saved[names[0]] if names else module.original_module
            for p in chosen.parameters():
                p.requires_grad_(False)
            replace_submodule(self._root(), path, chosen)

    def adapter_state(self, adapter_name: str = "default") -> adapter_files.AdapterState:
        """The adapter as stored (config, packed tensors and its extra tensors, float64 ones as float32),
        independent of this model."""
        with self._lock.read():
            _refuse_sharded(self, adapter_name)
            state = super().adapter_state(adapter_name)
            extras: dict[str, torch.Tensor] = {}
            for path, module in self._saved_modules():
                if adapter_name in module.lordba_saved:
                    extras.update({f"{path}.{k}": v for k, v in module.saved_tensors(adapter_name).items()})
            for path, adapter in self.adapter_modules(adapter_name).items():
                bias = self._layer_bias(path)
                if adapter.bias_delta is not None and bias is not None and path in state.modules:
                    extras[f"{path}.bias"] = (bias.detach().float() + adapter.bias_delta.detach()).to(bias.dtype).cpu()
            # a float64 model's tensors are stored as float32 (as its scales are): the file holds no float64
            state.extras = {k: v.float() if v.dtype == torch.float64 else v for k, v in extras.items()}
            return state

    def _load_state(
        self,
        state: adapter_files.AdapterState,
        adapter_name: str,
        is_trainable: bool = False,
        targets: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add an adapter under ``adapter_name`` (packed form), with its extra tensors (checked against
        the model first: names, shapes; a refused adapter leaves the model as it was), all under one hold
        of the write lock: a forward or a save of another thread sees the adapter whole or not at all.
        Returns the installed adapters by module path."""
        with self._lock.write():
            plan = self._plan_extras(state)
            self._check_saveable(plan["saved"], state.modules)  # a refused adapter leaves the model as it was
            self._warn_base(state.config)
            return super()._load_state(state, adapter_name, is_trainable, targets)

    def _load_extras(
        self, adapter_name: str, state: adapter_files.AdapterState, adapters: dict[str, Any], is_trainable: bool
    ) -> None:
        """Attach a loaded adapter's trained biases and add its trained copies of modules (inside
        :meth:`_add_whole`: all or none with the rest of the load)."""
        plan = self._plan_extras(state)
        for path, value in plan["bias"].items():
            adapter = adapters[path]
            adapter.attach_bias(self._bias_delta(path, value))
            adapter.bias_delta.requires_grad_(is_trainable)
        for path, tensors in plan["saved"].items():
            module = self._saved_module(path)
            module.add_copy(adapter_name, tuple(tensors))
            module.load_saved(adapter_name, tensors)
            for name in tensors:
                module.lordba_saved[adapter_name].get_parameter(name).requires_grad_(is_trainable)
        self._sync_saved()

    def _hotswap_extras(self, adapter_name: str, state: adapter_files.AdapterState, apply: bool) -> None:
        """Hot-swap the extra tensors (trained biases, modules trained in full) in place: the file must
        hold exactly the extras the adapter has (checked with ``apply=False``, before anything changes)."""
        held = {
            f"{p}.{k}"
            for p, m in self._saved_modules()
            if adapter_name in m.lordba_saved
            for k in m.saved_params[adapter_name]
        }
        held |= {f"{p}.bias" for p, a in self.adapter_modules(adapter_name).items() if a.bias_delta is not None}
        if set(state.extras) != held:
            raise AdapterStateError(
                f"hotswap_adapter: the file's extra tensors {sorted(state.extras)[:4]} differ from those adapter "
                f"{adapter_name!r} holds {sorted(held)[:4]}; hot-swapping needs the same ones"
            )
        plan = self._plan_extras(state)  # names and shapes against the model
        if not apply:
            return
        adapters = self.adapter_modules(adapter_name)
        with torch.no_grad():
            for path, value in plan["bias"].items():
                delta = self._bias_delta(path, value)
                adapters[path].bias_delta.copy_(delta.to(adapters[path].bias_delta.device))
        for path, tensors in plan["saved"].items():
            self._saved_module(path).load_saved(adapter_name, tensors)

    def _plan_extras(self, state: adapter_files.AdapterState) -> dict[str, dict[str, Any]]:
        """Where each extra tensor of ``state`` goes: ``{"bias": {layer path: tensor}, "saved": {module
        path: {param: tensor}}}``; raises :class:`AdapterFormatError` for a name or shape the model lacks."""
        plan: dict[str, dict[str, Any]] = {"bias": {}, "saved": {}}
        for name, value in sorted(state.extras.items()):
            path, _, param = name.rpartition(".")
            if param == "bias" and path in state.modules:
                bias = self._base_param(path, "bias", name)
                _check_shape(name, value, bias)
                plan["bias"][path] = value
                continue
            target = self._base_param(path, param, name, registered=True)  # a module trained in full: a copy of it
            _check_shape(name, value, target)
            plan["saved"].setdefault(path, {})[param] = value
        return plan

    def _base_param(self, path: str, param: str, name: str, registered: bool = False) -> torch.Tensor:
        """The base model's tensor ``param`` of the module at ``path`` (a LoRDBA layer's base layer, a module
        trained in full's original), for the extra tensor ``name``; with ``registered``, only a parameter
        registered on that module (what :meth:`SavedModule.add_copy` copies: not a buffer or attribute)."""
        try:
            module = self._root().get_submodule(path)
        except AttributeError:
            raise AdapterFormatError(f"extra tensor {name}: the base model has no module {path!r}") from None
        module = module.original_module if isinstance(module, SavedModule) else module
        module = module.base_layer if isinstance(module, LoRDBALinear) else module
        value = module._parameters.get(param) if registered else getattr(module, param, None)
        if not isinstance(value, torch.Tensor):
            if param == "weight" and getattr(resolve_backend(module), "name", "none") != "none":
                raise AdapterFormatError(  # the q4 base's 8-bit head: the adapter trained it in full, in float
                    f"extra tensor {name}: module {path!r} is quantized in this base ({type(module).__name__}), and "
                    "the adapter trained it in full: load it on a base that keeps that module unquantized "
                    "(lordba --quant none; quantize_model(..., head_bits=0) for the q4 base's output head)"
                )
            raise AdapterFormatError(f"extra tensor {name}: module {path!r} has no parameter {param!r}")
        return value

    def _warn_base(self, config: LoRDBAConfig) -> None:
        """Warn when the adapter was trained on another base quantization than this model's."""
        if config.base_quantization is None:
            return
        layers = [m.base_layer for _, m in self._lordba_layers()] or [
            m for m in self._root().modules() if not list(m.children())
        ]
        here = describe_base(layers)
        if here != config.base_quantization:
            warnings.warn(
                f"this adapter was trained on a base quantized as {config.base_quantization}, but this base is "
                f"{here or 'unquantized'}: its outputs will differ from the ones it was trained for",
                UserWarning,
                stacklevel=3,
            )

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``resize_token_embeddings``, refused while its output head carries adapters or is
        trained in full (``modules_to_save``): transformers would put a new plain layer in its place and drop
        them silently (an untied head), or change the weight they were made for (a tied one).

        Raises:
            ShapeMismatchError: the output head is adapted or trained in full (resize before adding adapters).
        """
        get_head = getattr(self.base_model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, (LoRDBALinear, SavedModule)):
            what = "carries adapters" if isinstance(head, LoRDBALinear) else "is trained in full (modules_to_save)"
            raise ShapeMismatchError(
                f"resize_token_embeddings: the output head {what}, made for the current vocabulary; resize the "
                "base model's embeddings before adding adapters"
            )
        return self.base_model.resize_token_embeddings(*args, **kwargs)


def _refuse_sharded(model: Any, adapter_name: str) -> None:
    """Raise :class:`AdapterStateError` naming an adapter tensor sharded by FSDP2 (a ``DTensor``): the file needs whole
    tensors (it failed in the sign packing, "aten.mul.Tensor got mixed torch.Tensor and DTensor")."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    for path, adapter in model.adapter_modules(adapter_name).items():
        for name, tensor in (*adapter.named_parameters(), *adapter.named_buffers()):
            if isinstance(tensor, DTensor):
                raise AdapterStateError(
                    f"adapter {adapter_name!r}: {path}.{name} is sharded (an FSDP2 DTensor): gather the full state "
                    "dict (get_model_state_dict with full_state_dict=True) and save it from an unsharded copy "
                    "of the model (docs/training.md, FSDP2)"
                )


def _internal(name: str) -> bool:
    dotted = f".{name}."
    return any(f".{p}." in dotted for p in ("base_layer", "lordba_adapters", "lordba_saved", "original_module"))


def _check_shape(name: str, value: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise AdapterFormatError(
            f"extra tensor {name}: shape {tuple(value.shape)}, the model's parameter has {tuple(target.shape)}"
        )
