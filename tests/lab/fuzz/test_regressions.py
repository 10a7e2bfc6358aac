"""Regression tests for what fuzzing and probing the loader found (each was an unclean failure:
an exception other than a LoRDBAError, a hang, or a load that later broke)."""

import hashlib
import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from lordba import ConfigError, LoRDBAConfig, LoRDBAError, LoRDBAModel, get_lordba_model
from lordba.format.adapter import read_adapter

from conftest import load_weights, rewrite_weights, set_config, tiny_llama

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(4)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random"))
    lm.save_pretrained(tmp_path, format_version=1)  # the layout these regressions were found in
    return tmp_path


def refused(directory, match):
    with pytest.raises(LoRDBAError, match=match) as info:
        read_adapter(directory)
    assert "adapter_config.json" in str(info.value) or "lordba_model.safetensors" in str(info.value)


def edit_config_text(directory, old, new):
    path = directory / "adapter_config.json"
    path.write_text(path.read_text().replace(old, new, 1))


def edit_header(directory, edit):
    path = directory / "lordba_model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    raw = edit(data[8 : 8 + n].rstrip(b" "))
    raw += b" " * ((-len(raw)) % 8)
    new = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    path.write_bytes(new)
    set_config(directory, weights_sha256=hashlib.sha256(new).hexdigest())


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"])
@pytest.mark.parametrize("pattern", ["(", "[a-", "q_proj)", "(?<=attn\\.)q_proj"])
def test_invalid_regular_expressions_are_config_errors(saved, field, pattern):
    """Was: re.error while checking ranks, or (alpha_pattern, "(?i)" inside PEFT's suffix
    pattern) an adapter that loaded and then raised re.error in scaling_for."""
    value = {pattern: 3} if field.endswith("pattern") else pattern
    set_config(saved, **{field: value})
    refused(saved, f"{field}.*not a valid regular expression")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        LoRDBAConfig(**{field: value})


@pytest.mark.parametrize("pattern", ["(a+)+$", "(?:a|aa)*b", ".*.*.*x", r"(\.\w+)*q", "a?" * 30 + "a" * 30])
def test_catastrophic_backtracking_patterns_are_harmless_in_re2(saved, pattern):
    """Patterns that backtrack exponentially in Python's engine (an earlier guard refused some and
    missed others) are matched by RE2 in linear time: the adapter loads (none of them matches a
    module of this file, so every rank stays r)."""
    set_config(saved, rank_pattern={pattern: 3})
    assert read_adapter(saved).config.rank_pattern == {pattern: 3}


@pytest.mark.parametrize("pattern", [r"(\w)\1", "^(?!.*vision).*q_proj$"])
def test_patterns_re2_cannot_run_are_refused(saved, pattern):
    set_config(saved, rank_pattern={pattern: 3})
    refused(saved, "rank_pattern key .* not a valid regular expression for RE2")


@pytest.mark.parametrize(
    "pattern",
    [
        r"model\.layers\.\d+\.self_attn\..*",
        r".*\.(q_proj|v_proj)",
        r".*decoder.*(self_attn|encoder_attn).*(q_proj|v_proj)$",
        "(?i)Q_PROJ",
        "q_proj",
    ],
)
def test_usual_peft_patterns_are_accepted(pattern):
    assert LoRDBAConfig(rank_pattern={pattern: 4}).rank_pattern == {pattern: 4}


def test_worst_allowed_pattern_on_the_longest_module_names_finishes(tmp_path):
    """The worst patterns still allowed (two unbounded repetitions) against 256-character module
    paths that never match: a hang check in a subprocess, not a speed target."""
    code = textwrap.dedent(
        """
        from lordba import LoRDBAConfig
        cfg = LoRDBAConfig(rank_pattern={r"[a.]*[a.]*z": 2, r".*\\..*\\.z": 2}, target_modules=r".*a.*a")
        name = ("a." * 128)[:255] + "a"
        for _ in range(20):
            assert cfg.rank_for(name) == cfg.r
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "old, new, match",
    [
        ('"r": 3', '"r": ' + "9" * 5000, "not valid JSON"),  # ValueError from int()
        ('"alpha": 32.0', '"alpha": ' + "9" * 400, "alpha must be"),  # OverflowError in isfinite
        ('"r": 3', '"r": ' + "[" * 900 + "]" * 900, "r must be"),  # RecursionError in repr
        ('"r": 3', '"r": ' + "[" * 100000 + "]" * 100000, "not valid JSON"),
        ('"r": 3', '"r": 3, "r": 3', "duplicate key"),
        ('"r": 3', '"r": 4294967296', "below 2\\*\\*31"),
    ],
    ids=["huge-int", "huge-alpha", "nested-900", "nested-100k", "duplicate-key", "rank-2^32"],
)
def test_config_numbers_nesting_and_duplicates(saved, old, new, match):
    edit_config_text(saved, old, new)
    refused(saved, match)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda raw: raw.replace(b'"data_offsets":[0,', b'"data_offsets":[1' + b"0" * 5000 + b",", 1),
            "not valid JSON",
        ),
        (lambda raw: raw.replace(b"[40,40,3]", b"[4" + b"0" * 5000 + b",40,3]", 1), "metadata 'modules'"),
        (lambda raw: b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"," + raw[1:], "not valid JSON"),
        (lambda raw: raw.replace(b'"format":"lordba"', b'"format":"lordba\\ud800"'), "lone UTF-16 surrogate"),
        (lambda raw: raw.replace(b"[40,40,3]", b"[40,40,3]}\\ud800", 1), "not valid JSON"),
    ],
    ids=["huge-offset", "huge-dim", "deep", "surrogate-value", "surrogate-in-modules"],
)
def test_header_oddities(saved, edit, match):
    edit_header(saved, edit)
    refused(saved, match)


def test_duplicate_header_keys_are_refused(saved):
    """Both Python and the Rust safetensors parser keep the last duplicate, but other readers keep
    the first: a file that reads differently elsewhere is refused."""

    def dup(raw):
        header = json.loads(raw)
        first = next(k for k in header if k != "__metadata__")
        return b"{" + json.dumps({first: header[first]})[1:-1].encode() + b"," + raw[1:]

    edit_header(saved, dup)
    refused(saved, "duplicate key")


@pytest.mark.parametrize(
    "name, match",
    [
        (f"{Q}.base_layer", "inside a LoRDBA layer"),
        (f"{Q}.lordba_adapters.default", "inside a LoRDBA layer"),
        ("model\nlayers", "not a module path"),
        ("model..q_proj", "not a module path"),
        ("\x1b[31mred", "not a module path"),
        ("a." * 128 + "q", "not a module path"),
    ],
)
def test_module_names_must_be_module_paths(saved, name, match):
    """An adapter naming ``q_proj.base_layer`` used to load and wrap the base layer inside the
    LoRDBA layer a second time; names with control characters reached error messages verbatim."""
    tensors, meta = load_weights(saved)
    dims = json.loads(meta["modules"])
    dims[name] = dims.pop(Q)
    meta["modules"] = json.dumps(dims, separators=(",", ":"), sort_keys=True)
    for kind in ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out"):
        tensors[f"{name}.{kind}"] = tensors.pop(f"{Q}.{kind}")
    rewrite_weights(saved, tensors, meta)
    refused(saved, match)


def test_the_refused_base_layer_name_would_have_nested_a_wrapper(saved, tmp_path):
    """What the module-path check prevents: loading onto a model that already has a LoRDBA layer
    at q_proj (the name resolves to its inner base layer)."""
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), saved)
    tensors, meta = load_weights(saved)
    dims = json.loads(meta["modules"])
    for path in list(dims):
        if path != Q:
            del dims[path]
            for kind in ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out"):
                del tensors[f"{path}.{kind}"]
    dims[f"{Q}.base_layer"] = dims.pop(Q)
    meta["modules"] = json.dumps(dims, separators=(",", ":"), sort_keys=True)
    for kind in ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out"):
        tensors[f"{Q}.base_layer.{kind}"] = tensors.pop(f"{Q}.{kind}")
    rewrite_weights(saved, tensors, meta)
    with pytest.raises(LoRDBAError, match="inside a LoRDBA layer"):
        lm.load_adapter(saved, "other")
    assert sum(type(m).__name__ == "LoRDBALinear" for m in lm.modules()) == 14


def test_drop_tensor_mutator_handles_a_zero_size_tensor(monkeypatch):
    """Fuzzer-side bug found by the 10-minute run: dropping an empty tensor (start == stop) together
    with its bytes shifted the dropped entry itself (KeyError)."""
    import random

    from lordba_lab.fuzz import mutate_header

    header = {
        "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
    }
    results = []
    monkeypatch.setattr(mutate_header, "with_weights", lambda case, fn: results.append(fn(header, b"xy")))
    for seed in range(40):
        mutate_header.drop_tensor(random.Random(seed), None)
    assert len(results) == 40 and all(r is not None for r in results)
