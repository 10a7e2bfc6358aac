"""Export a LoRDBA adapter as a plain PEFT LoRA adapter (SPEC §1: every LoRDBA adapter is one).

    lora_B = diag(a) S_B diag(√|m|·sign m),   lora_A = diag(√|m|) S_A diag(b),   lora_alpha = alpha

so PEFT's ``lora_alpha / r`` equals LoRDBA's ``s`` and ``lora_B @ lora_A * s`` is exactly ΔW up to
the export dtype. Splitting ``m`` evenly, and scaling ``A`` and ``B`` by a power of two to about the same
largest entry, keeps both factors in range for fp16. An adapter with per-module ranks or alphas
(``rank_pattern``, ``alpha_pattern``, a ``--target-bpw`` allocation, a ``cat`` combination) is written at one
rank, its largest (factors zero-padded), with one scaling ``alpha / r``, each module's own ``s`` folded into its
factors: vLLM and LoRAX scale every module by ``lora_alpha / r`` and llama.cpp by ``lora_alpha`` over the tensor's
rank, ignoring both patterns. Tensors trained in full (``modules_to_save``, the task's head, trained biases) go in
as PEFT saves them, in their own dtype, with the config's ``bias`` and ``task_type`` and the saved modules' paths
as ``modules_to_save``. The output is a standard directory (``adapter_config.json`` with ``peft_type: "LORA"``,
``adapter_model.safetensors``) that PEFT, vLLM, LoRAX and lm-eval's ``peft=`` load. What it needs of the base model
(its layer types, its heads) it reads off a ``LoRDBAModel``, else off a skeleton of the base the adapter names
(:mod:`lordba.convert.export_base`); without one it warns.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch

from lordba._util.dtypes import DTYPES
from lordba._util.files import check_path
from lordba.config import TASK_HEADS
from lordba.convert.export_base import BaseSkeleton, find_base
from lordba.core.packing import unpack_signs
from lordba.core.scales import get_codec
from lordba.errors import ConfigError, ConversionError
from lordba.format.adapter import AdapterState, ModuleRecord, read_adapter
from lordba.format.atomic import TMP_MARK, atomic_directory, link_or_copy
from lordba.format.sizes import peft_lora_key
from lordba.format.tensorfile import to_bytes
from lordba.nn.structure import uncompiled
from lordba.quant.conv1d import conv1d_class

EXPORT_DTYPES = ("float16", "bfloat16", "float32")  # names in lordba._util.dtypes.DTYPES


def lora_factors(rec: ModuleRecord, scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` in float32 for one stored module: ``lora_B @ lora_A == ΔW / s``."""
    b, m, a = get_codec(scale_dtype).decode(rec.tensors["scale_in"], rec.tensors["scale_mid"], rec.tensors["scale_out"])
    sign_A = unpack_signs(rec.tensors["sign_A"], (rec.r, rec.in_features))
    sign_B = unpack_signs(rec.tensors["sign_B"], (rec.out_features, rec.r))
    root = m.abs().sqrt()
    lora_A = root[:, None] * sign_A * b[None, :]
    lora_B = a[:, None] * sign_B * (root * torch.where(m < 0, -1.0, 1.0))[None, :]
    return lora_A, lora_B


def export_lora(
    model_or_dir: object,
    out_dir: str | Path,
    adapter_name: str = "default",
    dtype: str = "float16",
    overwrite: bool = False,
    base: str | Path | None = None,
) -> Path:
    """Write a PEFT LoRA directory equivalent to a LoRDBA adapter (a ``LoRDBAModel``, an
    ``AdapterState`` or a saved directory) to ``out_dir``, with factors in ``dtype``; returns
    ``out_dir``. For a directory, ``adapter_name`` other than ``"default"`` selects ``<directory>/<adapter_name>``,
    where :meth:`~lordba.LoRDBAModel.save_pretrained` writes a non-default adapter.

    Raises :class:`ConfigError` for an unknown ``dtype`` or a directory without the named adapter's folder;
    :class:`ConversionError` if a factor does not fit ``dtype`` (float16 tops out at 65504: use ``bfloat16`` or
    ``float32``) or a factor or a tensor trained in full holds NaN or infinite values;
    :class:`~lordba.errors.LoRDBAError` for an output that exists (without ``overwrite``) or whose
    replacement would delete the input adapter directory or the current directory. ``overwrite`` replaces the
    export's two files in an existing ``out_dir`` at once and keeps its other files (a README, tokenizer files).
    Warns (``UserWarning``) for an adapter trained on a quantized base (its ``base_quantization``): the exported
    ΔW is fit to that base, and a plain LoRA carries no record of it (a runtime serving the float base gives other
    outputs).

    From a directory or an ``AdapterState``, the base model's layer types (a GPT-2 ``Conv1D``: ``fan_in_fan_out``),
    whether it can generate (the default ``task_type``) and the base tensors of the modules PEFT's suffix rule wraps
    besides the saved ones (DistilBERT's ``pre_classifier``) are read off a skeleton of the base built on the meta
    device from the ``config.json`` of ``base`` (a folder, or a hub id in the local HF cache), else of the config's
    ``base_model_name_or_path``: the export is the one of the ``LoRDBAModel``. Without it, warns (``UserWarning``)
    naming what may be wrong; :class:`ConfigError` for a ``base`` that cannot be used, or given with a ``LoRDBAModel``
    (its own base is used)."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    check_path(out_dir, "export_lora: out_dir")
    if isinstance(model_or_dir, torch.nn.Module):  # torch.compile(lm): the LoRDBAModel it compiled
        model_or_dir = uncompiled(model_or_dir)
    adapter = _as_adapter_state(model_or_dir, adapter_name)
    config = adapter.config
    _warn_quantized_base(config.base_quantization)
    root, skeleton = _base_of(model_or_dir, adapter, base)
    tensors: dict[str, torch.Tensor] = {}
    rank = max((rec.r for rec in adapter.modules.values()), default=config.r)
    for path, rec in adapter.modules.items():
        lora_A, lora_B = _at_rank(*lora_factors(rec, config.scale_dtype), rank)
        # this module's s over the file's one scaling alpha / rank (exactly 1.0 for an adapter without patterns)
        ratio = (config.alpha_for(path) * rank) / (config.alpha * rec.r)
        if ratio != 1.0:
            lora_A, lora_B = lora_A * ratio**0.5, lora_B * ratio**0.5
        lora_A, lora_B = _balanced(lora_A, lora_B)
        for factor, value in (("A", lora_A), ("B", lora_B)):
            tensors[peft_lora_key(path, factor)] = _in_range(value, dtype, f"{path}.lora_{factor}")
    tensors.update(peft_extras(adapter))
    targets = sorted({target_name(p) for p in adapter.modules})
    task_type = config.task_type or _default_task_type(root)
    peft_saved = [*saved_module_paths(adapter), *TASK_HEADS.get(task_type or "", ())]  # (PEFT adds the heads)
    if root is None:
        _warn_unknown_base(skeleton, config.task_type is None, peft_saved)
    tensors.update(_suffix_matched_base_modules(root, skeleton, adapter, peft_saved, tensors))
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "rank_pattern": {},  # one rank and one scaling: runtimes that ignore the patterns get the same ΔW
        "alpha_pattern": {},
        "bias": config.bias,
        "modules_to_save": saved_module_paths(adapter) or None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": _all_conv1d(root, adapter),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if peft_config["modules_to_save"] is None:  # (PEFT's default: an adapter without them exports as it always has)
        del peft_config["modules_to_save"]
    # the layers PEFT wraps, where the adapter names them: without them PEFT also wraps every other module of the
    # target names (zero B: the same outputs, but those train when the export is loaded trainable)
    for name in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if getattr(config, name) is not None:
            peft_config[name] = getattr(config, name)
    keep = (model_or_dir, _source_dir(model_or_dir, adapter_name)) if isinstance(model_or_dir, (str, Path)) else ()
    with atomic_directory(out_dir, overwrite=overwrite, keep=keep) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(to_bytes(tensors, {"format": "pt"}))
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        _carry_over(Path(out_dir), tmp)
    return Path(out_dir)


def _carry_over(out: Path, tmp: Path) -> None:
    """Put in ``tmp`` (hard links, or copies where there are none) every entry of the existing output ``out`` but
    the export's own files: ``overwrite`` replaces what the export writes, as ``save_pretrained`` does, and keeps
    what a user put beside it (a README, tokenizer files), which the swap of the whole directory deleted."""
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if (tmp / entry.name).exists() or TMP_MARK in entry.name:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), tmp / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, tmp / entry.name)


def target_name(path: str) -> str:
    """The ``target_modules`` entry of the module at ``path``: its name, with its parents' up to one that is
    not an index (``mlp.down_proj`` → ``down_proj``, ``attn.to_out.0`` → ``to_out.0``): PEFT matches a bare
    index (``"0"``) to every module whose path ends in ``.0`` (``model.layers.0``, a decoder layer it refuses)."""
    parts = path.split(".")
    start = len(parts) - 1
    while start > 0 and parts[start].isdigit():
        start -= 1
    return ".".join(parts[start:])


def _balanced(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A · c, lora_B / c)`` with largest entries within a factor of 2 of each other (the same ``B A``): the
    output scales ``a`` sit in ``B`` and the input scales ``b`` in ``A``, so an adapter with large ``a`` and small
    ``b`` overflowed float16 in ``B`` (or lost its precision in ``A``) while ``B A`` fit. ``c`` is a power of two:
    exact, so float16-representable factors stay so."""
    peak_a, peak_b = float(lora_A.abs().max()), float(lora_B.abs().max())
    if not (peak_a > 0 and peak_b > 0 and math.isfinite(peak_a) and math.isfinite(peak_b)):
        return lora_A, lora_B  # (zero or non-finite: left to _in_range)
    c = 2.0 ** round(math.log2(peak_b / peak_a) / 2)
    return lora_A * c, lora_B / c


def _at_rank(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` zero-padded to ``rank`` (rows of ``A``, columns of ``B``): the same ``B A``."""
    pad = rank - lora_A.shape[0]
    if pad == 0:
        return lora_A, lora_B
    return torch.nn.functional.pad(lora_A, (0, 0, 0, pad)), torch.nn.functional.pad(lora_B, (0, pad))


def saved_module_paths(adapter: AdapterState) -> list[str]:
    """The ``modules_to_save`` of the export: the paths of the modules whose tensors the adapter trains in full
    (its ``modules_to_save`` and task heads). lordba matches an entry to whole path components, PEFT to a plain
    suffix (``norm`` is every ``*_layernorm`` too, whose tensors the file would lack: PEFT's load fails), so the
    export names each saved module by its path; an entry without tensors (nothing trainable) is left out."""
    entries = [entry.split(".") for entry in adapter.config.saved_modules]
    found = []
    for name in adapter.extras:
        parts = name.split(".")[:-1]  # the module's path, without the parameter's name
        ends = [i + len(e) for e in entries for i in range(len(parts) - len(e) + 1) if parts[i : i + len(e)] == e]
        if ends:
            found.append(".".join(parts[: min(ends)]))  # the outermost saved module holding the tensor
    return sorted(set(found))


def _suffix_matched_base_modules(
    root: torch.nn.Module | None, skeleton: BaseSkeleton | str, adapter: AdapterState, entries: list[str], tensors: dict
) -> dict[str, torch.Tensor]:
    """The base tensors of the modules PEFT also wraps for ``entries`` (the export's ``modules_to_save`` and the
    heads PEFT adds for its ``task_type``) that the export does not carry: PEFT matches an entry to a plain suffix of
    the path, and there is no entry for DistilBERT's ``classifier`` (which ``SEQ_CLS`` adds) that leaves out its
    ``pre_classifier``, whose tensors PEFT's load then needs (``KeyError``). They are the base's own (frozen,
    unchanged: PEFT's outputs stay the adapter's): a ``LoRDBAModel``'s, else read from the checkpoint of the base's
    ``skeleton`` (a warning names those it lacks). None without a base (``root`` None)."""
    if root is None or not entries:
        return {}
    ours = [*adapter.modules, *saved_module_paths(adapter)]
    out, lacking = {}, []
    for name, module in root.named_modules():
        prefix = f"base_model.model.{name}."
        if not name or not any(name.endswith(e) for e in entries) or any(k.startswith(prefix) for k in tensors):
            continue
        if any(type(sub).__module__.startswith("lordba.") for sub in module.modules()):
            continue  # an adapted, saved or quantized module: not a plain base module PEFT can take the tensors of
        if any(p == name or p.startswith(f"{name}.") for p in ours):
            continue  # (the same, in a skeleton: no lordba module there)
        state = module.state_dict() if isinstance(skeleton, str) else skeleton.tensors(name)
        if state is None:
            lacking.append(name)
            continue
        out.update({prefix + k: v.detach().contiguous() for k, v in state.items()})
    if lacking and isinstance(skeleton, BaseSkeleton):
        warnings.warn(
            f"export_lora: PEFT's modules_to_save rule also wraps {', '.join(lacking)} of the base, whose tensors "
            f"the checkpoint in {skeleton.folder} does not hold: PeftModel.from_pretrained of the export fails "
            "(KeyError); export from the LoRDBAModel instead",
            UserWarning,
            stacklevel=3,
        )
    return out


def peft_extras(adapter: AdapterState) -> dict[str, torch.Tensor]:
    """The adapter's tensors trained in full under the names PEFT saves them with: a saved module's
    parameter as ``base_model.model.<module>.<name>``, a trained bias of an adapted layer as
    ``base_model.model.<layer>.base_layer.bias`` (PEFT's LoRA layer wraps the base layer), any other
    trained bias as ``base_model.model.<module>.bias``."""
    out = {}
    for name, value in sorted(adapter.extras.items()):
        module, _, param = name.rpartition(".")
        if param == "bias" and module in adapter.modules:
            name = f"{module}.base_layer.bias"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _non_finite(name)
        out[f"base_model.model.{name}"] = value.contiguous()
    return out


def _base_of(
    model_or_dir: object, adapter: AdapterState, base: str | Path | None
) -> tuple[torch.nn.Module | None, BaseSkeleton | str]:
    """The base model the export reads its layer types and heads off (``None`` where none is known) and, for a
    directory or an ``AdapterState``, its :class:`BaseSkeleton` (else why there is none; ``""`` for a model)."""
    from lordba.nn.model import LoRDBAModel

    if isinstance(model_or_dir, LoRDBAModel):
        if base is not None:
            raise ConfigError(
                "export_lora: base= is for a saved adapter or an AdapterState; a LoRDBAModel's is its own"
            )
        return model_or_dir._root(), ""
    skeleton, why = find_base(adapter, base)
    return (skeleton.root, skeleton) if skeleton is not None else (None, why)


def _warn_unknown_base(why: BaseSkeleton | str, task_type_guessed: bool, peft_saved: list[str]) -> None:
    """Warn that an export without its base model may be wrong, naming how (``why``: why there is no base)."""
    risks = ["fan_in_fan_out is written false (wrong for GPT-2-family Conv1D layers)"]
    if task_type_guessed:
        risks.append("task_type is guessed CAUSAL_LM (wrong for an encoder or a classifier)")
    if peft_saved:
        risks.append(
            f"base tensors of modules PEFT's suffix rule wraps beside {', '.join(peft_saved)} are not carried "
            "(DistilBERT's pre_classifier: PEFT's load fails)"
        )
    warnings.warn(
        f"export_lora: the adapter's base model is unknown ({why}), and so are its layer types and heads: "
        f"{'; '.join(risks)}. Name the base model's folder or hub id with base= (lordba export-lora --base), or "
        "export from the LoRDBAModel",
        UserWarning,
        stacklevel=3,
    )


def _default_task_type(root: torch.nn.Module | None) -> str | None:
    """The ``task_type`` of an adapter whose config has none: ``CAUSAL_LM``, but none (PEFT's own for a config without
    one) for a model that cannot generate (an encoder, a classifier), which PEFT's ``PeftModelForCausalLM`` cannot
    wrap: ``PeftModel.from_pretrained`` failed on the export (``no attribute 'prepare_inputs_for_generation'``).
    ``CAUSAL_LM`` without a base (``root`` None)."""
    if root is None:
        return "CAUSAL_LM"
    return "CAUSAL_LM" if callable(getattr(root, "prepare_inputs_for_generation", None)) else None


def _all_conv1d(root: torch.nn.Module | None, adapter: AdapterState) -> bool:
    """PEFT's ``fan_in_fan_out``: whether every adapted layer of the base is a GPT-2-family ``Conv1D`` (weight
    ``in × out``: a ``LoRDBAModel``'s layer on the ``conv1d`` backend, a skeleton's ``Conv1D``); PEFT warned on
    loading an export written with false and set it true itself. False without a base (``root`` None)."""
    if root is None or not adapter.modules:
        return False
    conv1d = conv1d_class()
    return all(
        getattr(getattr(module, "backend", None), "name", None) == "conv1d"
        or (conv1d is not None and isinstance(module, conv1d))
        for module in (root.get_submodule(p) for p in adapter.modules)
    )


def _warn_quantized_base(quantization: dict | None) -> None:
    """Warn that an adapter trained on the base ``quantization`` describes is exported without that record."""
    if quantization is None:
        return
    warnings.warn(
        f"export_lora: this adapter was trained on a base quantized as {quantization}; its ΔW is fit to that base "
        "and the plain LoRA written cannot record it: a runtime that serves it on another base (vLLM, LoRAX or "
        "llama.cpp on the float or their own quantized weights) gives outputs other than lordba's",
        UserWarning,
        stacklevel=3,
    )


def _in_range(value: torch.Tensor, dtype: str, name: str) -> torch.Tensor:
    """``value`` (float32) cast to ``dtype``; :class:`ConversionError` if it holds NaN or infinite values (a
    diverged adapter) or the cast makes a finite entry infinite."""
    if not bool(torch.isfinite(value).all()):
        raise _non_finite(name)
    cast = value.to(DTYPES[dtype]).contiguous()
    if not bool(torch.isfinite(cast).all()):
        peak = float(value.abs().max())
        raise ConversionError(
            f"cannot export {name} as {dtype}: its largest entry {peak:.4g} exceeds {dtype}'s range "
            f"({torch.finfo(DTYPES[dtype]).max:.4g}); export with dtype='bfloat16' or 'float32' (--dtype)"
        )
    return cast


def _non_finite(name: str) -> ConversionError:
    """The error for a tensor ``name`` holding NaN or infinite values (no export dtype can hold it)."""
    return ConversionError(f"cannot export {name}: it holds NaN or infinite values (a diverged or corrupt adapter)")


def _as_adapter_state(model_or_dir: object, adapter_name: str) -> AdapterState:
    from lordba.nn.model import LoRDBAModel

    if isinstance(model_or_dir, LoRDBAModel):
        return model_or_dir.adapter_state(adapter_name)
    if isinstance(model_or_dir, AdapterState):
        return model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        return read_adapter(_source_dir(model_or_dir, adapter_name))
    raise ConfigError(
        f"export_lora takes a LoRDBAModel, an AdapterState or an adapter directory, got {type(model_or_dir).__name__}"
    )


def _source_dir(directory: str | Path, adapter_name: str) -> Path:
    """The folder of adapter ``adapter_name`` in a saved ``directory``: the directory itself for ``default``, else
    its subfolder ``adapter_name`` (as ``save_pretrained`` writes it); :class:`ConfigError` if there is none."""
    if adapter_name == "default":
        return Path(directory)
    source = Path(directory) / adapter_name
    if not source.is_dir():
        raise ConfigError(
            f"export_lora: no adapter {adapter_name!r} in {directory}: save_pretrained writes it to {source} "
            f"(pass that folder, or adapter_name='default' for {directory} itself)"
        )
    return source
