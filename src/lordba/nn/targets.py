"""Which modules of a model an adapter targets (PEFT's matching rules).

* a list of names: a module matches if its path equals an entry or ends with ``"." + entry``;
* a string: a regular expression that must match the whole module path;
* ``"all-linear"`` or ``None``: every supported linear layer except the output head (a GPT-2
  ``Conv1D`` is one);
* given the adapter's config: only modules in its ``layers_to_transform``, and never a module it
  trains in full (``modules_to_save``, the task's head), nor under all-linear one inside it (RoBERTa's
  ``classifier.dense``: PEFT's rule);
* never a module inside another adapter library's wrapper (PEFT's LoRA layer and ``modules_to_save``
  copy: its factors, its copy of the head); the wrapped linear layer itself is refused, by name or
  under all-linear (merge or unload that adapter first).

A target whose path an adapter file cannot hold (:func:`lordba.format.header.check_module_path`: a
``ModuleDict`` key with a space or a ``:``) is refused here, before anything is trained, not by the
first save.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from lordba._util.modules import is_output_head
from lordba._util.patterns import ALL_LINEAR, matches, pattern_key
from lordba.config import LoRDBAConfig
from lordba.errors import AdapterFormatError, TargetModulesError
from lordba.format.header import check_module_path
from lordba.nn.layer import LoRDBALinear
from lordba.quant import resolve_backend
from lordba.quant.backend import NEVER_CALLED


def _foreign_wrapper(module: nn.Module) -> bool:
    """A layer already wrapped by another adapter library (PEFT's LoRA layers, its ``modules_to_save``
    wrapper)."""
    if isinstance(module, LoRDBALinear):
        return False
    if hasattr(module, "base_layer"):
        return any(hasattr(module, attr) for attr in ("lora_A", "active_adapter", "merged_adapters"))
    return hasattr(module, "original_module") and hasattr(module, "modules_to_save")


def _wraps_linear(module: nn.Module) -> bool:
    """Whether a foreign wrapper's own layer is a supported linear layer (what all-linear would adapt)."""
    inner = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    inner = inner if isinstance(inner, nn.Module) else getattr(module, "original_module", None)
    return isinstance(inner, nn.Module) and resolve_backend(inner) is not None


def _fast_path_linears(model: nn.Module) -> set[str]:
    """Paths of the ``linear1`` / ``linear2`` of every ``nn.TransformerEncoderLayer``: in eval mode without
    gradients its fast path (``torch._transformer_encoder_layer_fwd``) reads their weights and never calls them, so
    an adapter there would silently change nothing (PEFT's LoRA has the same trap)."""
    return {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.TransformerEncoderLayer)
        for child in ("linear1", "linear2")
    }


def _inside_saved(saved: list[str], name: str) -> bool:
    """Whether ``name`` is below a module trained in full (``modules_to_save``, the task's head: RoBERTa's
    ``classifier.dense``): that module is copied whole, so an adapter inside it would be copied with it."""
    parts = name.split(".")
    return any(matches(saved, ".".join(parts[:i])) for i in range(1, len(parts)))


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
    in full (``modules_to_save``) is refused if ``target_modules`` names it (left out under all-linear);
    ``rank_pattern`` / ``alpha_pattern`` keys that match none of the paths found warn (a ``RuntimeWarning``,
    as PEFT's): they are ignored.
    A target whose path is not a module path of the file format is refused (:class:`TargetModulesError`).
    """
    saved = config.saved_modules if config is not None else []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fast_path = _fast_path_linears(model)
    all_linear = target_modules is None or target_modules == ALL_LINEAR
    found: list[str] = []
    linear_names: list[str] = []
    foreign: list[str] = []  # paths of other libraries' wrappers ("a.q_proj."): nothing inside is a target
    for name, module in model.named_modules():
        if not name or _is_internal(name) or any(name.startswith(prefix) for prefix in foreign):
            continue
        wrapped = _foreign_wrapper(module)
        if wrapped:
            foreign.append(name + ".")
        supported = isinstance(module, LoRDBALinear) or resolve_backend(module) is not None
        supported = supported and name not in fast_path
        if supported:
            linear_names.append(name)
        if all_linear:
            linear = supported or (wrapped and _wraps_linear(module))
            hit = linear and module is not head and not is_output_head(name)
        else:
            hit = matches(target_modules, name)
        if not hit or matches(exclude_modules, name) or (config is not None and not config.in_layers(name)):
            continue
        if saved and all_linear and _inside_saved(saved, name):  # (named ones: refused by the model, _check_saveable)
            continue
        if saved and matches(saved, name):
            if all_linear:
                continue
            raise TargetModulesError(f"module {name!r} is both a target and in modules_to_save (trained in full)")
        if wrapped:
            raise TargetModulesError(
                f"module {name!r} is already wrapped by {type(module).__module__}.{type(module).__name__}: "
                "merge or unload that adapter first"
            )
        if not supported:
            never = type(module) is NEVER_CALLED  # (an nn.Linear subclass: say why)
            why = " (nn.MultiheadAttention computes with its weight, never calling it)" if never else ""
            if name in fast_path:
                why = " (nn.TransformerEncoderLayer's inference fast path computes with its weight, never calling it)"
            raise TargetModulesError(
                f"target module {name!r} is a {type(module).__name__}, not a supported linear layer "
                f"(nn.Linear or a quantized linear from a supported backend){why}"
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
    if config is not None:
        _warn_unmatched_patterns(config, found)
    return found


def _warn_unmatched_patterns(config: LoRDBAConfig, found: list[str]) -> None:
    """Warn, as PEFT does, about ``rank_pattern`` / ``alpha_pattern`` keys that match no adapted module (a typo
    there silently gives every module ``r`` / ``alpha``)."""
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field)
        unmatched = [key for key in patterns if all(pattern_key({key: None}, path) is None for path in found)]
        if unmatched:
            warnings.warn(
                f"{field} key(s) {unmatched!r} matched no adapted module and are ignored", RuntimeWarning, stacklevel=3
            )
