"""serve.batch's KVBatch on hand-made caches (no model): the rows a ``select`` keeps and their order, the columns it
trims, what ``merge`` stacks and pads, and a ``decode`` refused before it touches the batch.

Round 5 of the hand-made mutants (serve/batch.py, each applied to a copy of src and the tests run against it): these
kill a reordering ``select`` returning the batch as it was (b01, which test_engine.py lets survive: the engine only
drops rows), columns trimmed to the shortest kept row or one too many (b02, b03), the lengths of the first rows kept
(b04), an empty ``select`` giving a batch of no rows (b05), a merge stacking the masks or the lengths the other way
(b06, b07) or padding on the right (b08), and ``decode`` not checking the adapters' count (b14: the model's own
refusal came after the mask had grown a column). A batch whose first layer is a sliding-window one (transformers'
``DynamicSlidingWindowLayer``: the batch's last ``window - 1`` columns) keeps that bound through ``select`` and
``merge``, and its count of columns seen (the sliding mask's offset) equal to the batch's width."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from lordba.errors import ShapeMismatchError
from lordba.serve.batch import KVBatch, decode


def batch(lengths: list[int], width: int | None = None, offset: float = 0.0, window: int | None = None) -> KVBatch:
    """A left-padded two-layer batch of rows of ``lengths``: each valid column of row ``i`` holds
    ``offset + 100 i + column`` (layer 1: keys + 1000; values: keys negated), each padded column 0. With ``window``,
    layer 0 is a sliding-window layer of that window (it holds the last ``window - 1`` columns)."""
    width = width or max(lengths)
    rows = len(lengths)
    mask = torch.zeros(rows, width, dtype=torch.long)
    keys = torch.zeros(rows, 1, width, 1)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
        keys[i, 0, width - n :, 0] = offset + 100 * i + torch.arange(width - n, width, dtype=torch.float32)
    cache = DynamicCache()
    if window is not None:
        cache.layers = [DynamicSlidingWindowLayer(window), DynamicLayer()]
    for layer in range(2):
        cache.update(keys * mask[:, None, :, None] + 1000 * layer * mask[:, None, :, None], -keys, layer)
    return KVBatch(cache, mask, list(lengths))


def valid(b: KVBatch, row: int, layer: int = 0) -> list[float]:
    """Row ``row``'s keys in its valid columns (what attention reads; a sliding layer: those it holds)."""
    keys = b.cache.layers[layer].keys[row, 0, :, 0]
    return keys[b.mask[row, b.width - keys.shape[0] :].bool()].tolist()


def test_select_keeps_the_rows_asked_for_in_that_order_with_their_lengths_and_trims_unused_columns():
    b = batch([2, 5, 3])
    rows = {i: (valid(b, i), valid(b, i, 1)) for i in range(3)}
    kept = b.select([2, 0])
    assert kept.lengths == [3, 2] and kept.rows == 2
    assert kept.width == 3 and kept.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert [(valid(kept, j), valid(kept, j, 1)) for j in range(2)] == [rows[2], rows[0]]
    assert all(layer.keys.shape[2] == layer.values.shape[2] == 3 for layer in kept.cache.layers)


def test_select_of_every_row_in_another_order_reorders_them():
    b = batch([4, 2])
    first, second = valid(b, 0), valid(b, 1)
    swapped = b.select([1, 0])
    assert swapped.lengths == [2, 4] and swapped.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert [valid(swapped, 0), valid(swapped, 1)] == [second, first]


def test_select_keeping_the_longest_row_keeps_every_column_and_none_is_none():
    b = batch([3, 6, 1])
    kept = b.select([1, 2])
    assert kept.width == 6 and kept.lengths == [6, 1] and valid(kept, 0) == valid(batch([3, 6, 1]), 1)
    assert b.select([]) is None


def test_merge_stacks_this_batchs_rows_then_the_others_the_narrower_padded_on_the_left():
    mine, theirs = batch([2, 3]), batch([5], offset=0.5)
    rows = [valid(mine, 0), valid(mine, 1), valid(theirs, 0)]
    merged = mine.merge(theirs)
    assert merged.lengths == [2, 3, 5] and merged.width == 5
    assert merged.mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert [valid(merged, i) for i in range(3)] == rows
    assert merged.cache.layers[0].keys[:2, 0, :2, 0].eq(0).all()  # the padding: zeros, on the left
    wider_first = batch([5], offset=0.5).merge(batch([2]))
    assert wider_first.lengths == [5, 2] and wider_first.mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]


class Refusing(torch.nn.Module):
    """A model that must not be called."""

    def forward(self, **kwargs):
        raise AssertionError("the model was called")


def test_decode_with_one_adapter_name_too_few_is_refused_before_the_batch_changes():
    b = batch([2, 3])
    mask, lengths = b.mask, list(b.lengths)
    with pytest.raises(ShapeMismatchError, match="1 adapters for 2 rows"):
        decode(Refusing(), b, [5, 6], ["a"])
    with pytest.raises(ShapeMismatchError, match="3 tokens"):
        decode(Refusing(), b, [5, 6, 7], ["a", "b"])
    assert b.mask is mask and b.lengths == lengths


def test_a_sliding_layer_keeps_the_last_columns_still_used_through_select_and_merge():
    b = batch([6, 2, 4], window=4)  # the sliding layer holds the last 3 of 6 columns
    sliding = b.cache.layers[0]
    assert sliding.keys.shape[2] == 3 and sliding.cumulative_length == 6 and valid(b, 1) == [104.0, 105.0]
    last = {i: valid(b, i)[-2:] for i in range(3)}
    kept = b.select([2, 1])  # width 4: the sliding layer still holds 3 columns, the full one 4
    assert kept.width == 4 and sliding.keys.shape[2] == sliding.values.shape[2] == 3
    assert sliding.cumulative_length == 4 and kept.cache.layers[1].keys.shape[2] == 4
    assert valid(kept, 0) == [203.0, 204.0, 205.0] and valid(kept, 1) == last[1]
    short = kept.select([1])  # width 2, under the window: 2 columns
    assert short.width == 2 and sliding.keys.shape[2] == 2 and sliding.cumulative_length == 2
    assert valid(short, 0) == last[1] and valid(short, 0, 1) == [1104.0, 1105.0]
    merged = short.merge(batch([5], offset=0.5, window=4))  # 2 columns and 3: padded to 3; width 5
    assert merged.width == 5 and sliding.keys.shape[2] == 3 and sliding.cumulative_length == 5
    assert merged.lengths == [2, 5] and valid(merged, 0) == last[1] and valid(merged, 1) == [2.5, 3.5, 4.5]
    assert merged.cache.layers[0].keys[0, 0, 0, 0] == 0 and merged.cache.layers[1].keys.shape[2] == 5


def test_batches_of_different_cache_layers_are_not_merged():
    with pytest.raises(ShapeMismatchError, match="different cache layers"):
        batch([2]).merge(batch([3], window=4))
