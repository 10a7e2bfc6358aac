"""lordba.quant.bnb without bitsandbytes installed (the ``quant`` extra left out)."""

import sys

import pytest

from lordba.cli import main
from lordba.quant import quantize_model
from tiny_model import tiny_model_dir

from conftest import tiny_llama


def test_a_bnb_base_without_bitsandbytes_names_it_and_the_extra(monkeypatch, tmp_path, capsys):
    # quantize_model(..., "bnb") failed with "AttributeError: 'NoneType' object has no attribute 'nn'" and
    # `lordba generate --quant bnb` with "internal error (a bug in lordba)", exit 1, where hqq's absence is
    # a ModuleNotFoundError naming it that the command reports with the extra to install (exit 2)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError) as err:
        quantize_model(tiny_llama(0), "bnb")
    assert err.value.name == "bitsandbytes"
    model = tiny_model_dir(tmp_path / "tiny")
    argv = ["generate", "--model", str(model), "--quant", "bnb", "--max-new-tokens", "1", "hi"]
    assert main(argv) == 2
    assert "'bitsandbytes', not installed: pip install 'lordba[quant]'" in capsys.readouterr().err
