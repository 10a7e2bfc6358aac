"""``LoRDBAConfig``: what a LoRDBA adapter is (rank, scaling, targets, storage), PEFT-style.

Every field is validated on construction and when read from ``adapter_config.json``; a wrong value
or type raises :class:`~lordba.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lordba._util.jsonio import read_json_file, safe_repr
from lordba._util.patterns import ALL_LINEAR, check_pattern, matches, pattern_key
from lordba.core.scales import SCALE_DTYPES
from lordba.core.ste import STE, STE_KINDS
from lordba.errors import AdapterFormatError, ConfigError

PEFT_TYPE = "LORDBA"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "lordba_model.safetensors"
MODES = ("ptq", "qat", "qat-from-lora", "scales-only")
INITS = ("cold", "random")
LATENT_DTYPES = ("float32", "bfloat16", "float16")
# Keys written by the library beside the dataclass fields.
_FILE_ONLY_KEYS = {"peft_type", "format_version", "weights_sha256", "library_version"}
MAX_RANK = (1 << 31) - 1


@dataclass
class LoRDBAConfig:
    """Configuration of a LoRDBA adapter (PEFT-style: each field's help is in its ``metadata["help"]``).

    Every field is validated on construction; a wrong value or type raises :class:`ConfigError`.
    """

    r: int = field(default=16, metadata={"help": "Rank (inner dimension) of the adapter."})
    alpha: float = field(
        default=32.0,
        metadata={
            "help": "Scaling numerator; the branch is multiplied by ``s = alpha / r`` (deliberately not called "
            "``lora_alpha``, so LoRA loaders refuse LoRDBA directories)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt: a list of names or name suffixes, a regular expression matched "
            "against the full module path, ``'all-linear'`` (every supported linear layer but the output "
            "head), or ``None`` for ``'all-linear'``."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names, suffixes or a regular expression of modules to leave alone."}
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module rank overrides, ``{pattern: r}``, patterns as in PEFT (a regular expression "
            "matched against the end of the module path)."
        },
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module ``alpha`` overrides, same patterns as ``rank_pattern``."}
    )
    scale_dtype: str = field(
        default="float16",
        metadata={
            "help": "Storage of the scale vectors: ``float32``, ``float16``, ``bfloat16`` or ``int8`` "
            "(see :mod:`lordba.core.scales`)."
        },
    )
    init: str = field(
        default="cold",
        metadata={
            "help": "``'cold'`` (latents ~ N(0, 0.01²), ``b = m = 1``, ``a = 0``: a no-op at step 0) or "
            "``'random'`` (the same but ``a`` ~ N(0, 0.01²): a non-trivial adapter, for tests)."
        },
    )
    ste: str = field(
        default="smoothsign",
        metadata={"help": "Straight-through estimator for the signs: ``'smoothsign'`` or ``'identity'``."},
    )
    ste_k: float = field(default=100.0, metadata={"help": "Smoothsign sharpness (backward of ``tanh(k x)``)."})
    ste_clip: float = field(default=1.0, metadata={"help": "Clipped-identity range."})
    mode: str = field(
        default="qat",
        metadata={
            "help": "How the adapter was (or will be) trained: ``ptq``, ``qat``, ``qat-from-lora``, ``scales-only``."
        },
    )
    latent_dtype: str = field(default="float32", metadata={"help": "Dtype of the latent sign factors while training."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The base model this adapter was made for (informational)."}
    )

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_positive("alpha", self.alpha)
        self.target_modules = _check_modules("target_modules", self.target_modules)
        self.exclude_modules = _check_modules("exclude_modules", self.exclude_modules)
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must be a dict, got {type(self.rank_pattern).__name__}")
        for key, value in self.rank_pattern.items():
            check_pattern("rank_pattern key", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        if not isinstance(self.alpha_pattern, dict):
            raise ConfigError(f"alpha_pattern must be a dict, got {type(self.alpha_pattern).__name__}")
        for key, value in self.alpha_pattern.items():
            check_pattern("alpha_pattern key", key)
            _check_positive(f"alpha_pattern[{key!r}]", value)
        _check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _check_choice("init", self.init, INITS)
        _check_choice("ste", self.ste, STE_KINDS)
        _check_positive("ste_k", self.ste_k)
        _check_positive("ste_clip", self.ste_clip)
        _check_choice("mode", self.mode, MODES)
        _check_choice("latent_dtype", self.latent_dtype, LATENT_DTYPES)
        if self.base_model_name_or_path is not None:
            _check_str("base_model_name_or_path", self.base_model_name_or_path)
        self.alpha = float(self.alpha)
        self.ste_k = float(self.ste_k)
        self.ste_clip = float(self.ste_clip)

    @property
    def peft_type(self) -> str:
        """``"LORDBA"``, as written to ``adapter_config.json``."""
        return PEFT_TYPE

    @property
    def ste_spec(self) -> STE:
        """The straight-through estimator this config asks for."""
        return STE(self.ste, self.ste_k, self.ste_clip)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``peft_type`` and ``format_version`` first."""
        return {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> LoRDBAConfig:
        """Build and validate a config from a dict (as read from ``adapter_config.json``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ConfigError(f"{source}: peft_type is {safe_repr(peft_type)}, not {PEFT_TYPE!r}")
        version = data.get("format_version", FORMAT_VERSION)
        if type(version) is not int:
            raise ConfigError(f"{source}: format_version must be an integer, got {safe_repr(version)}")
        if version != FORMAT_VERSION:
            raise AdapterFormatError(
                f"{source}: format_version {version} is not supported (this lordba reads version "
                f"{FORMAT_VERSION}); upgrade lordba to read it"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - _FILE_ONLY_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {safe_repr(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LoRDBAConfig:
        """Read and validate ``adapter_config.json`` from an adapter directory (PEFT's ``LoraConfig.from_pretrained``;
        the config alone: :func:`lordba.format.adapter.read_adapter` also checks it against the weights)."""
        return cls.from_dict(read_config_json(directory), source=str(Path(directory) / CONFIG_NAME))

    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name`` (``rank_pattern`` first, else ``r``)."""
        key = pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def targets_module(self, module_name: str) -> bool:
        """Whether ``target_modules`` covers ``module_name`` (``None`` and ``all-linear`` cover every module)."""
        return self.target_modules in (None, ALL_LINEAR) or matches(self.target_modules, module_name)

    def alpha_for(self, module_name: str) -> float:
        """The ``alpha`` of ``module_name`` (``alpha_pattern`` first, else ``alpha``)."""
        key = pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scaling_for(self, module_name: str) -> float:
        """``s = alpha / r`` for ``module_name``."""
        return self.alpha_for(module_name) / self.rank_for(module_name)


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory (errors name the file)."""
    if not Path(directory).is_dir():
        raise AdapterFormatError(f"{directory}: not a directory")
    return read_json_file(Path(directory) / CONFIG_NAME)


def _check_rank(name: str, value: Any) -> None:
    if type(value) is not int or not 1 <= value <= MAX_RANK:
        raise ConfigError(f"{name} must be a positive integer below 2**31, got {safe_repr(value)}")


def _check_positive(name: str, value: Any) -> None:
    try:
        ok = type(value) in (int, float) and math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be a positive finite number, got {safe_repr(value)}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {type(value).__name__}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices or not isinstance(value, str):
        raise ConfigError(f"{name} must be one of {choices}, got {safe_repr(value)}")


def _check_modules(name: str, value: Any) -> list[str] | str | None:
    if value is None or value == "all-linear":
        return value
    if isinstance(value, str):
        check_pattern(name, value)
        return value
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else list(value)
        for item in items:
            _check_str(f"{name} entry", item)
        if not items:
            raise ConfigError(f"{name} must not be empty")
        return items
    raise ConfigError(f"{name} must be a list of strings, a string or null, got {type(value).__name__}")
