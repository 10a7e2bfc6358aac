"""PEFT's ``layers_to_transform`` rule: which layer a module path is in, and whether that layer is adapted."""

from __future__ import annotations

import re


def in_layers(
    layers_to_transform: int | list[int] | None,
    layers_pattern: str | list[str] | None,
    target_modules: str | list[str] | None,
    module_name: str,
    legacy: bool = False,
) -> bool:
    """Whether ``module_name`` is in ``layers_to_transform`` (PEFT's rule; True when it is unset): the
    layer index is the first ``<name>.<digits>.`` of the path (``decoder.block.1.layer.0.…``: 1), or the
    digits after the first ``layers_pattern`` that the path holds. With ``legacy`` (checking a file),
    without ``layers_pattern`` the last ``<name>.<digits>.`` counts too: lordba took that one before, and
    the files it wrote then still load. A module whose whole path is an entry of a ``target_modules`` list
    is in, whatever its index (PEFT's rule: only suffix entries are limited to the layers)."""
    if layers_to_transform is None:
        return True
    if isinstance(target_modules, list) and module_name in target_modules:
        return True
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    if layer_index(layers_pattern, module_name) in wanted:
        return True
    return legacy and not layers_pattern and layer_index(layers_pattern, module_name, last=True) in wanted


def layer_index(layers_pattern: str | list[str] | None, module_name: str, last: bool = False) -> int | None:
    """The layer index of ``module_name`` by ``layers_pattern`` (PEFT 0.21's rule; ``last``: the last
    ``<name>.<digits>.`` where there is no pattern), or ``None``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    rules = [rf"(?:^|.*?\.){re.escape(p)}\.(\d+)\." for p in patterns or []]
    for rule in rules or [r".*\.[^.]*\.(\d+)\." if last else r".*?\.[^.]*\.(\d+)\."]:
        found = re.match(rule, module_name)
        if found is not None:
            return int(found.group(1))
    return None
