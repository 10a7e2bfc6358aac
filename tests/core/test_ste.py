import pytest
import torch

from lordba import ConfigError
from lordba.core.ste import STE, SignSTE, hard_sign


def test_hard_sign_of_zero_is_plus_one():
    assert hard_sign(torch.tensor([-2.0, -0.0, 0.0, 3.0])).tolist() == [-1.0, 1.0, 1.0, 1.0]


def test_smoothsign_gradient_is_tanh_derivative():
    x = torch.tensor([0.0, 0.01, -0.02, 1.0], requires_grad=True)
    SignSTE.apply(x, STE("smoothsign", 100.0)).sum().backward()
    t = torch.tanh(100 * x.detach())
    assert torch.allclose(x.grad, 100 * (1 - t * t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_smoothsign_gradient_of_low_precision_latents_is_the_float32_one_rounded(dtype):
    """``latent_dtype`` bfloat16/float16: ``1 - tanh²`` computed in that dtype cancels to exactly 0 from
    ``k·|x| ≈ 4`` (bfloat16) on, where the surrogate is still 0.13 at k = 100 (Adam would move the latent
    a full step): the surrogate is computed in float32 and rounded once."""
    x = torch.tensor([0.0, 0.01, -0.03, 0.04, 0.05, -0.06], dtype=dtype)
    got = STE("smoothsign", 100.0).grad(x, torch.ones_like(x))
    assert got.dtype == dtype
    t = torch.tanh(100 * x.double())
    torch.testing.assert_close(got.double(), 100 * (1 - t * t), rtol=2**-7, atol=0.0)
    assert (got > 0).all()


def test_identity_gradient_is_clipped():
    x = torch.tensor([0.5, -1.0, 1.5, -3.0], requires_grad=True)
    SignSTE.apply(x, STE("identity", clip=1.0)).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_invalid_ste():
    with pytest.raises(ConfigError):
        STE("tanh")
    with pytest.raises(ConfigError):
        STE("smoothsign", k=0.0)
    with pytest.raises(ConfigError, match="ste_clip"):
        STE("identity", clip=0.0)


def test_default_ste_is_the_config_default():
    """``STE()`` (the fused branch's default for callers of :mod:`lordba.core`) is what a default
    :class:`LoRDBAConfig` trains with: smoothsign, ``k = 100``, ``clip = 1``."""
    from lordba import LoRDBAConfig

    assert STE() == LoRDBAConfig().ste_spec == STE("smoothsign", 100.0, 1.0)
