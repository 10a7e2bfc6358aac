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


def test_identity_gradient_is_clipped():
    x = torch.tensor([0.5, -1.0, 1.5, -3.0], requires_grad=True)
    SignSTE.apply(x, STE("identity", clip=1.0)).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_invalid_ste():
    with pytest.raises(ConfigError):
        STE("tanh")
    with pytest.raises(ConfigError):
        STE("smoothsign", k=0.0)
