import mmap

import pytest
import torch

from lordba._util.arena import HUGE_PAGE, empty_views, huge_page_buffer, views_of_one_buffer


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


def test_a_large_buffer_starts_on_a_huge_page_boundary_and_outlives_its_mapping_name():
    buf = huge_page_buffer(HUGE_PAGE + 12345)
    assert buf.dtype == torch.uint8 and buf.numel() == HUGE_PAGE + 12345 and buf.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux: an advised mapping of its own, aligned to the page
        assert buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(7)  # the only reference to the mapping is the tensor's
    view = buf[-5:]
    del buf
    assert view.tolist() == [7] * 5


def test_a_small_buffer_is_an_ordinary_tensor_unless_asked_for_a_whole_page():
    small = huge_page_buffer(1000)
    assert small.numel() == 1000 and small.untyped_storage().nbytes() == 1000
    paged = huge_page_buffer(1000, small_too=True)
    assert paged.numel() == 1000
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert paged.data_ptr() % HUGE_PAGE == 0 and paged.untyped_storage().nbytes() >= HUGE_PAGE
    views = views_of_one_buffer([torch.arange(5), torch.ones(3)], huge_pages=True, small_too=True)
    assert torch.equal(views[0], torch.arange(5)) and torch.equal(views[1], torch.ones(3))
    assert huge_page_buffer(0, small_too=True).numel() == 0


def test_views_at_cache_lines_in_huge_pages_keep_values():
    tensors = [torch.randint(0, 255, (1000, 3000), dtype=torch.uint8), torch.randn(7).half(), torch.randn(3, 5)]
    views = views_of_one_buffer(tensors, align=64, huge_pages=True)
    assert all(torch.equal(v, t) and v.dtype == t.dtype for v, t in zip(views, tensors))
    assert all(v.data_ptr() % 64 == 0 for v in views)
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        views_of_one_buffer(tensors, align=12)


def test_empty_views_have_the_asked_shapes_and_dtypes_side_by_side():
    views = empty_views([((3, 5), torch.float16), ((7,), torch.int8), ((2, 2, 2), torch.float32)], align=64)
    assert [(tuple(v.shape), v.dtype) for v in views] == [((3, 5), torch.float16), ((7,), torch.int8),
                                                            ((2, 2, 2), torch.float32)]  # fmt: skip
    assert all(v.is_contiguous() and v.data_ptr() % 64 == 0 for v in views)
    assert [v.data_ptr() - views[0].data_ptr() for v in views] == [0, 64, 128]
    views[1].fill_(5)
    assert views[1].tolist() == [5] * 7


def test_buffers_made_under_inference_mode_are_ordinary_tensors():
    """A model's moved tensors (adapters, q4 weights, the ``--aot`` cache) live in these buffers: made as
    inference tensors they would have no version counter, and a layer's kept prompt factors would be made
    again at every prompt."""
    with torch.inference_mode():
        source = [torch.arange(5, dtype=torch.float32), torch.ones(3, dtype=torch.int8)]
        assert all(t.is_inference() for t in source)
        copies = views_of_one_buffer(source, huge_pages=True, small_too=True)
        views = empty_views([((4,), torch.float32)])
        big = huge_page_buffer(HUGE_PAGE + 1)
    for t in (*copies, *views, big):
        assert not t.is_inference()
    assert torch.equal(copies[0], torch.arange(5, dtype=torch.float32))
    copies[0].add_(1)
    assert copies[1]._version > 0  # views of one buffer share its version counter


def test_freed_memory_is_returned_to_the_os_after_a_model_is_quantized(monkeypatch):
    """glibc kept the pages of the float weights quantize_model replaced (SmolLM2-135M: 0.68 GB resident after q4,
    0.41 GB once returned) for the process's life; quantizing now returns them."""
    import platform

    from lordba._util import arena
    from lordba.quant import quantize, quantize_model

    from conftest import tiny_llama

    if platform.libc_ver()[0] == "glibc":
        assert arena.return_freed_memory() is True
    calls = []
    monkeypatch.setattr(quantize, "return_freed_memory", lambda: calls.append(1) or True)
    quantize_model(tiny_llama(), backend="q4")
    assert calls == [1]


def test_returning_freed_memory_off_glibc_does_nothing(monkeypatch):
    """On Windows ``ctypes.CDLL(None)`` is a TypeError ("argument of type 'NoneType' is not iterable", from its
    path check), which escaped: every quantize_model and cached q4 load failed there after quantizing."""
    import ctypes

    from lordba._util import arena

    def windows_cdll(name, *args, **kwargs):
        if name is None:
            raise TypeError("argument of type 'NoneType' is not iterable")
        return ctypes.CDLL(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", windows_cdll)
    assert arena.return_freed_memory() is False


def test_held_together_knows_empty_views_layout_and_nothing_else():
    from lordba._util.arena import held_together

    specs = [((3, 5), torch.uint8), ((7,), torch.float16), ((2, 2), torch.float32)]
    views = empty_views(specs, align=64)
    assert held_together(views, align=64)
    assert not held_together(views[::-1], align=64)  # another order
    assert not held_together(views, align=8)  # another layout: packed closer
    assert not held_together([torch.empty(s, dtype=d) for s, d in specs], align=64)  # tensors of their own
    assert not held_together([])
