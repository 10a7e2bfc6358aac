"""Merging adapters into the base weights, with PEFT's ``safe_merge`` and a word when it is lossy.

Merging into an unquantized base adds the dense update to the weight (exact up to float rounding).
Merging into a quantized base requantizes the weight: the merged model no longer computes
``base + adapter`` exactly. :func:`merge_layers` measures that error (the largest weight error the
requantization added, beyond the update itself) and warns with it, so the loss is never silent;
``unmerge_adapter()`` restores the original quantized base exactly. A layer whose weights accelerate
offloads (on ``meta``, loaded from its offload files for each call) cannot be merged into, nor can a weight
that another module shares (a tied output head: ``lm_head.weight`` is ``embed_tokens.weight``, and an in-place
merge would change the input embeddings too): both are refused.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Collection, Sequence

from torch import nn

from lordba.errors import AdapterStateError, ConfigError
from lordba.nn.layer import LoRDBALinear


class MergeRequantizationWarning(UserWarning):
    """Merging into a quantized base requantized its weights (the merged model is not exact)."""


def name_list(adapter_names: object, what: str) -> list[str]:
    """``adapter_names`` (one name, or a sequence of names) as a list of names, each once.

    Raises:
        ConfigError: a name that is not a string, or a name given twice (stacking or merging an adapter
            with itself would add its update twice), naming ``what`` the names were given to.
    """
    if isinstance(adapter_names, str):
        return [adapter_names]
    if not isinstance(adapter_names, Sequence):
        raise ConfigError(f"{what}: expected an adapter name or a list of them, got {type(adapter_names).__name__}")
    names = list(adapter_names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ConfigError(f"{what}: an adapter name must be a string, got {type(name).__name__} ({name!r})")
        if name in names[:i]:
            raise ConfigError(f"{what}: adapter {name!r} named more than once (its update would be added twice)")
    return names


def merge_names(adapter_names: str | Sequence[str] | None, active: Sequence[str], known: Collection[str]) -> list[str]:
    """The adapters a merge call names: ``active`` for ``None``, none for an empty list (PEFT's
    ``check_adapters_to_merge``: ``merge_and_unload(adapter_names=[])`` unloads without merging), one name for a
    string (not its characters).

    Raises:
        ConfigError: a name that is not a string, or one given twice (:func:`name_list`).
        AdapterStateError: a name is not a loaded adapter (merging would otherwise skip it silently).
    """
    names = list(active) if adapter_names is None else name_list(adapter_names, "merge")
    for name in names:
        if name not in known:
            raise AdapterStateError(f"unknown adapter {name!r}; loaded adapters: {sorted(known)}")
    return names


def _offloaded(module: nn.Module) -> bool:
    """Whether ``module`` holds a weight on the ``meta`` device (offloaded by accelerate, or never loaded)."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _check_untied(root: nn.Module, layers: Sequence[tuple[str, LoRDBALinear]], adapter_names: Sequence[str]) -> None:
    """Refuse an in-place merge into a weight that another module of ``root`` holds too (tied weights); the layer
    itself reached through another path (a block shared by several paths, as Zamba's) is no other module.

    Raises:
        AdapterStateError: naming the layer and the other module's parameter.
    """
    shared = [(p, l) for p, l in layers if l.backend.in_place_merge and l._to_merge(adapter_names)]
    if not shared:
        return
    owners: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    at: dict[int, list[str]] = {}  # every path of each layer: a block shared by several paths holds one layer
    for name, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, LoRDBALinear):
            at.setdefault(id(module), []).append(name + ".")
    for path, layer in shared:
        weight = layer.base_layer._parameters.get("weight")
        own = tuple(at.get(id(layer), [path + "."]))
        others = [n for n in owners.get(id(weight), ()) if not n.startswith(own)] if weight is not None else []
        if others:
            raise AdapterStateError(
                f"cannot merge into {path!r}: its weight is tied to {others[0]!r} (one tensor, e.g. "
                "tie_word_embeddings), and merging would change that module too; keep the adapter unmerged"
            )


def merge_layers(
    layers: Sequence[tuple[str, LoRDBALinear]],
    adapter_names: Sequence[str],
    safe_merge: bool = False,
    root: nn.Module | None = None,
) -> float:
    """Merge ``adapter_names`` into every layer; returns the largest requantization error (NaN where a requantized
    weight is not finite: the warning names the layer).

    ``root``: the model the layers are in, where a weight may be tied to another module's (refused).
    With ``safe_merge``, every layer's merged weight is checked for NaN/Inf before any layer is
    changed (and a requantized weight again before it replaces the base). On any failure the adapters this
    call merged come out of every layer again, those merged by earlier calls stay: nothing is left
    half-merged.

    Raises:
        AdapterStateError: ``safe_merge`` found a non-finite merged weight (naming the layer and adapter), or a
            layer to merge into holds its weights offloaded (``meta``; refused before any layer changes).
    """
    for path, layer in layers:  # a merge into a meta tensor does nothing: the update would be lost silently
        if layer._to_merge(adapter_names) and _offloaded(layer.base_layer):
            raise AdapterStateError(
                f"cannot merge into {path!r}: its weights are offloaded (on the meta device, loaded by accelerate's "
                "hook for each call); load the model without offloading to merge"
            )
    if root is not None:
        _check_untied(root, layers, adapter_names)
    if safe_merge:  # check every layer before changing any: an in-place merge cannot be undone bit-exactly
        for path, layer in layers:
            layer.check_finite_merge(adapter_names, where=path)
    done: list[tuple[LoRDBALinear, tuple]] = []
    worst, lossy, broken = 0.0, 0, []
    try:
        for path, layer in layers:
            done.append((layer, layer.merge_state()))  # before: a Ctrl-C as its merge returned still undoes it
            error = layer.merge(adapter_names, safe_merge=safe_merge, where=path)  # a refused layer restores itself
            if error is None:
                continue
            lossy += 1
            if not math.isfinite(error):  # a NaN / Inf weight (the layer's error keeps its NaN)
                broken.append(path)
            else:
                worst = max(worst, error)
    except BaseException:  # a refusal, or anything else half-way: nothing is left half-merged
        for layer, before in reversed(done):  # only this call's merges: earlier calls' stay merged
            layer.restore_merge_state(before)
        raise
    if lossy:
        nan = (
            f"; the requantized weights of {len(broken)} layer(s) are not finite (NaN/Inf), first {broken[0]!r}: the "
            "merged model computes NaN (safe_merge=True refuses such a merge)"
            if broken
            else ""
        )
        warnings.warn(
            f"merging into a quantized base requantized {lossy} layer(s): the largest weight error beyond the "
            f"adapter's update is {worst:.4g}{nan}, so the merged model's outputs differ from base + adapter; "
            "unmerge_adapter() restores the base exactly (keep the adapter unmerged, or merge into an "
            "unquantized base, for exact outputs)",
            MergeRequantizationWarning,
            stacklevel=3,
        )
    return float("nan") if broken else worst
