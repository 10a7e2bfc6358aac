"""``quantize_model``: make a model's linear layers low-bit and frozen, in place (SPEC §4)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lordba._util.modules import is_output_head, replace_submodule
from lordba.errors import ConfigError
from lordba.quant.backend import resolve_backend

QUANT_BACKENDS = ("hqq", "bnb", "none")


def quantize_model(
    model: nn.Module,
    backend: str = "hqq",
    bits: int = 4,
    group_size: int = 64,
    skip: tuple[str, ...] = (),
    progress: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but the output head and modules whose last name is
    in ``skip``) with a frozen weight-only quantized layer and return the model.

    ``backend="hqq"`` (default): HQQ, ``bits`` ∈ {1, 2, 3, 4, 8}, groups of ``group_size``.
    ``backend="bnb"``: bitsandbytes NF4 (``bits`` must be 4; block size 64).
    ``backend="none"``: leave the base unquantized.
    Every parameter of ``model`` is frozen. Raises :class:`ConfigError` for an unknown backend or
    unsupported ``bits``.
    """
    if backend not in QUANT_BACKENDS:
        raise ConfigError(f"quantization backend must be one of {QUANT_BACKENDS}, got {backend!r}")
    if backend == "bnb" and bits != 4:
        raise ConfigError(f"the bnb backend quantizes to NF4 (4 bits) only, got bits={bits}")
    if backend == "hqq" and bits not in (1, 2, 3, 4, 8):
        raise ConfigError(f"HQQ supports bits in (1, 2, 3, 4, 8), got {bits}")
    for p in model.parameters():
        p.requires_grad_(False)
    if backend == "none":
        return model
    targets = quantizable(model, skip)
    for name, linear in tqdm(targets, desc=f"quantizing ({backend}, {bits}-bit)", disable=not progress):
        compute_dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32
        if backend == "hqq":
            from lordba.quant.hqq import quantize_linear_hqq

            new = quantize_linear_hqq(linear, bits, group_size, compute_dtype)
        else:
            from lordba.quant.bnb import quantize_linear_bnb

            new = quantize_linear_bnb(linear, compute_dtype)
        replace_submodule(model, name, new)
    model.lordba_quantization = {"backend": backend, "bits": bits, "group_size": group_size}
    return model


def quantizable(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """The ``(path, nn.Linear)`` pairs :func:`quantize_model` replaces: every plain ``nn.Linear`` but
    the output head (the model's output embeddings, or a name :func:`is_output_head` accepts) and
    those whose last name is in ``skip``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m is not head and not is_output_head(name) and name.rsplit(".", 1)[-1] not in skip
    ]



def base_bits(model: nn.Module) -> dict[str, float]:
    """``{backend name: mean bits per weight}`` over the model's supported linear layers."""
    totals: dict[str, list[float]] = {}
    for m in model.modules():
        b = resolve_backend(m)
        if b is not None:
            n = float(b.features(m)[0] * b.features(m)[1])
            acc = totals.setdefault(b.name, [0.0, 0.0])
            acc[0] += b.bits_per_weight(m) * n
            acc[1] += n
    return {k: v[0] / v[1] for k, v in totals.items()}
