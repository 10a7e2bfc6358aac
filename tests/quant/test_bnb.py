"""lordba.quant.bnb without bitsandbytes installed (the ``quant`` extra left out)."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_wrapping_a_model_does_not_import_bitsandbytes():
    """Telling whether a layer is a bitsandbytes one imported bitsandbytes (about 3 s on this CPU, and its "Failed to
    load CPU gemm_4bit_forward" message) for every model wrapped, quantized or not; a bitsandbytes layer exists only
    once bitsandbytes is imported, so a model without one never imports it (and an NF4 model still matches)."""
    code = (
        "import sys\n"
        "from conftest import tiny_llama\n"
        "from lordba import LoRDBAConfig, get_lordba_model\n"
        "from lordba.quant import quantize_model\n"
        "config = LoRDBAConfig(r=2, target_modules=['q_proj'])\n"
        "lm = get_lordba_model(tiny_llama(0), config)\n"
        "q = get_lordba_model(quantize_model(tiny_llama(0), backend='q4'), config)\n"
        "print('bitsandbytes' in sys.modules)\n"
        "nf4 = get_lordba_model(quantize_model(tiny_llama(0), backend='bnb'), config)\n"
        "print(type(nf4.base_model.model.layers[0].self_attn.q_proj.base_layer).__name__)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "Linear4bit"], proc.stdout
