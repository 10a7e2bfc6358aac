"""The lab's cache of quantized bases: a second quantization of the same model folder loads the
cached layers, equal to the first, for the HQQ and q4 bases."""

import pytest
import torch

from lordba.quant.cache import quantize_model_cached

from conftest import tiny_llama


@pytest.mark.parametrize(("backend", "group"), [("hqq", 8), ("q4", 32)])
def test_cached_base_equals_the_fresh_one(tmp_path, monkeypatch, backend, group, input_ids):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_llama(0).save_pretrained(folder)
    fresh = quantize_model_cached(tiny_llama(0), folder, backend=backend, bits=4, group_size=group)
    files = list((tmp_path / "cache" / "quantized").glob("*.safetensors"))
    assert len(files) == 1
    cached = quantize_model_cached(tiny_llama(0), folder, backend=backend, bits=4, group_size=group)
    assert cached.lordba_quantization == fresh.lordba_quantization
    assert cached.lordba_quantization["head_bits"] == (8 if backend == "q4" else 0)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=input_ids).logits, cached(input_ids=input_ids).logits)
    if backend == "q4":  # the loaded weights held in one buffer, as quantize_model holds them
        weights = [m.qweight for m in cached.modules() if hasattr(m, "qweight")]
        assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
