"""``convert.export`` details the PEFT round trips of test_export.py leave open: the arguments refused, the target
name of a module path of indices only, the outermost saved module, the config of a plain adapter of ``nn.Linear``
layers, and what an ``overwrite`` carries over from the existing output (a link as a link, never a killed write's
temporary)."""

import errno
import json
import os
import types

import pytest
import torch

from lordba import ConfigError, LoRDBAConfig, LoRDBAError, export_lora, get_lordba_model
from lordba.convert.export import saved_module_paths, target_name
from lordba.format.atomic import TMP_MARK

from conftest import tiny_llama


@pytest.fixture
def lm():
    torch.manual_seed(0)
    return get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))


def test_an_unknown_dtype_or_an_out_dir_that_is_no_path_is_refused(lm, tmp_path):
    for dtype in ("int8", "float64", "fp16"):
        with pytest.raises(ConfigError, match=rf"dtype must be one of .*got '{dtype}'"):
            export_lora(lm, tmp_path / dtype, dtype=dtype)
    with pytest.raises(LoRDBAError, match="export_lora: out_dir must be a path, got int"):
        export_lora(lm, 3)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("path", "name"),
    [("model.layers.0.mlp.down_proj", "down_proj"), ("attn.to_out.0", "to_out.0"), ("0.1", "0.1"), ("2", "2")],
)
def test_a_target_name_keeps_the_indices_up_to_a_name(path, name):
    """A module of indices only (a Sequential of Sequentials at the root) is named by its whole path."""
    assert target_name(path) == name


def test_a_tensor_of_nested_saved_modules_is_named_by_the_outermost():
    """``modules_to_save`` of ``classifier`` and ``dense`` on ``classifier.dense``: PEFT's entry is ``classifier``,
    the module whose copy holds the tensor, not the inner one (a second, nested copy in PEFT)."""
    config = types.SimpleNamespace(saved_modules=["dense", "classifier"])
    names = ("classifier.dense.weight", "pooler.dense.bias", "other.bias")
    adapter = types.SimpleNamespace(config=config, extras={name: torch.zeros(1) for name in names})
    assert saved_module_paths(adapter) == ["classifier", "pooler.dense"]


def test_the_config_of_an_adapter_of_linear_layers_without_saved_modules(lm, tmp_path):
    """No ``modules_to_save`` (PEFT's default, as before saved modules were exported), ``fan_in_fan_out`` false."""
    export_lora(lm, tmp_path / "out", dtype="float32")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "modules_to_save" not in config and config["fan_in_fan_out"] is False


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard links", "no hard links"])
def test_overwrite_carries_a_link_as_a_link_and_no_killed_writes_temporary(lm, tmp_path, monkeypatch, hard_links):
    """Where the file system has no hard links the other files are copied: a link too, as a link (a copy of what it
    points to was a second, independent file)."""
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *args, **kwargs: _raise(OSError(errno.EXDEV, "cross-device link")))
    out = tmp_path / "out"
    export_lora(lm, out, dtype="float32")
    (tmp_path / "shared.json").write_text("{}")
    link = out / "tokenizer.json"
    link.symlink_to("../shared.json")
    killed = out / f".README.md{TMP_MARK}99999999.0123abcd"  # a write into the folder killed before its rename
    killed.write_text("half")
    export_lora(lm, out, dtype="float32", overwrite=True)
    assert link.is_symlink() and str(link.readlink()) == "../shared.json"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", link.name]


def _raise(err):
    raise err
