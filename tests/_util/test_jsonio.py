"""Strict JSON from untrusted files: lone surrogates are refused like any other invalid JSON."""

import json

import pytest

from lordba import AdapterFormatError, LoRDBAConfig, get_lordba_model
from lordba._util.jsonio import parse_json
from lordba.cli import main

from conftest import set_config, tiny_llama


def test_surrogate_pairs_are_text_and_lone_surrogates_are_refused():
    assert parse_json(b'{"a": ["\\ud83d\\ude00"]}', "x") == {"a": ["\U0001f600"]}
    for raw in (b'{"a": "\\ud800"}', b'{"\\udfff": 1}', b'[[["x\\udc00y"]]]'):
        with pytest.raises(AdapterFormatError, match=r"x: not valid JSON .*lone UTF-16 surrogate"):
            parse_json(raw, "x")
    assert parse_json(b'{"a": "\\\\ud800"}', "x") == {"a": "\\ud800"}  # an escaped backslash: plain text


def test_inspect_of_a_config_with_a_lone_surrogate_exits_3(tmp_path, capsys):
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, target_modules=["q_proj"])).adapter_state(
        "default"
    ).save_pretrained(tmp_path)
    set_config(tmp_path, base_model_name_or_path="x")
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"x"', json.dumps("\ud800")))
    assert main(["inspect", str(tmp_path)]) == 3
    assert "lone UTF-16 surrogate" in capsys.readouterr().err
