"""``lordba export-lora``'s ``--base``: the base model whose layer types and heads the export needs."""

import json

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.cli import main


def test_export_lora_base_names_the_base_of_an_adapter_that_records_none(tmp_path, capsys):
    """An adapter of a GPT-2 (``Conv1D`` layers) whose config names no base exported ``fan_in_fan_out: false``,
    silently; ``--base FOLDER`` gives ``true``, without it the command warns naming ``--base``, and a
    ``--base`` that names no model is an error naming it (exit 3, nothing written)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32, bos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    lm = get_lordba_model(GPT2LMHeadModel(config), LoRDBAConfig(r=2, init="random", target_modules=["c_attn"]))
    lm.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()).get("base_model_name_or_path") is None
    assert main(["export-lora", str(tmp_path / "a"), str(tmp_path / "out"), "--base", str(tmp_path / "base")]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with pytest.warns(UserWarning, match=r"base model is unknown.*fan_in_fan_out.*--base"):
        assert main(["export-lora", str(tmp_path / "a"), str(tmp_path / "plain")]) == 0
    assert main(["export-lora", str(tmp_path / "a"), str(tmp_path / "bad"), "--base", str(tmp_path / "none")]) == 3
    assert str(tmp_path / "none") in capsys.readouterr().err and not (tmp_path / "bad").exists()
