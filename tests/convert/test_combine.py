"""The dense combiner of add_weighted_adapter (lordba.convert.combine): a dense ΔW → LoRDBA records."""

import pytest
import torch

from lordba.convert.combine import combine_dense, lora_from_delta
from lordba.errors import ConversionError
from lordba.nn import model_combine


def test_registered_into_nn_at_import():
    assert model_combine._COMBINERS["dense"] is combine_dense


def test_lora_from_delta_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    delta = torch.randn(12, 3) @ torch.randn(3, 9)
    layer = lora_from_delta("m", delta, 3, 0.5)
    torch.testing.assert_close(layer.scaling * layer.B @ layer.A, delta, rtol=1e-4, atol=1e-4)
    padded = lora_from_delta("m", delta, 12, 0.5)  # rank above min(in, out): zero directions
    assert padded.A.shape == (12, 9) and padded.B.shape == (12, 12)
    with pytest.raises(ConversionError, match="'m'"):
        lora_from_delta("m", delta * float("nan"), 3, 0.5)


def test_combine_dense_reports_the_error_it_reaches():
    torch.manual_seed(0)
    signs_B, signs_A = torch.randn(16, 2).sign(), torch.randn(2, 24).sign()
    delta = (torch.rand(16, 1) * signs_B) @ (signs_A * torch.rand(1, 24))  # rank 2
    records, errors = combine_dense({"m": delta}, {"m": 4}, {"m": 1.0}, "float32")
    assert records["m"].r == 4 and set(records["m"].tensors) >= {"sign_A", "scale_mid"}
    assert 0 <= errors["m"] < 0.3
