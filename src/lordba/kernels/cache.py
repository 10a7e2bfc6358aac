"""Per-adapter inference caches, invalidated by the tensors' version counters.

Without a gradient, what an adapter's branch needs from its parameters changes only when they are
written to (an optimizer step, ``load_stored``, ``hotswap_adapter``, ``.to()``), so it is computed
once and kept until then:

* the decoded scales ``(b, m, a)`` (float32), keyed by each scale parameter's ``_version``,
  ``data_ptr()`` and the adapter's codec. An adapter loaded from a file (or hot-swapped) holds
  parameters that already are decoded values (``fake_quant`` leaves them unchanged), and so does
  any float32 adapter: then the cache holds views of the parameters and costs no memory. Otherwise
  (a trained int8/float16 adapter's latent scales) it is a float32 copy, ``in + r + out`` values.
  A compact adapter (:meth:`~lordba.nn.layer.DoubleBinaryAdapter.compact`) keeps nothing: the CPU
  kernels read its stored scales directly, other paths decode them per call;
* for an adapter in latent form, its signs packed on the fly (``r·(in+out)/8`` bytes), so that a
  latent adapter runs the very kernel its packed form runs and both give bit-identical outputs;
* in the ``dense`` kernel mode only, the folded dense factors ``A' = S_A diag(b)`` (r×in) and
  ``B' = s·diag(a) S_B diag(m)`` (out×r) in the activation dtype: ``r·(in+out)`` elements, i.e.
  32× the packed signs in float32. :func:`cache_nbytes` reports it.

The cache is a plain attribute of the adapter module: it is not part of its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lordba.core.packing import pack_signs

if TYPE_CHECKING:
    from lordba.nn.layer import DoubleBinaryAdapter

_ATTR = "_lordba_kernel_cache"


class _Cache:
    __slots__ = ("dense", "dense_key", "limits", "scale_key", "scales", "sign_key", "signs")

    def __init__(self) -> None:
        self.scale_key = self.sign_key = self.dense_key = None
        self.scales = self.signs = self.dense = None
        self.limits: dict = {}


def _entry(adapter: DoubleBinaryAdapter) -> _Cache:
    entry = adapter.__dict__.get(_ATTR)
    if entry is None:
        entry = _Cache()
        adapter.__dict__[_ATTR] = entry
    return entry


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    return t._version, t.data_ptr()


def scales(adapter: DoubleBinaryAdapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoded ``(b, m, a)`` of ``adapter`` (float32, no gradient), recomputed only after a write."""
    params = adapter._parameters  # direct dict access: this runs once per layer and token
    if "scale_in" not in params:  # compact: decoded on each call (not kept: that is its point)
        buffers = adapter._buffers
        return adapter.codec.decode(buffers["scale_in"], buffers["scale_mid"], buffers["scale_out"])
    entry = adapter.__dict__.get(_ATTR) or _entry(adapter)
    p_in, p_mid, p_out = params["scale_in"], params["scale_mid"], params["scale_out"]
    key = (
        p_in._version,
        p_mid._version,
        p_out._version,
        p_in.data_ptr(),
        p_mid.data_ptr(),
        p_out.data_ptr(),
        adapter.codec.name,
    )
    if entry.scale_key != key:
        with torch.no_grad():
            decoded = adapter.codec.fake_quant(p_in, p_mid, p_out)
            entry.scales = tuple(_view_if_equal(p, v) for p, v in zip((p_in, p_mid, p_out), decoded))
        entry.scale_key = key
    return entry.scales


def _view_if_equal(param: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """``param`` itself (detached, sharing its storage) when it already holds ``decoded``, else ``decoded``."""
    if param.dtype == decoded.dtype and param.is_contiguous() and torch.equal(param, decoded):
        return param.detach()
    return decoded.contiguous()


def signs(adapter: DoubleBinaryAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed ``(sign_A, sign_B)`` bytes: the buffers of a packed adapter, or the latents packed once."""
    latent_A = adapter._parameters.get("latent_A")
    if latent_A is None:
        buffers = adapter._buffers
        return buffers["sign_A"], buffers["sign_B"]
    entry = _entry(adapter)
    latent_B = adapter._parameters["latent_B"]
    key = (_stamp(latent_A), _stamp(latent_B))
    if entry.sign_key != key:
        entry.signs = (pack_signs(latent_A), pack_signs(latent_B))
        entry.sign_key = key
    return entry.signs


def limit(adapter: DoubleBinaryAdapter, key: tuple, compute: Callable[[], int]) -> int:
    """A per-adapter memo of the dispatch limit for ``key`` (mode, dtype, ISA)."""
    limits = _entry(adapter).limits
    found = limits.get(key)
    if found is None:
        found = limits[key] = compute()
    return found


def dense(adapter: DoubleBinaryAdapter, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded dense factors ``(A', B')`` in ``dtype`` (the ``dense`` mode), built once per write."""
    entry = _entry(adapter)
    sign_A, sign_B = signs(adapter)
    held = (adapter.scale_in, adapter.scale_mid, adapter.scale_out)  # parameters, or a compact adapter's buffers
    key = (*map(_stamp, held), adapter.codec.name, _stamp(sign_A), _stamp(sign_B), adapter.scaling, dtype)
    if entry.dense_key != key:
        from lordba.core.packing import unpack_signs

        b, m, a = scales(adapter)
        with torch.no_grad():
            s_a = unpack_signs(sign_A, (adapter.r, adapter.in_features))
            s_b = unpack_signs(sign_B, (adapter.out_features, adapter.r))
            folded_a = (s_a * b[None, :]).to(dtype)
            folded_b = (s_b * (adapter.scaling * a)[:, None] * m[None, :]).to(dtype)
        entry.dense = (folded_a.contiguous(), folded_b.contiguous())
        entry.dense_key = key
    return entry.dense


def clear(module: nn.Module) -> None:
    """Drop the caches of every adapter in ``module`` (they rebuild on the next call)."""
    for sub in module.modules():
        sub.__dict__.pop(_ATTR, None)


def cache_nbytes(module: nn.Module) -> dict[str, int]:
    """Bytes held by the caches under ``module`` beyond the adapters' own parameters and buffers
    (views of those count nothing): ``{"scales", "signs", "dense", "total"}``."""
    sizes = {"scales": 0, "signs": 0, "dense": 0}
    for sub in module.modules():
        entry = sub.__dict__.get(_ATTR)
        if entry is None:
            continue
        own = {t.untyped_storage().data_ptr() for t in (*sub.parameters(), *sub.buffers())}
        for field in sizes:
            tensors = getattr(entry, field) or ()
            sizes[field] += sum(
                t.numel() * t.element_size() for t in tensors if t.untyped_storage().data_ptr() not in own
            )
    sizes["total"] = sum(sizes.values())
    return sizes


def held_nbytes(adapters: Sequence[nn.Module]) -> int:
    """Bytes ``adapters`` hold in memory at inference: parameters, buffers and what their caches add."""
    own = sum(t.numel() * t.element_size() for ad in adapters for t in (*ad.parameters(), *ad.buffers()))
    return own + sum(cache_nbytes(ad)["total"] for ad in adapters)
