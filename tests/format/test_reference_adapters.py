"""Adapters written before the restructure of issue 13 (tests/fixtures/reference, made by
tests/fixtures/make_reference_adapters.py with the code of commit 0e086ec) still load and give the
same logits, and the same recipe today writes byte-identical files: the format did not change."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lordba import LoRDBAModel

from conftest import tiny_llama

REFERENCE = Path(__file__).parents[1] / "fixtures" / "reference"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_recipe_writes_byte_identical_files(tmp_path):
    from fixtures.make_reference_adapters import main

    main(tmp_path)
    written, committed = _files(tmp_path), _files(REFERENCE)
    adapters = {k for k in committed if not k.endswith("logits.safetensors")}
    assert adapters and adapters <= written.keys()
    for name in sorted(adapters):
        assert written[name] == committed[name], name


@pytest.mark.parametrize("name", ["fp16", "int8", "trained"])
def test_committed_adapters_load_and_give_the_committed_logits(name):
    from fixtures.make_reference_adapters import input_ids

    expected = load_file(str(REFERENCE / "logits.safetensors"))
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), REFERENCE / name)
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=input_ids()).logits, expected[name], rtol=0, atol=1e-5)
    if name != "trained":
        lm.load_adapter(REFERENCE / name / "second", "second")
        lm.set_adapter(["default", "second"])
        with torch.no_grad():
            torch.testing.assert_close(lm(input_ids=input_ids()).logits, expected[name + "+second"], rtol=0, atol=1e-5)
