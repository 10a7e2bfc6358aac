"""A PEFT ``LoraConfig`` as a :class:`~lordba.config.LoRDBAConfig`: the fields both have, under LoRDBA's names
(``lora_alpha`` → ``alpha``, ``lora_dropout`` → ``dropout``), and a refusal naming any other field set to other than
PEFT's default (a LoRA variant or an option LoRDBA has no counterpart for: dropped silently, it would train
another adapter than the one asked for)."""

from __future__ import annotations

from typing import Any

from lordba._util.jsonio import safe_repr
from lordba.errors import ConfigError

# LoraConfig field -> LoRDBAConfig field
RENAMED = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
SAME = (
    "r",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "task_type",
    "bias",
    "layers_to_transform",
    "layers_pattern",
    "base_model_name_or_path",
)
# fields with no bearing on the adapter trained (bookkeeping, or what lordba finds from the model itself)
IGNORED = ("peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "fan_in_fan_out")
HINTS = {
    "use_rslora": "rank-stabilised scaling: give alpha = lora_alpha · √r for the same scale",
    "use_dora": "DoRA has no LoRDBA counterpart",
    "init_lora_weights": "LoRDBA initialises its own way (LoRDBAConfig.init)",
}


def peft_field_error(name: str) -> ConfigError:
    """The error for a LoraConfig field given to ``LoRDBAConfig(...)`` (a dataclass ``TypeError`` before)."""
    new = RENAMED.get(name)
    where = f"LoRDBA's field is {new!r}" if new else HINTS.get(name, "LoRDBAConfig has no such field")
    return ConfigError(
        f"LoRDBAConfig({name}=...) is a PEFT LoraConfig field: {where}; LoRDBAConfig.from_peft(lora_config) "
        "converts a whole LoraConfig"
    )


ALIASES = {"rank": "r", "lora_r": "r", "targets": "target_modules", "target_module": "target_modules"}


def unknown_field_error(name: str, names: set[str]) -> ConfigError:
    """The error for an argument ``LoRDBAConfig`` has no field for (a dataclass ``TypeError`` before), naming the
    closest field (a usual other name, or the nearest spelling) and all of them."""
    import difflib

    near = ALIASES.get(name) or next(iter(difflib.get_close_matches(name, sorted(names), n=1)), None)
    hint = f" (did you mean {near!r}?)" if near in names else ""
    return ConfigError(f"LoRDBAConfig has no field {safe_repr(name)}{hint}; its fields: {', '.join(sorted(names))}")


def lordba_kwargs(lora: Any) -> dict[str, Any]:
    """The ``LoRDBAConfig`` arguments of ``lora`` (a ``peft.LoraConfig`` or its dict, as in ``adapter_config.json``).

    Raises:
        ConfigError: a field LoRDBA has no counterpart for is set to other than PEFT's default, naming it.
    """
    values = lora.to_dict() if hasattr(lora, "to_dict") else lora
    if not isinstance(values, dict):
        raise ConfigError(f"from_peft takes a peft LoraConfig or its dict, got {type(lora).__name__}")
    peft_type = str(values.get("peft_type") or "LORA").rsplit(".", 1)[-1]
    if peft_type != "LORA":
        raise ConfigError(f"from_peft: a config of peft_type {peft_type!r}, not a LoRA's")
    defaults = _lora_defaults()
    out: dict[str, Any] = {}
    if values.get("target_modules") is None:
        raise ConfigError(
            "from_peft: LoraConfig.target_modules is not set (PEFT then adapts its per-model default, q_proj and "
            "v_proj on a Llama; LoRDBA every linear layer): name the modules, or 'all-linear'"
        )
    for key, value in values.items():
        if key in SAME or key in RENAMED:
            out[RENAMED.get(key, key)] = _plain(value)
        elif key not in IGNORED and _plain(value) != _plain(defaults.get(key)) and (key in defaults or value):
            hint = HINTS.get(key, "LoRDBA has no counterpart")
            raise ConfigError(f"from_peft: LoraConfig.{key}={safe_repr(value)} is not supported ({hint})")
    for key in ("rank_pattern", "alpha_pattern"):
        if not out.get(key):
            out.pop(key, None)
    return {k: v for k, v in out.items() if v is not None}


def _plain(value: Any) -> Any:
    """PEFT keeps module-name lists as sets and task types as enums: as JSON has them."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", value)


def _lora_defaults() -> dict[str, Any]:
    try:
        from peft import LoraConfig
    except ImportError:  # a dict given without peft installed: a field not mapped is refused unless falsy
        return {}
    return LoraConfig().to_dict()
