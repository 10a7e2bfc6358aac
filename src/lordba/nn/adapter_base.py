"""What both forms of an adapter share (:mod:`lordba.nn.adapter`): dims, ``scaling`` and codec,
dense views, the stored-tensor contract, and the inference caches each adapter owns.

The caches (signs packed from latents, decoded scales, the ``dense`` kernel mode's folded factors,
the kernel dispatch limit) are plain attributes of the module, not part of its ``state_dict``, and
are rebuilt when the tensors they were made from change (version counter and storage).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules.module import (
    _global_buffer_registration_hooks,
)

from lordba import kernels
from lordba._util.arena import pinned_storages
from lordba._util.state import ordinary_tensors
from lordba.core.autograd import fold_factors, sign_branch
from lordba.core.packing import unpack_signs
from lordba.core.scales import ScaleCodec
from lordba.errors import AdapterStateError, ShapeMismatchError
from lordba.format.header import stored_shapes
from lordba.nn.epoch import TouchingDict, stamp, touch

SCALES = ("scale_in", "scale_mid", "scale_out")
_CACHE_KINDS = {"scales": "scales", "decoded": "scales", "signs": "signs", "dense": "dense"}  # cache_nbytes' keys


class _Caches:
    """An adapter's inference caches; each entry is rebuilt when the key it was made for changes. An entry
    keeps the storages of the tensors its key stamps (``pins``): a tensor replaced (``.data =``,
    ``load_state_dict(assign=True)``) and freed could otherwise give its address to the next one, with the
    same version counter, and the entry made for the first would be taken for the second."""

    __slots__ = ("entries", "limits")

    def __init__(self) -> None:
        self.entries: dict[str, tuple[object, object, tuple]] = {}  # name: (key, value, pinned storages)
        self.limits: dict[tuple, int] = {}  # kernel dispatch limit per (kernel mode, dtype)

    def lookup(self, name: str, key: object) -> object | None:
        """The entry ``name`` if it was made for ``key``, else None (the hot path: no closure)."""
        found = self.entries.get(name)
        return found[1] if found is not None and found[0] == key else None

    def store(self, name: str, key: object, value: object, pins: tuple[torch.Tensor, ...] = ()) -> object:
        """Keep ``value`` as entry ``name``, made for ``key`` (stamping ``pins``, whose storages it keeps
        alive: their addresses stay theirs); returns it."""
        self.entries[name] = (key, value, pinned_storages(pins))
        return value

    def get(self, name: str, key: object, build, pins: tuple[torch.Tensor, ...] = ()) -> object:  # noqa: ANN001
        """The entry ``name`` for ``key``, built (without gradient) and kept when missing or stale. Built as
        ordinary tensors even under ``torch.inference_mode``: a kept tensor is the key of other entries (the
        latents' packed signs key the ``dense`` mode's folded factors), and an inference tensor has no
        version counter to key by."""
        found = self.lookup(name, key)
        if found is None:
            with ordinary_tensors(), torch.no_grad():
                found = self.store(name, key, build(), pins)
        return found

    def clear(self) -> None:
        self.entries.clear()
        self.limits.clear()


_TEMPLATE: list[tuple[dict, tuple] | None] = []


def _module_template() -> tuple[dict, tuple] | None:
    """What ``nn.Module.__init__`` puts in an instance's ``__dict__`` (taken once from a real one):
    ``(flags, (name, container type) pairs)``, or ``None`` if it holds anything but flags and empty
    containers (then adapters are built the regular way)."""
    if not _TEMPLATE:
        state = dict(nn.Module().__dict__)
        flags = {k: v for k, v in state.items() if v is None or isinstance(v, bool)}
        fresh = tuple((k, type(v)) for k, v in state.items() if type(v) in (dict, set, OrderedDict) and not v)
        _TEMPLATE.append((flags, fresh) if len(flags) + len(fresh) == len(state) else None)
    return _TEMPLATE[0]


class AdapterBase(nn.Module):
    """What both forms share: dims, ``scaling``, the codec, dense views and the inference path."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, codec: ScaleCodec) -> None:
        super().__init__()
        if r < 1 or in_features < 1 or out_features < 1:
            raise ShapeMismatchError(f"invalid adapter shape in={in_features} out={out_features} r={r}")
        self.in_features, self.out_features, self.r = int(in_features), int(out_features), int(r)
        self.scaling = float(scaling)
        self.codec = codec
        object.__setattr__(self, "_buffers", TouchingDict(self._buffers))  # (writes to it touch())
        self._caches = _Caches()
        self.dropout = 0.0  # PEFT's lora_dropout: on the branch input, in training mode
        self.bias_delta: torch.Tensor | None = None  # a trained bias minus the base's (bias="lora_only"/"all")

    @classmethod
    def _assemble(
        cls,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        codec: ScaleCodec,
        buffers: dict[str, torch.Tensor],
        training: bool = True,
    ) -> AdapterBase | None:
        """An instance holding ``buffers`` (no parameters), in mode ``training``, built without
        running ``__init__``: the state ``nn.Module.__init__`` gives every module (fresh containers
        copied from a template) plus this class's attributes. What :meth:`__init__` +
        ``register_buffer`` give, at a tenth of the cost (loading a file builds hundreds of adapters).
        Returns ``None`` where that is not safe (PyTorch has global buffer-registration hooks, which
        it would not call; an unknown module state): the caller then constructs the regular way.
        Raises :class:`ShapeMismatchError` for non-positive dims."""
        if r < 1 or in_features < 1 or out_features < 1:
            raise ShapeMismatchError(f"invalid adapter shape in={in_features} out={out_features} r={r}")
        template = _module_template()
        if template is None or _global_buffer_registration_hooks:
            return None
        flags, fresh = template
        state = flags.copy()
        for key, kind in fresh:
            state[key] = kind()
        state["_buffers"] = TouchingDict(buffers)
        state["training"] = bool(training)
        state.update(
            in_features=int(in_features),
            out_features=int(out_features),
            r=int(r),
            scaling=float(scaling),
            codec=codec,
            _caches=_Caches(),
            dropout=0.0,
            bias_delta=None,
        )
        adapter = object.__new__(cls)
        adapter.__dict__.update(state)
        return adapter

    def __setattr__(self, name: str, value: object) -> None:
        touch()  # ``scaling``, ``training``, ``bias_delta``, a tensor replaced: prepared calls are rebuilt
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True) -> AdapterBase:  # noqa: ANN001
        touch()  # ``.to()``, ``.half()``: new tensors
        result = super()._apply(fn, recurse)
        self._caches.clear()  # (their entries would keep the previous tensors' storages until the next call)
        return result

    def __getstate__(self) -> dict:
        """The module's state (``torch.save``, pickling, ``copy.deepcopy``) without its caches: their entries pin
        the untyped storages of its tensors, which ``torch.save`` refuses beside the tensors themselves, and were
        keyed by the original's addresses. A copy builds its own."""
        state = super().__getstate__()
        state["_caches"] = _Caches()
        return state

    def __setstate__(self, state: dict) -> None:
        """The module's state, its ``_buffers`` a :class:`~lordba.nn.epoch.TouchingDict` again (a pickled state
        may hold a plain dict)."""
        super().__setstate__(state)
        object.__setattr__(self, "_buffers", TouchingDict(self._buffers))

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        """:meth:`nn.Module.register_buffer`, dropping prepared calls that held the previous tensor."""
        touch()
        super().register_buffer(name, tensor, persistent)

    # -- what each form provides
    def packed_signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed ``(sign_A, sign_B)`` bytes (no gradient)."""
        raise NotImplementedError

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The effective ``(b, m, a)`` in float32, as stored."""
        raise NotImplementedError

    def _kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        """``(sign_A, sign_B, b, m, a)`` as the kernels take them (packed signs; float or stored scales)."""
        raise NotImplementedError

    # -- shared
    def signs(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The hard sign matrices ``(S_A, S_B)`` as ±1 tensors (no gradient)."""
        sign_A, sign_B = self.packed_signs()
        return (
            unpack_signs(sign_A, (self.r, self.in_features), dtype),
            unpack_signs(sign_B, (self.out_features, self.r), dtype),
        )

    def delta_weight(self) -> torch.Tensor:
        """The dense ``out × in`` update ``s · diag(a) S_B diag(m) S_A diag(b)`` in float32."""
        sign_A, sign_B = self.signs()
        b, m, a = (v.detach() for v in self.scales())
        return self.scaling * (a[:, None] * sign_B * m[None, :]) @ (sign_A * b[None, :])

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the five tensors written to disk (SPEC §6 names without the module prefix);
        copies, so that a snapshot stays valid while the adapter is hot-swapped in place afterwards."""
        sign_A, sign_B = self.packed_signs()
        stored = dict(zip(SCALES, self._stored_scales()))
        tensors = {"sign_A": sign_A, "sign_B": sign_B, **stored}
        return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}

    def _stored_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- PEFT's extras: dropout on the branch input, a trained bias
    def attach_bias(self, delta: torch.Tensor | None) -> None:
        """Hold ``delta`` (``[out]``: trained bias minus the base layer's) as ``bias_delta``, a float32
        parameter in the training form, a buffer in the inference form, on the adapter's device (a file's
        bias is read on the CPU); ``None`` drops it. Raises :class:`ShapeMismatchError` for another shape."""
        if delta is not None and tuple(delta.shape) != (self.out_features,):
            raise ShapeMismatchError(
                f"bias_delta of shape {tuple(delta.shape)} for an adapter with {self.out_features} outputs"
            )
        for table in (self._parameters, self._buffers):
            table.pop("bias_delta", None)
        self.__dict__.pop("bias_delta", None)
        device = self.scale_out.device
        value = None if delta is None else delta.detach().to(device=device, dtype=torch.float32, copy=True)
        if value is not None and any(True for _ in self.parameters(recurse=False)):
            self.bias_delta = nn.Parameter(value, requires_grad=self.scale_out.requires_grad)
        else:
            self.register_buffer("bias_delta", value)

    def copy_extras(self, other: AdapterBase) -> AdapterBase:
        """Give ``other`` (another form of this adapter) this adapter's dropout and bias; returns ``other``."""
        other.dropout = self.dropout
        if self.bias_delta is not None:
            other.attach_bias(self.bias_delta)
        return other

    def _branch_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with dropout applied in training mode (PEFT's ``lora_dropout``)."""
        if self.dropout > 0.0 and self.training:
            return nn.functional.dropout(x, self.dropout, training=True)
        return x

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the trained bias delta, if any."""
        delta = self.bias_delta
        return out if delta is None else out + delta.to(out.dtype)

    def _inference(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The branch through :mod:`lordba.kernels` (no gradient to the adapter or ``x``)."""
        if torch.compiler.is_compiling():  # caches do not trace (version counters): plain tensors
            return kernels.packed_branch(x, *self._traced_tensors(), self.scaling, base)
        mode = kernels.get_mode()
        if mode == "dense":
            return kernels.dense_branch(x, *self._folded(x.dtype), base)
        limit = None  # the CPU kernels' dispatch limit, kept per (mode, dtype); other paths need none
        if x.is_cpu and mode in kernels.CPU_MODES:
            limit = self._limit(mode, x.dtype)
        tensors = self._kernel_tensors()
        if not x.is_cpu and tensors[2].dtype == torch.int8:
            tensors = self._decoded(tensors)
        return kernels.packed_branch(x, *tensors, self.scaling, base, limit)

    def _decoded(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``tensors`` with int8 scale codes decoded to float32, kept until they change: the GPU
        kernels read float32 scales, and decoding on every call would launch several small kernels
        per layer and token (the CPU kernels read the codes as they are)."""
        key = stamp(*tensors)
        return self._caches.get("decoded", key, lambda: (*tensors[:2], *kernels.float_scales(*tensors[2:])), tensors)

    def _limit(self, mode: str, dtype: torch.dtype) -> int:
        """The CPU kernels' dispatch limit for ``mode`` and ``dtype``, kept (this runs once per layer
        and token: no closure, no string key)."""
        limits = self._caches.limits
        limit = limits.get((mode, dtype))
        if limit is None:
            dims = self.in_features, self.out_features, self.r
            limit = limits[(mode, dtype)] = kernels.dispatch_limit(*dims, dtype, mode)
        return limit

    def _kernel_only(self) -> bool:
        """Whether this adapter's inference call is the kernel alone (no dropout in training, no trained
        bias to add)."""
        return self.bias_delta is None and not (self.training and self.dropout > 0.0)

    _routed_as_stored = False  # whether :meth:`_routed` gives the held tensors themselves (cacheable)

    def _routed(self, grad: bool, key: tuple[str, torch.dtype]) -> tuple | None:
        """``(kernel tensors, scaling, dispatch limit)`` for a many-adapter kernel call
        (:func:`routed_branches`; ``key``: kernel mode and dtype), or ``None`` if this adapter's own
        call would do more than run the inference kernel on its rows as they are (a gradient to
        compute, dropout in training, a trained bias to add). Runs once per adapter, layer and step."""
        if not self._kernel_only():
            return None
        params = self._parameters
        if grad and params and any(p is not None and p.requires_grad for p in params.values()):
            return None
        limit = self._caches.limits.get(key)
        return self._kernel_tensors(), self.scaling, limit if limit is not None else self._limit(*key)

    def _traced_call(self, dtype: torch.dtype) -> tuple | None:
        """:meth:`_routed`'s ``(tensors, scaling, limit)`` under ``torch.compile`` with gradients off (no
        caches: version counters do not trace), or ``None`` where this adapter's own call does more than
        the inference kernel (dropout, a trained bias, latent signs)."""
        if not self._kernel_only() or self._parameters.get("latent_A") is not None:
            return None
        limit = kernels.dispatch_limit(self.in_features, self.out_features, self.r, dtype, kernels.get_mode())
        return self._traced_tensors(), self.scaling, limit

    def _autograd(self, x: torch.Tensor, base: torch.Tensor | None, signs: tuple) -> torch.Tensor:
        """The branch through the fused autograd function (a gradient to compute), signs given as
        latents (straight-through) or ±1 tensors; ``base + branch`` given ``base``."""
        b, m, a = self.scales()
        out = sign_branch(x, *signs, b, m, a, self.scaling, getattr(self, "ste", None))
        return out if base is None else base + out.to(base.dtype)

    def _traced_tensors(self) -> tuple[torch.Tensor, ...]:
        """:meth:`_kernel_tensors` without caches (under ``torch.compile``)."""
        return self._kernel_tensors()

    def _folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``dense`` mode's folded factors in ``dtype``, kept until the signs or scales change."""
        held = (*self.packed_signs(), *(getattr(self, n) for n in SCALES))
        key = (stamp(*held), self.codec.name, self.scaling, dtype)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            sign_A, sign_B = self.signs()
            return fold_factors(sign_A, sign_B, *self.scales(), self.scaling, dtype)

        return self._caches.get("dense", key, build, held)

    def held_nbytes(self) -> int:
        """Bytes this adapter holds: its own parameters and buffers plus :meth:`cache_nbytes`'s
        total (read directly: a server sizes every load by it)."""
        own = sum(t.nbytes for t in (*self._parameters.values(), *self._buffers.values()) if t is not None)
        return own + (self.cache_nbytes()["total"] if self._caches.entries else 0)

    def cache_nbytes(self) -> dict[str, int]:
        """Bytes held by this adapter's caches beyond its own parameters and buffers (views of those
        count nothing): ``{"scales", "signs", "dense", "total"}``; ``scales`` counts the decoded scales of
        both caches that hold them (the training form's, and the float32 scales an int8-code adapter keeps
        for the GPU kernels)."""
        own = {t.untyped_storage().data_ptr() for t in (*self.parameters(), *self.buffers())}
        sizes = {"scales": 0, "signs": 0, "dense": 0}
        for name, (_, value, _) in list(self._caches.entries.items()):  # (a forward may add one meanwhile)
            kind = _CACHE_KINDS.get(name)
            if kind is not None:
                sizes[kind] += sum(
                    t.numel() * t.element_size() for t in value if t.untyped_storage().data_ptr() not in own
                )
        sizes["total"] = sum(sizes.values())
        return sizes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        self.check_loadable(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_loadable(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Refuse (:class:`AdapterStateError`) tensors of ``state_dict`` under ``prefix`` that this adapter cannot
        load: another shape than held, or scales of another form: into an inference adapter any other dtype
        (float32 would be cast into int8 codes), into float parameters int8 codes (read as values they would be
        127× too large)."""
        for name, held in (*self._parameters.items(), *self._buffers.items()):
            given = state_dict.get(prefix + name)
            if held is not None and isinstance(given, torch.Tensor) and given.shape != held.shape:
                raise AdapterStateError(
                    f"{prefix}{name}: shape {tuple(given.shape)} for an adapter holding {tuple(held.shape)}"
                )
        packed = not any(True for _ in self.parameters(recurse=False))
        for name in SCALES:
            given, held = state_dict.get(prefix + name), getattr(self, name)
            if given is None or given.dtype == held.dtype or (not packed and given.is_floating_point()):
                continue
            form = "packed adapter" if packed else "training adapter with float scale parameters"
            raise AdapterStateError(
                f"{prefix}{name}: {given.dtype} for a {form} holding {held.dtype} (load a state dict into "
                "the form it was saved from)"
            )

    def clear_cache(self) -> None:
        """Drop the inference caches (they rebuild on the next call)."""
        self._caches.clear()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
            f"scale_dtype={self.codec.name}"
        )


def check_sizes(adapter: AdapterBase, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ShapeMismatchError` unless the stored ``tensors`` have the sizes ``adapter`` needs
    (their dtypes follow the file's scale format, checked by the loader)."""
    dims = adapter.in_features, adapter.out_features, adapter.r
    for name, (_, shape) in stored_shapes(*dims, adapter.codec.name).items():
        if tuple(tensors[name].shape) != shape:
            raise ShapeMismatchError(f"{name} of shape {tuple(tensors[name].shape)} for an adapter needing {shape}")
