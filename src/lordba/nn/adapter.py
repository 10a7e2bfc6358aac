"""One double-binary adapter on one layer, in its two forms (SPEC §1), joined by one conversion.

* :class:`TrainableAdapter` (training form): float32 scale *parameters* ``scale_in`` (b),
  ``scale_mid`` (m), ``scale_out`` (a), always used through the adapter's scale codec
  (:mod:`lordba.core.scales`) so that what trains is what is stored; signs either as latent float
  parameters ``latent_A`` (r×in) / ``latent_B`` (out×r) trained through a straight-through
  estimator (QAT), or as frozen packed buffers ``sign_A`` / ``sign_B`` (scales-only training).
* :class:`PackedAdapter` (inference form): *buffers* only, exactly the tensors a file stores:
  packed signs (1 bit each, SPEC §6 order) and the scales in their stored dtypes (int8 codes in
  the int8 format), which the CPU kernels read as they are. In memory it takes what its file takes.

:meth:`TrainableAdapter.pack` gives the inference form; :meth:`PackedAdapter.trainable` the
training form back. Loading a file for inference builds a :class:`PackedAdapter` straight from the
stored tensors (:meth:`PackedAdapter.from_stored`): no decode / re-encode round trip. Each form
owns its inference caches (signs packed from the latents, decoded scales, the folded factors of the
``dense`` kernel mode, the kernel dispatch limit), invalidated by the tensors' version counters; the
kernels (:mod:`lordba.kernels`) take tensors only. Both forms give bit-identical outputs without
gradient (the same kernel on the same signs and decoded scales).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lordba.core.autograd import sign_branch
from lordba.core.packing import pack_signs
from lordba.core.scales import ScaleCodec
from lordba.core.ste import STE
from lordba.errors import AdapterStateError, ShapeMismatchError
from lordba.format.header import stored_specs
from lordba.nn.adapter_base import SCALES, AdapterBase, check_sizes
from lordba.nn.adapter_stored import StoredBuffers
from lordba.nn.epoch import stamp

LATENT_STD = 0.01


class TrainableAdapter(AdapterBase):
    """The training form: float32 scale parameters, and latent signs (``train_signs``) or frozen packed ones."""

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
        latent_signs: bool = True,
    ) -> None:
        """A cold adapter (``b = m = 1``, ``a = 0``: a no-op; ``init="random"``: ``a ~ N(0, 0.01²)``).
        With ``latent_signs`` the latents are drawn ~ N(0, 0.01²); else the packed signs are all +1
        (meant to be set by :meth:`load_stored`; no random numbers are drawn)."""
        super().__init__(in_features, out_features, r, scaling, codec)
        self.ste = ste
        f32 = {"dtype": torch.float32, "device": device}
        self.scale_in = nn.Parameter(torch.ones(in_features, **f32))
        self.scale_mid = nn.Parameter(torch.ones(r, **f32))
        self.scale_out = nn.Parameter(torch.zeros(out_features, **f32))
        if not latent_signs:
            self.latent_A = self.latent_B = None
            ones = torch.ones((r, in_features), device=device), torch.ones((out_features, r), device=device)
            self.register_buffer("sign_A", pack_signs(ones[0]))
            self.register_buffer("sign_B", pack_signs(ones[1]))
            return
        if init == "random":
            with torch.no_grad():
                self.scale_out.normal_(0.0, LATENT_STD)
        lat = {"dtype": latent_dtype, "device": device}
        self.latent_A = nn.Parameter(torch.randn(r, in_features, **lat) * LATENT_STD)
        self.latent_B = nn.Parameter(torch.randn(out_features, r, **lat) * LATENT_STD)
        self.sign_A = self.sign_B = None

    @property
    def has_latent_signs(self) -> bool:
        """True when the signs are latent parameters (QAT), False when they are frozen packed buffers."""
        return self.latent_A is not None

    def packed_signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed sign buffers, or the latents' signs packed (kept until the latents change)."""
        if self.latent_A is None:
            return self.sign_A, self.sign_B
        latent_A, latent_B = self.latent_A, self.latent_B
        key, pins = stamp(latent_A, latent_B), (latent_A, latent_B)
        return self._caches.get("signs", key, lambda: (pack_signs(latent_A), pack_signs(latent_B)), pins)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The effective ``(b, m, a)`` in float32: ``decode(encode(parameters))``, differentiable."""
        return self.codec.fake_quant(self.scale_in, self.scale_mid, self.scale_out)

    def _stored_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codec.encode(self.scale_in, self.scale_mid, self.scale_out)

    def _kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        """Packed signs and decoded scales, kept until the latents or a scale parameter change; the
        decoded scales are views of the parameters when these already hold decoded values (float32
        adapters, adapters loaded from files): no extra memory then."""
        params = self._parameters  # direct: this runs once per layer and token
        p_in, p_mid, p_out = params["scale_in"], params["scale_mid"], params["scale_out"]
        key = stamp(p_in, p_mid, p_out)
        scales = self._caches.lookup("scales", (key, self.codec.name))
        if scales is None:
            with torch.no_grad():
                decoded = self.codec.fake_quant(p_in, p_mid, p_out)
                scales = tuple(_view_if_equal(p, v) for p, v in zip((p_in, p_mid, p_out), decoded))
            self._caches.store("scales", (key, self.codec.name), scales, (p_in, p_mid, p_out))
        if params.get("latent_A") is None:
            buffers = self._buffers
            return buffers["sign_A"], buffers["sign_B"], *scales
        return (*self.packed_signs(), *scales)

    def _traced_tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.packed_signs(), *(v.detach() for v in self.scales()))

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The branch output for ``x`` ``[..., in]`` in ``x``'s dtype; given ``base`` (the base layer's
        output for ``x``), ``base + branch`` in ``base``'s dtype. With a gradient to compute, the fused
        autograd function (:func:`lordba.core.autograd.sign_branch`); else the inference kernels."""
        x = self._branch_input(x)
        if torch.is_grad_enabled() and self._needs_grad(x):
            latent = self._parameters.get("latent_A") is not None
            signs = (self.latent_A, self.latent_B) if latent else self.signs(x.dtype)
            return self._add_bias(self._autograd(x, base, signs))
        if self._parameters.get("latent_A") is not None and torch.compiler.is_compiling():
            # no caches under tracing (version counters): the latents' signs through the same function
            scales = (v.detach() for v in self.scales())
            out = sign_branch(x, self.latent_A.detach(), self.latent_B.detach(), *scales, self.scaling)
            return self._add_bias(out if base is None else base + out.to(base.dtype))
        return self._add_bias(self._inference(x, base))

    def _needs_grad(self, x: torch.Tensor) -> bool:
        """Whether a gradient reaches ``x`` or a parameter of this adapter (grad mode being on)."""
        trained = (self.scale_in, self.scale_mid, self.scale_out, self.latent_A, self.latent_B, self.bias_delta)
        return x.requires_grad or any(p is not None and p.requires_grad for p in trained)

    def set_trainable(self, signs: bool, scales: bool) -> None:
        """Choose what trains: the latent signs (latent form only) and/or the scales."""
        if signs and self.latent_A is None:
            raise AdapterStateError("packed signs cannot train: unpack_to_latent() the adapter first")
        for p in (self.scale_in, self.scale_mid, self.scale_out):
            p.requires_grad_(scales)
        if self.bias_delta is not None:
            self.bias_delta.requires_grad_(scales)  # a trained bias trains with the scales
        if self.latent_A is not None:
            self.latent_A.requires_grad_(signs)
            self.latent_B.requires_grad_(signs)

    @torch.no_grad()
    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set this adapter (frozen packed signs only: see :meth:`freeze_signs`) from validated stored
        tensors, in place; the scale parameters take the decoded values."""
        if self.latent_A is not None:
            raise AdapterStateError("load_stored needs frozen packed signs: freeze_signs() the adapter first")
        check_sizes(self, tensors)
        for name, value in zip(SCALES, self.codec.decode(*(tensors[n] for n in SCALES))):
            getattr(self, name).copy_(value)
        self.sign_A.copy_(tensors["sign_A"])
        self.sign_B.copy_(tensors["sign_B"])

    @torch.no_grad()
    def silence(self) -> None:
        """Make the branch a no-op (``a = 0``)."""
        self.scale_out.zero_()

    @torch.no_grad()
    def freeze_signs(self) -> TrainableAdapter:
        """A training-form copy with these signs frozen as packed buffers and the same scales."""
        frozen = TrainableAdapter(
            self.in_features,
            self.out_features,
            self.r,
            self.scaling,
            self.codec,
            self.ste,
            device=self.scale_in.device,
            latent_signs=False,
        )
        frozen.sign_A, frozen.sign_B = (t.clone() for t in self.packed_signs())
        for name in SCALES:
            getattr(frozen, name).copy_(getattr(self, name))
            getattr(frozen, name).requires_grad_(getattr(self, name).requires_grad)
        self.copy_extras(frozen)
        frozen.train(self.training)
        return frozen

    @torch.no_grad()
    def unfreeze_signs(self, magnitude: float = LATENT_STD, dtype: torch.dtype = torch.float32) -> TrainableAdapter:
        """A training-form copy whose frozen packed signs become latents ``± magnitude`` (to resume
        QAT); scales are copied exactly. An adapter with latent signs is returned as it is."""
        if self.latent_A is not None:
            return self
        out = self.freeze_signs()
        sign_A, sign_B = self.signs(dtype)
        out.latent_A = nn.Parameter(sign_A * magnitude)
        out.latent_B = nn.Parameter(sign_B * magnitude)
        out.sign_A = out.sign_B = None
        return out  # dropout and bias came with freeze_signs

    @torch.no_grad()
    def pack(self) -> PackedAdapter:
        """The inference form of this adapter: packed signs and the stored scales (frozen buffers)."""
        stored = dict(zip(("sign_A", "sign_B", *SCALES), (*self.packed_signs(), *self._stored_scales())))
        packed = PackedAdapter.from_stored(
            stored, self.in_features, self.out_features, self.r, self.scaling, self.codec
        )
        self.copy_extras(packed)
        packed.train(self.training)
        return packed


class PackedAdapter(StoredBuffers, AdapterBase):
    """The inference form: the stored tensors as frozen buffers (packed signs, scales in their stored dtypes; kept
    as stored: :class:`~lordba.nn.adapter_stored.StoredBuffers`)."""

    def __init__(
        self,
        sign_A: torch.Tensor,
        sign_B: torch.Tensor,
        scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        codec: ScaleCodec,
    ) -> None:
        """Hold the given tensors (not copied); use :meth:`from_stored` to check and copy stored ones."""
        super().__init__(in_features, out_features, r, scaling, codec)
        self.register_buffer("sign_A", sign_A)
        self.register_buffer("sign_B", sign_B)
        for name, value in zip(SCALES, scales):
            self.register_buffer(name, value)

    @classmethod
    def from_stored(
        cls,
        tensors: Mapping[str, torch.Tensor],
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        codec: ScaleCodec,
        device: torch.device | str | None = None,
        copy: bool = True,
        training: bool = True,
    ) -> PackedAdapter:
        """An inference adapter holding the five stored ``tensors`` (SPEC §6 names: packed
        ``sign_A``/``sign_B``, scales in ``codec``'s stored dtypes; checked, :class:`ShapeMismatchError`
        otherwise): contiguous copies, or with ``copy=False`` the tensors themselves where they are
        contiguous and on ``device`` (the loader's own, freshly read tensors: no copy). ``training``:
        the module's mode (that of the layer it is for, so that it need not be set again)."""
        buffers = {}
        target = None if device is None else torch.device(device)
        for name, dtype, shape, _ in stored_specs(in_features, out_features, r, codec.name):
            t = tensors[name]
            if t.shape != shape or t.dtype != dtype:
                raise ShapeMismatchError(f"{name}: {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            moved = target is not None and t.device != target
            if copy or moved or not t.is_contiguous() or t.requires_grad:
                t = t.detach().to(target or t.device).clone(memory_format=torch.contiguous_format)
            buffers[name] = t
        adapter = None
        if cls.__init__ is PackedAdapter.__init__:  # a subclass's own __init__ is run, not skipped
            adapter = cls._assemble(in_features, out_features, r, scaling, codec, buffers, training)
        if adapter is None:
            scales = tuple(buffers[n] for n in SCALES)
            adapter = cls(buffers["sign_A"], buffers["sign_B"], scales, in_features, out_features, r, scaling, codec)
            adapter.train(training)
        return adapter

    def packed_signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed sign buffers."""
        return self.sign_A, self.sign_B

    def scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoded ``(b, m, a)`` in float32."""
        return self.codec.decode(self.scale_in, self.scale_mid, self.scale_out)

    def _stored_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.scale_in, self.scale_mid, self.scale_out

    def _kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        buffers = self._buffers  # direct: this runs once per layer and token; stored scales as they are
        return buffers["sign_A"], buffers["sign_B"], buffers["scale_in"], buffers["scale_mid"], buffers["scale_out"]

    _routed_as_stored = True

    def _routed(self, grad: bool, key: tuple[str, torch.dtype]) -> tuple | None:
        """:meth:`AdapterBase._routed` for buffers only (no parameter can need a gradient): the stored
        tensors read directly, once per adapter, layer and step of a mixed batch."""
        if not self._kernel_only():
            return None
        limit = self._caches.limits.get(key)
        return self._kernel_tensors(), self.scaling, limit if limit is not None else self._limit(*key)

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The branch output for ``x`` ``[..., in]`` (``base + branch`` given ``base``), through the
        inference kernels; when ``x`` needs a gradient (an adapter trained below or beside this one),
        through the autograd function, so that the gradient to ``x`` includes this branch. The adapter
        itself (buffers) gets none."""
        x = self._branch_input(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return self._add_bias(self._autograd(x, base, self.signs(x.dtype)))
        return self._add_bias(self._inference(x, base))

    @torch.no_grad()
    def trainable(
        self,
        ste: STE,
        latent_signs: bool = False,
        magnitude: float = LATENT_STD,
        latent_dtype: torch.dtype = torch.float32,
    ) -> TrainableAdapter:
        """The training form of this adapter: float32 scale parameters holding the decoded values
        (frozen until :meth:`TrainableAdapter.set_trainable`), and the signs frozen as packed buffers,
        or with ``latent_signs`` as latents ``± magnitude`` (to resume QAT); ``ste`` is the
        straight-through estimator the latents will train through."""
        device = self.sign_A.device
        out = TrainableAdapter(
            self.in_features,
            self.out_features,
            self.r,
            self.scaling,
            self.codec,
            ste,
            device=device,
            latent_signs=False,
        )
        out.load_stored({"sign_A": self.sign_A, "sign_B": self.sign_B, **dict(zip(SCALES, self._stored_scales()))})
        self.copy_extras(out)
        if latent_signs:
            out = out.unfreeze_signs(magnitude, latent_dtype)
        for p in (out.scale_in, out.scale_mid, out.scale_out, out.bias_delta):
            if p is not None:
                p.requires_grad_(False)
        out.train(self.training)
        return out


def _view_if_equal(param: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """``param`` itself (detached, sharing its storage) when it already holds ``decoded``, else ``decoded``."""
    if param.dtype == decoded.dtype and param.is_contiguous() and torch.equal(param, decoded):
        return param.detach()
    return decoded.contiguous()


def held_nbytes(adapters: list[nn.Module]) -> int:
    """Bytes ``adapters`` hold in memory at inference: parameters, buffers and what their caches add."""
    return sum(ad.held_nbytes() for ad in adapters)


LoRDBAAdapter = TrainableAdapter | PackedAdapter
