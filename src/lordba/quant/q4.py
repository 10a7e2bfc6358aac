"""The ``q4`` base: 4-bit weight-only linear layers with lordba's own CPU kernels (the fast base),
and 8-bit ones for the output head.

HQQ's optimiser chooses each group's scale and zero point with HQQ's own settings (so a 4-bit layer
holds the codes HQQ 4-bit makes at the same group size); the codes are then repacked for
:mod:`lordba.kernels.q4`, whose decode kernel reads 4.5 bits per weight (AVX-512, or a portable
build) where HQQ's PyTorch path dequantizes the whole weight on every call. Gradients flow to the
input (QAT on a frozen q4 base); merging requantizes (lossy, restored exactly on unmerge).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lordba._util.arena import empty_views, held_together, own_storage, own_storages
from lordba.errors import AdapterStateError, ConfigError
from lordba.kernels import bound_calls, cpu_available
from lordba.kernels.q4 import (
    CHUNK,
    GEMM_MIN_TOKENS,
    amx_prefill_available,
    check_compute,
    compute_flags,
    cpu_op_runs,
    default_compute,
    pack_codes,
    q4_dequantize,
    q4_linear,
)
from lordba.quant.backend import BaseBackend, kept_factors

_UNBOUND = object()  # Q4Linear's bound call not made yet
QUANTIZE_ELEMENTS = 1 << 22  # weights quantized at once (Q4Linear.from_weight): its rows in chunks of about this size


def prefill_elements(limit: int, in_features: int) -> int:
    """The input size (elements) from which an adapted q4 layer's prompt, under ``fast``, runs the bfloat16 GEMM with
    the branch's kept prefill factors (``limit``: the adapter's dispatch limit)."""
    return max(GEMM_MIN_TOKENS, limit + 1) * in_features


class Q4Linear(nn.Module):
    """A frozen 4-bit (or 8-bit) linear layer (buffers: ``qweight``, ``scale``, ``minus``; optional ``bias``).

    ``compute`` (``"exact"`` / ``"fast"`` / ``"fast-int8"``, default
    :func:`~lordba.kernels.q4.default_compute`, can be set at any time): how the kernels compute
    (:mod:`lordba.kernels.q4`): ``exact`` is the dequantized weight's result up to float32 rounding,
    ``fast`` computes on bfloat16 operands where the CPU has native bfloat16 dot products (the prefill
    GEMM; a single token's input rounded to bfloat16), ``fast-int8`` rounds a single token's input to
    int8 instead (AVX512-VNNI and AVX2 builds).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        minus: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None = None,
        bits: int = 4,
        compute: str | None = None,
    ) -> None:
        super().__init__()
        self.compute = default_compute() if compute is None else compute
        if bits not in (4, 8):
            raise ConfigError(f"Q4Linear stores 4- or 8-bit codes, got bits={bits}")
        self.bits = bits
        self.in_features = int(in_features)
        self.out_features = int(qweight.shape[0])
        self.group_size = qweight.shape[1] * 8 // bits // scale.shape[1]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.to(torch.float16).contiguous())
        self.register_buffer("minus", minus.to(torch.float16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if self.qweight.is_cpu:
            cpu_available()  # loaded now: tracing (torch.export, torch.compile) cannot load the kernels

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 64,
        optimize: bool = True,
        bits: int = 4,
        round_zero: bool | None = None,
    ) -> Q4Linear:
        """Quantize a dense ``out × in`` weight to ``bits`` (4 or 8) per weight, HQQ's optimised affine
        quantizer, groups of ``group_size``.

        ``round_zero``: whether HQQ's optimiser starts each group from its min-max zero point rounded
        to an integer code; ``None`` takes HQQ's own setting for ``bits`` (``BaseQuantizeConfig``: at 4
        bits, not at 8), so that a 4-bit layer holds the quantization HQQ 4-bit makes at the same group
        size. The rounded start ends at a slightly larger weight error but a smaller model loss
        (SmolLM2-135M on two held-out corpora: +0.146 / +0.203 nats over fp32 against +0.203 / +0.237;
        docs/kernels.md, "The zero points").

        Raises:
            ConfigError: ``group_size`` is not a positive multiple of 32, or ``bits`` is not 4 or 8.
        """
        if group_size <= 0 or group_size % CHUNK:
            raise ConfigError(f"the q4 base needs a group size that is a multiple of {CHUNK}, got {group_size}")
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer

        if round_zero is None:
            round_zero = BaseQuantizeConfig(nbits=bits, group_size=group_size)["weight_quant_params"]["round_zero"]
        out, in_features = weight.shape
        padded = -(-in_features // group_size) * group_size
        rows = max(1, QUANTIZE_ELEMENTS // padded)  # HQQ's optimiser holds ~10 float32 copies of what it is given
        packed, scales, minus = [], [], []
        for start in range(0, out, rows):
            n = min(rows, out - start)
            w = torch.zeros(n, padded, dtype=torch.float32)
            w[:, :in_features] = weight.detach()[start : start + rows].float().cpu()
            if padded > in_features:  # pad with the row's last group mean: keeps the padded group's range tight
                w[:, in_features:] = w[:, padded - group_size : in_features].mean(dim=1, keepdim=True)
            codes, meta = Quantizer.quantize(
                w,
                nbits=bits,
                group_size=group_size,
                optimize=optimize,
                round_zero=bool(round_zero),
                axis=1,
                bitpack=False,
                device="cpu",
            )
            del w
            scale = meta["scale"].float().reshape(n, padded // group_size)
            packed.append(pack_codes(codes.reshape(n, padded).to(torch.uint8), bits))
            scales.append(scale)
            minus.append(-scale * meta["zero"].float().reshape(n, -1))
            del codes, meta
        dev = weight.device  # built there: a layer off the CPU does not load the CPU kernels
        layer = cls(
            torch.cat(packed).to(dev), torch.cat(scales).to(dev), torch.cat(minus).to(dev), in_features, bias, bits
        )
        return layer.to(dev)

    @property
    def compute(self) -> str:
        """``"exact"``, ``"fast"`` or ``"fast-int8"`` (see the class docstring)."""
        return self._compute

    @compute.setter
    def compute(self, name: str) -> None:
        self._flags = compute_flags(check_compute(name))
        self._compute = name

    def dequantize(self) -> torch.Tensor:
        """The float32 ``out × in`` weight this layer computes with."""
        return q4_dequantize(self.qweight, self.scale, self.minus, self.in_features, self.bits)

    def __setattr__(self, name: str, value: object) -> None:
        self.__dict__.pop("_call", None)  # a new compute, bias or size: the bound call is made again
        super().__setattr__(name, value)

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        self.__dict__.pop("_call", None)  # it held the previous tensor (checked by identity: never read again)
        super().register_buffer(name, tensor, persistent)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_call", None)  # a copy binds its own
        # the weights held together (hold_weights_together) share one storage across dtypes: torch.save refuses that
        state["_buffers"] = own_storages(state["_buffers"])
        return state

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The state dict's ``scale`` and ``minus`` as copies where they are views of a buffer shared with uint8 codes
        (:func:`hold_weights_together`): ``torch.save`` refuses one storage viewed as two dtypes. The codes stay views
        (one dtype: savable); ``keep_vars=True`` gives the layer's own tensors."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            for name in ("scale", "minus"):
                destination[prefix + name] = own_storage(destination[prefix + name])

    def _apply(self, fn, recurse: bool = True) -> Q4Linear:  # noqa: ANN001
        """``.to()``, ``.float()``, ``.half()``, …: ``scale`` and ``minus`` follow the device but stay float16
        (the stored quantization, which the kernels read as such), taken back only where the conversion cast them
        (``to_empty()`` of a layer on ``meta`` cannot copy them); the bias follows the conversion."""
        self.__dict__.pop("_call", None)  # (it would hold the previous tensors until the next call)
        held = {name: self._buffers[name] for name in ("scale", "minus")}
        result = super()._apply(fn, recurse)
        for name, tensor in held.items():
            converted = self._buffers[name]
            if converted.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(converted.device)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # eager: the bound call (it declines what it does not cover)
            call = self.__dict__.get("_call", _UNBOUND)
            if call is _UNBOUND:
                call = self._bind()
            if call is not None:
                y = call(x, self._flags)
                if y is not None:
                    return y
        return q4_linear(x, self.qweight, self.scale, self.minus, self.in_features, self.bias, self.bits, *self._flags)

    def _bind(self) -> Callable | None:
        """This layer's forward with its tensors bound (:mod:`lordba.kernels.cpu.bound`'s ``Q4Call``: the same
        op call as :func:`q4_linear`'s, without parsing its arguments in Python; ``None`` if unavailable),
        kept until an attribute is set or the layer is moved (and checked by identity on every call)."""
        module = bound_calls() if self.qweight.is_cpu else None
        buffers, params = self._buffers, self._parameters
        call = None
        if module is not None:
            call = module.Q4Call(buffers, params, self.in_features, GEMM_MIN_TOKENS, self.bits, self._flags)
        self.__dict__["_call"] = call
        return call

    def forward_with_branch(self, tensors: tuple, scaling: float, limit: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable ``f(x)``: ``self(x)`` plus the packed LoRDBA branch of ``tensors`` (its ``(sign_A, sign_B,
        b, m, a)``), ``scaling`` and ``limit`` (its dispatch limit) in one CPU op call (``lordba::q4_branch``;
        no gradient): see :meth:`Q4Backend.fused_branch`. The layer's tensors, ``compute`` and bias are read
        where they are held on every call (in-place changes, ``.to()``, a new ``compute`` are seen).

        A prompt on the bfloat16 GEMM (``fast``, from ``max(GEMM_MIN_TOKENS, limit + 1)`` tokens) gets the
        branch's folded factors kept here (``lordba::q4_prefill_factors``, and ``A'`` packed for the tile unit
        where it runs: ``lordba::tile_pack``; refolded when a tensor of ``tensors`` changes: version
        counters); outside ``torch.compile`` only."""
        op, buffers, params = torch.ops.lordba.q4_branch.default, self._buffers, self._parameters
        in_features, bits = self.in_features, self.bits
        prefill_from = prefill_elements(limit, in_features)
        kept: list = []  # [versions of tensors, (folded_A, folded_B[, folded_A packed for the tile unit])]

        def fold() -> tuple[torch.Tensor, ...]:
            folded_A, folded_B = torch.ops.lordba.q4_prefill_factors(*tensors, scaling)
            packed = (torch.ops.lordba.tile_pack(folded_A),) if amx_prefill_available() else ()
            return folded_A, folded_B, *packed

        def folded() -> tuple[torch.Tensor, ...]:
            return kept_factors(kept, tensors, fold)

        def call(x: torch.Tensor) -> torch.Tensor:
            flags = self._flags
            factors = folded() if x.numel() >= prefill_from and flags[0] and not torch.compiler.is_compiling() else ()
            return op(
                x, buffers["qweight"], buffers["scale"], buffers["minus"], in_features, GEMM_MIN_TOKENS, bits,
                *flags, params.get("bias"), *tensors, scaling, limit, *factors,
            )  # fmt: skip

        return call

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, compute={self.compute}"
        )


def set_compute(model: nn.Module, compute: str) -> int:
    """Set ``compute`` (``"exact"`` / ``"fast"`` / ``"fast-int8"``) on every :class:`Q4Linear` of ``model``; returns how
    many there are.

    Raises:
        ConfigError: an unknown name.
    """
    check_compute(compute)
    layers = [m for m in model.modules() if isinstance(m, Q4Linear)]
    for layer in layers:
        layer.compute = compute
    return len(layers)


def hold_weights_together(model: nn.Module) -> int:
    """Hold the packed weights of every CPU :class:`Q4Linear` of ``model`` (``qweight``, ``scale``, ``minus``, in
    module order) as views of one buffer in huge pages where the OS gives them
    (:func:`~lordba._util.arena.huge_page_buffer`), each at a 64-byte cache line, moved there one by one (memory
    peaks at the buffer and one old tensor). One decoded token reads every weight once; in 4 KB pages it ran
    4-5% slower on SmolLM2 (docs/kernels.md). Values are unchanged; weights held so already (a cached base read
    straight into such a buffer, :mod:`lordba.quant.cache`) stay where they are. Returns the bytes held."""
    layers = [m for m in model.modules() if isinstance(m, Q4Linear) and m.qweight.is_cpu]
    slots = [(layer, name) for layer in layers for name in ("qweight", "scale", "minus")]
    if held_together([layer._buffers[n] for layer, n in slots], align=64):
        return sum(layer._buffers[n].nbytes for layer, n in slots)
    views = empty_views(
        [(t.shape, t.dtype) for t in (layer._buffers[n] for layer, n in slots)], align=64, huge_pages=True
    )
    with torch.no_grad():
        for (layer, name), view in zip(slots, views):  # one at a time: the old tensor is freed as it is replaced
            view.copy_(layer._buffers[name])
            layer.register_buffer(name, view)
    return sum(v.nbytes for v in views)


def quantize_linear_q4(linear: nn.Linear, group_size: int = 64, bits: int = 4, where: str = "layer") -> Q4Linear:
    """A :class:`Q4Linear` with ``linear``'s weight (quantized to ``bits``) and bias.

    Raises:
        ConfigError: naming ``where``, a weight whose scales or offsets overflow float16 (a group's lowest weight
            below -65504, or its range beyond 15 (4 bits) or 255 (8 bits) times 65504): the layer would give NaN.
    """
    layer = Q4Linear.from_weight(linear.weight, linear.bias, group_size, bits=bits)
    if not (bool(layer.scale.isfinite().all()) and bool(layer.minus.isfinite().all())):
        raise ConfigError(
            f"{where}: its weight (|w| up to {float(linear.weight.detach().abs().max()):.4g}) overflows the q4 base's "
            "float16 scales and offsets: quantized, it would give NaN (leave it unquantized, skip, or use backend hqq)"
        )
    return layer


class Q4Backend(BaseBackend):
    """lordba's own 4-bit layers; merging requantizes into a new layer with the same group size."""

    name = "q4"
    in_place_merge = False
    bits = 4.0

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, Q4Linear)

    def weight_device(self, module: nn.Module) -> torch.device:
        return module.qweight.device

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize()

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        weight = module.dequantize() + delta.float()
        merged = Q4Linear.from_weight(weight, module.bias, module.group_size, bits=module.bits)
        if not (bool(merged.scale.isfinite().all()) and bool(merged.minus.isfinite().all())):  # quantize_linear_q4's
            raise AdapterStateError(
                f"the merged weight (|w| up to {float(weight.abs().max()):.4g}) overflows the q4 base's float16 "
                "scales and offsets: requantized, it would give NaN (keep the adapter unmerged)"
            )
        merged.compute = module.compute
        return merged

    def bits_per_weight(self, module: nn.Module) -> float:
        return module.bits + 32.0 / module.group_size  # two float16 per group

    def describe(self, module: nn.Module) -> dict[str, Any] | None:
        return {"backend": "q4", "bits": int(module.bits), "group_size": int(module.group_size)}

    def fused_branch(
        self, module: nn.Module, x: torch.Tensor, tensors: tuple, scaling: float, limit: int
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """:meth:`Q4Linear.forward_with_branch` where the compiled CPU op runs ``x``: decode calls ~210
        adapted layers per token, and one op call per layer instead of two took SmolLM2-135M + LoRDBA's
        ahead-of-time compiled step from 10.53 to 10.30 ms (1 thread; docs/kernels.md)."""
        if not cpu_op_runs(x) or not hasattr(torch.ops.lordba, "q4_branch"):
            return None
        return module.forward_with_branch(tensors, scaling, limit)

    def bound_branch(
        self, module: nn.Module, tensors: tuple, scaling: float, limit: int, checks: tuple, call: Callable
    ) -> Any:
        """``lordba::q4_branch`` bound; a prompt that takes kept prefill factors goes to ``call``."""
        bound = bound_calls() if module.qweight.is_cpu else None
        if bound is None:
            return None
        below = min(prefill_elements(limit, module.in_features), 1 << 62)  # (an int64 for C++)
        return bound.LayerCall.q4(
            checks, module._buffers, module._parameters, module.__dict__, module.in_features, GEMM_MIN_TOKENS,
            module.bits, tensors, scaling, limit, below, call,
        )  # fmt: skip
