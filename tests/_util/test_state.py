import torch

from lordba._util.state import ordinary_tensors


def test_tensors_made_inside_are_ordinary_under_inference_mode_with_grad_still_off():
    with torch.inference_mode():
        assert torch.ones(2).is_inference()
        with ordinary_tensors():
            made = torch.ones(2)
            assert not torch.is_grad_enabled()  # the caller's mode: no gradient under inference mode
        assert torch.ones(2).is_inference()  # left as it was
    assert not made.is_inference()
    made.add_(1)  # an ordinary tensor: changed in place outside inference mode, its version counted
    assert made._version == 1


def test_outside_inference_mode_grad_mode_is_the_callers_and_it_decorates():
    @ordinary_tensors()
    def grad_on() -> bool:
        return torch.is_grad_enabled()

    assert grad_on()
    with torch.no_grad():
        assert not grad_on()
    with torch.inference_mode():
        assert not grad_on()
