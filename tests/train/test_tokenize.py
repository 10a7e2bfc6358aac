import pytest
import torch

from lordba import DataError
from lordba.train.records import Example
from lordba.train.tokenize import Batcher, collate, encode_examples
from lordba_lab.assets import load_model_and_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_model_and_tokenizer()[1]


def test_loss_is_on_the_completion_only(tok):
    ex = Example((("user", "What is 2+3?"),), "5", "5")
    (row,) = encode_examples(tok, [ex])
    completion = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    assert tok.decode(completion).startswith("5") and "<|im_end|>" in tok.decode(completion)
    prompt = tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == -100])
    assert "What is 2+3?" in prompt and prompt.rstrip().endswith("assistant")


def test_plain_text_trains_on_everything_and_truncation(tok):
    (row,) = encode_examples(tok, [Example((), "hello world")])
    assert all(l != -100 for l in row["labels"])
    with pytest.raises(DataError, match="longer than max_length"):
        encode_examples(tok, [Example((("user", "word " * 50),), "x")], max_length=8)


def test_batches_depend_only_on_seed_and_index():
    rows = [{"input_ids": [i, i + 1, i + 2][: 1 + i % 3], "labels": [i, i + 1, i + 2][: 1 + i % 3]} for i in range(10)]
    a, b = Batcher(rows, 4, seed=3), Batcher(rows, 4, seed=3)
    for k in (0, 1, 2, 7):
        assert all(torch.equal(a.batch(k)[n], b.batch(k)[n]) for n in ("input_ids", "labels", "attention_mask"))
    assert not torch.equal(a.batch(0)["input_ids"], Batcher(rows, 4, seed=4).batch(0)["input_ids"])
    batch = collate(rows[:3], pad_id=0)
    assert batch["labels"][0, 1:].eq(-100).all() and batch["attention_mask"].sum() == 1 + 2 + 3
