"""Module-name patterns with PEFT's semantics, matched in linear time (patterns come from untrusted files).

* ``target_modules`` / ``exclude_modules``: a list of names (a module matches if its path equals an
  entry or ends with ``"." + entry``), or a string: a regular expression that must match the whole path;
* ``rank_pattern`` / ``alpha_pattern`` keys: a regular expression matched against the end of the
  path, after a ``.`` (PEFT's ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", path)``).

Every regular expression runs in RE2 (``google-re2``), whose matching time is linear in the length
of the path whatever the pattern: no pattern from a file can make a load hang, so there is no
backtracking guard to keep in step with Python's engine. RE2 has no backreferences or lookaround;
such a pattern is refused with a :class:`~lordba.errors.ConfigError` naming the field, as is one
longer than :data:`MAX_PATTERN_CHARS` characters or whose compiled program needs more than
:data:`MAX_PROGRAM_BYTES` (large counted repeats such as ``[a-z]{0,1000}`` repeated): compiling
and matching any accepted pattern takes well under a second.

RE2's ``\\w``, ``\\d``, ``\\s`` and ``\\b`` (and their negations) are ASCII, Python's (PEFT's) Unicode: they
agree on ASCII names (every name an adapter file can hold), and a pattern using one is refused with a
:class:`~lordba.errors.ConfigError` naming it and the module when matched against a name with non-ASCII
characters, where the two engines could pick different modules. Case-insensitive matching (``(?i)``) agrees too
but for one class: Python's re takes ``İ`` (U+0130) and ``ı`` (U+0131) as case variants of ``i``, RE2 does not
(every other character's case variants are the same in both); a case-insensitive pattern is refused the same way
when the module name has one of them, or the pattern has a character from U+0130 on (``İ``, ``ı``, or a range
reaching them) and the name an ``i`` or ``I``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import re2

from lordba._util.jsonio import safe_repr
from lordba.errors import ConfigError

ALL_LINEAR = "all-linear"
MAX_PATTERN_CHARS = 1024
MAX_PROGRAM_BYTES = 1 << 18  # RE2's memory for one compiled pattern: bounds its compile and match time
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print every refused pattern to stderr
_OPTIONS.max_mem = MAX_PROGRAM_BYTES


def matches(spec: Sequence[str] | str | None, name: str) -> bool:
    """True if module path ``name`` matches a target/exclude ``spec`` (``None`` matches nothing).

    A string is a regular expression that must match all of ``name``; a list matches an equal entry
    or a ``"." + entry`` suffix. Raises :class:`ConfigError` for a string that is not a valid RE2
    pattern (patterns are checked by :func:`check_pattern` when a config is built).
    """
    if spec is None:
        return False
    if isinstance(spec, str):
        return _search(spec, "full", name)
    return any(name == t or name.endswith("." + t) for t in spec)


def path_key(path: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that :func:`pattern_key` (and PEFT) matches with
    ``path`` alone: the escaped path anchored at the start (a bare ``blocks\\.0\\.proj`` matches
    ``inner.blocks.0.proj`` too, keys match the end of a name after a ``.``)."""
    return "^" + re.escape(path)


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key of ``patterns`` matching the end of ``module_name``
    (after a ``.``), or ``None``. Raises :class:`ConfigError` for a key RE2 cannot compile."""
    for key in patterns:
        if _search(key, "key", module_name):
            return key
    return None


def check_pattern(name: str, pattern: Any) -> None:
    """Check a module-name regular expression from field ``name`` (``"target_modules"``,
    ``"rank_pattern key"``, ...): a string of at most :data:`MAX_PATTERN_CHARS` characters that RE2
    compiles both as a whole-path pattern and as a ``rank_pattern`` key. Returns nothing; raises
    :class:`ConfigError` naming the field otherwise (backreferences and lookaround included)."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{name} must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{name} {safe_repr(pattern)}: longer than {MAX_PATTERN_CHARS} characters")
    for form in ("full", "key"):
        _regex(pattern, form, name)


def _unicode_classes(pattern: str) -> list[str]:
    """The Perl class escapes of ``pattern`` (``\\w``, ``\\d``, ``\\s``, ``\\b`` and their negations): ASCII in
    RE2, Unicode in Python's ``re`` (PEFT's), so on a name with non-ASCII characters the two engines can
    disagree (``.*\\w+_proj`` matches ``layers.0.é_proj`` in PEFT, not in RE2). An escaped backslash is skipped."""
    found, i = [], 0
    while i < len(pattern) - 1:
        if pattern[i] == "\\":
            if pattern[i + 1] in "wWdDsSbB":
                found.append(pattern[i : i + 2])
            i += 2
        else:
            i += 1
    return found


_TURKISH_I = frozenset("\u0130\u0131")  # İ and ı: case variants of i in Python's re, not in RE2


_FLAGS = re.compile(r"\(\?([imsU]*)(?:-[imsU]*)?[:)]")  # a (?flags) or (?flags:...) group's opening, flags on first


def _case_scan(pattern: str) -> tuple[bool, bool]:
    """``(case-insensitive, mentions i)`` of ``pattern``: whether an ``i`` is among the flags a ``(?flags)`` or
    ``(?flags:...)`` group turns on (a literal ``(?i)`` inside a character class counts too), and whether, outside
    those groups, it has a character of ``iIİı``, a character class or an escape that can stand for one (``\\x``,
    octal, ``\\p``)."""
    insensitive = mentions = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        group = _FLAGS.match(pattern, i) if c == "(" else None
        if group:
            insensitive = insensitive or "i" in group.group(1)
            i = group.end()
            continue
        escape = c == "\\" and i + 1 < len(pattern)
        mentions = mentions or c in "iI[" or c in _TURKISH_I or (escape and pattern[i + 1] in "xX01234567pP")
        i += 2 if escape else 1
    return insensitive, mentions


def _turkish_i_differs(pattern: str, name: str) -> bool:
    """Whether Python's re and RE2 can disagree on ``pattern`` against ``name``: a case-insensitive pattern that can
    match an ``i`` where the name has ``İ`` or ``ı``, or one with a character from U+0130 on (``İ``, ``ı``, a range
    reaching them) where the name has an ``i`` or ``I``."""
    if name.isascii() and pattern.isascii():
        return False
    chars = set(name)
    high = bool(chars & {"i", "I"}) and any(ord(c) >= 0x130 for c in pattern)
    if not (high or chars & _TURKISH_I):
        return False
    insensitive, mentions = _case_scan(pattern)
    return insensitive and (high or mentions)


def _search(pattern: str, form: str, name: str) -> bool:
    regex = _regex(pattern, form, "pattern")
    try:
        found = regex.fullmatch(name) if form == "full" else regex.match(name)
    except UnicodeEncodeError:  # a lone surrogate: no module path has one
        return False
    classes = [] if name.isascii() else _unicode_classes(pattern)
    if classes:
        raise ConfigError(
            f"pattern {safe_repr(pattern)} and module {safe_repr(name)}: {', '.join(dict.fromkeys(classes))} "
            "means ASCII characters only in RE2, the engine lordba matches module names with, but any Unicode "
            "letter, digit or space in Python's re (PEFT's), and this module name has non-ASCII characters: write "
            "the characters out (e.g. [^.] or [A-Za-z0-9_]), or list the modules instead of a pattern"
        )
    if _turkish_i_differs(pattern, name):
        raise ConfigError(
            f"pattern {safe_repr(pattern)} and module {safe_repr(name)}: case-insensitive (?i) matching takes "
            "'\u0130' (U+0130) and '\u0131' (U+0131) as case variants of 'i' in Python's re (PEFT's) but not in RE2, "
            "the engine lordba matches module names with, and this module name or pattern has them: write the cases "
            "out instead of (?i) (e.g. [Ii]), or list the modules instead of a pattern"
        )
    return found is not None


def _regex(pattern: str, form: str, field_name: str) -> Any:
    """The RE2 program of ``pattern`` as a whole-path pattern (``"full"``) or a pattern key
    (``"key"``); :class:`ConfigError` naming ``field_name`` if RE2 cannot compile it."""
    regex = _compile(pattern, form)
    if isinstance(regex, str):
        raise ConfigError(f"{field_name} {safe_repr(pattern)} is not a valid regular expression {regex}")
    return regex


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str, form: str) -> Any:
    """The compiled program, or the reason RE2 refuses it (a string); cached per pattern and form."""
    source = pattern if form == "full" else rf"(.*\.)?({pattern})$"
    try:
        return re2.compile(source, _OPTIONS)
    except re2.error as err:
        reason = err.args[0].decode("utf-8", "replace") if err.args and isinstance(err.args[0], bytes) else err
        return (
            f"for RE2, the linear-time engine lordba matches module names with ({reason}; "
            "backreferences and lookaround are not supported)"
        )
    except (UnicodeEncodeError, TypeError, ValueError) as err:
        return f"({err})"
