"""What both forms of an adapter share (:mod:`lordba.nn.adapter`): dims, ``scaling`` and codec,
dense views, the stored-tensor contract, and the inference caches each adapter owns.

The caches (signs packed from latents, decoded scales, the ``dense`` kernel mode's folded factors,
the kernel dispatch limit) are plain attributes of the module, not part of its ``state_dict``, and
are rebuilt when the tensors they were made from change (version counter and storage).
"""

from __future__ import annotations

import torch
from torch import nn

from lordba import kernels
from lordba.core.autograd import fold_factors, sign_branch
from lordba.core.packing import unpack_signs
from lordba.core.scales import ScaleCodec
from lordba.errors import AdapterStateError, ShapeMismatchError
from lordba.format.header import stored_shapes

SCALES = ("scale_in", "scale_mid", "scale_out")


def stamp(*tensors: torch.Tensor) -> tuple:
    """What identifies the contents of ``tensors`` for a cache key: version counter and storage."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


class _Caches:
    """An adapter's inference caches; each entry is rebuilt when the key it was made for changes."""

    __slots__ = ("entries", "limits")

    def __init__(self) -> None:
        self.entries: dict[str, tuple[object, object]] = {}
        self.limits: dict[tuple, int] = {}  # kernel dispatch limit per (kernel mode, dtype)

    def lookup(self, name: str, key: object) -> object | None:
        """The entry ``name`` if it was made for ``key``, else None (the hot path: no closure)."""
        found = self.entries.get(name)
        return found[1] if found is not None and found[0] == key else None

    def store(self, name: str, key: object, value: object) -> object:
        """Keep ``value`` as entry ``name``, made for ``key``; returns it."""
        self.entries[name] = (key, value)
        return value

    def get(self, name: str, key: object, build) -> object:  # noqa: ANN001
        """The entry ``name`` for ``key``, built (without gradient) and kept when missing or stale."""
        found = self.lookup(name, key)
        if found is None:
            with torch.no_grad():
                found = self.store(name, key, build())
        return found

    def clear(self) -> None:
        self.entries.clear()
        self.limits.clear()


class AdapterBase(nn.Module):
    """What both forms share: dims, ``scaling``, the codec, dense views and the inference path."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, codec: ScaleCodec) -> None:
        super().__init__()
        if r < 1 or in_features < 1 or out_features < 1:
            raise ShapeMismatchError(f"invalid adapter shape in={in_features} out={out_features} r={r}")
        self.in_features, self.out_features, self.r = int(in_features), int(out_features), int(r)
        self.scaling = float(scaling)
        self.codec = codec
        self._caches = _Caches()

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

    def _inference(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The branch through :mod:`lordba.kernels` (no gradient to the adapter or ``x``)."""
        if torch.compiler.is_compiling():  # caches do not trace (version counters): plain tensors
            return kernels.packed_branch(x, *self._traced_tensors(), self.scaling, base)
        mode = kernels.get_mode()
        if mode == "dense":
            return kernels.dense_branch(x, *self._folded(x.dtype), base)
        limit = None  # the CPU kernels' dispatch limit, kept per (mode, dtype); other paths need none
        if x.is_cpu and mode in ("auto", "sign", "unpack"):
            limits = self._caches.limits  # this runs once per layer and token: no closure, no string key
            limit = limits.get((mode, x.dtype))
            if limit is None:
                dims = self.in_features, self.out_features, self.r
                limit = limits[(mode, x.dtype)] = kernels.dispatch_limit(*dims, x.dtype, mode)
        return kernels.packed_branch(x, *self._kernel_tensors(), self.scaling, base, limit)

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

        return self._caches.get("dense", key, build)

    def cache_nbytes(self) -> dict[str, int]:
        """Bytes held by this adapter's caches beyond its own parameters and buffers (views of those
        count nothing): ``{"scales", "signs", "dense", "total"}``."""
        own = {t.untyped_storage().data_ptr() for t in (*self.parameters(), *self.buffers())}
        sizes = {"scales": 0, "signs": 0, "dense": 0}
        for name, (_, value) in self._caches.entries.items():
            if name in sizes:
                sizes[name] = sum(
                    t.numel() * t.element_size() for t in value if t.untyped_storage().data_ptr() not in own
                )
        sizes["total"] = sum(sizes.values())
        return sizes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Refuse scale tensors of another form than held: into an inference adapter any other dtype
        (float32 would be cast into int8 codes), into float parameters int8 codes (read as values they
        would be 127× too large)."""
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
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
