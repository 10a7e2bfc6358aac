"""The config is bound to the weights: its digest is stored in the weights file's metadata, so a
changed field (one flipped bit in ``alpha``) is refused; files written before the digest existed
still load; the writer never saves what its reader refuses."""

import hashlib
import json
import struct
import warnings

import pytest
import torch

from lordba import AdapterFormatError, ConfigError, LoRDBAConfig, LoRDBAError, get_lordba_model
from lordba.format.adapter import AdapterState, ModuleRecord, read_adapter
from lordba.format.integrity import CONFIG_DIGEST_KEY, config_digest

from conftest import load_weights, rewrite_weights, set_config, tiny_llama

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def state():
    torch.manual_seed(5)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, alpha=8.0, init="random", target_modules=["q_proj"]))
    return lm.adapter_state("default")


@pytest.fixture
def saved(tmp_path, state):
    state.save_pretrained(tmp_path)
    return tmp_path


def test_the_weights_store_the_digest_of_the_config(saved):
    _, metadata = load_weights(saved)
    config = json.loads((saved / "adapter_config.json").read_text())
    assert metadata[CONFIG_DIGEST_KEY] == config_digest(config)
    read_adapter(saved)


def test_one_flipped_bit_in_alpha_is_refused(saved):
    """8.0 → 9.0 is one bit ('8' = 0x38, '9' = 0x39); it would scale every output by 9/8."""
    path = saved / "adapter_config.json"
    text = path.read_text()
    assert '"alpha": 8.0' in text
    path.write_text(text.replace('"alpha": 8.0', '"alpha": 9.0'))
    with pytest.raises(AdapterFormatError, match=r"config digest stored in lordba_model\.safetensors"):
        read_adapter(saved)


@pytest.mark.parametrize(
    "change",
    [
        {"alpha": 16.0},
        {"r": 3},
        {"alpha_pattern": {"q_proj": 2.0}},
        {"rank_pattern": {"k_proj": 4}},
        {"scale_dtype": "float32"},
        {"target_modules": ["q_proj", "k_proj"]},
        {"exclude_modules": ["v_proj"]},
        {"ste_k": 99.0},
        {"mode": "ptq"},
        {"base_model_name_or_path": "someone/else"},
    ],
)
def test_any_changed_field_is_refused_by_the_digest(saved, change):
    set_config(saved, reseal=False, **change)
    with pytest.raises(AdapterFormatError, match=CONFIG_DIGEST_KEY):
        read_adapter(saved)


def test_library_version_and_weights_checksum_are_outside_the_digest(saved):
    set_config(saved, reseal=False, library_version="9.9.9")
    assert read_adapter(saved).config.alpha == 8.0


def test_every_single_bit_flip_of_the_config_is_refused_or_changes_nothing(saved):
    """All 8 × len(config) single-bit flips: each is refused with a LoRDBAError, or loads the very
    same adapter (a flip inside library_version, or whitespace that stays JSON)."""
    path = saved / "adapter_config.json"
    original = path.read_bytes()
    want = read_adapter(saved)
    loaded = 0
    for i in range(len(original)):
        for bit in range(8):
            data = bytearray(original)
            data[i] ^= 1 << bit
            path.write_bytes(bytes(data))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = read_adapter(saved)
            except LoRDBAError:
                continue
            loaded += 1
            assert got.config == want.config and got.sha256 == want.sha256, (i, bit)
            for name, rec in got.modules.items():
                assert all(torch.equal(t, want.modules[name].tensors[k]) for k, t in rec.tensors.items())
    assert loaded < 8 * 12  # only the few flips inside "library_version"'s value or harmless bytes


def test_files_written_before_the_digest_still_load(saved):
    tensors, metadata = load_weights(saved)
    del metadata[CONFIG_DIGEST_KEY]
    rewrite_weights(saved, tensors, metadata)
    assert read_adapter(saved).config.alpha == 8.0
    set_config(saved, alpha=9.0)  # without a digest, only the weights' checksum protects it
    assert read_adapter(saved).config.alpha == 9.0


def test_library_version_must_be_a_string(saved):
    set_config(saved, reseal=False, library_version=5)
    with pytest.raises(ConfigError, match="library_version must be a string"):
        read_adapter(saved)


def test_a_module_the_config_excludes_is_refused(saved):
    set_config(saved, exclude_modules=["q_proj"])
    with pytest.raises(AdapterFormatError, match="excluded by exclude_modules"):
        read_adapter(saved)
    set_config(saved, exclude_modules=r".*layers\.1\..*")
    with pytest.raises(AdapterFormatError, match="excluded by exclude_modules"):
        read_adapter(saved)


@pytest.mark.parametrize("bad", ["model.layers.0.self attn.q_proj", "model.layers.0.é", "m." * 129 + "x"])
def test_save_refuses_a_module_path_the_loader_refuses(tmp_path, state, bad):
    rec = state.modules[Q]
    modules = {bad: ModuleRecord(bad, rec.in_features, rec.out_features, rec.r, dict(rec.tensors))}
    config = LoRDBAConfig(r=2, alpha=8.0, target_modules=None)
    with pytest.raises(AdapterFormatError, match=r"cannot save: module name .* is not a module path"):
        AdapterState(config, modules).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "lordba_model.safetensors").exists()


def _edit_header(directory, edit, fix_checksum=False):
    """Rewrite the weights file as ``edit(header, data)`` returns it (the parsed safetensors header, the
    data section), the header padded to 8 bytes; with ``fix_checksum`` the config's weights_sha256 follows."""
    path = directory / "lordba_model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header, data = edit(json.loads(raw[8 : 8 + n]), raw[8 + n :])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    if fix_checksum:
        set_config(directory, weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _first(header):
    """The name of the tensor whose bytes start the data section."""
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _set_offsets(change):
    def edit(header, data):
        entry = header[_first(header)]
        entry["data_offsets"] = change(entry["data_offsets"])
        return header, data

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set_offsets(lambda o: [False, o[1]]), r"tensor '(\w+)': malformed data_offsets \[False, \d+\]"),  # False == 0
        (_set_offsets(lambda o: [-1, o[1]]), r"tensor '(\w+)': malformed data_offsets \[-1, \d+\]"),
        (_set_offsets(lambda o: [*o, 0]), r"tensor '(\w+)': malformed data_offsets \[0, \d+, 0\]"),
        (
            lambda h, d: (h, d + bytes(8)),
            r"holds \d+ data bytes but its header describes \d+ \(truncated",
        ),
    ],
    ids=["bool", "negative", "three", "padded"],
)
def test_a_header_that_does_not_describe_the_file_is_refused_before_it_is_hashed(saved, monkeypatch, edit, match):
    """check_length is what bounds a refusal by the header: a bool or negative offset, a third offset or
    trailing bytes were refused only after the whole file was read and hashed (a checksum mismatch)."""
    from lordba.format import pair as pair_module

    _edit_header(saved, edit)  # the checksum no longer matches: a refusal before hashing is all that can say why

    def never(*args, **kwargs):
        raise AssertionError("the file was read in full")

    monkeypatch.setattr(pair_module, "read_file_bytes", never)
    with pytest.raises(AdapterFormatError, match=match) as err:
        read_adapter(saved)
    assert "lordba_model.safetensors" in str(err.value) and "refused before hashing" in str(err.value)


def test_header_entries_in_any_order_describe_the_file(saved):
    """safetensors does not order a header's entries: listed last to first, the file is the same adapter
    (the length check took the last entry's end for the file's)."""
    want = read_adapter(saved)
    _edit_header(saved, lambda h, d: (dict(reversed(h.items())), d), fix_checksum=True)
    got = read_adapter(saved)
    for name, rec in want.modules.items():
        assert all(torch.equal(t, got.modules[name].tensors[k]) for k, t in rec.tensors.items())


def test_a_config_with_its_fields_in_another_order_loads(saved):
    """The digest is of the config's fields, not of their order in the file (a tool that rewrites the JSON)."""
    path = saved / "adapter_config.json"
    fields = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(fields.items())), indent=4))
    assert read_adapter(saved).config.alpha == 8.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}])
def test_a_config_field_that_is_not_json_has_no_digest(value):
    with pytest.raises(AdapterFormatError, match="config fields are not canonical JSON"):
        config_digest({"alpha": value})


def test_an_edited_base_path_is_refused_saying_how_to_load_on_a_moved_base_or_record_another(saved):
    """``base_model_name_or_path`` is in the digest (older readers compute it over every field), so editing it after
    moving the base folder is refused; the error named no field. It now names this one and what to do instead: give
    the base where you load, or record another base by setting it on the loaded adapter and saving again."""
    from lordba import LoRDBAModel

    original = json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"]
    set_config(saved, reseal=False, base_model_name_or_path="/moved/base")
    with pytest.raises(AdapterFormatError, match=r"base_model_name_or_path is in the digest.*put the saved value back"):
        read_adapter(saved)
    set_config(saved, reseal=False, base_model_name_or_path=original)
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), saved)
    lm.peft_config["default"].base_model_name_or_path = "/moved/base"
    lm.save_pretrained(saved / "resaved")
    assert read_adapter(saved / "resaved").config.base_model_name_or_path == "/moved/base"
