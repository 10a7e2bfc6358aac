"""Module-name patterns: PEFT's semantics, matched by RE2 in linear time (no backtracking guard)."""

import subprocess
import sys
import textwrap

import pytest

from lordba import ConfigError, LoRDBAConfig
from lordba._util.patterns import check_pattern, matches, pattern_key

PEFT_DOC_PATTERN = r".*decoder.*(self_attn|encoder_attn).*(q_proj|v_proj)$"

# Shapes the former guard let through and Python's backtracking engine takes exponential time on
# (65-320 characters), with the module names that trigger it.
HANG_SHAPES = {
    "optional items": ("a?" * 30 + "a" * 30, "a" * 30),
    "bounded repeats": ("a{0,1}" * 30 + "a" * 30, "a" * 30),
    "alternations": ("(a|a)?" * 30 + "b", "a" * 30),
    "long alternations": ("(?:a|a)?" * 40 + "b", "a" * 40),
}


def test_peft_semantics_of_lists_strings_and_pattern_keys():
    assert matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert matches(["self_attn.q_proj"], "model.layers.0.self_attn.q_proj")
    assert not matches(["proj"], "model.layers.0.self_attn.q_proj")  # a suffix after a "." only
    assert matches(["q_proj"], "q_proj") and not matches(None, "q_proj")
    assert matches(r".*\.q_proj", "model.layers.0.self_attn.q_proj")
    assert not matches(r"q_proj", "model.layers.0.self_attn.q_proj")  # a string must match the whole path
    assert not matches(r".*q_pro", "model.q_proj")
    keys = {r"layers\.0\.self_attn\.q_proj": 4, "q_proj": 2}
    assert pattern_key(keys, "model.layers.0.self_attn.q_proj") == r"layers\.0\.self_attn\.q_proj"
    assert pattern_key(keys, "model.layers.1.self_attn.q_proj") == "q_proj"
    assert pattern_key(keys, "model.layers.1.self_attn.xq_proj") is None  # after a "." only
    assert pattern_key({"proj": 1}, "q_proj") is None and pattern_key({"q_proj": 1}, "q_proj") == "q_proj"


def test_peft_documented_pattern_is_accepted_and_matches():
    check_pattern("target_modules", PEFT_DOC_PATTERN)
    config = LoRDBAConfig(target_modules=PEFT_DOC_PATTERN, rank_pattern={PEFT_DOC_PATTERN: 3})
    assert config.targets_module("model.decoder.layers.0.encoder_attn.v_proj")
    assert not config.targets_module("model.encoder.layers.0.self_attn.q_proj")
    assert config.rank_for("model.decoder.layers.1.self_attn.q_proj") == 3


@pytest.mark.parametrize(
    "pattern", ["(a+)+$", "(?:a|aa)*b", ".*.*.*x", r"(\.\w+)*q", *[p for p, _ in HANG_SHAPES.values()]]
)
def test_patterns_the_former_guard_refused_or_missed_are_accepted(pattern):
    assert LoRDBAConfig(rank_pattern={pattern: 4}).rank_pattern == {pattern: 4}


@pytest.mark.parametrize(
    "field, pattern",
    [
        ("rank_pattern key", r"(\w)\1"),
        ("alpha_pattern key", r"(?P<x>a)(?P=x)"),
        ("target_modules", "^(?!.*vision).*q_proj$"),
        ("exclude_modules", r"(?<=self_attn\.)q_proj"),
        ("target_modules", "(unclosed"),
        ("rank_pattern key", "\ud800"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_naming_the_field(field, pattern):
    with pytest.raises(ConfigError, match=field.split()[0]) as err:
        check_pattern(field, pattern)
    assert "not a valid regular expression" in str(err.value)
    kwargs = {
        "rank_pattern key": {"rank_pattern": {pattern: 2}},
        "alpha_pattern key": {"alpha_pattern": {pattern: 2.0}},
        "target_modules": {"target_modules": pattern},
        "exclude_modules": {"exclude_modules": pattern},
    }[field]
    with pytest.raises(ConfigError, match=field.split()[0]):
        LoRDBAConfig(**kwargs)


def test_too_long_and_non_string_patterns_are_refused():
    with pytest.raises(ConfigError, match="longer than 1024"):
        check_pattern("target_modules", "a" * 1025)
    with pytest.raises(ConfigError, match="must be a string"):
        check_pattern("rank_pattern key", 5)


def test_hang_shapes_against_adversarial_names_finish():
    """Every hang shape, as a whole-path pattern and as a pattern key, against its name and
    256-character variants: a hang check in a subprocess (30 s), not a speed target."""
    code = textwrap.dedent(
        f"""
        from lordba._util.patterns import matches, pattern_key
        for pattern, name in {list(HANG_SHAPES.values())!r}:
            for candidate in (name, (name + ".") * (256 // (len(name) + 1)) + "a", name + "b"):
                matches(pattern, candidate)
                pattern_key({{pattern: 1}}, candidate)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_patterns_whose_program_is_too_large_are_refused_and_long_real_ones_accepted():
    """Counted repeats make RE2's program (and its compile time) grow: refused past 256 KiB."""
    with pytest.raises(ConfigError, match="pattern too large"):
        check_pattern("target_modules", "[a-z]{0,1000}" * 20)
    layers = "|".join(rf"layers\.{i}\.mlp\.(gate|up|down)_proj" for i in range(20))
    check_pattern("rank_pattern key", layers)
    assert pattern_key({layers: 2}, "model.layers.7.mlp.up_proj") == layers


@pytest.mark.parametrize("pattern", [r".*\w+_proj", r".*\.\W*\D?_proj", r"layers\.\d\..*", r".*\b_proj"])
def test_a_class_escape_against_a_non_ascii_name_is_refused_not_matched_in_ascii(pattern):
    """RE2's \\w, \\d, \\s and \\b are ASCII, Python's re (PEFT's) Unicode: ``.*\\w+_proj`` matched PEFT's
    ``layers.0.é_proj`` but not lordba's, so the two silently targeted different layers. On a non-ASCII name a
    pattern with one is refused naming the pattern and the module; on ASCII names (every name a file can hold)
    the engines agree and it matches as before, as does a pattern without one or with an escaped backslash."""
    import re

    name = "layers.0.é_proj" if "d" not in pattern else "layers.٣.q_proj"
    with pytest.raises(ConfigError, match=r"non-ASCII.*\[\^\.\]") as err:
        matches(pattern, name)
    assert repr(name) in str(err.value) and repr(pattern) in str(err.value)
    ascii_name = "layers.0.q_proj"
    assert matches(pattern, ascii_name) == (re.fullmatch(pattern, ascii_name) is not None)
    assert matches(r".*_proj", "layers.0.é_proj") and not matches(r".*\\w_proj", "layers.0.é_proj")
    assert matches(["é_proj"], "layers.0.é_proj")


TURKISH_I_CASES = [
    ("(?i).*i_proj", "layers.0.ı_proj"),  # ı (U+0131) an i in Python's (?i), not in RE2's
    ("(?i)layers\\.0\\.[a-z]+", "layers.0.İ"),  # İ (U+0130): the same, through a class
    ("(?i:.*[^i])", "layers.0.İ"),  # a negated class: Python takes İ as i, so leaves it out
    ("(?i).*İ_proj", "layers.0.i_proj"),  # the pattern's İ, an ASCII name's i
    ("(?si)(?:.*\\.)?ı$", "layers.0.I"),
]


@pytest.mark.parametrize(("pattern", "name"), TURKISH_I_CASES)
def test_a_case_insensitive_pattern_where_turkish_i_differs_is_refused_not_matched_otherwise(pattern, name):
    """Python's re (PEFT's) takes İ (U+0130) and ı (U+0131) as case variants of i under ``(?i)``, RE2 does not (the only
    characters whose case variants differ between the two): ``(?i).*i_proj`` matched PEFT's ``layers.0.ı_proj`` but
    not lordba's (module names are Python attribute names: non-ASCII ones are allowed). Such a pair is refused naming
    the pattern and the module, as a target pattern and as a rank_pattern key."""
    import re

    assert (re.fullmatch(pattern, name) is not None) != (re.fullmatch(pattern, name, re.ASCII) is not None)
    with pytest.raises(ConfigError, match=r"U\+0130.*\[Ii\]") as err:
        matches(pattern, name)
    assert repr(name) in str(err.value) and repr(pattern) in str(err.value)
    with pytest.raises(ConfigError, match="U\\+0131"):
        pattern_key({pattern: 2}, name)


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("(?i).*q_proj", "layers.ı.q_proj"),  # nothing in the pattern an i can be
        ("(?-i:.*i_proj)", "layers.0.ı_proj"),  # not case-insensitive
        (".*[a-z]_proj", "layers.0.ı_proj"),
        ("(?i).*Q_PROJ", "layers.0.q_proj"),  # ASCII on both sides
        ("(?P<mid>.*)i_proj", "layers.0.ı_proj"),  # a named group, no flags
    ],
)
def test_patterns_the_engines_agree_on_match_as_python_does(pattern, name):
    import re

    assert matches(pattern, name) == (re.fullmatch(pattern, name) is not None)


def test_a_model_with_a_dotless_i_in_a_module_name_is_refused_a_case_insensitive_target():
    """Through ``get_lordba_model``: the adapter would have left out the layer PEFT adapts."""
    from torch import nn

    from lordba import get_lordba_model

    model = nn.Module()
    model.add_module("katmanı", nn.Linear(4, 4))
    model.add_module("other", nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="'katmanı'"):
        get_lordba_model(model, LoRDBAConfig(r=2, target_modules="(?i)(katmani|other)"))
