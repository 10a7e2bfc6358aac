"""Read a PEFT LoRA adapter (a saved directory or an in-memory ``peft.PeftModel``) for conversion.

Directory: ``adapter_config.json`` plus ``adapter_model.safetensors``. A pickle
``adapter_model.bin`` is refused unless ``allow_pickle=True`` (then ``torch.load(weights_only=True)``;
the files: :mod:`lordba.convert.peft_files`).
Keys ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``, also with an adapter name
(``lora_A.<name>.weight``). Per module: the rank from the tensors (checked against ``r`` /
``rank_pattern``), ``alpha`` from ``lora_alpha`` / ``alpha_pattern`` (PEFT's pattern matching), and
PEFT's scaling ``alpha / r`` or, with ``use_rslora``, ``alpha / √r``.

Refused, with a :class:`~lordba.errors.ConversionError` or :class:`~lordba.errors.AdapterFormatError`
naming the file, tensor or field: other PEFT types (LoHa, LoKr, IA³, ...); **DoRA** (not supported:
its update rescales the columns of ``W + s·BA`` by a trained magnitude, so it depends on the base
weights and is not a low-rank additive delta); LoRA variants whose forward is not ``s·BA`` (QA-LoRA,
aLoRA, LoRA bias, ...); embedding / convolution LoRA and extra trained tensors (``modules_to_save``,
trainable tokens), unless ``skip_unsupported=True`` (then they are left out with a warning);
NaN/inf factors; rank mismatches; merged adapters of a ``PeftModel``. The PEFT side is validated as
strictly as lordba's own files (:mod:`lordba.convert.peft_checks`): field types and ranges, patterns
(RE2, linear time), module paths a LoRDBA file can hold, empty or overflowing factors, and
PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA initialisations (their factors need a residual base).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lordba._util.jsonio import read_json_file, safe_repr
from lordba._util.patterns import pattern_key
from lordba.config import TASK_HEADS, LoRDBAConfig
from lordba.convert.peft_checks import check_factors, check_init, check_numbers, check_path, check_patterns
from lordba.convert.peft_files import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, _load_tensors, _resolve_dir  # noqa: F401
from lordba.errors import ConfigError, ConversionError

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# Config fields that change LoRA's forward away from ``s · B A`` (name → what it is).
_VARIANTS = {
    "use_dora": "DoRA (its update depends on the base weights and is not a low-rank delta)",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "lora_bias": "LoRA bias (lora_B has a bias)",
    "alora_invocation_tokens": "aLoRA (activated by invocation tokens)",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


@dataclass
class LoraLayer:
    """One LoRA module: ``ΔW = scaling · B A`` (float32 factors)."""

    path: str
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    r: int
    alpha: float
    scaling: float

    @property
    def in_features(self) -> int:
        """Input features (columns of ``A``)."""
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        """Output features (rows of ``B``)."""
        return self.B.shape[0]


@dataclass
class LoraAdapter:
    """A whole LoRA adapter: its layers (sorted by path) and the PEFT config fields that matter."""

    layers: dict[str, LoraLayer]
    r: int
    alpha: float
    use_rslora: bool
    base_model_name_or_path: str | None
    source: str
    # PEFT fields carried into the LoRDBA config (modules_to_save, task_type, bias, dropout, layers_*)
    fields: dict[str, Any] = field(default_factory=dict)
    # tensors trained in full (modules_to_save weights, trained biases), {parameter path: tensor}
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_config(cfg: dict[str, Any], where: str, skip_unsupported: bool) -> tuple[int, float, bool]:
    peft_type = cfg.get("peft_type")
    if peft_type == "LORDBA":
        raise ConversionError(f"{where}: this is already a LoRDBA adapter (peft_type LORDBA), nothing to convert")
    if peft_type != "LORA":
        raise ConversionError(
            f"{where}: peft_type is {safe_repr(peft_type)}; only LoRA adapters (peft_type 'LORA') can be converted"
        )
    for name, what in _VARIANTS.items():
        if cfg.get(name):
            raise ConversionError(f"{where}: {name}={safe_repr(cfg[name])}: {what} is not supported by the conversion")
    check_init(cfg, where)
    r, alpha, rslora = check_numbers(cfg, where)
    check_patterns(cfg, where)
    extra = [n for n in ("trainable_token_indices",) if cfg.get(n)]
    if extra and not skip_unsupported:
        raise ConversionError(
            f"{where}: {', '.join(f'{n}={safe_repr(cfg[n])}' for n in extra)}: fully trained modules/tokens cannot be "
            "represented by a LoRDBA adapter (pass skip_unsupported=True / --skip-unsupported to leave them out)"
        )
    return r, alpha, rslora


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _widened(t: torch.Tensor) -> torch.Tensor:
    """A float8 factor (safetensors' F8_E4M3 / F8_E5M2) in float32, which every value of it fits, since torch has
    no finiteness check or maximum for float8; other tensors as they are (a float64 factor's magnitude is checked
    before it is narrowed)."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def _layer(
    path: str, A: torch.Tensor, B: torch.Tensor, names: tuple[str, str], cfg: dict[str, Any], where: str
) -> LoraLayer:
    r_cfg, alpha, rslora = cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]
    check_path(path, where)
    A, B = _widened(A), _widened(B)
    for t, name in ((A, names[0]), (B, names[1])):
        if t.dim() != 2:
            raise ConversionError(
                f"{where}: tensor {name} has shape {tuple(t.shape)}: only linear LoRA (2-D factors) can be "
                "converted (convolution LoRA is not supported)"
            )
        if not t.is_floating_point():
            raise ConversionError(f"{where}: tensor {name} has dtype {t.dtype}, expected a float dtype")
        if not bool(torch.isfinite(t).all()):
            raise ConversionError(f"{where}: tensor {name} holds NaN or infinite values")
    if A.shape[0] != B.shape[1]:
        raise ConversionError(
            f"{where}: tensors {names[0]} {tuple(A.shape)} and {names[1]} {tuple(B.shape)} disagree on the rank"
        )
    key = pattern_key(cfg["rank_pattern"], path)
    expected = int(cfg["rank_pattern"][key]) if key is not None else r_cfg
    if A.shape[0] != expected:
        source = f"rank_pattern[{key!r}]" if key is not None else "r"
        raise ConversionError(
            f"{where}: tensor {names[0]} has rank {A.shape[0]} but adapter_config.json gives module {path!r} "
            f"rank {expected} ({source})"
        )
    key = pattern_key(cfg["alpha_pattern"], path)
    a = float(cfg["alpha_pattern"][key]) if key is not None else alpha
    scaling = _scaling(a, expected, rslora)
    check_factors(path, A, B, names, scaling, where)
    return LoraLayer(path, A.float(), B.float(), expected, a, scaling)


_CONVOLUTION = "convolution LoRA layers (factors of more than 2 dimensions; only linear LoRA can be converted)"


def _linear(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether a module's factors are a linear LoRA's (2-D; a convolution LoRA's are 3-D to 5-D)."""
    return A.dim() == 2 and B.dim() == 2


def _left_out_biases(extras: dict[str, torch.Tensor], paths: list[str], fields: dict[str, Any]) -> None:
    """Drop from ``extras`` the trained biases of the LoRA layers ``paths`` left out, where ``bias="lora_only"``
    trained them as part of those layers (kept, the layer's bias changed without its LoRA: half of its update)."""
    if fields.get("bias") == "lora_only":
        for path in paths:
            extras.pop(f"{path}.bias", None)


def _unsupported(names: list[str], where: str, skip: bool, why: str) -> None:
    if not names:
        return
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if not skip:
        raise ConversionError(
            f"{where}: {why}: {shown} (pass skip_unsupported=True / --skip-unsupported to leave them out)"
        )
    warnings.warn(f"{where}: leaving out {why}: {shown}", stacklevel=3)


def _tying(cfg: dict[str, Any]) -> str:
    """What an adapter saved with ``ensure_weight_tying`` adds to the reason its extra tensors are refused."""
    if not cfg.get("ensure_weight_tying"):
        return ""
    return (
        " (ensure_weight_tying=True: PEFT added copies for the embedding / output head tied to the adapter's, which "
        "a LoRDBA adapter cannot tie: convert an adapter trained with ensure_weight_tying=False, or leave them out "
        "and the tied module keeps its base weights)"
    )


def read_peft_dir(
    source: str | Path, adapter_name: str = "default", allow_pickle: bool = False, skip_unsupported: bool = False
) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory."""
    directory = _resolve_dir(Path(source), adapter_name)
    config_path = directory / CONFIG_NAME
    cfg = read_json_file(config_path)
    r, alpha, rslora = _check_config(cfg, str(config_path), skip_unsupported)
    tensors, weights_path = _load_tensors(directory, allow_pickle)
    where = str(weights_path)
    dora = sorted(k for k in tensors if "lora_magnitude_vector" in k)
    if dora:
        raise ConversionError(
            f"{where}: tensor {dora[0]}: DoRA magnitude vectors found; DoRA is not supported (its update depends "
            "on the base weights and is not a low-rank delta)"
        )
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapters_seen: set[str] = set()
    other: list[str] = []
    for key in sorted(tensors):
        match = _KEY.match(key)
        if match is None:
            other.append(key)
            continue
        if match["adapter"] is not None:
            adapters_seen.add(match["adapter"])
            if match["adapter"] != adapter_name:
                continue
        pair = factors.setdefault(match["path"], {})
        if match["factor"] in pair:  # (with and without base_model.model. or the adapter's name): PEFT loads one
            raise ConversionError(
                f"{where}: tensors {pair[match['factor']][0]} and {key}: two tensors for one factor of module "
                f"{match['path']!r} (which one a loader uses differs)"
            )
        pair[match["factor"]] = (key, tensors[key])
    if adapters_seen and adapter_name not in adapters_seen:
        raise ConversionError(f"{where}: no tensors for adapter {adapter_name!r}; the file has {sorted(adapters_seen)}")
    if adapter_name != "default" and not adapters_seen and directory.name != adapter_name:  # PEFT's default adapter
        named = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}"))
        raise ConversionError(
            f"{source}: no adapter {adapter_name!r} (no subfolder {adapter_name!r}; the adapter at the top is PEFT's "
            f"'default', its tensors name no adapter); adapters in subfolders: {named}"
        )
    fields = peft_fields(cfg, str(config_path))
    extras, other = _extras(tensors, other, fields, adapter_name)
    copies = {f"base_model.model.{path}.base_layer.weight" for path in factors}
    if any(key in copies for key in other):  # lm_head: PEFT saves its base weight (save_embedding_layers)
        other = [key for key in other if key not in copies]
        warnings.warn(
            f"{where}: leaving out the base weights PEFT saved beside a LoRA on an output head or embedding "
            "(save_embedding_layers); the converted adapter applies to the base model's own weights",
            stacklevel=2,
        )
    _unsupported(other, where, skip_unsupported, "tensors that are not linear LoRA factors" + _tying(cfg))
    full = {"r": r, "lora_alpha": alpha, "use_rslora": rslora, **_patterns(cfg)}
    layers = {}
    for path in sorted(factors):
        pair = factors[path]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ConversionError(f"{where}: module {path!r} has no {missing} tensor")
    convolutions = [path for path in sorted(factors) if not _linear(factors[path]["A"][1], factors[path]["B"][1])]
    _unsupported(convolutions, where, skip_unsupported, _CONVOLUTION)
    _left_out_biases(extras, convolutions, fields)
    for path in sorted(set(factors) - set(convolutions)):
        (name_A, A), (name_B, B) = factors[path]["A"], factors[path]["B"]
        layers[path] = _layer(path, A, B, (name_A, name_B), full, where)
    if not layers:
        raise ConversionError(f"{where}: no LoRA factors (lora_A/lora_B weights) found")
    base = cfg.get("base_model_name_or_path")
    base = base if isinstance(base, str) else None
    return LoraAdapter(layers, r, alpha, rslora, base, str(directory), fields, extras)


_PEFT_FIELDS = {
    "modules_to_save": "modules_to_save",
    "task_type": "task_type",
    "bias": "bias",
    "lora_dropout": "dropout",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
}


def peft_fields(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The PEFT config fields a LoRDBA config carries over (``lora_dropout`` as ``dropout``), checked by
    :class:`~lordba.config.LoRDBAConfig`'s rules; raises :class:`ConversionError` naming the field."""
    out = {ours: cfg[theirs] for theirs, ours in _PEFT_FIELDS.items() if cfg.get(theirs) not in (None, [], "")}
    if out.get("task_type") == "CAUSAL_LM":
        out.pop("task_type")  # what export_lora writes for an adapter without one (others: the export's PEFT class)
    if "layers_to_transform" not in out:
        out.pop("layers_pattern", None)  # alone it selected nothing (older PEFT wrote it so; ours refuses it)
    try:
        LoRDBAConfig(**out)
    except ConfigError as err:
        raise ConversionError(f"{where}: {err}") from None
    return out


def _extras(
    tensors: dict[str, torch.Tensor], keys: list[str], fields: dict[str, Any], adapter_name: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split the non-LoRA tensor keys into extras (weights of modules trained in full, trained biases)
    and the rest (``(extras by parameter path, other keys)``). A module is trained in full by PEFT's rule
    (``_set_trainable``): its path ends with a ``modules_to_save`` entry or a task's head as a plain string
    (``classifier`` also takes DistilBERT's ``pre_classifier``, which PEFT trains and saves), with all its
    submodules (RoBERTa's ``classifier.dense``, ``classifier.out_proj``). Left out of both: the biases of the
    original module kept in PEFT's wrapper (``<head>.original_module.<...>.bias``, saved under ``bias="all"``)."""
    saved = [*(fields.get("modules_to_save") or []), *TASK_HEADS.get(fields.get("task_type") or "", ())]
    extras, rest = {}, []
    for key in keys:
        name = key.removeprefix("base_model.model.").replace(f".modules_to_save.{adapter_name}.", ".")
        head, copy, param = name.rpartition(".modules_to_save.")
        if copy and "." not in param:  # bias="all": a saved module's own bias, the adapter name taken out by PEFT
            name = f"{head}.{param}"
        name = name.replace(".base_layer.", ".")  # a trained bias of a LoRA layer
        wrapper, inside, _ = name.partition(".original_module.")
        if inside and _in_saved(wrapper, saved):
            continue  # bias="all" saves the base's own copy in PEFT's wrapper too; the adapter never uses it
        module, _, param = name.rpartition(".")
        trained_bias = param == "bias" and fields.get("bias", "none") != "none"
        if module and (trained_bias or _in_saved(module, saved)) and tensors[key].is_floating_point():
            extras[name] = tensors[key].detach().clone()
        else:
            rest.append(key)
    return extras, rest


def _in_saved(module: str, saved: list[str]) -> bool:
    """Whether ``module`` or a module above it ends with one of ``saved`` (PEFT's plain-suffix rule)."""
    parts = module.split(".")
    return any(".".join(parts[:i]).endswith(m) for i in range(1, len(parts) + 1) for m in saved)


def _patterns(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return check_patterns(cfg, "PEFT config")


def read_peft_model(model: Any, adapter_name: str | None = None, skip_unsupported: bool = False) -> LoraAdapter:
    """Read the LoRA factors of an in-memory ``peft.PeftModel`` (default: its one active adapter; refused
    with several active, whose sum no one of them is), with the tensors it trains in full
    (``modules_to_save``, biases) as PEFT would save them."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    name = adapter_name
    if name is None:
        active = list(getattr(model, "active_adapters", None) or [model.active_adapter])
        if len(active) != 1:
            raise ConversionError(f"PeftModel has several active adapters {active}; pass adapter_name to pick one")
        name = active[0]
    if name not in model.peft_config:
        raise ConversionError(f"PeftModel has no adapter {name!r}; it has {sorted(model.peft_config)}")
    cfg = model.peft_config[name].to_dict()
    cfg["peft_type"] = str(getattr(cfg["peft_type"], "value", cfg["peft_type"]))
    where = f"PeftModel adapter {name!r}"
    r, alpha, rslora = _check_config(cfg, where, skip_unsupported)
    root = model.base_model.model
    layers: dict[str, LoraLayer] = {}
    other: list[str] = []
    convolutions: list[str] = []
    fields = peft_fields(cfg, where)
    # without the base weights of targeted embedding layers / lm_head, which are no adapter tensors
    saved = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    extras, rest = _extras(saved, [k for k in saved if _KEY.match(k) is None], fields, name)
    for path, module in root.named_modules():
        if not isinstance(module, PeftLoraLayer):
            continue
        if name in getattr(module, "lora_embedding_A", {}):
            other.append(path)
            continue
        if name not in module.lora_A:
            continue
        if name in getattr(module, "merged_adapters", []):
            raise ConversionError(f"{where}: module {path!r} has the adapter merged into its base; unmerge it first")
        A, B = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
        if not _linear(A, B):
            convolutions.append(path)
            continue
        pair = (f"{path}.lora_A.{name}.weight", f"{path}.lora_B.{name}.weight")
        layer = _layer(
            path, A, B, pair, {"r": A.shape[0], "lora_alpha": alpha, "use_rslora": rslora, **_patterns({})}, where
        )
        layer.alpha = float(module.lora_alpha[name])
        layer.scaling = float(module.scaling[name])
        layers[path] = layer
    _unsupported(convolutions, where, skip_unsupported, _CONVOLUTION)
    _left_out_biases(extras, convolutions, fields)
    _unsupported(sorted(set(other)), where, skip_unsupported, "modules that are not linear LoRA layers" + _tying(cfg))
    inside = tuple(f"base_model.model.{path}." for path in other)  # their tensors: named above
    rest = [key for key in rest if not key.startswith(inside)]
    _unsupported(rest, where, skip_unsupported, "tensors that are not linear LoRA factors" + _tying(cfg))
    if not layers:
        raise ConversionError(f"{where}: no LoRA linear layers found")
    base = cfg.get("base_model_name_or_path")
    base = base if isinstance(base, str) else None
    return LoraAdapter(dict(sorted(layers.items())), r, alpha, rslora, base, where, fields, extras)
