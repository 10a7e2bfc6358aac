"""Module-name patterns with PEFT's semantics, checked before use (patterns come from untrusted files).

* ``target_modules`` / ``exclude_modules``: a list of names (a module matches if its path equals an
  entry or ends with ``"." + entry``), or a string: a regular expression that must match the whole path;
* ``rank_pattern`` / ``alpha_pattern`` keys: a regular expression matched against the end of the
  path, after a ``.`` (PEFT's ``get_pattern_key``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lordba._util.jsonio import safe_repr
from lordba.errors import ConfigError

try:  # the standard library's regex parser (private modules, stable API since 3.11)
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

ALL_LINEAR = "all-linear"
MAX_PATTERN_CHARS = 1024
MAX_UNBOUNDED_REPEATS = 2


def matches(spec: Sequence[str] | str | None, name: str) -> bool:
    """True if module path ``name`` matches a target/exclude ``spec`` (``None`` matches nothing)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``module_name``
    (after a ``.``), or ``None``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def check_pattern(name: str, pattern: Any) -> None:
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
