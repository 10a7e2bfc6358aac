"""``LoRDBAModel`` and ``get_lordba_model``: adapters on a whole model, with PEFT's method names.

The wrapper injects :class:`~lordba.nn.layer.LoRDBALinear` layers into a (transformers) model,
freezes the base, and manages named adapters: add, load, save, set, stack, delete, hot-swap,
disable, merge and unload, mixed-batch routing and generation. Its ``forward`` exposes the wrapped
model's own signature (plus ``adapter_names``), so ``transformers.Trainer`` keeps the right
dataset columns.

Thread safety (tested in tests/nn/test_concurrency.py; the contract is in docs/security.md):
forward and generate calls hold the model's lock shared; every method that changes adapters
(add, load, load_adapter_state, hot-swap, set, delete, merge, unmerge, merge_and_unload, unload,
pack, set_trainable, freeze_signs, unpack_to_latent, load_state_dict) holds it exclusively and checks its arguments
under it, so it is atomic with respect to forwards and to each other. Saving and ``adapter_state``
hold it shared. Routing (``adapter_names``) and ``disable_adapter`` are per thread (per asyncio task;
other threads' calls wait for a ``disable_adapter`` block to end: see its docstring). Not
thread-safe: training (backward and optimizer steps) concurrently with anything else on the same
model, and changing adapter tensors directly.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lordba._util.dtypes import DTYPES
from lordba._util.files import windows_name_problem
from lordba._util.modules import frozen_unless_failed
from lordba._util.state import ordinary_tensors
from lordba.config import LoRDBAConfig
from lordba.core.scales import get_codec
from lordba.errors import AdapterStateError, ConfigError, ShapeMismatchError, TargetModulesError
from lordba.nn.adapter import LoRDBAAdapter, TrainableAdapter
from lordba.nn.fastpath import armed
from lordba.nn.hub import refuse_base_attribute
from lordba.nn.layer import LoRDBALinear, adapter_device
from lordba.nn.lock import RWLock, holding
from lordba.nn.merge import name_list
from lordba.nn.model_files import AdapterFilesMixin
from lordba.nn.model_forms import AdapterFormsMixin
from lordba.nn.model_merge import MergeMixin
from lordba.nn.model_peft import PeftFeaturesMixin
from lordba.nn.model_state import (
    ForwardWithSignature,
    StateDictMixin,
    base_keys_not_missing,
    note_loading_prefix,
    with_adapter_names,
)
from lordba.nn.routing import BASE_ROW, DISABLED, UNUSABLE_NAMES, DisableBlock, RoutingGate, in_disable_block, routing
from lordba.nn.structure import resolve, uncompiled
from lordba.nn.targets import find_targets
from lordba.quant import BaseBackend, resolve_backend


class LoRDBAModel(StateDictMixin, PeftFeaturesMixin, AdapterFilesMixin, AdapterFormsMixin, MergeMixin, nn.Module):
    """A model with LoRDBA adapters. Build it with :func:`get_lordba_model` or :meth:`from_pretrained`."""

    # adapters attached: transformers' Trainer refuses a quantized base (is_quantized, read through) without them
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: LoRDBAConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"a LoRDBAModel wraps a model (an nn.Module), got {type(model).__name__}")
        if any(isinstance(m, LoRDBALinear) for m in model.modules()):
            raise TargetModulesError(
                "this model already has LoRDBA layers: add adapters through its LoRDBAModel (add_adapter)"
            )
        self.base_model = model
        self.peft_config: dict[str, LoRDBAConfig] = {}
        self._active: tuple[str, ...] = ()
        self._lock = RWLock()
        self._gate = RoutingGate()  # the routing of the call in flight, read by every layer
        self._layers_disabled = False  # disable_adapter_layers(): layers made later start disabled too
        try:
            signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            signature = inspect.signature(lambda *args, **kwargs: None)
        self.forward = ForwardWithSignature(self, with_adapter_names(signature))
        self.register_load_state_dict_pre_hook(note_loading_prefix)  # loaded inside another module: the base's keys
        self.register_load_state_dict_post_hook(base_keys_not_missing)  # are not missing (state_dict omits them)
        with frozen_unless_failed(model):  # a refused config leaves the caller's model as it was
            if config is not None:
                self.add_adapter(adapter_name, config)
        if config is not None:
            self.set_adapter(adapter_name)
        if type(self) is LoRDBAModel and "QuestionAnswering" in type(model).__name__:
            self.__class__ = LoRDBAModelForQuestionAnswering

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers"):
                raise
            refuse_base_attribute(name)  # never save or upload the base model by mistake
            return getattr(self.base_model, name)

    def _get_name(self) -> str:
        """The wrapped model's class name, as PEFT's wrapper is seen: the HF Trainer reads it to tell a causal LM,
        whose labels its label smoother (``label_smoothing_factor``) shifts by one (the repr keeps this class's)."""
        return self.base_model._get_name()

    def __repr__(self) -> str:
        return type(self).__name__ + super().__repr__()[len(self._get_name()) :]

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its LoRDBA layers in place)."""
        return self.base_model

    def _root(self) -> nn.Module:
        """The wrapped model as its module paths are named: a base compiled in place (``lm.base_model =
        torch.compile(lm.base_model)``) is walked through the module it compiled (paths without ``_orig_mod.``)."""
        return uncompiled(self.base_model)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names (several when stacked)."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of names when several are stacked (PEFT's property)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    # ------------------------------------------------------------------ layers
    def _lordba_layers(self) -> list[tuple[str, LoRDBALinear]]:
        return self._modules_of(LoRDBALinear)  # one named_modules() walk per structure change

    def adapter_modules(self, adapter_name: str) -> dict[str, LoRDBAAdapter]:
        """``{module path: adapter}`` of one adapter."""
        with self._lock.read():
            self._check_known(adapter_name)
            held = ((n, m.lordba_adapters._modules.get(adapter_name)) for n, m in self._lordba_layers())
            return {n: a for n, a in held if a is not None}

    def _check_known(self, *names: str) -> None:
        for name in names:
            if not isinstance(name, str):
                raise ConfigError(f"an adapter name must be a string, got {type(name).__name__} ({name!r})")
            if name not in self.peft_config:
                raise AdapterStateError(f"unknown adapter {name!r}; loaded adapters: {sorted(self.peft_config)}")

    def _check_new_name(self, name: str, new: bool = True) -> None:
        """Refuse ``name`` for an adapter (``new``: one made here, to be saved in a folder of its name; an adapter
        loaded from files may keep a name Windows cannot hold as a folder, as a Linux server's adapter folder does)."""
        if not isinstance(name, str) or not name or name == BASE_ROW or any(c in name for c in "./\\"):
            raise ConfigError(f"adapter name must be a non-empty string without '.', '/' or '\\', got {name!r}")
        problem = windows_name_problem(name) if new else None
        if problem is not None:  # save_pretrained writes every adapter but "default" into a folder of its name
            raise ConfigError(
                f"adapter name {name!r} cannot be a folder name on Windows ({problem}), and save_pretrained saves "
                "the adapter in a folder of its name: choose another name"
            )
        if name in UNUSABLE_NAMES:
            raise ConfigError(
                f"adapter name {name!r} is an attribute of torch's nn.ModuleDict, which holds each layer's adapters "
                "by name: choose another name"
            )
        if name in self.peft_config:
            raise AdapterStateError(f"adapter {name!r} already exists: delete_adapter() it or use hotswap_adapter()")

    def _target(self, path: str, root: nn.Module | None = None) -> tuple[nn.Module, BaseBackend]:
        """The base layer at ``path`` (inside its LoRDBA wrapper, if any) and its backend (``root``:
        the base model, when the caller already holds it)."""
        module = resolve(self._root() if root is None else root, path)
        if module is None:
            raise ShapeMismatchError(f"the base model has no module {path!r}")
        if isinstance(module, LoRDBALinear):
            return module.base_layer, module.backend
        backend = resolve_backend(module)
        if backend is None:
            raise ShapeMismatchError(f"module {path!r} is a {type(module).__name__}, not a supported linear layer")
        return module, backend

    # ------------------------------------------------------------------ adapters
    @ordinary_tensors()
    def add_adapter(self, adapter_name: str, config: LoRDBAConfig, *, low_cpu_mem_usage: bool = False) -> None:
        """Inject a new (trainable, latent-form) adapter per ``config``; it is not activated. ``low_cpu_mem_usage=True``
        (PEFT's empty adapter) is refused as in :func:`get_lordba_model`."""
        _refuse_empty_adapters("add_adapter", low_cpu_mem_usage)
        if not isinstance(config, LoRDBAConfig):
            raise ConfigError(f"config must be a LoRDBAConfig, got {type(config).__name__}")
        self._check_new_name(adapter_name)
        targets = find_targets(self._root(), config.target_modules, config.exclude_modules, config)
        config = self._prepare_config(config, targets)  # records the base quantization
        saved = self._saved_paths(config, targets)  # modules trained in full, biases (model_peft)
        codec = get_codec(config.scale_dtype)
        adapters = {}
        for path in targets:
            base, backend = self._target(path)
            in_f, out_f = backend.features(base)
            adapters[path] = TrainableAdapter(
                in_f,
                out_f,
                config.rank_for(path),
                config.scaling_for(path),
                codec,
                config.ste_spec,
                config.init,
                DTYPES[config.latent_dtype],
                adapter_device(base, backend.weight_device(base), path),
            )
        with self._lock.write():
            self._check_new_name(adapter_name)  # again: another thread may have taken the name
            extras = lambda: self._install_extras(adapter_name, config, saved, adapters)  # noqa: E731
            self._add_whole(adapter_name, config, adapters, extras)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate one adapter, or several (stacked: their branches add up). Merged adapters left out are
        unmerged first, with a warning (PEFT's behaviour): in the base weights they would still act.

        Raises:
            AdapterStateError: no name, an unknown one, or several that each train the same module in full.
        """
        names = tuple(name_list(adapter_names, "set_adapter"))
        if not names:
            raise AdapterStateError("set_adapter needs at least one adapter name")
        with self._lock.write():
            self._check_known(*names)
            self._check_one_saved_copy(names)
            merged = sorted({n for _, layer in self._lordba_layers() for n in layer.merged_adapters})
            unmerge = not set(merged) <= set(names)
            if unmerge:
                warnings.warn(f"set_adapter: unmerging the merged adapters {merged} first", UserWarning, stacklevel=2)
            layers = self._lordba_layers()
            for _, layer in layers if unmerge else ():  # all before any layer switches (a Ctrl-C: none has)
                layer.unmerge()
            for _, layer in layers:
                layer.set_adapter(names)
            self._active = names
            self._sync_saved()

    @holding
    def disable_adapter(self) -> Iterator[None]:
        """Within the block (in this thread; with asyncio, in this task: a context variable), the model runs as its
        base alone (this model: other models' calls keep their adapters). Calls of other threads that want adapters
        wait until the block ends (the layers hold one routing at a time). A thread started or handed work inside the
        block (a thread pool's, ``generate`` with a streamer on a ``threading.Thread``) does not inherit it: its calls
        want the adapters and wait, so waiting for them inside the block never ends; run them in the block's context
        (``contextvars.copy_context().run``, ``asyncio.to_thread``) to have them run the base. As PEFT's, it also
        decorates a function (``@model.disable_adapter()``: each call runs in a block)."""
        block, token = DisableBlock(self._gate), None  # this model's calls only
        entering, reading = self._gate.enter(routing(None, True, None), block=True), self._lock.read()
        try:  # (recorded inside: a Ctrl-C as the set returns still closes the block)
            token = DISABLED.set(DISABLED.get() | {block})
            with entering:
                with reading:  # checked in the gate: a merge (another thread's) sees the block or it
                    if any(layer.merged for _, layer in self._lordba_layers()):
                        raise AdapterStateError(
                            "adapters are merged into the base: unmerge_adapter() before disabling them"
                        )
                yield
        finally:
            block.open = False  # ends it in its context also when another thread closes it (no reset there)
            reading.close()  # (a Ctrl-C as an inner block's __exit__ began left it holding while the traceback lived)
            entering.close()
            if token is not None:
                with contextlib.suppress(ValueError):  # (a token of another context)
                    DISABLED.reset(token)

    # ------------------------------------------------------------------ forward
    @holding
    def _calling(self, adapter_names: Sequence[str] | None, expand: int = 1) -> Iterator[None]:
        """Run a call: publish its routing to the layers (through the gate, which torch.compile
        guards on), then hold the lock shared and check the routed names under it. ``expand``: ``generate``'s
        rows per input (beams, returned sequences): each name is repeated so, and the names as given stay the
        routing's ``input_names`` (an encoder-decoder's encoder runs on the inputs, its decoder on the rows)."""
        names = inputs = None
        if adapter_names is not None:
            listed = isinstance(adapter_names, Sequence) and not isinstance(adapter_names, str)
            if not listed or not all(isinstance(n, str) for n in adapter_names):  # (a list in it: unhashable)
                raise ConfigError("adapter_names must be a list with one adapter name (a string) per batch row")
            names = tuple(n for n in adapter_names for _ in range(expand))
            inputs = tuple(adapter_names) if expand > 1 else None
        call = routing(None, in_disable_block(self._gate), names, inputs)
        if (names is not None or call.disabled) and torch.is_grad_enabled() and self._checkpointing():
            raise AdapterStateError(
                "adapter_names or a disable_adapter() block in a training call with gradient checkpointing: the "
                "layers are recomputed in backward with the active adapters, so the gradients would be wrong; "
                "turn gradient checkpointing off (gradient_checkpointing_disable()), or use set_adapter()"
            )
        entering, reading = self._gate.enter(call), self._lock.read()
        try:
            with entering, reading:
                unknown = sorted({n for n in names or () if n != BASE_ROW and n not in self.peft_config}, key=str)
                if unknown:
                    raise AdapterStateError(
                        f"adapter_names: unknown adapter(s) {unknown}; loaded: {sorted(self.peft_config)}"
                    )
                yield from armed(self._gate.routing)  # (in this frame: no context manager's exit to interrupt)
        except BaseException:  # (a Ctrl-C as an inner block's __exit__ began left it holding while the traceback lived)
            reading.close()
            entering.close()
            raise

    def _forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if torch.compiler.is_exporting():  # (torch.export refuses the call's frame that torch.compile runs eagerly)
            return self._exported(args, kwargs, adapter_names)
        return self._eager_forward(*args, adapter_names=adapter_names, **kwargs)

    def _exported(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None) -> Any:
        """The call ``torch.export`` traces: the wrapped model with the active adapters (or none in a
        ``disable_adapter()`` block, whose routing the layers read), captured as they are now.

        Raises:
            AdapterStateError: ``adapter_names`` (a mixed batch's routing is per call: no exported graph holds it).
        """
        if adapter_names is not None:
            raise AdapterStateError(
                "torch.export of a LoRDBAModel captures its active adapters: export without adapter_names "
                "(set_adapter() the adapter to export)"
            )
        return self.base_model(*args, **kwargs)

    @torch.compiler.disable(recursive=False)
    def _eager_forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        # Under torch.compile this frame runs eagerly (the call's routing, the lock); the wrapped
        # model's forward below is compiled, and its layers read the routing from the gate, which
        # dynamo guards on: each routing / enable state gets its own graph, never a stale one.
        with self._calling(adapter_names):
            return self.base_model(*args, **kwargs)

    def forward(self, *args: Any, labels: Any = None, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward (an instance's has its exact signature). The class's names ``labels``: the HF
        Trainer takes its label names from it (``find_labels``); without them, evaluation computed no ``eval_loss``."""
        kwargs.update({} if labels is None else {"labels": labels})
        return self._forward(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model, optionally with one adapter per batch row (each name repeated
        for the row's beams or returned sequences, per the call's generation config: keyword or positional)."""
        expand = 1
        if adapter_names is not None:
            given = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)  # (inputs, config, ...)
            gen = given or getattr(self.base_model, "generation_config", None)
            beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1) or 1)
            returns = kwargs.get("num_return_sequences", getattr(gen, "num_return_sequences", 1) or 1)
            expand = beams if beams > 1 else returns
        with torch.no_grad(), self._calling(adapter_names, expand):  # generate's own no_grad, before the call is armed
            return self.base_model.generate(*args, **kwargs)


def get_lordba_model(
    model: nn.Module, config: LoRDBAConfig, adapter_name: str = "default", *, low_cpu_mem_usage: bool = False
) -> LoRDBAModel:
    """Inject a new LoRDBA adapter into ``model`` (frozen) and return the wrapper, like PEFT's ``get_peft_model``.

    Raises:
        ConfigError: ``config`` is not a :class:`~lordba.config.LoRDBAConfig`; ``low_cpu_mem_usage=True`` (PEFT's
            empty adapter on ``meta``, filled by a later load): lordba makes no empty adapters;
            :meth:`LoRDBAModel.from_pretrained` / ``load_adapter`` build a saved adapter from its file's tensors
            without initialising it first.
    """
    _refuse_empty_adapters("get_lordba_model", low_cpu_mem_usage)
    if not isinstance(config, LoRDBAConfig):  # (None made a wrapper without adapter: training updated nothing)
        raise ConfigError(f"get_lordba_model: config must be a LoRDBAConfig, got {type(config).__name__}")
    return LoRDBAModel(model, config, adapter_name)


def _refuse_empty_adapters(call: str, low_cpu_mem_usage: bool) -> None:
    """Raise :class:`ConfigError` for PEFT's ``low_cpu_mem_usage=True`` of a new adapter (made empty, on ``meta``)."""
    if low_cpu_mem_usage:
        raise ConfigError(
            f"{call}(low_cpu_mem_usage=True): lordba makes no empty (meta) adapters to fill later; to load a saved "
            "adapter without initialising one first, use LoRDBAModel.from_pretrained(model, adapter_dir) or "
            "load_adapter(), which build it from the file's tensors"
        )


class LoRDBAModelForQuestionAnswering(LoRDBAModel):
    """The :class:`LoRDBAModel` of a question-answering model (a class named ``...QuestionAnswering``; PEFT's
    ``PeftModelForQuestionAnswering``): its class's forward names ``start_positions`` and ``end_positions``, the
    labels the HF Trainer looks for in a class so named (``find_labels``). Without them it found none, and
    evaluation computed no ``eval_loss``."""

    def forward(self, *args: Any, start_positions: Any = None, end_positions: Any = None, **kwargs: Any) -> Any:
        """The wrapped model's forward, as :meth:`LoRDBAModel.forward`."""
        given = {"start_positions": start_positions, "end_positions": end_positions}
        return super().forward(*args, **kwargs, **{k: v for k, v in given.items() if v is not None})
