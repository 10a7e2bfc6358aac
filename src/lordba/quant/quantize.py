"""``quantize_model``: make a model's linear layers low-bit and frozen, in place (SPEC §4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lordba._util.arena import return_freed_memory
from lordba._util.modules import is_output_head, own_config, replace_submodule
from lordba._util.state import ordinary_tensors
from lordba.errors import ConfigError
from lordba.quant.backend import resolve_backend
from lordba.quant.conv1d import conv1d_class

QUANT_BACKENDS = ("q4", "hqq", "bnb", "none")  # the default first
DEFAULT_BACKEND = "q4"  # the fastest base on CPU at HQQ 4-bit g64's accuracy (lordba bench --suite quant)


@ordinary_tensors()
def quantize_model(
    model: nn.Module,
    backend: str = DEFAULT_BACKEND,
    bits: int = 4,
    group_size: int = 64,
    skip: tuple[str, ...] = (),
    progress: bool = False,
    head_bits: int | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` and GPT-2-family ``Conv1D`` of ``model`` (but the output head and modules whose
    last name is in ``skip``) with a frozen weight-only quantized layer and return the model (a ``Conv1D``
    becomes the quantized layer of its transposed weight: the same ``in → out`` layer).

    ``head_bits``: the output head's quantization (``q4`` only: 8 or 4; ``0`` keeps it unquantized;
    ``None``, the default, is 8 for ``q4`` — at decode, a small model's float32 head is the largest
    weight read per token — and unquantized for the other backends; a head whose last name is in ``skip``, or
    tied to the input embeddings of an encoder-decoder model (whose forward reads the tie:
    :func:`rescaled_when_tied`), stays unquantized). A quantized head tied to the input embeddings is untied:
    the embeddings stay float32 for the lookup.

    ``backend="hqq"``: HQQ, ``bits`` ∈ {1, 2, 3, 4, 8}, groups of ``group_size`` (a multiple of 8).
    ``backend="q4"`` (default): lordba's own 4-bit layers (HQQ-optimised groups of ``group_size``, a multiple
    of 32; the fast decode kernels of :mod:`lordba.kernels.q4`).
    ``backend="bnb"``: bitsandbytes NF4 (``bits`` must be 4; block size 64).
    ``backend="none"``: leave the base unquantized.
    Every parameter of ``model`` is frozen; each new layer takes the mode (training or eval) of the layer it
    replaces. Raises :class:`ConfigError` for an unknown backend,
    unsupported ``bits``, a ``group_size`` the backend does not take, or (``hqq``) a layer whose shape HQQ cannot
    pack, or a layer whose weight is on the meta device (:func:`check_loaded`) or holds inf or NaN
    (:func:`check_finite`), naming it, before any layer is replaced; (``q4``) a layer whose weight overflows the
    float16 scales and offsets, naming it, before any layer is replaced (:func:`~lordba.quant.q4.quantize_linear_q4`);
    a ``group_size`` that is not a positive integer, a ``skip`` that is not a list of names; for a model that
    already holds adapter layers (:func:`check_no_adapters`); and for one already quantized otherwise
    (:func:`check_quantized_alike`; quantized alike, only its unquantized layers are quantized).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize_model takes an nn.Module, got {type(model).__name__}")
    check_no_adapters(model)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ConfigError(f"group_size must be a positive integer, got {group_size!r}")
    if isinstance(skip, str) or not all(isinstance(name, str) for name in skip):
        raise ConfigError(f"skip must be a list of module names (last names, e.g. ['down_proj']), got {skip!r}")
    if backend not in QUANT_BACKENDS:
        raise ConfigError(f"quantization backend must be one of {QUANT_BACKENDS}, got {backend!r}")
    if backend == "bnb" and bits != 4:
        raise ConfigError(f"the bnb backend quantizes to NF4 (4 bits) only, got bits={bits}")
    if backend == "hqq" and bits not in (1, 2, 3, 4, 8):
        raise ConfigError(f"HQQ supports bits in (1, 2, 3, 4, 8), got {bits}")
    if backend == "hqq" and group_size % 8:  # (HQQ's BaseQuantizeConfig: a bare assert, skipped under python -O)
        raise ConfigError(f"the hqq backend takes a group_size that is a multiple of 8, got {group_size}")
    if backend == "q4" and (bits != 4 or group_size % 32):
        raise ConfigError(
            f"the q4 backend is 4-bit with groups of a multiple of 32, got bits={bits}, group_size={group_size}"
        )
    head_bits = (8 if backend == "q4" else 0) if head_bits is None else head_bits
    if head_bits and (backend != "q4" or head_bits not in (4, 8)):
        raise ConfigError(f"head_bits={head_bits}: only the q4 backend quantizes the output head, to 4 or 8 bits")
    if backend == "none":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    check_quantized_alike(
        model, {"backend": backend, "bits": bits, "group_size": 64 if backend == "bnb" else group_size}
    )
    targets = quantizable(model, skip)
    head = quantized_head(model, skip) if head_bits else None
    if head is None:
        head_bits = 0  # stays as it is (and tied)
    check_loaded(targets + ([head] if head else []))  # before any layer is replaced
    check_finite(targets + ([head] if head else []))
    if backend == "hqq":  # every layer checked before any is replaced: a refusal leaves the model as it was
        from lordba.quant.hqq import hqq_shape_problem

        for name, linear in targets:
            problem = hqq_shape_problem(tuple(linear.weight.shape), bits, group_size)
            if problem:
                raise ConfigError(
                    f"{name}: the hqq backend cannot quantize its {list(linear.weight.shape)} weight with bits={bits}, "
                    f"group_size={group_size}: {problem} (use another group_size, or backend 'q4')"
                )
    replaced = []  # every layer quantized before any is replaced: a refusal (q4's float16 overflow) changes nothing
    for name, linear in tqdm(targets, desc=f"quantizing ({backend}, {bits}-bit)", disable=not progress):
        compute_dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32
        if backend == "hqq":
            from lordba.quant.hqq import quantize_linear_hqq

            new = quantize_linear_hqq(linear, bits, group_size, compute_dtype)
        elif backend == "q4":
            from lordba.quant.q4 import quantize_linear_q4

            new = quantize_linear_q4(linear, group_size, where=name)
        else:
            from lordba.quant.bnb import quantize_linear_bnb

            new = quantize_linear_bnb(linear, compute_dtype)
        new.train(model.get_submodule(name).training)  # the replaced layer's mode (a Conv1D's, not its view's)
        replaced.append((name, new))
    if head:
        from lordba.quant.q4 import quantize_linear_q4

        replaced.append((head[0], quantize_linear_q4(head[1], group_size, head_bits, head[0]).train(head[1].training)))
    record = {"backend": backend, "bits": bits, "group_size": group_size, "head_bits": head_bits}
    targets = head = linear = None  # the float layers: freed as they are replaced, before the q4 weights are copied
    install_quantized(model, replaced, record)
    return model


def install_quantized(model: nn.Module, layers: list[tuple[str, nn.Module]], record: dict) -> None:
    """Put the quantized ``layers`` (``[(path, layer)]``, every one built before: a refusal while building them
    changed nothing) in place: the model's parameters frozen, a quantized output head (``record["head_bits"]``)
    untied, the q4 weights held together, and ``record`` kept as the model's ``lordba_quantization``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, new in layers:
        replace_submodule(model, name, new)
    if record["head_bits"]:
        untie_head(model)
    if record["backend"] == "q4":
        from lordba.quant.q4 import hold_weights_together

        hold_weights_together(model)
    model.lordba_quantization = record
    return_freed_memory()  # the replaced float weights' pages: glibc kept them for the process's life


def check_no_adapters(model: nn.Module) -> None:
    """Refuse a model that holds adapter layers (a module wrapping a ``base_layer``: lordba's, PEFT's).

    Quantizing under them would replace their base layers behind their backs (a layer keeps the backend
    of the base it wrapped: merging then fails) and freeze their trainable parameters.

    Raises:
        ConfigError: naming the first such module.
    """
    for name, module in model.named_modules():
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            raise ConfigError(
                f"{name}: the model already has adapter layers ({type(module).__name__}): quantize the base model "
                "before adding adapters (quantize_model, then get_lordba_model)"
            )


def check_quantized_alike(model: nn.Module, wanted: dict[str, Any]) -> None:
    """Refuse a model that holds layers (but its output head) quantized otherwise than ``wanted`` (a
    :meth:`BaseBackend.describe` record): quantizing it again would leave those layers as they are and quantize
    only the rest with the new settings (a mixed base recorded as ``wanted``). Layers quantized alike are kept.

    Raises:
        ConfigError: naming the first such layer, its quantization and the one asked for.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        backend = resolve_backend(module)
        found = backend.describe(module) if backend is not None and module is not head else None
        if found is not None and found != wanted and not is_output_head(name):
            raise ConfigError(
                f"{name}: the model is already quantized ({found}), quantize_model was asked for {wanted}: quantize "
                "the model as loaded, unquantized"
            )


def check_loaded(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse layers whose weight holds no data: on the ``meta`` device (a model made under ``torch.device("meta")``,
    or offloaded by accelerate: ``cpu_offload``, a ``device_map`` offloading to the CPU or disk, its weights held by
    hooks and put in place for each forward only).

    Raises:
        ConfigError: naming the first such layer.
    """
    for name, layer in layers:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            raise ConfigError(
                f"{name}: its weight is on the meta device (not loaded, or offloaded by accelerate): load the model "
                "with its weights in memory (no offloading device_map) before quantizing it"
            )


def check_finite(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse layers whose weight holds inf or NaN: every backend quantizes it into a layer whose group (or row) scale
    is NaN, so that the model gives NaN for every input.

    Raises:
        ConfigError: naming the first such layer.
    """
    for name, layer in layers:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not bool(weight.isfinite().all()):
            raise ConfigError(f"{name}: its weight holds inf or NaN: quantized, it would give NaN for every input")


def quantized_head(model: nn.Module, skip: tuple[str, ...] = ()) -> tuple[str, nn.Linear] | None:
    """The output head (``get_output_embeddings()``) with its path, where the q4 backend quantizes it: a plain
    ``nn.Linear`` whose last name is not in ``skip`` and that is not tied to an encoder-decoder's input embeddings
    (:func:`rescaled_when_tied`); else ``None``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or rescaled_when_tied(model, head):
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    return None if name.rsplit(".", 1)[-1] in skip else (name, head)


def rescaled_when_tied(model: nn.Module, head: nn.Module) -> bool:
    """Whether ``head`` is tied to the input embeddings of an encoder-decoder model: the T5 family's forwards (UMT5,
    Switch Transformers, UDOP, T5Gemma) scale the decoder's output by ``d_model ** -0.5`` where
    ``config.tie_word_embeddings`` is set, so untying the head (:func:`untie_head`) would change every logit."""
    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = getattr(config, "tie_word_embeddings", False) and getattr(embeddings, "weight", None) is head.weight
    return bool(tied and getattr(config, "is_encoder_decoder", False))


def untie_head(model: nn.Module) -> None:
    """Mark a model whose (tied) output head was replaced by a quantized layer as untied, so that
    transformers does not tie it to the input embeddings again.

    The model gets its own copy of the config (:func:`~lordba._util.modules.own_config`: in every module that held
    it or one of its sub-configs, a multimodal model's ``text_config``): the config may be shared (two models built
    from one config, the user's object), and writing it untied another model whose head is still tied: its save left
    the head out as a tied copy and its config said untied, so it reloaded with a random head."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        own_config(model).tie_word_embeddings = False


def quantizable(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """The ``(path, nn.Linear)`` pairs :func:`quantize_model` replaces: every plain ``nn.Linear`` and GPT-2-family
    ``Conv1D`` (given as an ``nn.Linear`` viewing its weight transposed: :func:`as_linear`) but the output head
    (the model's output embeddings, or a name :func:`is_output_head` accepts), those whose last name is in
    ``skip`` and those the model keeps in float (:func:`kept_in_float`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    conv1d = conv1d_class()
    kept = kept_in_float(model)
    return [
        (name, m if type(m) is nn.Linear else as_linear(m))
        for name, m in model.named_modules()
        if (type(m) is nn.Linear or (conv1d is not None and type(m) is conv1d))
        and m is not head
        and not is_output_head(name)
        and name.rsplit(".", 1)[-1] not in skip
        and not any(f".{k}." in f".{name}." for k in kept)
    ]


def kept_in_float(model: nn.Module) -> list[str]:
    """The module names a transformers model keeps unquantized (its class's ``_keep_in_fp32_modules``, as
    transformers' own quantizers skip them; e.g. T5's ``wo``, whose input its feed-forward casts to the layer's
    weight dtype); a module is kept where one of them is a run of whole components of its path."""
    names = getattr(model, "_keep_in_fp32_modules", None) or ()
    return [n for n in names if isinstance(n, str) and n]


def as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what the ``Conv1D`` ``conv`` computes (``y = x W + b``, ``W`` stored ``in × out``):
    its weight a transposed view of ``conv``'s (``out × in``, not copied), its bias ``conv``'s."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


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


def describe_base(modules: list[nn.Module]) -> dict[str, Any] | None:
    """The base quantization of ``modules`` (base layers) as an adapter records it: the description
    (:meth:`BaseBackend.describe`) most of the quantized ones share, or ``None`` if none is quantized."""
    counts: dict[str, tuple[int, dict[str, Any]]] = {}
    for m in modules:
        backend = resolve_backend(m)
        found = backend.describe(m) if backend is not None else None
        if found is not None:
            key = repr(sorted(found.items()))
            counts[key] = (counts.get(key, (0, found))[0] + 1, found)
    return max(counts.values(), key=lambda c: c[0])[1] if counts else None
