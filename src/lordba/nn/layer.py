"""The LoRDBA layer: a frozen base linear layer plus named double-binary adapters (SPEC §1).

:class:`DoubleBinaryAdapter` is one adapter on one layer. Its signs are held in one of two forms:

* **latent** (training): float factors ``latent_A`` (r×in) and ``latent_B`` (out×r) whose signs
  are used through a straight-through estimator;
* **packed** (inference): uint8 buffers ``sign_A``/``sign_B`` with 1 bit per sign (SPEC §6 order).

Its scales ``scale_in`` (b), ``scale_mid`` (m), ``scale_out`` (a) are float parameters, always
passed through the adapter's scale codec (:mod:`lordba.core.scales`) so that what runs is what is stored.
A packed adapter that will not train can be made **compact** (what loading a file for inference
does): its scales are then buffers holding the stored tensors themselves (int8 codes in the int8
format), so in memory it takes what its file takes; the CPU kernels read them as they are.

:class:`LoRDBALinear` wraps the base layer, holds several named adapters, and adds the branches of
the active ones (stacked adapters add up), or routes each row of a mixed batch to its own adapter.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lordba import kernels
from lordba.core.autograd import branch
from lordba.core.packing import pack_signs, packed_size, unpack_signs
from lordba.core.scales import ScaleCodec
from lordba.core.ste import STE, hard_sign
from lordba.errors import AdapterStateError, ShapeMismatchError
from lordba.quant import BaseBackend, resolve_backend

_SCALES = ("scale_in", "scale_mid", "scale_out")
BASE_ROW = "__base__"  # an ``adapter_names`` entry that routes a row to the base model alone
_LATENT_STD = 0.01


@dataclass(frozen=True)
class Routing:
    """Per-call adapter selection, set by :class:`~lordba.nn.model.LoRDBAModel` for one forward.

    ``active`` overrides the layers' active adapters, ``disabled`` turns every branch off, and
    ``adapter_names`` (one entry per batch row) routes rows to adapters.
    """

    active: tuple[str, ...] | None = None
    disabled: bool = False
    adapter_names: tuple[str, ...] | None = None


ROUTING: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("lordba_routing", default=None)


class DoubleBinaryAdapter(nn.Module):
    """One double-binary adapter of rank ``r`` on an ``in_features → out_features`` layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        codec: ScaleCodec,
        ste: STE,
        init: str = "cold",
        latent_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        packed: bool = False,
    ) -> None:
        """A cold (or ``random``) adapter in latent form; with ``packed=True`` an all-(+1) packed
        adapter with ``a = 0`` meant to be filled by :meth:`load_stored` (draws no random numbers)."""
        super().__init__()
        if r < 1 or in_features < 1 or out_features < 1:
            raise ShapeMismatchError(f"invalid adapter shape in={in_features} out={out_features} r={r}")
        self.in_features, self.out_features, self.r = int(in_features), int(out_features), int(r)
        self.scaling = float(scaling)
        self.codec = codec
        self.ste = ste
        f32 = {"dtype": torch.float32, "device": device}
        self.scale_in = nn.Parameter(torch.ones(in_features, **f32))
        self.scale_mid = nn.Parameter(torch.ones(r, **f32))
        self.scale_out = nn.Parameter(torch.zeros(out_features, **f32))
        self.latent_A: nn.Parameter | None = None
        self.latent_B: nn.Parameter | None = None
        if packed:
            u8 = {"dtype": torch.uint8, "device": device}
            self.register_buffer("sign_A", torch.full((packed_size(r * in_features),), 255, **u8))
            self.register_buffer("sign_B", torch.full((packed_size(out_features * r),), 255, **u8))
            _zero_padding(self.sign_A, r * in_features)
            _zero_padding(self.sign_B, out_features * r)
            return
        if init == "random":
            with torch.no_grad():
                self.scale_out.normal_(0.0, _LATENT_STD)
        lat = {"dtype": latent_dtype, "device": device}
        self.latent_A = nn.Parameter(torch.randn(r, in_features, **lat) * _LATENT_STD)
        self.latent_B = nn.Parameter(torch.randn(out_features, r, **lat) * _LATENT_STD)
        self.register_buffer("sign_A", None)
        self.register_buffer("sign_B", None)

    # ----------------------------------------------------------------------------- state
    @property
    def is_packed(self) -> bool:
        """True in the packed (inference) form, False in the latent (training) form."""
        return self.latent_A is None

    @property
    def is_compact(self) -> bool:
        """True when the scales are held as their stored tensors (frozen buffers), see :meth:`compact`."""
        return "scale_in" in self._buffers

    @torch.no_grad()
    def compact(self) -> None:
        """Packed → compact: hold the scales as the tensors a file stores (e.g. int8 codes) in
        frozen buffers instead of float32 parameters. Outputs are unchanged (the forward always
        ran on the decoded stored values); at r = 16 the adapter's memory falls by about half."""
        if self.is_compact:
            return
        if not self.is_packed:
            raise AdapterStateError("compact() needs the packed form: call pack() first")
        stored = self.codec.encode(self.scale_in, self.scale_mid, self.scale_out)
        kernels.cache.clear(self)  # its entries view the float32 parameters dropped here
        for name, value in zip(_SCALES, stored):
            delattr(self, name)
            self.register_buffer(name, value.contiguous())

    @torch.no_grad()
    def expand(self) -> None:
        """Compact → float32 scale parameters holding the decoded values (frozen; exact)."""
        if not self.is_compact:
            return
        decoded = self.codec.decode(self.scale_in, self.scale_mid, self.scale_out)
        kernels.cache.clear(self)
        for name, value in zip(_SCALES, decoded):
            delattr(self, name)
            setattr(self, name, nn.Parameter(value.contiguous(), requires_grad=False))

    @torch.no_grad()
    def silence(self) -> None:
        """Make the branch a no-op (``a = 0``), in the adapter's current scale format (what a
        hot-swap does to modules the new file leaves out)."""
        if not self.is_compact:
            self.scale_out.zero_()
            return
        ones = torch.ones(self.in_features + self.r, device=self.scale_in.device)
        zeros = torch.zeros(self.out_features, device=self.scale_in.device)
        stored = self.codec.encode(ones[: self.in_features], ones[self.in_features :], zeros)
        for name, value in zip(_SCALES, stored):
            self._hold_stored(name, value)

    def _hold_stored(self, name: str, value: torch.Tensor) -> None:
        """Write a stored scale tensor into a compact adapter's buffer, in place, or as a new buffer
        when its dtype differs (the scale format changed with a hot-swap)."""
        held = self._buffers[name]
        if held.dtype == value.dtype:
            held.copy_(value)
        else:
            self.register_buffer(name, value.to(held.device).clone(memory_format=torch.contiguous_format))

    def _apply(self, fn, recurse: bool = True) -> DoubleBinaryAdapter:  # noqa: ANN001
        """``.to()``, ``.half()``, …: a compact adapter's scales follow the device but keep their
        stored dtypes (they are the file's tensors; casting them would change what is saved)."""
        if not self.is_compact:
            return super()._apply(fn, recurse)
        held = {name: self._buffers[name] for name in _SCALES}
        result = super()._apply(fn, recurse)
        for name, tensor in held.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return result

    def signs(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The hard sign matrices ``(S_A, S_B)`` as ±1 tensors (no gradient)."""
        if self.is_packed:
            return (
                unpack_signs(self.sign_A, (self.r, self.in_features), dtype),
                unpack_signs(self.sign_B, (self.out_features, self.r), dtype),
            )
        return hard_sign(self.latent_A.detach()).to(dtype), hard_sign(self.latent_B.detach()).to(dtype)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The effective ``(b, m, a)`` in float32, as stored (differentiable w.r.t. the parameters)."""
        if self.is_compact:
            return self.codec.decode(self.scale_in, self.scale_mid, self.scale_out)
        return self.codec.fake_quant(self.scale_in, self.scale_mid, self.scale_out)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``out × in`` update ``s · diag(a) S_B diag(m) S_A diag(b)`` in float32."""
        sign_A, sign_B = self.signs()
        b, m, a = (v.detach() for v in self.scales())
        return self.scaling * (a[:, None] * sign_B * m[None, :]) @ (sign_A * b[None, :])

    @torch.no_grad()
    def pack(self) -> None:
        """Latent → packed form: keep only the signs (1 bit each); the latents are dropped."""
        if self.is_packed:
            return
        self.sign_A = pack_signs(self.latent_A)
        self.sign_B = pack_signs(self.latent_B)
        self.latent_A = None
        self.latent_B = None

    @torch.no_grad()
    def unpack_to_latent(self, magnitude: float = _LATENT_STD, dtype: torch.dtype = torch.float32) -> None:
        """Packed → latent form, latents ``± magnitude`` with the current signs (to resume QAT)."""
        if not self.is_packed:
            return
        self.expand()
        sign_A, sign_B = self.signs(dtype)
        self.latent_A = nn.Parameter(sign_A * magnitude)
        self.latent_B = nn.Parameter(sign_B * magnitude)
        self.sign_A = None
        self.sign_B = None

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the tensors written to disk (SPEC §6 names without the module prefix); copies,
        so that a snapshot stays valid while the adapter is hot-swapped in place afterwards."""
        if self.is_packed:
            sign_A, sign_B = self.sign_A, self.sign_B
        else:
            sign_A, sign_B = pack_signs(self.latent_A), pack_signs(self.latent_B)
        if self.is_compact:
            b, m, a = self.scale_in, self.scale_mid, self.scale_out
        else:
            b, m, a = self.codec.encode(self.scale_in, self.scale_mid, self.scale_out)
        return {
            "sign_A": sign_A.detach().cpu().clone(memory_format=torch.contiguous_format),
            "sign_B": sign_B.detach().cpu().clone(memory_format=torch.contiguous_format),
            "scale_in": b.cpu().clone(memory_format=torch.contiguous_format),
            "scale_mid": m.cpu().clone(memory_format=torch.contiguous_format),
            "scale_out": a.cpu().clone(memory_format=torch.contiguous_format),
        }

    @torch.no_grad()
    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set this adapter from validated stored tensors, in place (packed form afterwards)."""
        expected = {"sign_A": packed_size(self.r * self.in_features), "sign_B": packed_size(self.out_features * self.r)}
        for name, size in expected.items():
            if tensors[name].numel() != size:
                raise ShapeMismatchError(f"{name}: {tensors[name].numel()} bytes, expected {size}")
        compact = self.is_compact
        values = [tensors[n] for n in _SCALES] if compact else self.codec.decode(*(tensors[n] for n in _SCALES))
        for name, value in zip(_SCALES, values):
            if getattr(self, name).shape != value.shape:
                raise ShapeMismatchError(
                    f"{name} of shape {tuple(value.shape)} for a tensor of {tuple(getattr(self, name).shape)}"
                )
        device = self.scale_in.device
        for name, value in zip(_SCALES, values):
            if compact:
                self._hold_stored(name, value)
            else:
                getattr(self, name).copy_(value)
        if self.is_packed:
            self.sign_A.copy_(tensors["sign_A"])
            self.sign_B.copy_(tensors["sign_B"])
        else:
            self.latent_A = None
            self.latent_B = None
            self.sign_A = tensors["sign_A"].to(device).clone()
            self.sign_B = tensors["sign_B"].to(device).clone()

    def set_trainable(self, signs: bool, scales: bool) -> None:
        """Choose what trains: the latent signs (latent form only) and/or the scales (a compact
        adapter gets float32 scale parameters back for that)."""
        if scales:
            self.expand()
        if not self.is_compact:  # compact scales are buffers: frozen already
            for p in (self.scale_in, self.scale_mid, self.scale_out):
                p.requires_grad_(scales)
        if not self.is_packed:
            self.latent_A.requires_grad_(signs)
            self.latent_B.requires_grad_(signs)
        elif signs:
            raise AdapterStateError("packed signs cannot train: call unpack_to_latent() first")

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The branch output for ``x`` of shape ``[..., in]``, in ``x``'s dtype; given ``base`` (the base
        layer's output for ``x``), ``base + branch`` in ``base``'s dtype (the add is fused at inference).

        Without gradient both forms run :func:`lordba.kernels.packed_branch` (a latent adapter on its
        signs packed on the fly), so packed and latent forms give bit-identical outputs."""
        if not torch.is_grad_enabled():
            return kernels.packed_branch(x, self, base=base)
        latent_A = self.latent_A
        if (
            x.requires_grad
            or self.scale_in.requires_grad
            or self.scale_mid.requires_grad
            or self.scale_out.requires_grad
            or (latent_A is not None and (latent_A.requires_grad or self.latent_B.requires_grad))
        ):
            b, m, a = self.scales()
            if latent_A is None:
                sign_A, sign_B = self.signs(x.dtype)
                out = branch(x, sign_A, sign_B, b, m, a, self.scaling)
            else:
                out = branch(x, latent_A, self.latent_B, b, m, a, self.scaling, self.ste)
            return out if base is None else base + out.to(base.dtype)
        return kernels.packed_branch(x, self, base=base)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Refuse scale tensors of another form than this adapter's: into a compact adapter any
        other dtype (float32 would be cast into int8 codes), into float parameters int8 codes
        (read as values they would be 127× too large)."""
        compact = self.is_compact
        for name in _SCALES:
            given, held = state_dict.get(prefix + name), getattr(self, name)
            if given is None or given.dtype == held.dtype:
                continue
            if compact or not given.is_floating_point():
                form = "compact adapter" if compact else "adapter with float scale parameters"
                raise AdapterStateError(
                    f"{prefix}{name}: {given.dtype} for a {form} holding {held.dtype} (load a state dict "
                    "into the form it was saved from: compact() / expand())"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        form = "compact" if self.is_compact else "packed" if self.is_packed else "latent"
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
            f"scale_dtype={self.codec.name}, form={form}"
        )


def _zero_padding(packed: torch.Tensor, numel: int) -> None:
    pad = (-numel) % 8
    if pad:
        packed[-1] = int(packed[-1]) & ~((1 << pad) - 1) & 0xFF


class LoRDBALinear(nn.Module):
    """A frozen base linear layer with LoRDBA adapters; a drop-in replacement of the base."""

    def __init__(self, base_layer: nn.Module, backend: BaseBackend | None = None) -> None:
        super().__init__()
        backend = backend or resolve_backend(base_layer)
        if backend is None:
            raise ShapeMismatchError(f"{type(base_layer).__name__} is not a supported linear layer")
        self.base_layer = base_layer
        self.backend = backend
        self.in_features, self.out_features = backend.features(base_layer)
        self.lordba_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._premerge_base: list[nn.Module] = []
        self.disable_adapters = False

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight if hasattr(self.base_layer, "weight") else self.base_layer.W_q

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, adapter: DoubleBinaryAdapter) -> None:
        if (adapter.in_features, adapter.out_features) != (self.in_features, self.out_features):
            raise ShapeMismatchError(
                f"adapter {name!r} is {adapter.in_features}→{adapter.out_features}, "
                f"the layer is {self.in_features}→{self.out_features}"
            )
        self.lordba_adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged: unmerge it before deleting it")
        if name in self.lordba_adapters:
            del self.lordba_adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def set_adapter(self, names: str | Sequence[str]) -> None:
        self.active_adapters = [names] if isinstance(names, str) else list(names)

    # ----------------------------------------------------------------------------- merge
    def get_delta_weight(self, name: str) -> torch.Tensor:
        return self.lordba_adapters[name].delta_weight()

    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Add the named (default: active) adapters' updates into the base weight.

        A quantized base is requantized (lossy); its original module is kept, and :meth:`unmerge`
        restores it exactly.
        """
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lordba_adapters:
                continue
            if not self.merged_adapters and not self.backend.in_place_merge:
                self._premerge_base = [self.base_layer]  # a list: not registered as a submodule
            self.base_layer = self.backend.merge(self.base_layer, self.get_delta_weight(name))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again (last merged first)."""
        if not self.merged_adapters:
            return
        if not self.backend.in_place_merge:
            self.base_layer = self._premerge_base.pop()
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_layer = self.backend.unmerge(self.base_layer, self.get_delta_weight(name))

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = None if torch.compiler.is_compiling() else ROUTING.get()
        if routing is None:
            disabled, names, active = self.disable_adapters, None, self.active_adapters
        else:
            disabled, names = routing.disabled, routing.adapter_names
            active = routing.active if routing.active is not None else self.active_adapters
        if disabled:
            if self.merged_adapters:
                raise AdapterStateError("adapters are merged into the base: unmerge before disabling them")
            return result
        if names is not None:
            return self._mixed_batch_forward(x, result, names)
        adapters, merged = self.lordba_adapters, self.merged_adapters
        for name in active:
            if name in merged or name not in adapters:
                continue  # merged into the base, or this layer is not targeted by that adapter
            result = adapters[name](x, result)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        if self.merged_adapters:
            raise AdapterStateError("mixed-batch routing needs unmerged adapters: call unmerge first")
        if len(names) != x.shape[0]:
            raise ShapeMismatchError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} rows")
        groups = kernels.route_index(names, x.device)
        adapters = self.lordba_adapters
        if len(groups) == 1:
            name = names[0]
            return adapters[name](x, result) if name != BASE_ROW and name in adapters else result
        result = result.clone()
        for name, index in groups.items():
            if name == BASE_ROW or name not in adapters:
                continue
            delta = adapters[name](x.index_select(0, index))
            result.index_add_(0, index, delta.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lordba_adapters)}"


def new_adapter(
    layer: LoRDBALinear,
    r: int,
    scaling: float,
    codec: ScaleCodec,
    ste: STE,
    init: str,
    latent_dtype: torch.dtype,
) -> DoubleBinaryAdapter:
    """A fresh adapter sized for ``layer``, on the device of its base weight."""
    device = layer.backend.weight_device(layer.base_layer)
    return DoubleBinaryAdapter(
        layer.in_features, layer.out_features, r, scaling, codec, ste, init, latent_dtype, device
    )
