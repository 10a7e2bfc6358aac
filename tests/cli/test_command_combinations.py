"""Commands chained as users chain them: ``lordba convert`` (``--target-bpw``, int8 scales, a head trained in full)
then ``export-lora`` and PEFT's loader, ``inspect`` of every folder the other commands write, ``generate --quant auto``
on adapters recording q4 or no base, eager / ``--compile`` / ``--aot`` decoding of one int8-scale adapter, and
``cache --clear-quantized`` before ``generate --quant q4``; each checked against the adapter alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.cli import main
from tiny_model import save_peft_lora, tiny_model_dir


def _lora(model_dir, out, seed: int, modules_to_save=None):
    return save_peft_lora(AutoModelForCausalLM.from_pretrained(model_dir), out, seed, modules_to_save)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny model folder, ``conv`` (converted: --target-bpw 3, int8 scales, lm_head trained in full) and ``q4``
    (made on the q4 base, its config records it; its output scales large enough to change the greedy text)."""
    root = tmp_path_factory.mktemp("cli_combos")
    model_dir = tiny_model_dir(root / "model")
    argv = ["--quiet", "--iters", "2", "--scale-dtype", "int8", "--target-bpw", "3"]
    assert main(["convert", str(_lora(model_dir, root / "lora", 1, ["lm_head"])), str(root / "conv"), *argv]) == 0
    from lordba.quant import quantize_model

    base = quantize_model(AutoModelForCausalLM.from_pretrained(model_dir).eval(), backend="q4", group_size=64)
    torch.manual_seed(2)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random", scale_dtype="int8"))
    with torch.no_grad():
        for adapter in lm.adapter_modules("default").values():
            adapter.scale_out.mul_(300)
    lm.save_pretrained(root / "q4")
    return model_dir, root


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_converted_adapter_exported_loads_in_peft_with_its_logits(made, tmp_path):
    """``convert`` → ``export-lora --dtype float32`` → ``PeftModel.from_pretrained``: the LoRDBA adapter's logits,
    its head trained in full included."""
    from peft import PeftModel

    model_dir, root = made
    assert main(["export-lora", str(root / "conv"), str(tmp_path / "peft"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    ids = torch.tensor([[5, 20, 30, 40, 7, 9]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "peft").eval()
    lordba_model = LoRDBAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / "conv").eval()
    got, want = logits(peft_model, ids), logits(lordba_model, ids)
    base = logits(AutoModelForCausalLM.from_pretrained(model_dir), ids)
    assert (got - want).abs().max() < 1e-4 < (want - base).abs().max()


def test_inspect_reads_every_folder_the_commands_write(made, tmp_path, capsys):
    """Converted (with the source LoRA's ranks), made on q4, saved with two adapters (each folder), exported to
    PEFT (refused naming what it is, exit 3)."""
    model_dir, root = made
    lm = get_lordba_model(AutoModelForCausalLM.from_pretrained(model_dir), LoRDBAConfig(r=2, init="random"))
    lm.add_adapter("second", LoRDBAConfig(r=3, init="random", target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path / "multi")
    for folder, rank in (
        (root / "conv", None),
        (root / "q4", 4),
        (tmp_path / "multi", 2),
        (tmp_path / "multi" / "second", 3),
    ):
        assert main(["inspect", str(folder), "--json"]) == 0, folder
        report = json.loads(capsys.readouterr().out)
        if rank is not None:
            assert {m["r"] for m in report["size"]["modules"]} == {rank}, folder
    assert main(["export-lora", str(root / "conv"), str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "peft")]) == 3
    err = capsys.readouterr().err
    assert "LORA" in err and "internal error" not in err


def _generate(capsys, model_dir, *argv: str) -> str:
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "10", *argv, "Hello"]) == 0
    return capsys.readouterr().out


def test_quant_auto_takes_the_recorded_base_or_none(made, tmp_path, capsys, monkeypatch):
    model_dir, root = made
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    q4 = ["--adapter", str(root / "q4"), "--q4-compute", "exact"]
    assert _generate(capsys, model_dir, *q4) == _generate(capsys, model_dir, *q4, "--quant", "q4")
    conv = ["--adapter", str(root / "conv"), "--branch-compute", "exact"]
    assert _generate(capsys, model_dir, *conv) == _generate(capsys, model_dir, *conv, "--quant", "none")


def test_clearing_the_quantized_cache_with_nothing_or_something_cached_then_generate_rebuilds_it(
    made, tmp_path, capsys, monkeypatch
):
    model_dir, root = made
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    assert main(["cache", "--clear-quantized"]) == 0  # nothing cached: nothing to do
    capsys.readouterr()
    argv = ["--adapter", str(root / "q4"), "--quant", "q4", "--q4-compute", "exact"]
    first = _generate(capsys, model_dir, *argv)
    entries = [p for p in (tmp_path / "cache" / "quantized").iterdir()]
    assert entries
    assert main(["cache", "--clear-quantized"]) == 0
    capsys.readouterr()
    assert not any((tmp_path / "cache" / "quantized").iterdir())
    assert _generate(capsys, model_dir, *argv) == first
    assert any((tmp_path / "cache" / "quantized").iterdir())
    assert main(["cache"]) == 0 and "1 entry" in capsys.readouterr().out


@pytest.mark.long
@pytest.mark.parametrize("quant", ["none"])  # (q4's --aot against eager: tests/cli/test_generate.py)
def test_eager_compile_and_aot_decode_an_int8_adapter_to_the_same_text(made, tmp_path, capsys, monkeypatch, quant):
    model_dir, root = made
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    adapter = root / ("conv" if quant == "none" else "q4")
    argv = ["--adapter", str(adapter), "--quant", quant]
    eager = _generate(capsys, model_dir, *argv)
    torch._dynamo.reset()
    assert _generate(capsys, model_dir, *argv, "--compile") == eager
    torch._dynamo.reset()
    assert _generate(capsys, model_dir, *argv, "--aot") == eager
