import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lordba import ShapeMismatchError, pack_signs, unpack_signs
from lordba.core.packing import check_padding, packed_size
from lordba.errors import AdapterFormatError

shapes = st.lists(st.integers(1, 37), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pm1_bytes_identical_to_numpy_packbits(shape, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    packed = pack_signs(s)
    expected = np.packbits(s.reshape(-1).numpy() > 0)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numpy().tobytes() == expected.tobytes()
    assert packed.numel() == packed_size(s.numel())


@settings(max_examples=150, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_round_trip_of_real_tensors_is_their_sign(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t.view(-1)[0] = 0.0  # sign(0) = +1
    signs = unpack_signs(pack_signs(t), t.shape)
    assert signs.shape == t.shape
    assert torch.equal(signs, torch.where(t >= 0, 1.0, -1.0))
    assert np.packbits(t.reshape(-1).numpy() >= 0).tobytes() == pack_signs(t).numpy().tobytes()


def test_padding_bits_are_zero_and_checked():
    s = torch.ones(13)  # 13 bits → 2 bytes, 3 padding bits
    packed = pack_signs(s)
    assert packed.tolist() == [255, 0b11111000]
    check_padding(packed, 13, "t")
    bad = packed.clone()
    bad[-1] |= 1
    with pytest.raises(AdapterFormatError, match="padding"):
        check_padding(bad, 13, "t")


def test_negative_zero_packs_as_plus_one_and_nan_is_refused():
    assert unpack_signs(pack_signs(torch.tensor([-0.0, -1e-30])), (2,)).tolist() == [1.0, -1.0]
    with pytest.raises(ShapeMismatchError, match="NaN"):
        pack_signs(torch.tensor([1.0, float("nan")]))


def test_unpack_refuses_wrong_sizes_and_dtypes():
    with pytest.raises(ShapeMismatchError, match="needs exactly 2"):
        unpack_signs(torch.zeros(3, dtype=torch.uint8), (3, 4))
    with pytest.raises(ShapeMismatchError, match="1-D uint8"):
        unpack_signs(torch.zeros(2, dtype=torch.int8), (2, 8))


def test_unpack_dtype():
    out = unpack_signs(pack_signs(torch.tensor([1.0, -1.0])), (2,), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, "float32", None])
def test_unpack_refuses_a_dtype_that_cannot_hold_minus_one(dtype):
    """dtype=torch.uint8 gave 255 for every -1 sign, silently; torch.bool gave int64 ±1; the string "float32" failed
    in torch as "Invalid device string"."""
    with pytest.raises(ShapeMismatchError, match=r"dtype must be a torch dtype that holds -1"):
        unpack_signs(pack_signs(torch.tensor([1.0, -1.0])), (2,), dtype)
    for ok in (torch.int8, torch.float16, torch.complex64):
        assert unpack_signs(pack_signs(torch.tensor([1.0, -1.0])), (2,), ok).tolist() == [1, -1]
