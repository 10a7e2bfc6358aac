"""``LoRDBAConfig``: what a LoRDBA adapter is (rank, scaling, targets, storage), PEFT-style.

Every field is validated on construction and when read from ``adapter_config.json``; a wrong value
or type raises :class:`~lordba.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError, ConfigError

try:  # the standard library's regex parser (private modules, stable API since 3.11)
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse
from .scales import SCALE_DTYPES
from .ste import STE, STE_KINDS

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
MAX_PATTERN_CHARS = 1024
MAX_UNBOUNDED_REPEATS = 2


@dataclass
class LoRDBAConfig:
    """Configuration of a LoRDBA adapter.

    Args:
        r: rank (inner dimension) of the adapter.
        alpha: scaling numerator; the branch is multiplied by ``s = alpha / r`` (deliberately not
            called ``lora_alpha``, so LoRA loaders refuse LoRDBA directories).
        target_modules: module names to adapt: a list of names or name suffixes, a regular
            expression matched against the full module path, ``"all-linear"`` (every supported
            linear layer but the output head), or ``None`` for ``"all-linear"``.
        exclude_modules: names, suffixes or a regular expression of modules to leave alone.
        rank_pattern: per-module rank overrides, ``{pattern: r}``, patterns as in PEFT
            (a regular expression matched against the end of the module path).
        alpha_pattern: per-module ``alpha`` overrides, same patterns.
        scale_dtype: storage of the scale vectors: ``float32``, ``float16``, ``bfloat16`` or
            ``int8`` (see :mod:`lordba.scales`).
        init: ``"cold"`` (latents ~ N(0, 0.01²), ``b = m = 1``, ``a = 0``: a no-op at step 0) or
            ``"random"`` (the same but ``a`` ~ N(0, 0.01²): a non-trivial adapter, for tests).
        ste: straight-through estimator for the signs: ``"smoothsign"`` or ``"identity"``.
        ste_k: smoothsign sharpness (backward of ``tanh(k x)``).
        ste_clip: clipped-identity range.
        mode: how the adapter was (or will be) trained: ``ptq``, ``qat``, ``qat-from-lora``,
            ``scales-only``.
        latent_dtype: dtype of the latent sign factors while training.
        base_model_name_or_path: the base model this adapter was made for (informational).
    """

    r: int = 16
    alpha: float = 32.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    scale_dtype: str = "float16"
    init: str = "cold"
    ste: str = "smoothsign"
    ste_k: float = 100.0
    ste_clip: float = 1.0
    mode: str = "qat"
    latent_dtype: str = "float32"
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_positive("alpha", self.alpha)
        self.target_modules = _check_modules("target_modules", self.target_modules)
        self.exclude_modules = _check_modules("exclude_modules", self.exclude_modules)
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must be a dict, got {type(self.rank_pattern).__name__}")
        for key, value in self.rank_pattern.items():
            _check_pattern("rank_pattern key", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        if not isinstance(self.alpha_pattern, dict):
            raise ConfigError(f"alpha_pattern must be a dict, got {type(self.alpha_pattern).__name__}")
        for key, value in self.alpha_pattern.items():
            _check_pattern("alpha_pattern key", key)
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

    def save_pretrained(self, directory: str | Path, **extra: Any) -> Path:
        """Write ``adapter_config.json`` (atomically) with ``extra`` keys such as the weights checksum."""
        from .atomic import atomic_write_bytes

        path = Path(directory) / CONFIG_NAME
        text = json.dumps({**self.to_dict(), **extra}, indent=2, sort_keys=False) + "\n"
        atomic_write_bytes(path, text.encode())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LoRDBAConfig:
        """Read and validate ``adapter_config.json`` from an adapter directory."""
        return cls.from_dict(read_config_json(directory), source=str(Path(directory) / CONFIG_NAME))

    def rank_for(self, module_name: str) -> int:
        """The rank of ``module_name`` (``rank_pattern`` first, else ``r``)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def targets_module(self, module_name: str) -> bool:
        """Whether ``target_modules`` covers ``module_name`` (``None`` and ``all-linear`` cover every module)."""
        from .targets import ALL_LINEAR, matches  # lazily: targets imports the layer

        return self.target_modules in (None, ALL_LINEAR) or matches(self.target_modules, module_name)

    def alpha_for(self, module_name: str) -> float:
        """The ``alpha`` of ``module_name`` (``alpha_pattern`` first, else ``alpha``)."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scaling_for(self, module_name: str) -> float:
        """``s = alpha / r`` for ``module_name``."""
        return self.alpha_for(module_name) / self.rank_for(module_name)


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory (errors name the file)."""
    if not Path(directory).is_dir():
        raise AdapterFormatError(f"{directory}: not a directory")
    return read_json_file(Path(directory) / CONFIG_NAME)


def read_json_file(path: Path, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """A size-limited JSON object from ``path``; :class:`AdapterFormatError` naming the file otherwise."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing (not an adapter directory)")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)  # bounded even if the file grows after a stat
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot read ({err.strerror})") from None
    if len(raw) > max_bytes:
        raise AdapterFormatError(f"{path}: larger than the {max_bytes}-byte limit for a config")
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def parse_json(raw: bytes, what: str) -> Any:
    """Strict JSON from untrusted bytes: UTF-8, no NaN/Infinity, no duplicate keys (readers that
    keep the first or the last duplicate would see different files), and every failure, including
    nesting too deep and integers too long to convert, as :class:`AdapterFormatError` naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise AdapterFormatError(f"{what}: not valid JSON ({err})") from None


def _reject_constant(name: str) -> None:
    raise json.JSONDecodeError(f"non-standard constant {name}", name, 0)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return data


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


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


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def safe_repr(value: Any) -> str:
    """A short ``repr`` of an untrusted value for an error message: bounded length and depth,
    and no failure on huge integers (whose ``repr`` raises) or deep nesting."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def _check_pattern(name: str, pattern: Any) -> None:
    """A module-name regular expression must compile and must not backtrack exponentially
    (patterns come from untrusted adapter files and are matched against untrusted module names)."""
    _check_str(name, pattern)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{name} {safe_repr(pattern)}: longer than {MAX_PATTERN_CHARS} characters")
    try:
        re.compile(pattern)
        re.compile(rf"(.*\.)?({pattern})$")  # as config.rank_for/alpha_for match it
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression ({err})") from None
    problem = _backtracking_hazard(parsed, inside_repeat=False, unbounded=[0])
    if problem:
        raise ConfigError(
            f"{name} {pattern!r}: {problem}, which can make matching take exponential or high-polynomial time; "
            "use a plain module name or a simpler pattern"
        )


def _backtracking_hazard(items: Any, inside_repeat: bool, unbounded: list[int]) -> str | None:
    """The first construct of a parsed pattern that risks catastrophic backtracking, if any."""
    repeats = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)}
    for op, av in items:
        sub: list[Any] = []
        nested = inside_repeat
        if op in repeats:
            _, high, body = av
            if high > 1:
                if inside_repeat:
                    return "it nests a repetition inside a repetition"
                if high == _sre.MAXREPEAT:
                    unbounded[0] += 1
                    if unbounded[0] > MAX_UNBOUNDED_REPEATS:
                        return f"it has more than {MAX_UNBOUNDED_REPEATS} unbounded repetitions"
                nested = True
            sub = [body]
        elif op is _sre.BRANCH:
            if inside_repeat:
                return "it repeats an alternation"
            sub = list(av[1])
        elif op is _sre.SUBPATTERN:
            sub = [av[-1]]
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            sub = [av[1]]
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            sub = [av]
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            return "it uses a backreference"
        for part in sub:
            problem = _backtracking_hazard(part, nested, unbounded)
            if problem:
                return problem
    return None


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
        _check_pattern(name, value)
        return value
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else list(value)
        for item in items:
            _check_str(f"{name} entry", item)
        if not items:
            raise ConfigError(f"{name} must not be empty")
        return items
    raise ConfigError(f"{name} must be a list of strings, a string or null, got {type(value).__name__}")
