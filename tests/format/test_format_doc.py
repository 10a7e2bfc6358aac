"""The numpy decoder of docs/format.md reads what lordba writes (versions 1 and 3, every scale
format), independently of lordba's reader."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.core.packing import unpack_signs
from lordba.core.scales import get_codec
from lordba.format.adapter import read_adapter

from conftest import tiny_llama

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"


def _decoder() -> dict:
    text = DOC.read_text()
    code = re.search(r"<!-- decoder: begin -->\n```python\n(.*?)```\n<!-- decoder: end -->", text, re.S)
    assert code is not None, "docs/format.md lost its decoder"
    namespace: dict = {}
    exec(compile(code.group(1), str(DOC), "exec"), namespace)  # our own documentation
    return namespace


CASES = [(v, d) for v in (1, 3) for d in ("float32", "float16", "bfloat16", "int8")] + [(3, "int4")]  # int4: v3 only


@pytest.mark.parametrize("version, scale_dtype", CASES)
def test_the_documented_decoder_reads_lordba_files(tmp_path, version, scale_dtype):
    torch.manual_seed(2)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random", scale_dtype=scale_dtype))
    lm.save_pretrained(tmp_path, format_version=version)
    decoded = _decoder()["decode"](tmp_path)
    adapter = read_adapter(tmp_path)
    assert set(decoded) == set(adapter.modules)
    codec = get_codec(scale_dtype)
    for path, rec in adapter.modules.items():
        S_A, S_B, b, m, a = decoded[path]
        t = rec.tensors
        assert np.array_equal(S_A, unpack_signs(t["sign_A"], (rec.r, rec.in_features)).numpy())
        assert np.array_equal(S_B, unpack_signs(t["sign_B"], (rec.out_features, rec.r)).numpy())
        for mine, theirs in zip((b, m, a), codec.decode(t["scale_in"], t["scale_mid"], t["scale_out"])):
            np.testing.assert_allclose(mine, theirs.double().numpy(), rtol=1e-6, atol=0)
