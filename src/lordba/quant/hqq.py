"""HQQ (Half-Quadratic Quantization) bases: ``hqq.core.quantize.HQQLinear``, 1–8 bits.

Pure-PyTorch backend, real bit packing, gradients to the input, 1–8 bits. Its optimiser is also what
the default ``q4`` base (:mod:`lordba.quant.q4`) uses to choose its groups; HQQ's own CPU forward
dequantizes the whole weight on every call (``lordba bench --suite quant``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lordba.quant.backend import BaseBackend, linear_branch_op, prompt_tiles


def _hqq_linear_cls() -> type | None:
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        return None
    return HQQLinear


@functools.cache  # one class, made when first asked for: hqq is imported lazily
def hqq_layer_cls() -> type:
    """The ``HQQLinear`` subclass lordba makes its HQQ layers of (:func:`quantize_linear_hqq`, the cache, merges):
    HQQ's own forward, but a conversion of the module it is in (``model.to(torch.bfloat16)``, ``.half()``, ``.to(
    device)``) reaches its compute dtype, its scales and zeros (held in a dict, not as buffers) and its bias (a plain
    attribute). ``HQQLinear`` keeps them as they were (its ``to``, ``half``, … do nothing), so that every forward of
    a cast model failed (``expected m1 and m2 to have the same dtype``)."""
    from hqq.core.quantize import HQQLinear

    class LordbaHQQLinear(HQQLinear):
        @classmethod
        def set_backend(cls, backend: Any) -> None:
            HQQLinear.set_backend(backend)  # (HQQ sets ``forward`` on the class it is called on: keep it HQQ's)

        def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
            result = super()._apply(fn, recurse)
            if self.meta is None:
                return result
            for key, value in list(self.meta.items()):
                if isinstance(value, torch.Tensor):
                    self.meta[key] = fn(value)
            if isinstance(self.bias, torch.Tensor) and not isinstance(self.bias, nn.Parameter):
                self.bias = fn(self.bias)
            probe = fn(torch.zeros((), dtype=self.compute_dtype))  # what the conversion makes of a float tensor
            if probe.is_floating_point():
                self.compute_dtype = probe.dtype
                self.meta["compute_dtype"] = probe.dtype
            self.device = str(self.W_q.device)
            return result

        def matmul(self, x: torch.Tensor, transpose: bool = True) -> torch.Tensor:
            """HQQ's ``x @ W.T`` (its forward with a backward) or ``x @ W`` (that backward), with the dequantized
            weight in ``x``'s dtype: under ``torch.autocast`` the output gradient is of the autocast dtype (bfloat16)
            while the weight is of the compute dtype, and HQQ's ``torch.matmul`` of the two failed."""
            weight = self.dequantize()
            if x.is_floating_point() and weight.dtype != x.dtype:
                weight = weight.to(x.dtype)
            return torch.matmul(x, weight.t() if transpose else weight)

    LordbaHQQLinear.__qualname__ = LordbaHQQLinear.__name__  # pickled by name: this module's ``__getattr__``
    LordbaHQQLinear.__module__ = __name__
    return LordbaHQQLinear


def __getattr__(name: str) -> Any:
    if name == "LordbaHQQLinear":  # (made when first asked for: hqq is imported lazily)
        return hqq_layer_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HQQBackend(BaseBackend):
    """HQQ ``HQQLinear`` layers; merging requantizes into a new layer with the same settings."""

    name = "hqq"
    in_place_merge = False

    def matches(self, module: nn.Module) -> bool:
        cls = _hqq_linear_cls()
        return cls is not None and isinstance(module, cls)

    def weight_device(self, module: nn.Module) -> torch.device:
        return module.W_q.device

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize().float()

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        weight = (self.dequantize(module) + delta.float()).to(module.compute_dtype)
        config = copy.deepcopy(module.quant_config)  # HQQLinear pops "offload_meta" out of its config
        merged = hqq_layer_cls()(
            None,
            {**config, "offload_meta": module.offload_meta},
            compute_dtype=module.compute_dtype,
            device=module.device,
            initialize=False,
        )
        merged.quantize(weight, **config)
        merged.bias = module.bias
        return merged

    def bits_per_weight(self, module: nn.Module) -> float:
        return float(module.meta["nbits"])

    def fused_branch(
        self, module: nn.Module, x: torch.Tensor, tensors: tuple, scaling: float, limit: int
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``lordba::linear_branch`` on the weight HQQ dequantizes for every call anyway (its PyTorch
        forwards, with or without a backward: ``x @ dequantize().T + bias``), so the branch joins the
        dense product as on an ``nn.Linear`` base (one token: inside the op's GEMV; more: ``at::linear``
        and the branch added into its output in place, on the tile unit for a prompt under the ``fast``
        branch compute): equal to HQQ's forward then the branch up to float (``fast``: bfloat16) rounding.
        ``None`` where HQQ runs another forward (its other backends), under
        ``torch.compile``, or where ``x`` is not of its compute dtype on the CPU."""
        cls = _hqq_linear_cls()
        plain = () if cls is None else (cls.forward_pytorch, cls.forward_pytorch_backprop)  # x @ dequantize().T
        if type(module).forward not in plain or "forward" in vars(module):
            return None
        if torch.compiler.is_compiling() or not (x.is_cpu and module.W_q.is_cpu) or x.dtype != module.compute_dtype:
            return None
        op = linear_branch_op()
        if op is None:
            return None
        tiles = prompt_tiles(tensors, scaling, limit)

        def call(x: torch.Tensor) -> torch.Tensor:
            return op(x, module.dequantize(), module.bias, *tensors, scaling, limit, *tiles(x))

        return call

    def describe(self, module: nn.Module) -> dict[str, Any] | None:
        group = module.meta.get("group_size")
        return {
            "backend": "hqq",
            "bits": int(module.meta["nbits"]),
            "group_size": None if group is None else int(group),
        }


# HQQ packs the code rows of this many groups into one row (``hqq.core.bitpack``, no padding): a weight whose
# group count is not a multiple fails there (4 bits: a bare RuntimeError) or, at 1 bit, quantizes into a layer
# that fails on its first forward. 3 bits pads; 8 bits does not pack.
_GROUPS_PER_PACK = {1: 8, 2: 4, 4: 2}


def hqq_shape_problem(shape: tuple[int, ...], bits: int, group_size: int) -> str | None:
    """Why HQQ cannot quantize a weight of ``shape`` with ``bits`` and ``group_size``, or ``None`` if it can:
    its size must be a multiple of ``group_size`` and, at 1, 2 and 4 bits, its group count a multiple of
    the groups HQQ packs together."""
    n = 1
    for d in shape:
        n *= int(d)
    if n % group_size:
        return f"its {n} weights are not a multiple of group_size={group_size}"
    per_pack = _GROUPS_PER_PACK.get(bits, 1)
    if (n // group_size) % per_pack:
        return (
            f"its {n // group_size} groups of {group_size} are not a multiple of the {per_pack} that HQQ packs "
            f"together at {bits} bits"
        )
    return None


def quantize_linear_hqq(linear: nn.Linear, bits: int, group_size: int, compute_dtype: torch.dtype) -> nn.Module:
    """An ``HQQLinear`` replacing ``linear`` (its float weight is released)."""
    from hqq.core.quantize import BaseQuantizeConfig

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    cls = hqq_layer_cls()
    return cls(linear, config, compute_dtype=compute_dtype, device=str(linear.weight.device), del_orig=True)
