"""The loader's vectorised value checks, its one read of a file and the tensors as views of it
(lordba.format.header)."""

import io
import struct

import pytest
import torch

from lordba.core.packing import pack_signs
from lordba.errors import AdapterFormatError
from lordba.format.header import ModuleRecord, check_all_values, check_values, read_file_bytes, tensor_views


def record(path, in_f=13, out_f=7, r=3, g=None):
    """A valid int8-format module (r·in and out·r not multiples of 8: padding bits exist)."""
    g = g or torch.Generator().manual_seed(0)
    b = torch.randint(-127, 128, (in_f,), dtype=torch.int8, generator=g)
    a = torch.randint(-127, 128, (out_f,), dtype=torch.int8, generator=g)
    b[0], a[0] = 127, -127
    tensors = {
        "sign_A": pack_signs(torch.randn(r, in_f, generator=g)),
        "sign_B": pack_signs(torch.randn(out_f, r, generator=g)),
        "scale_in": b,
        "scale_mid": torch.rand(r, generator=g),
        "scale_out": a,
    }
    return ModuleRecord(path, in_f, out_f, r, tensors)


def corrupt(kind):
    def apply(rec):
        t = rec.tensors
        if kind == "padding":
            t["sign_A"][-1] |= 1
        elif kind == "nan":
            t["scale_mid"][1] = float("nan")
        elif kind == "minus128":
            t["scale_out"][2] = -128
        elif kind == "peak":
            t["scale_in"].clamp_(-100, 100)
        elif kind == "peak126":  # one code short of the format's peak
            t["scale_in"].clamp_(-126, 126)

    return apply


@pytest.mark.parametrize("kind", ["padding", "nan", "minus128", "peak", "peak126"])
def test_vectorised_checks_refuse_what_the_per_module_check_refuses_with_its_message(kind):
    records = [record(f"layers.{i}.proj", g=torch.Generator().manual_seed(i)) for i in range(6)]
    check_all_values(records, "int8", "f")  # all valid
    corrupt(kind)(records[4])
    with pytest.raises(AdapterFormatError) as per_module:
        check_values(records[4], "int8", "f")
    with pytest.raises(AdapterFormatError) as vectorised:
        check_all_values(records, "int8", "f")
    assert str(vectorised.value) == str(per_module.value) and "layers.4.proj" in str(vectorised.value)


def test_int4_codes_off_its_grid_are_refused_by_both_checks_naming_the_tensor():
    """An int8 code that is no int4 code (100: between 91 and 109), in a vector that still reaches 127."""
    from lordba.core.scales import get_codec

    records = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        rec = record(f"layers.{i}.proj", g=g)
        codes = get_codec("int4").encode(
            torch.randn(13, generator=g), torch.rand(3, generator=g), torch.randn(7, generator=g)
        )
        rec.tensors.update(zip(("scale_in", "scale_mid", "scale_out"), codes))
        records.append(rec)
    check_all_values(records, "int4", "f")  # all valid
    scale_in = records[2].tensors["scale_in"]
    scale_in[int(scale_in.abs().argmin())] = 100
    for check in (lambda: check_values(records[2], "int4", "f"), lambda: check_all_values(records, "int4", "f")):
        with pytest.raises(AdapterFormatError, match=r"layers\.2\.proj\.scale_in: a code outside the int4 format"):
            check()


def test_all_zero_int8_scales_are_valid():
    rec = record("p")
    rec.tensors["scale_out"].zero_()
    check_all_values([rec], "int8", "f")


def test_tensors_are_views_of_one_read_and_a_misaligned_one_is_copied():
    data = struct.pack("<2f", 0.5, 4.0) + bytes(range(1, 12)) + struct.pack("<2f", 1.5, -2.0)
    spans = {
        "a": (torch.float32, (2,), 8, 16),  # aligned: a view
        "u": (torch.uint8, (3,), 16, 19),
        "i": (torch.int8, (2, 4), 19, 27),
        "f": (torch.float32, (2,), 27, 35),  # offset 27: misaligned for float32, copied
    }
    raw = b"\0" * 8 + data
    whole = read_file_bytes(io.BytesIO(raw), "f", len(raw), aligned_at=8)
    assert bytes(whole.numpy()) == raw
    got = tensor_views(whole, spans)
    assert got["a"].data_ptr() % 64 == 0  # the first tensor byte lies on a cache line
    assert got["a"].tolist() == [0.5, 4.0] and got["f"].tolist() == [1.5, -2.0]
    assert got["u"].tolist() == [1, 2, 3] and got["i"].shape == (2, 4) and got["i"][0, 0] == 4
    one = whole.untyped_storage().data_ptr()
    assert got["a"].untyped_storage().data_ptr() == got["u"].untyped_storage().data_ptr() == one
    assert got["i"].untyped_storage().data_ptr() == one
    assert got["f"].untyped_storage().data_ptr() != one


@pytest.mark.parametrize("shift", [0, 1, 2, 3, 5])
def test_views_follow_where_the_bytes_lie_in_memory(shift):
    """Alignment is judged in memory, not in the file: bytes placed at any offset of their storage
    give the same values, views where the dtype allows, copies elsewhere."""
    raw = b"\0" * 8 + struct.pack("<2f", 0.5, 4.0) + struct.pack("<h", -3)
    spans = {"a": (torch.float32, (2,), 8, 16), "h": (torch.int16, (1,), 16, 18)}
    storage = torch.zeros(len(raw) + shift, dtype=torch.uint8)
    data = storage[shift:]
    data.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    got = tensor_views(data, spans)
    assert got["a"].tolist() == [0.5, 4.0] and got["h"].tolist() == [-3]
    shared = got["a"].untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    assert shared == ((shift + 8) % 4 == 0)


def test_a_file_shorter_than_its_size_is_refused_as_truncated():
    with pytest.raises(AdapterFormatError, match="truncated"):
        read_file_bytes(io.BytesIO(b"\0" * 10), "f", 11)


@pytest.mark.parametrize("header_bytes", [5, 6, 7, 9])
def test_a_data_section_at_any_file_offset_gives_views_of_its_aligned_tensors(header_bytes):
    """A header not padded to 8 bytes (safetensors does not require it) puts the data section at an odd file
    offset: read_file_bytes aligns it in memory, and the tensors are views there with their own values."""
    data = struct.pack("<2f", 0.5, 4.0) + struct.pack("<3h", -3, 7, 9) + bytes([1, 2])
    spans = {
        "f": (torch.float32, (2,), header_bytes, header_bytes + 8),
        "h": (torch.int16, (3,), header_bytes + 8, header_bytes + 14),
        "u": (torch.uint8, (2,), header_bytes + 14, header_bytes + 16),
    }
    raw = b"\0" * header_bytes + data
    whole = read_file_bytes(io.BytesIO(raw), "f", len(raw), aligned_at=header_bytes)
    got = tensor_views(whole, spans)
    assert got["f"].tolist() == [0.5, 4.0] and got["h"].tolist() == [-3, 7, 9] and got["u"].tolist() == [1, 2]
    one = whole.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == one for t in got.values())  # no copy
    assert got["f"].data_ptr() % 64 == 0


def test_byte_ranges_are_checked_by_the_header_check_itself():
    """check_length (before hashing) also refuses these; the header and tiling checks must not rely on it."""
    from lordba.format.header import check_contiguous, check_tensor_set

    expected = [("t", torch.uint8, (4,), 4)]
    for offsets, match in (
        ([False, 4], r"tensor t: malformed data_offsets \[False, 4\]"),
        ([0, True], r"tensor t: malformed data_offsets \[0, True\]"),
        ([-1, 3], r"tensor t: byte range \[-1, 3\] holds 4 bytes, expected 4"),
        ([0, 5], r"tensor t: byte range \[0, 5\] holds 5 bytes, expected 4"),
    ):
        header = {"t": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}
        with pytest.raises(AdapterFormatError, match=match):
            check_tensor_set(header, expected, {}, "f")
    spans = {"a": (torch.uint8, (4,), 0, 4), "b": (torch.uint8, (4,), 4, 8)}
    check_contiguous(spans, 8, "f")
    with pytest.raises(AdapterFormatError, match=r"f: the file holds 9 data bytes but its header describes 8"):
        check_contiguous(spans, 9, "f")
    with pytest.raises(AdapterFormatError, match=r"f: tensor b: data does not follow the previous tensor"):
        check_contiguous({**spans, "b": (torch.uint8, (4,), 3, 7)}, 7, "f")
