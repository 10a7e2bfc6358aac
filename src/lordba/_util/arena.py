"""Many small tensors as views of one buffer; buffers the OS may back with huge pages."""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch

from lordba._util.state import ordinary_tensors

_ALIGN = 8  # bytes: every dtype's alignment
HUGE_PAGE = 2 << 20  # bytes: x86-64's and arm64's (4 KB granule) transparent huge page


@ordinary_tensors()
def huge_page_buffer(nbytes: int, small_too: bool = False) -> torch.Tensor:
    """A new uint8 CPU tensor of ``nbytes`` (contents undefined) whose memory Linux may back with 2 MB
    pages: an anonymous mapping, its start aligned to 2 MB and marked ``MADV_HUGEPAGE`` (transparent huge
    pages in ``madvise`` mode, the common default, give ordinary allocations 4 KB pages). Decode streams
    every weight once a token; in 4 KB pages that is a TLB miss every 4 KB and the misses evict the
    entries of everything else the step reads (docs/kernels.md). Where the OS has no such advice, or
    ``nbytes`` is under one huge page (unless ``small_too``: then one whole page is mapped for it), an
    ordinary ``torch.empty``. The mapping lives as long as the tensor (or a view of it) does."""
    if (nbytes < HUGE_PAGE and not (small_too and nbytes > 0)) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to align the start
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP compiled out or refused: ordinary pages, still one buffer
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


@ordinary_tensors()
def empty_views(
    specs: Sequence[tuple[Sequence[int], torch.dtype]],
    device: torch.device | str = "cpu",
    align: int = _ALIGN,
    huge_pages: bool = False,
    small_too: bool = False,
) -> list[torch.Tensor]:
    """New contiguous tensors of the given ``(shape, dtype)`` (contents undefined) as views of one new uint8
    buffer on ``device``, in the given order, each at a multiple of ``align`` bytes (a multiple of 8).
    ``huge_pages``: a CPU buffer from :func:`huge_page_buffer` (``small_too`` passed on). A caller moving
    tensors into them one at a time (copy, then drop the old one) holds at most the buffer and one old tensor
    at once.

    Raises:
        ValueError: ``align`` is not a multiple of 8.
    """
    if align < _ALIGN or align % _ALIGN:
        raise ValueError(f"empty_views: align must be a multiple of {_ALIGN}, got {align}")
    starts, sizes, total = _layout(specs, align)
    device = torch.device(device)
    if huge_pages and device.type == "cpu":
        buffer = huge_page_buffer(total, small_too)
    else:
        buffer = torch.empty(total + align, dtype=torch.uint8, device=device)
        buffer = buffer[-buffer.data_ptr() % align :][:total]
    return [
        buffer[start : start + size].view(dtype).view(tuple(shape))
        for (shape, dtype), start, size in zip(specs, starts, sizes)
    ]


def _layout(specs: Sequence[tuple[Sequence[int], torch.dtype]], align: int) -> tuple[list[int], list[int], int]:
    """Where :func:`empty_views` puts tensors of ``specs`` in its buffer: ``(starts, sizes, total)`` in bytes."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += -(-size // align) * align
    return starts, sizes, total


def held_together(tensors: Sequence[torch.Tensor], align: int = _ALIGN) -> bool:
    """Whether ``tensors`` already are what :func:`empty_views` makes for their shapes and dtypes with ``align``:
    contiguous views of one buffer, in this order, each at its place (the first at a multiple of ``align``)."""
    if not tensors or tensors[0].data_ptr() % align:
        return False
    starts, _, _ = _layout([(t.shape, t.dtype) for t in tensors], align)
    first, storage = tensors[0].data_ptr(), tensors[0].untyped_storage().data_ptr()
    return all(
        t.is_contiguous() and t.untyped_storage().data_ptr() == storage and t.data_ptr() - first == start
        for t, start in zip(tensors, starts)
    )


def views_of_one_buffer(
    tensors: Sequence[torch.Tensor], align: int = _ALIGN, huge_pages: bool = False, small_too: bool = False
) -> list[torch.Tensor]:
    """Copies of ``tensors`` (all on one device) as views of one new uint8 buffer (:func:`empty_views`), in the
    given order, each at a multiple of ``align`` bytes (a multiple of 8), contiguous, of its own shape and dtype
    (no gradient). ``huge_pages``: a CPU buffer from :func:`huge_page_buffer` (``small_too`` passed on).

    Raises:
        ValueError: the tensors are on more than one device, or ``align`` is not a multiple of 8.
    """
    if len({t.device for t in tensors}) > 1:
        raise ValueError("views_of_one_buffer: the tensors must be on one device")
    device = tensors[0].device if tensors else torch.device("cpu")
    views = empty_views([(t.shape, t.dtype) for t in tensors], device, align, huge_pages, small_too)
    with torch.no_grad():
        for view, t in zip(views, tensors):
            view.copy_(t)
    return views


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it with its own storage where it is a view of a larger buffer (this module's views
    of one buffer hold tensors of several dtypes in one storage, which ``torch.save`` refuses to write: "Cannot
    save multiple tensors or storages that view the same data as different types"). For state dicts and pickles."""
    if tensor.untyped_storage().nbytes() == tensor.nbytes and tensor.is_contiguous():
        return tensor
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def own_storages(buffers: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """A module's ``_buffers`` with each tensor in a storage of its own (:func:`own_storage`), for its pickled state."""
    return {k: None if v is None else own_storage(v) for k, v in buffers.items()}


def pinned_storages(tensors: Sequence[torch.Tensor]) -> tuple[torch.UntypedStorage, ...]:
    """The storages of ``tensors``, for a cache entry made from them to hold: while it lives, a tensor replaced
    (``.data =``, which keeps the version counter) cannot hand its freed address to the next one, which would then
    be taken for it (an entry keyed by version and address: ``quant.backend.kept_factors``,
    ``nn.adapter_base``'s caches)."""
    return tuple(t.untyped_storage() for t in tensors)


def return_freed_memory() -> bool:
    """Give the memory freed so far back to the OS where the C library keeps it (glibc's ``malloc_trim``): after
    a model's float weights were replaced by quantized ones, glibc kept their freed pages (SmolLM2-135M quantized to
    q4: 0.68 GB resident, 0.41 GB after this; a 249M-parameter model: 1.40 → 0.39 GB), which the process then held
    for its life (a server's). Costs ~20 ms. Returns whether anything was called (False off glibc)."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS; Windows' CDLL(None) is a TypeError)
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
