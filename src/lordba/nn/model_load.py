"""Loading adapter files onto a :class:`~lordba.nn.model.LoRDBAModel`: load, load an in-memory state, hot-swap,
``from_pretrained`` (a mixin of the model, under :class:`~lordba.nn.model_files.AdapterFilesMixin`, kept apart so that
each module stays readable; it uses the model's lock, names and layers).

Loading validates the whole directory (:mod:`lordba.format.adapter`) and checks it against the
model's layers before the model is touched; for inference it builds the adapters' inference form
straight from the stored tensors (:meth:`~lordba.nn.adapter.PackedAdapter.from_stored`). An adapter
given by a Hub id (``"user/repo"``) is fetched first (:func:`lordba.nn.hub.resolve_adapter_dir`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lordba._util.callers import caller_stacklevel
from lordba._util.interrupts import PutBack
from lordba._util.modules import frozen_unless_failed
from lordba._util.state import ordinary_tensors
from lordba.config import CONFIG_NAME
from lordba.config.locate import other_base
from lordba.core.scales import get_codec
from lordba.errors import AdapterFormatError, AdapterStateError, BaseModelWarning, ConfigError, ShapeMismatchError
from lordba.format import adapter as adapter_files
from lordba.nn.adapter import LoRDBAAdapter, PackedAdapter, TrainableAdapter
from lordba.nn.hub import resolve_adapter_dir
from lordba.nn.layer import adapter_device
from lordba.nn.model_forms import hold_together
from lordba.nn.model_install import AdapterInstallMixin
from lordba.quant import BaseBackend

Targets = dict[str, tuple[nn.Module, BaseBackend]]  # module path -> (base layer, its backend)


class AdapterLoadMixin(AdapterInstallMixin):
    """Load / hot-swap methods of :class:`~lordba.nn.model.LoRDBAModel`."""

    def _check_fits(self, state: adapter_files.AdapterState, source: object) -> Targets:
        """Every module of ``state`` exists in this model with the same in/out features; returns
        ``{path: (base layer, backend)}`` (resolved once, reused to build the adapters)."""
        targets: Targets = {}
        root = self._root()
        for path, rec in state.modules.items():
            try:
                base, backend = self._target(path, root)
                in_f, out_f = backend.features(base)
            except ShapeMismatchError as err:
                raise AdapterFormatError(f"{source}: {err}") from None
            if (in_f, out_f) != (rec.in_features, rec.out_features):
                raise AdapterFormatError(
                    f"{source}: module {path!r} is {rec.in_features}→{rec.out_features} in the file "
                    f"but {in_f}→{out_f} in the base model"
                )
            targets[path] = (base, backend)
        return targets

    def _read_for_model(self, model_id: str | Path, **hub: Any) -> tuple[adapter_files.AdapterFile, Targets]:
        """Open (a Hub id is fetched first), check against this model's layers, then load the
        tensors of an adapter directory; returns it and its resolved targets."""
        adapter = adapter_files.open_adapter(resolve_adapter_dir(model_id, **hub))
        targets = self._check_fits(adapter, adapter.weights_path)
        adapter.load_tensors()
        self._warn_other_base(adapter)
        return adapter, targets

    def _warn_other_base(self, adapter: adapter_files.AdapterFile) -> None:
        """Warn (:class:`~lordba.errors.BaseModelWarning`) where ``adapter`` records another base model than this
        model's ``name_or_path`` (:func:`~lordba.config.locate.other_base`); never refuses: a base may have moved."""
        recorded = adapter.config.base_model_name_or_path
        current = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        if other_base(recorded, current if isinstance(current, str) else None):
            warnings.warn(
                f"{adapter.directory / CONFIG_NAME}: the adapter was made for base_model_name_or_path {recorded!r}, "
                f"and this model is {current!r}: an adapter for another model of the same layer shapes loads and "
                "gives meaningless outputs (nothing to do if it is the same model under another name or folder)",
                BaseModelWarning,
                stacklevel=caller_stacklevel(),  # (the user's line: from_pretrained's, load_adapter's, ...)
            )

    @ordinary_tensors()
    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        on_verified: Callable[[adapter_files.AdapterFile], None] | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Load an adapter under ``adapter_name`` (packed form; scales train if ``is_trainable``,
        else it is compact: scales held as stored, frozen). ``model_id`` is a directory or a
        Hugging Face Hub repo id (``revision``, ``token``, ``cache_dir``, ``subfolder`` and
        ``local_files_only`` as in PEFT). Validation happens before the model is touched;
        ``on_verified`` (if given) is called with the read file once all of it passed, before anything is
        installed (the server's LRU makes room there: a bad file evicts nobody); what it raises ends the load.
        ``low_cpu_mem_usage`` (PEFT's keyword: no adapter weights made before the file's are loaded) is accepted
        and changes nothing: the adapters are always built from the file's tensors, never initialised first.
        Without ``is_trainable`` the model is put in eval mode, as PEFT does (dropout off: the adapter's and the
        base's); ``model.train()`` turns it back on.

        Raises:
            AdapterFormatError: a missing, invalid or unresolvable adapter (named); AdapterStateError /
                ConfigError: the name is taken or invalid.
        """
        self._check_new_name(adapter_name, new=False)
        hub = dict(
            revision=revision, token=token, cache_dir=cache_dir, subfolder=subfolder, local_files_only=local_files_only
        )
        adapter_file, targets = self._read_for_model(model_id, **hub)
        if on_verified is not None:
            on_verified(adapter_file)
        evaluate = PutBack(self._evaluate_loaded, [(adapter_name, adapter_file.config)])
        try:
            self._load_state(adapter_file, adapter_name, is_trainable, targets)
        finally:  # (a Ctrl-C as the load returned, or part way through the eval: the eval is finished, then raised)
            if not is_trainable:  # for inference (PEFT's load_adapter): dropout, the branch's and the base's, off
                try:  # (a first try apart: a Ctrl-C pending as it begins is caught here, a second one at the next try)
                    evaluate()
                except KeyboardInterrupt as err:
                    evaluate.interrupted = err
                    while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                        try:
                            evaluate()
                            break
                        except KeyboardInterrupt as err:
                            evaluate.interrupted = err
                evaluate.done()

    def _evaluate_loaded(self, loaded: tuple[str, Any]) -> None:
        """The model in eval mode if the adapter ``loaded`` names (its name and config) was loaded (not refused or
        undone). Can be done twice."""
        name, config = loaded
        if self.peft_config.get(name) is config:
            with self._lock.write():  # (the walk over the modules: another thread's delete_adapter changes them)
                self.eval()

    @ordinary_tensors()
    def load_adapter_state(
        self, state: adapter_files.AdapterState, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Add an in-memory adapter (e.g. from ``convert_lora``) under ``adapter_name``, packed form
        (its tensors are copied). Raises :class:`AdapterFormatError` if it does not fit the model or
        holds what a file may not (a missing tensor, NaN or infinite scales, codes outside the format),
        :class:`AdapterStateError` / :class:`ConfigError` if the name is taken or invalid, :class:`ConfigError`
        if ``state`` is not an :class:`~lordba.format.adapter.AdapterState`."""
        if not isinstance(state, adapter_files.AdapterState):
            raise ConfigError(f"load_adapter_state takes an AdapterState (convert_lora's), got {type(state).__name__}")
        self._load_state(state, adapter_name, is_trainable)

    def _load_state(
        self,
        state: adapter_files.AdapterState,
        adapter_name: str,
        is_trainable: bool = False,
        targets: Targets | None = None,
    ) -> dict[str, LoRDBAAdapter]:
        """:meth:`load_adapter_state`; given ``targets`` (what :meth:`_check_fits` returned for a file
        the loader read itself), the check is not repeated and the adapters hold the file's freshly
        read tensors without copying them. Returns the installed adapters by module path."""
        self._check_new_name(adapter_name, new=False)
        owned = targets is not None
        if targets is None:  # an in-memory state: the checks a file's tensors get, then the model's
            adapter_files.checked_tensors(state.config, state.modules, "load_adapter_state: cannot load")
            targets = self._check_fits(state, "adapter")
        config = state.config
        codec = get_codec(config.scale_dtype)
        adapters = {}
        devices: dict[int, torch.device] = {}
        for path, rec in state.modules.items():
            base, backend = targets[path]
            adapter = PackedAdapter.from_stored(  # scales held as stored (int8 codes): the file's size in memory
                rec.tensors,
                rec.in_features,
                rec.out_features,
                rec.r,
                config.scaling_for(path),
                codec,
                device=_device(base, backend, devices, path),
                copy=False,  # a file's own tensors, or the caller's: copied below into one buffer
                training=base.training,  # its layer's mode, as a rule (checked again when installed)
            )
            if adapter.dropout != config.dropout:
                adapter.dropout = config.dropout
            if is_trainable:
                adapter = adapter.trainable(config.ste_spec)
                adapter.set_trainable(signs=False, scales=True)
            adapters[path] = adapter
        if not owned:  # the caller's tensors: copied, as a loaded file's are held (one buffer)
            hold_together([a for a in adapters.values() if isinstance(a, PackedAdapter)])
        with self._lock.write():
            self._check_new_name(adapter_name, new=False)  # again: another thread may have taken the name
            load_extras = lambda: self._load_extras(adapter_name, state, adapters, is_trainable)  # noqa: E731
            self._add_whole(adapter_name, config, adapters, load_extras)
        return adapters

    def _load_extras(
        self, adapter_name: str, state: adapter_files.AdapterState, adapters: dict[str, Any], is_trainable: bool
    ) -> None:
        """Add a loaded adapter's extra tensors; without support for modules trained in full, a file that has extras
        is refused."""
        if state.extras:
            raise AdapterStateError(f"this model cannot hold the extra tensors of adapter {adapter_name!r}")

    @ordinary_tensors()
    def hotswap_adapter(
        self,
        model_id: str | Path,
        adapter_name: str = "default",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        """Replace a loaded adapter's weights in place (no re-injection, same tensors, so compiled
        graphs stay valid; only a compact adapter given another scale format gets new scale
        buffers); its scaling and dropout become the new file's. The new adapter must target the
        same modules (or a subset: the others become no-ops) with the same ranks, and must not be
        merged (its old update is in the base weights). ``model_id`` and the Hub keywords (``revision``,
        ``token``, ``cache_dir``, ``subfolder``, ``local_files_only``) are as in :meth:`load_adapter`.
        All or none: a failure or an interrupt (Ctrl-C) half-way puts every layer's old tensors, scale format,
        scaling and dropout back, and the config stays the old one. For that the swap keeps a copy of the
        adapter's own tensors while it runs (its modules trained in full included; never the base's): extra
        memory the size of the adapter, not of the model.

        Raises:
            AdapterStateError: an unknown or merged adapter, other modules, ranks or extra tensors
                (the model is left as it was); AdapterFormatError: as :meth:`load_adapter`.
        """
        self._check_known(adapter_name)
        hub = dict(
            revision=revision, token=token, cache_dir=cache_dir, subfolder=subfolder, local_files_only=local_files_only
        )
        adapter_file, _ = self._read_for_model(model_id, **hub)
        config = adapter_file.config
        codec = get_codec(config.scale_dtype)
        with self._lock.write():  # check and swap at once: another thread may delete or swap it
            current = self.adapter_modules(adapter_name)
            if any(adapter_name in layer.merged_adapters for _, layer in self._lordba_layers()):
                raise AdapterStateError(
                    f"hotswap_adapter: adapter {adapter_name!r} is merged into the base weights: "
                    "unmerge_adapter() before hot-swapping it"
                )
            for path, rec in adapter_file.modules.items():
                old = current.get(path)
                if old is None or old.r != rec.r:
                    raise AdapterStateError(
                        f"hotswap_adapter: module {path!r} (rank {rec.r}) is not in adapter {adapter_name!r} with "
                        "that rank; hot-swapping needs the same target modules (or a subset) and ranks"
                    )
            self._hotswap_extras(adapter_name, adapter_file, apply=False)  # checked before anything changes
            undo = _SwapUndo()
            put_back = PutBack(undo.restore, [lambda path, adapter: self._swap(adapter_name, path, adapter)])
            try:
                for path, adapter in current.items():
                    rec = adapter_file.modules.get(path)
                    if rec is not None and isinstance(adapter, TrainableAdapter) and adapter.has_latent_signs:
                        undo.swapped.append((path, adapter))  # (before: putting back one not replaced is no-op)
                        adapter = self._swap(adapter_name, path, adapter.freeze_signs())  # stored signs are packed
                    else:
                        undo.keep_adapter(adapter)
                    adapter.codec = codec
                    adapter.scaling = config.scaling_for(path)
                    adapter.dropout = config.dropout  # the swapped-in config's, as a load gives it
                    if rec is None:
                        adapter.silence()
                    else:
                        adapter.load_stored(rec.tensors)
                if adapter_file.extras:  # modules trained in full and trained biases, written in place
                    for _, module in self._saved_modules():
                        if adapter_name in module.lordba_saved:
                            for name in module.saved_params[adapter_name]:
                                undo.keep(module.lordba_saved[adapter_name].get_parameter(name))
                self._hotswap_extras(adapter_name, adapter_file, apply=True)
            except BaseException:  # a failure or a Ctrl-C half-way: every layer's old adapter back
                try:  # (a second Ctrl-C during it starts it again: each of its steps can be repeated)
                    put_back()
                except KeyboardInterrupt as err:
                    put_back.interrupted = err
                    while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                        try:
                            put_back()
                            break
                        except KeyboardInterrupt as err:
                            put_back.interrupted = err
                put_back.done()  # (a Ctrl-C that came meanwhile raised)
                raise
            self.peft_config[adapter_name] = config

    def _hotswap_extras(self, adapter_name: str, state: adapter_files.AdapterState, apply: bool) -> None:
        """Check (``apply=False``) or load in place the extra tensors of a hot-swapped adapter; without
        support for modules trained in full, a file that has extras is refused."""
        if state.extras:
            raise AdapterStateError(f"hotswap_adapter: this model cannot hold the extra tensors of {adapter_name!r}")

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **hub: Any,
    ) -> Any:
        """Load a saved adapter (a directory or a Hub repo id; ``hub``: the keyword arguments of
        :meth:`load_adapter`, e.g. ``revision``, ``token``, ``cache_dir``, ``subfolder``) onto
        ``model`` and activate it. Raises as :meth:`load_adapter`, leaving ``model`` as it was (its parameters'
        ``requires_grad`` too: the wrapper freezes them)."""
        if not isinstance(model, nn.Module):
            raise ConfigError(f"from_pretrained loads onto a model (an nn.Module), got {type(model).__name__}")
        with frozen_unless_failed(model):
            wrapper = cls(model)
            wrapper.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **hub)
        wrapper.set_adapter(adapter_name)
        return wrapper


class _SwapUndo:
    """What a hot-swap changed, as it was before: the adapters it replaced by another form (``swapped``), and copies
    of the tensors it writes in place with the attributes it sets (the adapter's tensors only: the base is never
    written)."""

    def __init__(self) -> None:
        self.swapped: list[tuple[str, LoRDBAAdapter]] = []
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.adapters: list[tuple[LoRDBAAdapter, dict[str, Any], dict[str, torch.Tensor | None]]] = []

    def keep(self, tensor: torch.Tensor) -> None:
        self.tensors.append((tensor, tensor.detach().clone()))

    def keep_adapter(self, adapter: LoRDBAAdapter) -> None:
        """Keep ``adapter``'s attributes, its buffers (a new scale format replaces them) and its tensors' values."""
        attributes = {name: getattr(adapter, name) for name in ("codec", "scaling", "dropout")}
        self.adapters.append((adapter, attributes, dict(adapter._buffers)))
        for tensor in (*adapter._parameters.values(), *adapter._buffers.values()):
            if tensor is not None:
                self.keep(tensor)

    def restore(self, put_back: Callable[[str, LoRDBAAdapter], object]) -> None:
        """Put everything kept back (in place: the tensors compiled graphs read stay the same ones)."""
        for adapter, attributes, buffers in self.adapters:
            for name, tensor in buffers.items():
                if adapter._buffers.get(name) is not tensor:
                    adapter._buffers[name] = tensor
            for name, value in attributes.items():
                setattr(adapter, name, value)
        with torch.no_grad():
            for tensor, copy in self.tensors:
                tensor.copy_(copy)
        for path, adapter in self.swapped:
            put_back(path, adapter)


def _device(base: nn.Module, backend: BaseBackend, seen: dict[int, torch.device], path: str) -> torch.device:
    """The device of ``base``'s weight (:meth:`BaseBackend.weight_device`; a plain weight read directly), or for
    one offloaded by accelerate (``meta``) where its hook computes (:func:`~lordba.nn.layer.adapter_device`)."""
    if type(backend).weight_device is BaseBackend.weight_device:
        weight = base._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and not weight.is_meta:
            return weight.device
    key = id(base)
    if key not in seen:
        seen[key] = adapter_device(base, backend.weight_device(base), path)
    return seen[key]
