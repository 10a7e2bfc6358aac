"""PEFT's status reports (``get_layer_status``, ``get_model_status``) and adapter state-dict functions
(``get_lordba_model_state_dict`` / ``set_lordba_model_state_dict``, shaped like PEFT's
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``) for :class:`~lordba.nn.model.LoRDBAModel`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.nn.modules.module import _IncompatibleKeys

from lordba.errors import AdapterFormatError, AdapterStateError, ConfigError
from lordba.format.extras import EXTRA_PREFIX, check_extra_values
from lordba.format.header import TENSOR_KINDS, ModuleRecord, check_values
from lordba.format.sizes import SizeReport, size_report
from lordba.nn.adapter import TrainableAdapter
from lordba.nn.layer import LoRDBALinear
from lordba.quant import resolve_backend

Irregular = Literal["irregular"]


@dataclass
class LayerStatus:
    """One adapted layer, with PEFT's ``TunerLayerStatus`` fields."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


@dataclass
class ModelStatus:
    """The whole model, with PEFT's ``TunerModelStatus`` fields (``"irregular"`` where layers differ)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular] = field(default_factory=dict)
    available_adapters: list[str] = field(default_factory=list)
    devices: dict[str, list[str]] = field(default_factory=dict)


def _grad_state(adapter: torch.nn.Module) -> bool | Irregular:
    flags = {p.requires_grad for p in adapter.parameters()}
    return "irregular" if len(flags) > 1 else bool(flags and flags.pop())


def _merge(values: list[Any]) -> Any:
    first = values[0] if values else []
    return first if all(v == first for v in values) else "irregular"


def _merged(layers: list[LayerStatus]) -> list[str] | Irregular:
    """The adapters merged in some layer (PEFT's rule): ``"irregular"`` where a layer holds one of them unmerged
    (a layer that does not hold an adapter says nothing of it)."""
    merged = sorted({n for layer in layers for n in layer.merged_adapters})
    unmerged = {n for layer in layers for n in layer.available_adapters if n not in layer.merged_adapters}
    return "irregular" if unmerged & set(merged) else merged


def _quantized_weights(model: torch.nn.Module) -> int:
    """The weights of ``model``'s quantized linear layers that its parameters do not count (buffers, packed
    parameters): ``in × out`` less the numel of the layer's own parameters that hold its weight (all but ``bias``:
    bnb's packed ``weight``, HQQ's ``W_q``), and a bias held as a plain tensor (HQQ's)."""
    missing = 0
    for module in model.modules():
        backend = resolve_backend(module)
        if backend is None or isinstance(module, LoRDBALinear):
            continue
        in_f, out_f = backend.features(module)
        held = sum(p.numel() for name, p in module._parameters.items() if p is not None and name != "bias")
        missing += max(in_f * out_f - held, 0)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and "bias" not in module._parameters and "bias" not in module._buffers:
            missing += bias.numel()
    return missing


class StatusMixin:
    """``get_layer_status``, ``get_model_status``, the trainable-parameter counts and ``size_report`` of the model, and
    turning its adapter layers off and on (``disable_adapter_layers`` / ``enable_adapter_layers``)."""

    # ------------------------------------------------------------------ enable / disable
    def enable_adapter_layers(self) -> None:
        """Turn the adapters back on in every layer (undoes :meth:`disable_adapter_layers`)."""
        self._set_layers_disabled(False)

    def disable_adapter_layers(self) -> None:
        """Turn the adapters off in every layer until :meth:`enable_adapter_layers` (persistent, unlike
        the ``disable_adapter()`` block): the model runs as its base, original heads and biases included,
        also in the layers of adapters added or loaded meanwhile."""
        self._set_layers_disabled(True)

    def _set_layers_disabled(self, disabled: bool) -> None:
        with self._lock.write():
            if disabled and any(layer.merged for _, layer in self._lordba_layers()):
                raise AdapterStateError("adapters are merged into the base: unmerge_adapter() before disabling them")
            for _, module in [*self._lordba_layers(), *self._saved_modules()]:
                module.disable_adapters = disabled
            self._layers_disabled = disabled  # for the layers of adapters added or loaded later

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``; a quantized base layer counts as the ``in × out`` weights it
        stands for (as PEFT counts a bnb 4-bit weight), whether it holds them as buffers (q4, HQQ) or packed."""
        with self._lock.read():  # one walk of one state: another thread may add or delete an adapter meanwhile
            params = list(self.parameters())
            quantized = _quantized_weights(self.base_model)
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized

    def print_trainable_parameters(self) -> None:
        """Print trainable, total and the trainable share of the parameters (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def size_report(self, adapter_name: str = "default", r_ref: int | None = None) -> SizeReport:
        """Bytes, bits per weight (both bases) and ratio to the fp16 LoRA of rank ``r_ref``
        (default: the same rank), per module and for the file ``save_pretrained`` writes of the adapter's
        LoRDBA modules. Tensors trained in full (``modules_to_save``, task heads, trained biases) are not
        counted: a LoRA file holds the same bytes of them (``lordba convert`` reports them apart)."""
        dims = {p: (a.in_features, a.out_features, a.r) for p, a in self.adapter_modules(adapter_name).items()}
        return size_report(dims, self.peft_config[adapter_name].scale_dtype, r_ref=r_ref)

    def get_layer_status(self) -> list[LayerStatus]:
        """One :class:`LayerStatus` per LoRDBA layer, in model order (PEFT's ``get_layer_status``)."""
        out = []
        with self._lock.read():
            for name, layer in self._lordba_layers():
                adapters = layer.lordba_adapters
                out.append(
                    LayerStatus(
                        name=name,
                        module_type=f"lordba.LoRDBALinear({type(layer.base_layer).__name__})",
                        enabled=not layer.disable_adapters,
                        active_adapters=list(layer.active_adapters),  # the model's, as PEFT's layers report
                        merged_adapters=list(layer.merged_adapters),
                        requires_grad={n: _grad_state(a) for n, a in adapters.items()},
                        available_adapters=sorted(adapters),
                        devices={
                            n: sorted({str(t.device) for t in (*a.parameters(), *a.buffers())})
                            for n, a in adapters.items()
                        },
                    )
                )
        return out

    def get_model_status(self) -> ModelStatus:
        """The model's :class:`ModelStatus` (PEFT's ``get_model_status``)."""
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()
        grads: dict[str, bool | Irregular] = {}
        devices: dict[str, set[str]] = {}
        for layer in layers:
            for n, g in layer.requires_grad.items():
                grads[n] = g if grads.get(n, g) == g else "irregular"
            for n, d in layer.devices.items():
                devices.setdefault(n, set()).update(d)
        return ModelStatus(
            base_model_type=type(self.base_model).__name__,
            adapter_model_type=type(self).__name__,
            peft_types={n: c.peft_type for n, c in self.peft_config.items()},
            trainable_params=trainable,
            total_params=total,
            num_adapter_layers=len(layers),
            enabled=_merge([layer.enabled for layer in layers]) if layers else True,
            active_adapters=_merge([layer.active_adapters for layer in layers]),
            merged_adapters=_merged(layers),
            requires_grad=grads,
            available_adapters=sorted(self.peft_config),
            devices={n: sorted(d) for n, d in devices.items()},
        )


def get_lordba_model_state_dict(model: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` stores for ``adapter_name``, under the file's key names
    (``<module path>.sign_A`` ... ``.scale_out``, ``extra:<parameter path>``): PEFT's
    ``get_peft_model_state_dict``. Raises :class:`~lordba.errors.AdapterStateError` for an unknown adapter,
    :class:`~lordba.errors.ConfigError` for a model that is no LoRDBA model."""
    state = _lordba_model(model, "get_lordba_model_state_dict").adapter_state(adapter_name)
    out = {f"{p}.{k}": rec.tensors[k] for p, rec in state.modules.items() for k in TENSOR_KINDS}
    out.update({EXTRA_PREFIX + k: v for k, v in state.extras.items()})
    return out


def set_lordba_model_state_dict(
    model: Any, state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> _IncompatibleKeys:
    """Load ``state_dict`` (as :func:`get_lordba_model_state_dict` gives it) into the existing adapter
    ``adapter_name`` (PEFT's ``set_peft_model_state_dict``), in place. As PEFT's (``strict=False``), a partial state
    dict loads what it holds (the adapter's other tensors are kept) and keys that are none of the adapter's are
    left out; both are returned. Everything given is checked first, as a file is (dtypes, shapes, padding bits,
    finite scales; extras against the model), so a refused state dict leaves the model as it was.

    Returns:
        PEFT's ``load_result``: torch's ``_IncompatibleKeys`` (``missing_keys``: the adapter's keys the dict lacks,
        ``unexpected_keys``: the dict's keys that are not the adapter's), named as
        :func:`get_lordba_model_state_dict` names them.

    Raises :class:`AdapterFormatError`, or :class:`AdapterStateError` for an adapter merged into the base (unmerging
    it would then subtract the new update), :class:`ConfigError` for a model that is no LoRDBA model or a
    ``state_dict`` that is no mapping."""
    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"set_lordba_model_state_dict: state_dict must be a dict of tensors, got {state_dict!r:.80}")
    model = _lordba_model(model, "set_lordba_model_state_dict")
    with model._lock.write():  # snapshot, checks and load at once: another thread may hot-swap or replace it
        return _set_state_dict(model, state_dict, adapter_name)


def _lordba_model(model: Any, call: str) -> Any:
    """``model`` if it is a LoRDBA model, or the one inside it (``DistributedDataParallel``), else ConfigError."""
    for inner in (model, getattr(model, "module", None)):
        if hasattr(inner, "adapter_state") and hasattr(inner, "_lock"):
            return inner
    raise ConfigError(f"{call}: the model must be a LoRDBAModel (get_lordba_model), got {type(model).__name__}")


def _set_state_dict(model: Any, state_dict: dict[str, torch.Tensor], adapter_name: str) -> _IncompatibleKeys:
    """:func:`set_lordba_model_state_dict`'s work (the caller holds the write lock)."""
    current = model.adapter_state(adapter_name)
    config = current.config
    own = [f"{p}.{k}" for p in current.modules for k in TENSOR_KINDS] + [EXTRA_PREFIX + k for k in current.extras]
    known = set(own)
    result = _IncompatibleKeys([k for k in own if k not in state_dict], [k for k in state_dict if k not in known])
    records = {}  # the modules the dict names: the tensors it lacks are the adapter's own
    for path, held in current.modules.items():
        if not any(f"{path}.{kind}" in state_dict for kind in TENSOR_KINDS):
            continue
        rec = records[path] = ModuleRecord(path, held.in_features, held.out_features, held.r)
        for kind, (dtype, shape) in rec.expected(config.scale_dtype).items():
            t = state_dict.get(f"{path}.{kind}", held.tensors[kind])
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise AdapterFormatError(f"state dict: {path}.{kind}: {got}, expected {dtype} {shape}")
            rec.tensors[kind] = t.detach().cpu()
        check_values(rec, config.scale_dtype, "state dict")
    extras = {k: state_dict[EXTRA_PREFIX + k] for k in current.extras if EXTRA_PREFIX + k in state_dict}
    check_extra_values(extras, "state dict")
    plan = model._plan_extras(type(current)(config, {**current.modules, **records}, extras=extras))
    if any(adapter_name in layer.merged_adapters for _, layer in model._lordba_layers()):
        raise AdapterStateError(  # unmerging would then take the new update out of the base, not the merged one
            f"set_lordba_model_state_dict: adapter {adapter_name!r} is merged into the base weights: "
            "unmerge_adapter() before loading into it"
        )
    for path, adapter in model.adapter_modules(adapter_name).items():
        if path in records:  # (not: not in the dict, or silenced by a hot-swap: adapter_state leaves it out)
            if isinstance(adapter, TrainableAdapter) and adapter.has_latent_signs:
                adapter = model._swap(adapter_name, path, adapter.freeze_signs())
            adapter.load_stored(records[path].tensors)
        value = plan["bias"].get(path)
        if value is not None:
            with torch.no_grad():
                adapter.bias_delta.copy_(model._bias_delta(path, value))
    for path, tensors in plan["saved"].items():
        model._root().get_submodule(path).load_saved(adapter_name, tensors)
    return result
