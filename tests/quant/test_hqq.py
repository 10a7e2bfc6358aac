"""The HQQ base: shapes HQQ cannot pack are refused with the library's error, before any layer is replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lordba.errors import ConfigError
from lordba.quant import quantize_model


class Two(nn.Module):
    def __init__(self, out_b: int) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(40, out_b, bias=False)


@pytest.mark.parametrize(("bits", "out_b", "group"), [(4, 20, 64), (2, 24, 64), (1, 20, 16), (8, 20, 64)])
def test_a_layer_hqq_cannot_pack_is_a_config_error_naming_it_and_the_model_is_untouched(bits, out_b, group):
    # 20x40 = 800 weights: 12.5 groups of 64 (HQQ fails in its packing with a bare RuntimeError);
    # 24x40 = 960: 15 groups, not a multiple of the 4 that 2-bit packing takes; 20x40 / 16 = 50 groups, not of 8
    model = Two(out_b)
    with pytest.raises(ConfigError, match=r"\bb\b.*hqq|hqq.*\bb\b"):
        quantize_model(model, "hqq", bits=bits, group_size=group)
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_shapes_hqq_packs_still_quantize(bits):
    model = quantize_model(Two(64), "hqq", bits=bits, group_size=16)  # 64 x 40 / 16 = 160 groups
    out = model.b(torch.randn(2, 40))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
