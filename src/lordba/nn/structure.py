"""Where a model's LoRDBA layers and modules trained in full are, found by one ``named_modules()``
walk and kept until the model's structure changes (what makes loading an adapter cheap: a model
with a thousand adapters resident has a thousand modules per layer to walk through).

The index is rebuilt when:

* a module of the kind it indexes was registered anywhere since it was built (a global
  module-registration hook of PyTorch counts them: ``setattr`` of a module, ``add_module``,
  ``ModuleList``/``ModuleDict`` changes; registrations of other modules are not counted, since a
  forward registers some: transformers slices its ``ModuleList`` of layers on every call); or
* one of its entries is no longer at its path (it, or a module above it, was deleted or replaced):
  every entry is checked on use, by dictionary lookups along its path.

A module of that kind added inside another module registered in one piece (a deep copy of a
decoder layer appended to the model) is not seen until the next rebuild; lordba's own methods add
layers one by one.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

_VERSION = [0]  # bumped whenever a module of an indexed kind is registered anywhere in this process
_KINDS: list[type[nn.Module]] = []  # the kinds indexes are kept for


def _count_registration(parent: nn.Module, name: str, module: nn.Module | None) -> None:
    # Not under tracing (a model's forward registers modules: transformers slices its ModuleList of
    # layers on every call), so that compiled graphs never guard on the counter.
    if not torch.compiler.is_compiling() and _KINDS and isinstance(module, tuple(_KINDS)):
        _VERSION[0] += 1


register_module_module_registration_hook(_count_registration)


def structure_version() -> int:
    """A number that changes whenever a module of a kind some :class:`ModuleIndex` indexes is
    registered in this process (``setattr``, ``add_module``, containers)."""
    return _VERSION[0]


def uncompiled(module: nn.Module) -> nn.Module:
    """``module`` itself, or for one ``torch.compile`` returned (an ``OptimizedModule``) the module it compiled: the
    one whose paths adapters, their files and configs name (the wrapper puts ``_orig_mod.`` before them; PEFT
    strips it too)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")  # (not imported: nothing was compiled)
    while frame is not None and isinstance(module, frame.OptimizedModule):
        module = module._orig_mod
    return module


def resolve(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``root`` at dotted ``path`` (``""``: root), or ``None`` where there is none:
    ``get_submodule`` without its per-step checks and exceptions."""
    module = root
    if path:
        for part in path.split("."):
            module = module._modules.get(part)
            if module is None:
                return None
    return module


def replace_everywhere(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` below ``root`` and in every other slot holding the module now there (one module
    registered under two names, ``self.alias = self.proj``: a call through either runs ``new``)."""
    old = root.get_submodule(path)
    slots = [(parent, name) for parent in root.modules() for name, child in parent._modules.items() if child is old]
    for parent, name in slots:  # (found before any is set: ``new`` may hold ``old``, a wrapper its base)
        setattr(parent, name, new)


class ModuleIndex:
    """``(path, module)`` of the modules of a root that are instances of ``kind``, in
    ``named_modules()`` order, kept until the structure changes (module docstring). Threads may
    share it: concurrent rebuilds give the same entries. The modules are held by weak references: a layer
    taken out of the model (``unload()``, ``merge_and_unload()``, ``delete_adapter``) is freed with its adapters
    while the model lives on, not kept until the next walk."""

    def __init__(self, kind: type[nn.Module]) -> None:
        self._kind = kind
        if kind not in _KINDS:
            _KINDS.append(kind)
        self._entries: list[tuple[str, weakref.ref[nn.Module]]] = []
        self._version = -1
        self._root: nn.Module | None = None

    def __reduce__(self) -> tuple:
        """A copy (``copy.deepcopy``, pickling: ``torch.save(model)``) is a fresh index: it walks its own root."""
        return (ModuleIndex, (self._kind,))

    def get(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(path, module)`` pairs, walking ``root`` only if the structure changed; a new list."""
        version, entries = self._version, self._entries
        if version == _VERSION[0] and self._root is root:
            held = [(path, ref()) for path, ref in entries]
            if all(module is not None and resolve(root, path) is module for path, module in held):
                return held
        version = _VERSION[0]
        found = [(n, m) for n, m in root.named_modules() if isinstance(m, self._kind)]
        self._entries, self._version, self._root = [(n, weakref.ref(m)) for n, m in found], version, root
        return found

    def invalidate(self) -> None:
        """Walk again on the next :meth:`get`."""
        self._version = -1
