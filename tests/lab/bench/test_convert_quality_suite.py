"""The ``convert-quality`` suite's trained LoRA, cached under ``$LORDBA_CACHE/bench``, on a tiny random model."""

import errno
import json
import os

import torch
from safetensors.torch import load_file

from lordba_lab.bench import convert_quality

from conftest import tiny_llama


class _Tokenizer:
    """What the LoRA's training asks of a tokenizer: a batch of texts as ids and an attention mask."""

    padding_side = "left"

    def __init__(self, during=None):
        self.during = during  # called at the first batch

    def __call__(self, texts, **kwargs):
        if self.during is not None:
            during, self.during = self.during, None
            during()
        ids = torch.tensor([[len(t) % 97 + i for i in range(8)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_run_interrupted_saving_the_lora_beside_another_leaves_a_whole_cached_lora(monkeypatch, tmp_path):
    """Two runs of the suite at once both trained the LoRA and saved it into the cached folder itself: the second's
    interrupted save (a Ctrl-C, a kill) left the first's adapter_config.json beside its own half-written weights,
    which every later run took as the cached LoRA (and failed to read). Each run trains into a folder of its own,
    moved into place whole."""
    import fcntl

    import peft.peft_model

    from lordba_lab import assets

    def no_locks(fd, op):  # where the cache has none (some FUSE and SMB mounts), two runs train at once
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "rating": 1 - 2 * (i % 2)}) + "\n" for i in range(32)))
    monkeypatch.setattr(assets, "ensure_vader_movies", lambda: data)
    out = tmp_path / "cache" / "smollm2-lora-r16-sentiment-2steps"

    def second():  # another run, started as the first trains: it runs whole, the first half-way
        convert_quality.train_lora(out, steps=2)

    models = iter([(tiny_llama(0), _Tokenizer(during=second)), (tiny_llama(0), _Tokenizer())])
    monkeypatch.setattr(assets, "load_model_and_tokenizer", lambda: next(models))
    real_save, saves = peft.peft_model.safe_save_file, []

    def save(tensors, path, **kwargs):
        saves.append(path)
        if len(saves) == 1:
            return real_save(tensors, path, **kwargs)
        with open(path, "wb") as f:  # the first run's save, interrupted half-way
            f.write(b"\x00" * 64)
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    try:
        convert_quality.train_lora(out, steps=2)
    except KeyboardInterrupt:
        pass
    assert len(saves) == 2
    cached = convert_quality.train_lora(out, steps=2)  # a later run takes the cached LoRA
    assert cached == out and sorted(load_file(str(out / "adapter_model.safetensors")))
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")) == [out.name]
