"""The config is bound to the weights: its digest is stored in the weights file's metadata, so a
changed field (one flipped bit in ``alpha``) is refused; files written before the digest existed
still load; the writer never saves what its reader refuses."""

import json
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
