"""Sizes are exact: the report predicts the bytes of our file and of PEFT's fp16 LoRA file."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lordba import LoRDBAConfig, get_lordba_model, size_report

from conftest import tiny_llama


def test_predicted_sizes_equal_real_files(tmp_path):
    for scale_dtype in ("float16", "int8"):
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, scale_dtype=scale_dtype))
        lm.save_pretrained(tmp_path / scale_dtype)
        rep = lm.size_report()
        assert rep.file_bytes == (tmp_path / scale_dtype / "lordba_model.safetensors").stat().st_size
    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules="all-linear"))
    peft_model.half()
    peft_model.save_pretrained(tmp_path / "peft")
    assert rep.fp16_lora_file_bytes == (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size


def test_bits_per_weight_formulas():
    rep = size_report({"x": (4096, 4096, 16)}, "float16")
    m = rep.modules[0]
    assert m.sign_bytes == 16 * 8192 // 8 and m.scale_bytes == 2 * (8192 + 16)
    assert abs(m.bpw_lora - (1 + 16 / 16 + 16 * 16 / (16 * 8192))) < 1e-9  # ≈ 2.0
    assert abs(m.bpw_dw - 8 * m.payload_bytes / 4096**2) < 1e-12


def test_int8_scales_reach_ten_times_smaller_on_7b_shapes():
    dims = {}
    for layer in range(32):
        for name, (i, o) in {
            "q_proj": (4096, 4096),
            "k_proj": (4096, 4096),
            "v_proj": (4096, 4096),
            "o_proj": (4096, 4096),
            "gate_proj": (4096, 11008),
            "up_proj": (4096, 11008),
            "down_proj": (11008, 4096),
        }.items():
            dims[f"model.layers.{layer}.{name}"] = (i, o, 16)
    rep = size_report(dims, "int8")
    assert rep.ratio_file > 10.3 and rep.ratio_payload > 10.5
    assert 7.9 < size_report(dims, "float16").ratio_file < 8.0


def test_r_ref_compares_with_another_lora_rank():
    rep = size_report({"x": (1024, 1024, 16)}, "int8", r_ref=32)
    assert rep.modules[0].fp16_lora_bytes == 2 * 32 * 2048 and torch.isfinite(torch.tensor(rep.ratio_file))


def test_stored_shapes_and_byte_counts_of_odd_dims():
    from lordba.format.adapter import stored_shapes
    from lordba.format.sizes import payload_bytes, stored_bytes

    shapes = stored_shapes(10, 7, 3, "int8")
    assert list(shapes) == ["sign_A", "sign_B", "scale_in", "scale_mid", "scale_out"]
    assert shapes == {
        "sign_A": (torch.uint8, (4,)),  # 30 signs -> 4 bytes
        "sign_B": (torch.uint8, (3,)),  # 21 signs -> 3 bytes
        "scale_in": (torch.int8, (10,)),
        "scale_mid": (torch.float32, (3,)),
        "scale_out": (torch.int8, (7,)),
    }
    assert stored_bytes(10, 7, 3, "int8") == {"sign_A": 4, "sign_B": 3, "scale_in": 10, "scale_mid": 12, "scale_out": 7}
    assert payload_bytes(10, 7, 3, "bfloat16") == 4 + 3 + 2 * (10 + 3 + 7)
    scales = ("scale_in", "scale_mid", "scale_out")
    assert sum(stored_bytes(10, 7, 2, "float16")[k] for k in scales) == 38
    assert sum(stored_bytes(10, 7, 2, "int8")[k] for k in scales) == 10 + 8 + 7
    rep = size_report({"x": (10, 7, 3)}, "int8")
    assert (rep.modules[0].sign_bytes, rep.modules[0].scale_bytes) == (7, 29)


def test_size_report_names_bad_dimensions_and_r_ref():
    # No modules, a zero or negative feature count: ZeroDivisionError; r_ref=-1: a report with negative ratios.
    from lordba import ConfigError

    for dims in ({}, {"x": (8, 0, 2)}, {"x": (8, -8, 2)}, {"x": (8, 8, 0)}, {"x": (8.0, 8, 2)}, {"x": (8, 8)}):
        with pytest.raises(ConfigError, match="size_report"):
            size_report(dims, "float16")
    for r_ref in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="r_ref"):
            size_report({"x": (8, 8, 2)}, "float16", r_ref=r_ref)
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=2))
    with pytest.raises(ConfigError, match="r_ref"):
        lm.size_report(r_ref=-1)


def test_size_report_refuses_a_file_version_that_cannot_hold_the_adapter():
    # int4 scales exist only in version 3 files (saves refuse version 1), and lordba writes no version 4: the
    # report gave a version-1 file size for both (int4's as large as int8's, above its own payload's need).
    from lordba import ConfigError
    from lordba.format.sizes import adapter_file_bytes

    dims = {"x": (64, 32, 4)}
    with pytest.raises(ConfigError, match=r"int4.*version 1"):
        size_report(dims, "int4", format_version=1)
    for version in (0, 2, 4, "3"):
        with pytest.raises(ConfigError, match="format_version"):
            adapter_file_bytes(dims, "int8", version)
    assert size_report(dims, "int4").file_bytes == adapter_file_bytes(dims, "int4", 3)
    assert size_report(dims, "int8", format_version=1).file_bytes == adapter_file_bytes(dims, "int8", 1)
