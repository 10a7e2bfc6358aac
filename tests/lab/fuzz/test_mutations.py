"""Structure-aware property tests of the loader (Hypothesis), with an exact expectation per case.

Seeds are small valid adapters of every scale dtype (:func:`lordba_lab.fuzz.corpus.seed_cases`).
Most structural mutations need the checksum fixed up (``fix_checksum``), or they stop at the
checksum check; each test says which. :func:`lordba_lab.fuzz.oracle.run_case` judges the load: a
refusal must be a ``LoRDBAError`` naming the file; a load must equal the mutated files exactly,
read by an independent parser, and obey every rule of docs/format.md.
"""

import json
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lordba.config import CONFIG_NAME, WEIGHTS_NAME
from lordba_lab.fuzz.corpus import PREV_CONFIG, PREV_WEIGHTS, as_backups, fix_checksum, seed_cases
from lordba_lab.fuzz.mutate_base import join_weights, split_weights
from lordba_lab.fuzz.oracle import LOADED, REFUSED, reference_parse, run_case, value_problem

SEEDS = seed_cases()
VALID = [c for c in SEEDS if PREV_CONFIG not in c]
WORK = Path(tempfile.mkdtemp(prefix="lordba-fuzz-test-"))
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TORCH = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

seeds = st.sampled_from(VALID)


def judge(case, outcome=None, match=None):
    result = run_case(case, WORK)
    assert result.outcome in (REFUSED, LOADED), f"{result.kind}: {result.detail}"
    if outcome is not None:
        assert result.outcome == outcome, f"{result.kind}: {result.detail}"
    if match is not None:
        assert match in result.detail, result.detail
    return result


def spec_problem(weights):
    """Whether the file breaks a value rule, decided from the bytes alone (not by lordba.format.adapter)."""
    tensors, metadata = reference_parse(weights)
    dims = json.loads(metadata["modules"])
    for name, (dtype, _, raw) in tensors.items():
        path, kind = name.rsplit(".", 1)
        in_f, out_f, r = dims[path]
        bits = {"sign_A": r * in_f, "sign_B": out_f * r}.get(kind, 0)
        t = torch.frombuffer(bytearray(raw), dtype=TORCH[dtype]) if raw else torch.empty(0)
        if value_problem(kind, dtype, raw, bits, t):
            return True
    return False


def data_start(weights):
    return 8 + struct.unpack_from("<Q", weights)[0]


@FAST
@given(case=seeds, where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_data_bit_with_fixed_checksum_loads_iff_the_values_are_valid(case, where, bit):
    """A flipped bit in a sign or scale is a different adapter: valid (then it must load with
    exactly the new content) unless it sets a padding bit, makes a scale NaN/inf, or breaks an
    int8 rule (then it must be refused naming the tensor)."""
    weights = bytearray(case[WEIGHTS_NAME])
    start = data_start(weights)
    i = start + int(where * (len(weights) - start))
    weights[i] ^= 1 << bit
    mutated = fix_checksum({**case, WEIGHTS_NAME: bytes(weights)})
    expected = REFUSED if spec_problem(mutated[WEIGHTS_NAME]) else LOADED
    result = judge(mutated, expected)
    if expected == REFUSED:
        assert "tensor" in result.detail and WEIGHTS_NAME in result.detail


@FAST
@given(case=seeds, where=st.floats(0, 1, exclude_max=True), value=st.integers(1, 255), backups=st.booleans())
def test_any_changed_byte_without_checksum_fix_is_refused(case, where, value, backups):
    """Without a fixed checksum every change of the weights is caught by the checksum (an
    intact backup pair is read instead when present: the previous adapter, exactly), or before it
    by the header when that no longer describes the file (lordba never leaves such a file, so it is
    refused rather than taken for an interrupted save)."""
    weights = bytearray(case[WEIGHTS_NAME])
    i = int(where * len(weights))
    weights[i] ^= value
    mutated = {**case, WEIGHTS_NAME: bytes(weights), **(as_backups(case) if backups else {})}
    result = judge(mutated)
    if result.outcome == REFUSED and "refused before hashing" in result.detail:
        return
    if backups:
        assert result.outcome == LOADED and result.kind == "recovered", result
    else:
        assert result.outcome == REFUSED and "checksum mismatch" in result.detail, result


@FAST
@given(case=seeds, keep=st.floats(0, 1, exclude_max=True), fix=st.booleans())
def test_truncated_weights_are_refused(case, keep, fix):
    weights = case[WEIGHTS_NAME][: int(keep * len(case[WEIGHTS_NAME]))]
    mutated = {**case, WEIGHTS_NAME: weights}
    judge(fix_checksum(mutated) if fix else mutated, REFUSED, None if fix else "checksum mismatch")


def header_edit(case, edit):
    header, data = split_weights(case[WEIGHTS_NAME])
    return fix_checksum({**case, WEIGHTS_NAME: join_weights(edit(header, data), data)})


def tensor_names(case):
    header, _ = split_weights(case[WEIGHTS_NAME])
    return sorted(k for k in header if k != "__metadata__")


@FAST
@given(case=seeds, pick=st.integers(0, 10**6), dtype=st.sampled_from(["U8", "I8", "F16", "BF16", "F32", "F64", "I32"]))
def test_wrong_dtype_is_refused_naming_the_tensor(case, pick, dtype):
    names = tensor_names(case)
    name = names[pick % len(names)]
    header, _ = split_weights(case[WEIGHTS_NAME])
    if header[name]["dtype"] == dtype:
        return
    mutated = header_edit(case, lambda h, d: {**h, name: {**h[name], "dtype": dtype}})
    judge(mutated, REFUSED, name)


@FAST
@given(case=seeds, pick=st.integers(0, 10**6), delta=st.sampled_from([-1, 1]), also_data=st.booleans())
def test_shape_off_by_one_is_refused(case, pick, delta, also_data):
    """Shape ±1, with the byte range and the data changed to match or not: refused either way."""
    names = tensor_names(case)
    name = names[pick % len(names)]

    def edit(h, d):
        e = h[name]
        shape = [e["shape"][0] + delta]
        if shape[0] < 0:
            shape = [1]
        if not also_data:
            return {**h, name: {**e, "shape": shape}}
        item = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}[e["dtype"]]
        start, stop = e["data_offsets"]
        out = {**h, name: {**e, "shape": shape, "data_offsets": [start, start + shape[0] * item]}}
        shift = start + shape[0] * item - stop
        for k, v in h.items():
            if k not in ("__metadata__", name) and v["data_offsets"][0] >= stop:
                out[k] = {**v, "data_offsets": [o + shift for o in v["data_offsets"]]}
        return out

    mutated = header_edit(case, edit)
    if also_data:  # resize the tensor's bytes too, so only the shape rule can catch it
        header, data = split_weights(case[WEIGHTS_NAME])
        start, stop = header[name]["data_offsets"]
        new_header, _ = split_weights(mutated[WEIGHTS_NAME])
        size = new_header[name]["data_offsets"][1] - start
        data = data[:start] + (data[start:stop] + bytes(8))[:size] + data[stop:]
        mutated = fix_checksum({**case, WEIGHTS_NAME: join_weights(new_header, data)})
    judge(mutated, REFUSED, name)


@FAST
@given(case=seeds, pick=st.integers(0, 10**6), extra=st.booleans())
def test_missing_and_extra_tensors_are_refused(case, pick, extra):
    names = tensor_names(case)
    name = names[pick % len(names)]
    if extra:
        mutated = header_edit(
            case, lambda h, d: {**h, name + "x": {"dtype": "U8", "shape": [0], "data_offsets": [len(d), len(d)]}}
        )
        judge(mutated, REFUSED, "unexpected tensor")
    else:
        removed = header_edit(case, lambda h, d: {k: v for k, v in h.items() if k != name})
        detail = judge(removed, REFUSED).detail
        assert "missing tensor" in detail or "header describes" in detail, detail  # the last: data too long


@FAST
@given(
    case=seeds,
    version=st.one_of(st.integers(), st.text(max_size=5), st.none(), st.floats(allow_nan=False, allow_infinity=False)),
)
def test_unknown_format_versions_are_refused(case, version):
    if version == 1 and type(version) is int:
        return
    config = json.loads(case[CONFIG_NAME])
    judge({**case, CONFIG_NAME: json.dumps({**config, "format_version": version}).encode()}, REFUSED, "format_version")
    if version != "1":
        mutated = header_edit(
            case, lambda h, d: {**h, "__metadata__": {**h["__metadata__"], "format_version": str(version)}}
        )
        judge(mutated, REFUSED, "format_version")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
FIELD_RULES = {  # an independent statement of each field's valid values (docs/format.md)
    "r": lambda v: type(v) is int and 1 <= v < 2**31,
    "alpha": lambda v: type(v) in (int, float) and 0 < v < float("inf"),
    "ste_k": lambda v: type(v) in (int, float) and 0 < v < float("inf"),
    "ste_clip": lambda v: type(v) in (int, float) and 0 < v < float("inf"),
    "mode": lambda v: v in ("ptq", "qat", "qat-from-lora", "scales-only") and isinstance(v, str),
    "init": lambda v: v in ("cold", "random") and isinstance(v, str),
    "ste": lambda v: v in ("smoothsign", "identity") and isinstance(v, str),
    "latent_dtype": lambda v: v in ("float32", "bfloat16", "float16") and isinstance(v, str),
    "base_model_name_or_path": lambda v: v is None or isinstance(v, str),
    "scale_dtype": lambda v: v in ("float32", "float16", "bfloat16", "int8") and isinstance(v, str),
}


@FAST
@given(case=seeds, field=st.sampled_from(sorted(FIELD_RULES)), value=JSON_VALUES)
def test_config_fields_of_any_type(case, field, value):
    """Any JSON value in a config field (with the config's digest in the weights updated, as an
    attacker would): refused naming the field unless it is valid; a valid value loads (r and
    scale_dtype must also agree with the weights file)."""
    config = json.loads(case[CONFIG_NAME])
    mutated = {**case, CONFIG_NAME: json.dumps({**config, field: value}).encode()}
    result = judge(fix_checksum(mutated, digest=True))  # the config's digest follows the change
    valid = FIELD_RULES[field](value) and (field not in ("r", "scale_dtype") or value == config[field])
    if field == "r" and valid is False and FIELD_RULES["r"](value) and not config["rank_pattern"]:
        assert "has rank" in result.detail  # a valid rank that the file's modules do not have
    assert result.outcome == (LOADED if valid else REFUSED), result.detail
    if not FIELD_RULES[field](value):
        assert field in result.detail


@FAST
@given(case=seeds, edit=st.sampled_from(["duplicate", "deep", "bad-utf8", "huge-int", "nan", "bom", "surrogate"]))
def test_header_json_oddities_are_refused(case, edit):
    header, data = split_weights(case[WEIGHTS_NAME])
    raw = json.dumps(header, separators=(",", ":")).encode()
    first = next(k for k in header if k != "__metadata__")
    raw = {
        "duplicate": raw[:-1] + b"," + json.dumps({first: header[first]})[1:-1].encode() + b"}",
        "deep": b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"," + raw[1:],
        "bad-utf8": raw[:-1] + b',"\xff":1}',
        "huge-int": raw.replace(b'"data_offsets":[0,', b'"data_offsets":[' + b"1" * 5000 + b",", 1),
        "nan": raw.replace(b'"data_offsets":[0,', b'"data_offsets":[NaN,', 1),
        "bom": b"\xef\xbb\xbf" + raw,
        "surrogate": raw.replace(b'"format":"lordba"', b'"format":"lordba\\ud800"'),
    }[edit]
    judge(fix_checksum({**case, WEIGHTS_NAME: join_weights(raw, data)}), REFUSED, WEIGHTS_NAME)


@FAST
@given(old=seeds, new=seeds, damage=st.sampled_from(["inconsistent", "partial-backups", "bad-backups"]))
def test_interrupted_saves_read_the_intact_previous_pair(old, new, damage):
    """Current pair inconsistent (new weights, old config) + backups of the old pair: the old
    adapter is read, exactly. Without an intact backup pair the load is refused."""
    case = {CONFIG_NAME: old[CONFIG_NAME], WEIGHTS_NAME: new[WEIGHTS_NAME], **as_backups(old)}
    if old[WEIGHTS_NAME] == new[WEIGHTS_NAME]:
        return
    if damage == "inconsistent":
        assert judge(case, LOADED).kind == "recovered"
        return
    if damage == "partial-backups":
        case.pop(PREV_WEIGHTS)
    else:
        case[PREV_WEIGHTS] = case[PREV_WEIGHTS][:-1]
    judge(case, REFUSED, "checksum mismatch")


@pytest.mark.parametrize("scale_dtype_index", range(4))
def test_seeds_load(scale_dtype_index):
    assert judge(VALID[scale_dtype_index], LOADED).kind == "current"


@FAST
@given(case=seeds, where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_config_bit_is_refused_unless_it_changes_nothing(case, where, bit):
    """The config's digest in the weights catches every bit rot of a field; what loads (a flip in
    library_version's text, or whitespace) is the very adapter the seed holds."""
    data = bytearray(case[CONFIG_NAME])
    data[int(where * len(data))] ^= 1 << bit
    result = judge({**case, CONFIG_NAME: bytes(data)})
    if result.outcome == LOADED:
        before, after = json.loads(case[CONFIG_NAME]), json.loads(bytes(data))
        before.pop("library_version"), after.pop("library_version", None)
        assert before == after


@FAST
@given(case=seeds, seed=st.integers(0, 2**32 - 1), digest=st.booleans())
def test_regex_shaped_config_patterns_are_judged_clean(case, seed, digest):
    """The fuzzer's regex mutator (hang shapes, what RE2 cannot run, huge repeats, PEFT's documented
    patterns) in every pattern field: a refusal naming the file, or a faithful load; with the
    digest not fixed up, always a refusal (by the field's own check, or else by the digest)."""
    import random

    from lordba_lab.fuzz.mutate_content import config_regex

    mutated = fix_checksum(config_regex(random.Random(seed), case), digest=digest)
    result = judge(mutated)
    if not digest and mutated[CONFIG_NAME] != case[CONFIG_NAME]:
        assert result.outcome == REFUSED, result  # by the field's check, or else by the digest


def test_docs_count_the_mutators_there_are():
    """docs/security.md says how many structure-aware and byte-level mutators the fuzzer has (it said 24
    structure-aware ones after the compact file's three had joined)."""
    from lordba_lab.fuzz import mutate_bytes
    from lordba_lab.fuzz.mutate import MUTATORS

    text = " ".join((Path(__file__).resolve().parents[3] / "docs" / "security.md").read_text().split())
    structure, byte_level = re.search(
        r"with (\d+) structure-aware mutators .*? and (\d+) byte-level ones", text
    ).groups()
    assert int(byte_level) == len(mutate_bytes.MUTATORS)
    assert int(structure) == len(MUTATORS) - len(mutate_bytes.MUTATORS)
