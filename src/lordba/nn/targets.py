"""Which modules of a model an adapter targets (PEFT's matching rules).

* a list of names: a module matches if its path equals an entry or ends with ``"." + entry``;
* a string: a regular expression that must match the whole module path;
* ``"all-linear"`` or ``None``: every supported linear layer except the output head (a GPT-2
  ``Conv1D`` is one);
* given the adapter's config: only modules in its ``layers_to_transform``, and never a module it
  trains in full (``modules_to_save``, the task's head).

A target whose path an adapter file cannot hold (:func:`lordba.format.header.check_module_path`: a
``ModuleDict`` key with a space or a ``:``) is refused here, before anything is trained, not by the
first save.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lordba._util.modules import is_output_head
from lordba._util.patterns import ALL_LINEAR, matches
from lordba.config import LoRDBAConfig
from lordba.errors import AdapterFormatError, TargetModulesError
from lordba.format.header import check_module_path
from lordba.nn.layer import LoRDBALinear
from lordba.quant import resolve_backend


def _foreign_wrapper(module: nn.Module) -> bool:
    """A linear layer already wrapped by another adapter library (e.g. PEFT's LoRA)."""
    return (
        not isinstance(module, LoRDBALinear)
        and hasattr(module, "base_layer")
        and any(hasattr(module, attr) for attr in ("lora_A", "active_adapter", "merged_adapters"))
    )


def _is_internal(name: str) -> bool:
    dotted = f".{name}."
    return any(f".{part}." in dotted for part in ("base_layer", "lordba_adapters", "lordba_saved", "original_module"))


def find_targets(
    model: nn.Module,
    target_modules: Sequence[str] | str | None,
    exclude_modules: Sequence[str] | str | None = None,
    config: LoRDBAConfig | None = None,
) -> list[str]:
    """Paths of the modules to adapt, in model order; errors if none or an unsupported one matches.

    With ``config``, modules outside its ``layers_to_transform`` are left out, and a module it trains
    in full (``modules_to_save``) is refused if ``target_modules`` names it (left out under all-linear).
    A target whose path is not a module path of the file format is refused (:class:`TargetModulesError`).
    """
    saved = config.saved_modules if config is not None else []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    all_linear = target_modules is None or target_modules == ALL_LINEAR
    found: list[str] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        if not name or _is_internal(name):
            continue
        supported = isinstance(module, LoRDBALinear) or resolve_backend(module) is not None
        if supported:
            linear_names.append(name)
        if all_linear:
            hit = supported and module is not head and not is_output_head(name)
        else:
            hit = matches(target_modules, name)
        if not hit or matches(exclude_modules, name) or (config is not None and not config.in_layers(name)):
            continue
        if saved and matches(saved, name):
            if all_linear:
                continue
            raise TargetModulesError(f"module {name!r} is both a target and in modules_to_save (trained in full)")
        if _foreign_wrapper(module):
            raise TargetModulesError(
                f"module {name!r} is already wrapped by {type(module).__module__}.{type(module).__name__}: "
                "merge or unload that adapter first"
            )
        if not supported:
            raise TargetModulesError(
                f"target module {name!r} is a {type(module).__name__}, not a supported linear layer "
                "(nn.Linear or a quantized linear from a supported backend)"
            )
        try:
            check_module_path(name, "target_modules")
        except AdapterFormatError as err:  # the adapter could be trained but never saved
            raise TargetModulesError(
                f"{err}: an adapter file cannot hold it; leave it out with exclude_modules"
            ) from None
        found.append(name)
    if not found:
        sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear_names})[:12]) or "none"
        raise TargetModulesError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__} "
            f"(its linear layers are named: {sample})"
        )
    return found
