"""bitsandbytes bases: NF4 (``bnb.nn.Linear4bit``), the QLoRA format users know, and LLM.int8()
(``bnb.nn.Linear8bitLt`` with int8 weights and one absmax scale per output row).

bitsandbytes ships official CPU wheels; on CPU it dequantizes then multiplies (the fast fused
kernels need a hub download, which this library never does; the NF4 layers made here never take its
AVX512-BF16 repacked kernel: :func:`_make_linear4bit`), so HQQ is the faster default here.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from lordba.quant.backend import BaseBackend


def _bnb():
    """bitsandbytes where it is imported, else None: a layer of its kinds exists only once it is (its class's module
    imported), so telling that a module is none of them never imports it (about 3 s on CPU, and its warning that a
    CPU kernel could not be fetched, for every model wrapped)."""
    return sys.modules.get("bitsandbytes")


def _require_bnb():
    """bitsandbytes, to build its layers: without it, the ``ModuleNotFoundError`` naming it (which ``lordba``
    reports with the extra to install, ``pip install 'lordba[quant]'``, as for hqq)."""
    import bitsandbytes

    return bitsandbytes


class _BnbBackend(BaseBackend):
    """What the bitsandbytes layers share: found by their class name in ``bnb.nn``, merged by
    requantizing into a new layer."""

    layer_class = ""  # the name of the layer class in ``bitsandbytes.nn``
    in_place_merge = False

    def matches(self, module: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, getattr(bnb.nn, self.layer_class))

    def weight_device(self, module: nn.Module) -> torch.device:
        return module.weight.device


class BnbNF4Backend(_BnbBackend):
    """bitsandbytes ``Linear4bit`` (NF4) layers; merging requantizes into a new layer."""

    name = "bnb"
    layer_class = "Linear4bit"
    bits = 4.0

    def adopt(self, module: nn.Module) -> None:
        """A ``Linear4bit`` made elsewhere (transformers' ``BitsAndBytesConfig``, QLoRA) keeps bitsandbytes' ordinary
        CPU path from now on, as :func:`_make_linear4bit`'s do: its AVX512-BF16 kernel (taken after one forward in
        eval mode without a gradient, and then for every forward) has no backward, so the gradient to the adapters
        of earlier layers was silently lost. A layer already in that kernel's layout is read back into the ordinary
        one (:func:`_nf4_codes`: the values it computes with)."""
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            codes, state = _nf4_codes(module.weight)
            module.weight.data, module.weight.quant_state = codes, state
        _keep_ordinary_cpu_path(module)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        codes, state = _nf4_codes(module.weight)
        return _bnb().functional.dequantize_4bit(codes, state).float()

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        weight = self.dequantize(module) + delta.float()
        return _make_linear4bit(weight, module.bias, module.compute_dtype, module.weight.quant_type)

    def describe(self, module: nn.Module) -> dict[str, Any] | None:
        state = module.weight.quant_state
        return {"backend": "bnb", "bits": 4, "group_size": int(getattr(state, "blocksize", 64) or 64)}


class BnbInt8Backend(_BnbBackend):
    """bitsandbytes ``Linear8bitLt`` layers with frozen int8 weights (``has_fp16_weights=False``):
    ``W = CB · SCB / 127`` per output row. Merging requantizes into a new layer (lossy)."""

    name = "bnb-int8"
    layer_class = "Linear8bitLt"
    bits = 8.0

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        w = module.weight
        scb = getattr(w, "SCB", None)
        if scb is None:  # after a forward, bitsandbytes keeps the row scales in the layer's state
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if w.dtype != torch.int8 or scb is None:
            return w.detach().float()  # fp16 weights (not yet quantized, or has_fp16_weights=True)
        return w.data.float() * scb.float()[:, None] / 127.0

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        return make_linear8bit(self.dequantize(module) + delta.float(), module.bias, module.state.threshold)

    def describe(self, module: nn.Module) -> dict[str, Any] | None:
        return {"backend": "bnb-int8", "bits": 8, "group_size": None}


def _keep_ordinary_cpu_path(layer: nn.Module) -> None:
    """Keep the NF4 ``layer`` off bitsandbytes' AVX512-BF16 CPU kernel, which its first forward in eval mode without a
    gradient would repack it for: a repacked layer computes every later forward, with a gradient too, with that
    kernel, which has no backward (the gradient to the input silently dropped; with a bias, an error) and which takes
    only outputs in multiples of 32 and inputs in multiples of 64 (else a bare RuntimeError / AssertionError)."""
    layer.support_avx512bf16_for_cpu = False


def _nf4_codes(weight: nn.Parameter) -> tuple[torch.Tensor, Any]:
    """An NF4 weight's codes and quant state in bitsandbytes' ordinary layout, as ``dequantize_4bit`` reads them.

    After a forward in eval mode without a gradient on a CPU with AVX512-BF16, bitsandbytes holds the weight in its
    CPU kernel's layout (``packing_format_for_cpu``: the codes reordered, the absmax dequantized to bfloat16 and
    transposed). Read back here without changing the layer (its own inverse would requantize nested absmax in
    place): the codes reordered on a copy of the state, the absmax the layer now computes with."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    copied = copy.copy(state)
    copied.original_nested = False  # (the inverse would quantize the absmax again, in place)
    codes, copied = _convert_weight_packed_for_cpu_inverse(weight.data, copied)
    copied.absmax = state.absmax.t().reshape(-1).float()  # [in / blocksize, out] -> the blocks' order
    return codes, copied


def make_linear8bit(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float = 0.0) -> nn.Module:
    """A frozen ``Linear8bitLt`` (int8 weights, per-row absmax) holding ``weight`` (``out × in``) and ``bias``."""
    bnb = _require_bnb()
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear8bitLt(  # built empty (as transformers builds it): no random init from the global generator
        in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold, device="meta"
    )
    layer.weight = bnb.nn.Int8Params(weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)


def _make_linear4bit(
    weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, quant_type: str = "nf4"
) -> nn.Module:
    bnb = _require_bnb()
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(  # built empty (as transformers builds it): no random init from the global generator
        in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, quant_type=quant_type, device="meta"
    )
    layer.weight = bnb.nn.Params4bit(weight.detach().float().cpu(), requires_grad=False, quant_type=quant_type)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    _keep_ordinary_cpu_path(layer)
    return layer.to(weight.device)


def quantize_linear_bnb(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A ``Linear4bit`` (NF4) replacing ``linear``."""
    return _make_linear4bit(linear.weight.data, linear.bias, compute_dtype, "nf4")
