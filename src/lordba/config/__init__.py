"""``LoRDBAConfig``: what a LoRDBA adapter is (rank, scaling, targets, storage), PEFT-style.

Every field is validated on construction and when read from ``adapter_config.json``; a wrong value
or type raises :class:`~lordba.errors.ConfigError` naming the field (the checks of single fields:
:mod:`lordba.config.checks`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lordba._util.files import not_a_directory
from lordba._util.jsonio import read_json_file, safe_repr
from lordba._util.patterns import ALL_LINEAR, check_pattern, matches, pattern_key
from lordba.config.checks import (
    MAX_RANK,  # noqa: F401  (re-exported)
    _check_choice,
    _check_layers,
    _check_layers_pattern,
    _check_modules,
    _check_positive,
    _check_rank,
    _check_str,
    check_base_quantization,
)
from lordba.config.layers import in_layers
from lordba.config.locate import is_hub_id, locate
from lordba.core.scales import SCALE_DTYPES
from lordba.core.ste import STE, STE_KINDS
from lordba.errors import AdapterFormatError, ConfigError, LoRDBAError

PEFT_TYPE = "LORDBA"
FORMAT_VERSION = 1  # files without extra tensors (what every older lordba reads)
EXTRAS_FORMAT_VERSION = 2  # files that also hold extra tensors (modules_to_save weights, trained biases)
COMPACT_FORMAT_VERSION = 3  # one tensor per kind (all modules' sign_A, ...), extras allowed; int4 scales
READABLE_VERSIONS = (FORMAT_VERSION, EXTRAS_FORMAT_VERSION, COMPACT_FORMAT_VERSION)
DEFAULT_FORMAT_VERSION = COMPACT_FORMAT_VERSION  # what saves write unless told otherwise
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "lordba_model.safetensors"
MODES = ("ptq", "qat", "qat-from-lora", "scales-only")
INITS = ("cold", "random")
LATENT_DTYPES = ("float32", "bfloat16", "float16")
# Keys written by the library beside the dataclass fields.
_FILE_ONLY_KEYS = {"peft_type", "format_version", "weights_sha256", "library_version"}
BIAS_MODES = ("none", "lora_only", "all")
# PEFT's task types and the head modules each trains in full (PEFT's classifier_module_names etc.).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}
# Fields added after format version 1: written only when they differ from their defaults, so that an
# adapter that uses none of them keeps the bytes it had before they existed.
_OPTIONAL_FIELDS = {
    "modules_to_save": None,
    "task_type": None,
    "bias": "none",
    "dropout": 0.0,
    "layers_to_transform": None,
    "layers_pattern": None,
    "base_quantization": None,
}


# what to do with another PEFT type's adapter given where a LoRDBA one is read (a LoRA: the common mix-up)
_OTHER_TYPE_HINT = (
    ": a PEFT adapter of another type; load it with PEFT, or convert a LoRA to LoRDBA with "
    "`lordba convert LORA_DIR OUT_DIR` (in Python lordba.convert_lora)"
)


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
            "help": "Storage of the scale vectors: ``float32``, ``float16``, ``bfloat16``, ``int8`` or ``int4`` "
            "(see :mod:`lordba.core.scales`; ``int4`` needs format version 3)."
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
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules (names or name suffixes, as ``target_modules``) trained in full and saved with "
            "the adapter (PEFT's ``modules_to_save``); disabling the adapter runs the original ones."
        },
    )
    task_type: str | None = field(
        default=None,
        metadata={
            "help": "PEFT's task type (``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``, "
            "``SEQ_2_SEQ_LM``, ``FEATURE_EXTRACTION``); ``SEQ_CLS``/``TOKEN_CLS`` also train and save the "
            "``classifier``/``score`` head, ``QUESTION_ANS`` the ``qa_outputs`` head."
        },
    )
    bias: str = field(
        default="none",
        metadata={
            "help": "Which base biases train and are saved with the adapter, as PEFT: ``'none'``, "
            "``'lora_only'`` (those of the adapted layers) or ``'all'`` (every bias of the model)."
        },
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout probability on the branch input while training (PEFT's ``lora_dropout``)."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Only adapt modules of these layer indices (PEFT's rule: the number after "
            "``layers_pattern`` in the module path, e.g. ``model.layers.3.mlp``)."
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name(s) of the module list of the layers (``layers``, ``h``), for ``layers_to_transform``."},
    )
    base_quantization: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "The base quantization the adapter was trained on, as its backend describes it "
            "(``{'backend': 'hqq', 'bits': 4, 'group_size': 64}``), or null for an unquantized base; a load "
            "onto a base quantized otherwise warns."
        },
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> LoRDBAConfig:  # PEFT's and unknown names get a clear error
        from lordba.config.peft_fields import HINTS, RENAMED, peft_field_error, unknown_field_error

        names = {f.name for f in fields(cls)}
        for name in kwargs:
            if name in RENAMED or name in HINTS:
                raise peft_field_error(name)
            if name not in names:
                raise unknown_field_error(name, names)
        return super().__new__(cls)

    @classmethod
    def from_peft(cls, lora_config: Any) -> LoRDBAConfig:
        """The LoRDBA config of a PEFT ``LoraConfig`` (or its dict): the same target modules, ranks, ``alpha``
        (``lora_alpha``), ``dropout`` (``lora_dropout``), patterns, layers, ``modules_to_save``, ``bias`` and
        ``task_type``; LoRDBA's own fields at their defaults.

        Raises:
            ConfigError: a field LoRDBA has no counterpart for is set (``use_dora``, ``use_rslora``, ...), or
                ``target_modules`` is not (PEFT's per-model default is not LoRDBA's), naming it.
        """
        from lordba.config.peft_fields import lordba_kwargs

        return cls(**lordba_kwargs(lora_config))

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_positive("alpha", self.alpha)
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR  # PEFT's shorthand, in any case ("ALL-LINEAR")
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
        self._check_peft_fields()
        self.alpha = float(self.alpha)
        self.ste_k = float(self.ste_k)
        self.ste_clip = float(self.ste_clip)

    def _check_peft_fields(self) -> None:
        """Validate the PEFT-named fields (``modules_to_save`` ... ``base_quantization``)."""
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ConfigError("modules_to_save must be a list of module names, got a string")
            self.modules_to_save = _check_modules("modules_to_save", self.modules_to_save)
        if self.task_type is not None:
            _check_choice("task_type", self.task_type, tuple(TASK_HEADS))
        _check_choice("bias", self.bias, BIAS_MODES)
        try:
            ok = type(self.dropout) in (int, float) and 0.0 <= self.dropout < 1.0
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"dropout must be a number in [0, 1), got {safe_repr(self.dropout)}")
        self.dropout = float(self.dropout)
        self.layers_to_transform = _check_layers(self.layers_to_transform)
        self.layers_pattern = _check_layers_pattern(self.layers_pattern)
        if self.layers_pattern is not None and self.layers_to_transform is None:  # PEFT: alone it selects nothing
            raise ConfigError("layers_pattern is given without layers_to_transform: give the layer indices too")
        self.base_quantization = check_base_quantization(self.base_quantization)

    @property
    def saved_modules(self) -> list[str]:
        """Module names trained in full and saved with the adapter: ``modules_to_save`` and the task's heads."""
        return list(dict.fromkeys([*(self.modules_to_save or []), *TASK_HEADS.get(self.task_type or "", ())]))

    def in_layers(self, module_name: str, legacy: bool = False) -> bool:
        """Whether ``module_name`` is in ``layers_to_transform`` (PEFT's rule; True when it is unset; ``legacy``:
        checking a file, where lordba's earlier index rule counts too): :func:`lordba.config.layers.in_layers`."""
        return in_layers(self.layers_to_transform, self.layers_pattern, self.target_modules, module_name, legacy)

    @property
    def peft_type(self) -> str:
        """``"LORDBA"``, as written to ``adapter_config.json``."""
        return PEFT_TYPE

    @property
    def ste_spec(self) -> STE:
        """The straight-through estimator this config asks for."""
        return STE(self.ste, self.ste_k, self.ste_clip)

    def to_dict(self, format_version: int = FORMAT_VERSION) -> dict[str, Any]:
        """JSON-ready dict, with ``peft_type`` and ``format_version`` first; the fields added after
        version 1 (``modules_to_save`` ... ``base_quantization``) only where they are not their defaults."""
        data = {k: v for k, v in asdict(self).items() if k not in _OPTIONAL_FIELDS or v != _OPTIONAL_FIELDS[k]}
        return {"peft_type": PEFT_TYPE, "format_version": format_version, **data}

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> LoRDBAConfig:
        """Build and validate a config from a dict (as read from ``adapter_config.json``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ConfigError(
                f"{source}: peft_type is {safe_repr(peft_type)}, not {PEFT_TYPE!r}"
                + (_OTHER_TYPE_HINT if isinstance(peft_type, str) else "")
            )
        version = data.get("format_version", FORMAT_VERSION)
        if type(version) is not int:
            raise ConfigError(f"{source}: format_version must be an integer, got {safe_repr(version)}")
        if version not in READABLE_VERSIONS:
            raise AdapterFormatError(
                f"{source}: format_version {version} is not supported (this lordba reads versions "
                f"{list(READABLE_VERSIONS)}); upgrade lordba to read it"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - _FILE_ONLY_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {safe_repr(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("layers_to_transform") is None:  # written before that was refused: it had no effect
            kwargs.pop("layers_pattern", None)
        try:
            config = cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        config.file_version = version  # not a field: the weights file must say the same version
        return config

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        subfolder: str | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> LoRDBAConfig:
        """Read and validate ``adapter_config.json`` from an adapter directory or a Hugging Face Hub repo id, in
        its ``subfolder`` if given (PEFT's ``PeftConfig.from_pretrained``; the Hub keywords of
        ``LoRDBAModel.from_pretrained``, read as it reads them: :func:`~lordba.config.locate.locate`; the config
        alone: :func:`lordba.format.adapter.read_adapter` also checks it against the weights).

        Raises:
            AdapterFormatError: a local directory that is none, or without the file; a Hub id that cannot be read
                (offline and not cached, unknown) or whose repo has no config, naming the id and file (as the
                model's loaders say it). ConfigError: a config that is invalid.
        """
        hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        folder = locate(directory, [CONFIG_NAME], subfolder=subfolder, stacklevel=2, **hub)
        path = folder / CONFIG_NAME
        if is_hub_id(directory) and not path.is_file():
            where = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
            raise AdapterFormatError(f"Hub repo {directory!r} (revision {revision or 'main'}) has no {where}")
        return cls.from_dict(read_config_json(folder), source=str(path))

    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name`` (``rank_pattern`` first, else ``r``)."""
        key = pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def targets_module(self, module_name: str, legacy: bool = False) -> bool:
        """Whether ``target_modules`` covers ``module_name`` (``None`` and ``all-linear`` cover every module;
        ``legacy``: as :meth:`in_layers`)."""
        if not self.in_layers(module_name, legacy):
            return False
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
        raise AdapterFormatError(not_a_directory(directory))
    return read_json_file(Path(directory) / CONFIG_NAME)


def recorded_base_quantization(directory: str | Path) -> dict[str, Any] | None:
    """The ``base_quantization`` an adapter directory's config records (its config alone is read); None where it
    records none, or its config cannot be read (the loader reports that when the adapter is loaded)."""
    try:
        return check_base_quantization(read_json_file(Path(directory) / CONFIG_NAME).get("base_quantization"))
    except (LoRDBAError, AttributeError):  # (AttributeError: a config that is no JSON object)
        return None
