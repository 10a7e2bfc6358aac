"""The running batch's KV cache: every row's keys and values in one left-padded batch.

A row is one request. Its cache is a run of valid columns at the right end of the batch (left
padding before it, masked out by the attention mask), so that one decode forward appends one column
for every row at once. Rows join by :meth:`KVBatch.merge` (the shorter batch is padded on the left
to the longer one's width, then the rows are stacked) and leave by :meth:`KVBatch.select`, which
also drops leading columns that no remaining row uses. Each row keeps its own position ids (its
number of valid tokens), so a row's numbers do not depend on its neighbours' lengths.

This is the design of Hugging Face TGI's first batching engine (concatenating left-padded batches),
on transformers' own ``DynamicCache``; it works with any causal LM whose cache is a list of
``[batch, heads, length, head_dim]`` key/value tensors per layer (Llama, Qwen2, SmolLM2, ...). A model whose config
has sliding-window layers (Gemma 3, Mistral) gets transformers' ``DynamicSlidingWindowLayer`` for them, as
``generate`` does: such a layer keeps only the batch's last ``window - 1`` columns (every row's valid columns are at
the right end, so they are each row's last tokens) and counts all of them in ``cumulative_length``, which
``select`` and ``merge`` keep equal to the batch's width (the sliding mask's offset into the attention mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from lordba._util.modules import cache_keyword, output_cache
from lordba.errors import ShapeMismatchError


@dataclass
class KVBatch:
    """Per-layer key/value caches of the running rows, their attention mask and their lengths.

    ``mask`` is ``[rows, columns]`` (1 for a valid column); ``lengths[i]`` is row ``i``'s number of
    valid columns, which is also the position id of its next token.
    """

    cache: DynamicCache
    mask: torch.Tensor
    lengths: list[int]

    @property
    def rows(self) -> int:
        """Number of rows (requests) in the batch."""
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Number of columns (the longest row's length plus padding)."""
        return int(self.mask.shape[1])

    def select(self, keep: Sequence[int]) -> KVBatch | None:
        """The batch with only the rows ``keep`` (in that order), trimmed of columns no row uses;
        None when ``keep`` is empty."""
        if not keep:
            return None
        if list(keep) == list(range(self.rows)):
            return self
        index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        lengths = [self.lengths[i] for i in keep]
        width = max(lengths)
        for layer in self.cache.layers:  # a sliding layer holds the last columns only: it keeps those still used
            start = max(0, layer.keys.shape[2] - width)
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
            _set_width(layer, width)
        return KVBatch(self.cache, self.mask.index_select(0, index)[:, self.width - width :], lengths)

    def merge(self, other: KVBatch) -> KVBatch:
        """One batch with this batch's rows, then ``other``'s (the narrower is left-padded). Every new tensor is
        built before any is put in place: an allocation failing part way (out of memory) leaves this batch whole."""
        kinds = [type(layer) for layer in self.cache.layers]
        if kinds != [type(layer) for layer in other.cache.layers]:
            raise ShapeMismatchError(
                f"cannot merge KV batches of different cache layers ({len(kinds)} and {len(other.cache.layers)}"
                " layers, or sliding-window layers in one only)"
            )
        width = max(self.width, other.width)
        merged = []
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            columns = max(mine.keys.shape[2], theirs.keys.shape[2])  # a sliding layer's: at most its window's
            merged.append(
                (
                    torch.cat([_pad_left(mine.keys, columns, 2), _pad_left(theirs.keys, columns, 2)]),
                    torch.cat([_pad_left(mine.values, columns, 2), _pad_left(theirs.values, columns, 2)]),
                )
            )
        mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        for layer, (keys, values) in zip(self.cache.layers, merged):
            layer.keys, layer.values = keys, values
            _set_width(layer, width)
        return KVBatch(self.cache, mask, self.lengths + other.lengths)

    def kv_bytes(self) -> int:
        """Bytes held by the keys and values (padding included)."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


def _new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty cache for ``model``'s prefill: transformers' ``DynamicCache`` for its config (its sliding-window layers
    keep their window's columns only, as in ``generate``) when every layer is a plain or a sliding-window one (what
    :class:`KVBatch` pads and trims), else one whose every layer keeps all its columns (the masks are the model's)."""
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        cache = DynamicCache(config=config)
        if cache.layers and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
            return cache
    return DynamicCache()


def _set_width(layer: object, width: int) -> None:
    """Make a sliding-window layer count ``width`` tokens seen (the columns of the batch's attention mask)."""
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = width


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@torch.inference_mode()
def prefill(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], adapters: Sequence[str], pad_id: int = 0
) -> tuple[torch.Tensor, KVBatch]:
    """Run the prompts (left-padded, one adapter per row) through ``model`` in one forward.

    Takes a :class:`~lordba.nn.model.LoRDBAModel` (or any model whose forward takes
    ``adapter_names``), token id lists and one adapter name per prompt. Returns the last position's
    float32 logits ``[rows, vocab]`` and the new rows' :class:`KVBatch`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ShapeMismatchError("prefill needs at least one prompt, each of at least one token")
    width = max(len(p) for p in prompts)
    device = _device(model)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    cache = _new_cache(model)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        adapter_names=list(adapters),
        **{cache_keyword(model): cache},
    )
    return out.logits[:, -1, :].float(), KVBatch(output_cache(out), mask, [len(p) for p in prompts])


@torch.inference_mode()
def decode(model: torch.nn.Module, batch: KVBatch, tokens: Sequence[int], adapters: Sequence[str]) -> torch.Tensor:
    """Append one token per row (one forward, one adapter per row); returns float32 logits
    ``[rows, vocab]`` and extends ``batch`` in place by one column."""
    if len(tokens) != batch.rows or len(adapters) != batch.rows:
        raise ShapeMismatchError(f"decode: {len(tokens)} tokens and {len(adapters)} adapters for {batch.rows} rows")
    device = batch.mask.device
    ids = torch.tensor(list(tokens), dtype=torch.long, device=device).unsqueeze(1)
    positions = torch.tensor(batch.lengths, dtype=torch.long, device=device).unsqueeze(1)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.rows, 1))], dim=1)
    out = model(
        input_ids=ids,
        attention_mask=batch.mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        adapter_names=list(adapters),
        **{cache_keyword(model): batch.cache},
    )
    batch.cache = output_cache(out)
    batch.lengths = [n + 1 for n in batch.lengths]
    return out.logits[:, -1, :].float()


def _device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
