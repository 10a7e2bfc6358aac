"""Adapters saved by earlier versions keep working (tests/fixtures/upgrade/<commit>, written by
tests/fixtures/make_upgrade_adapters.py with the code of that commit): format versions 1, 2 (extras) and 3
(compact), int8 and int4 scales, modules_to_save, trained biases, layers_to_transform and a multi-adapter folder
load with today's code and give the logits stored beside them; resaved today (format version 3), they give the
same logits again."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.make_upgrade_adapters import RECIPES, input_ids, tiny_llama
from lordba import LoRDBAModel
from lordba.format.adapter import read_adapter

UPGRADE = Path(__file__).parents[1] / "fixtures" / "upgrade"
CASES = [(c.name, name) for c in sorted(UPGRADE.iterdir()) if c.is_dir() for name in RECIPES if (c / name).is_dir()]
# what each commit wrote: the format version of each adapter (7674e8e: 1 without extras, 2 with them)
VERSIONS = {"7674e8e": {"fp16-multi": 1, "int8-saved-bias": 2, "int8-all-bias-layers": 2}}


def _logits(lm: LoRDBAModel) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=input_ids()).logits


def test_the_fixtures_cover_each_format_version():
    versions = {read_adapter(UPGRADE / c / n).format_version for c, n in CASES}
    assert versions == {1, 2, 3}
    for commit, expected in VERSIONS.items():
        assert {n: read_adapter(UPGRADE / commit / n).format_version for n in expected} == expected


@pytest.mark.parametrize("commit,name", CASES)
def test_an_adapter_of_an_earlier_version_loads_with_its_logits_and_resaves(commit, name, tmp_path):
    expected = load_file(str(UPGRADE / commit / "logits.safetensors"))
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), UPGRADE / commit / name)
    torch.testing.assert_close(_logits(lm), expected[name], rtol=0, atol=1e-5)
    if name + "+second" in expected:
        lm.load_adapter(UPGRADE / commit / name / "second", "second")
        lm.set_adapter(["default", "second"])
        torch.testing.assert_close(_logits(lm), expected[name + "+second"], rtol=0, atol=1e-5)
        lm.set_adapter("default")
    lm.save_pretrained(tmp_path, selected_adapters=["default"])
    assert read_adapter(tmp_path).format_version == 3
    again = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)
    torch.testing.assert_close(_logits(again), expected[name], rtol=0, atol=1e-5)
