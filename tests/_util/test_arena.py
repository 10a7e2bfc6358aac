import pytest
import torch

from lordba._util.arena import views_of_one_buffer


def test_copies_share_one_buffer_in_order_aligned_and_do_not_overlap():
    tensors = [torch.arange(5, dtype=torch.uint8), torch.randn(3, 2), torch.tensor([7], dtype=torch.int8),
               torch.randn(4).half()]  # fmt: skip
    views = views_of_one_buffer(tensors)
    assert all(torch.equal(v, t) and v.dtype == t.dtype and v.shape == t.shape for v, t in zip(views, tensors))
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    starts = [v.data_ptr() for v in views]
    assert starts == sorted(starts) and all(s % 8 == starts[0] % 8 for s in starts)
    views[0].fill_(0)  # copies: the originals are untouched, the neighbours too
    assert torch.equal(tensors[0], torch.arange(5, dtype=torch.uint8)) and torch.equal(views[1], tensors[1])


def test_tensors_on_two_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        views_of_one_buffer([torch.zeros(2), torch.zeros(2, device="meta")])
