"""The quant suite's whole-model part on a tiny model (the real-model measurement is
``lordba bench --suite quant``): the q4 base before it took HQQ's zero rounding, and the losses per base
and corpus over the tasks' held-out text blocks (``text_blocks``, tested in ``tests/lab/test_tasks.py``)."""

import copy
import json
import zlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lordba.kernels.q4 import unpack_codes
from lordba.quant import Q4Linear, quantize_model
from lordba.train.evaluate import heldout_loss
from lordba_lab.bench import quant, suites
from lordba_lab.tasks import text_blocks

from conftest import TINY, tiny_llama


class WordTokenizer:
    """One id per word (below the tiny model's vocabulary; the same in every process)."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [zlib.crc32(w.encode()) % TINY["vocab_size"] for w in text.split()]}


def fake_corpora(tmp_path, monkeypatch):
    """40 addresses of 600+ words and 400 review snippets: a fifth of each held out by the tasks' hash."""
    speeches = tmp_path / "sotu.jsonl"
    rows = [{"year": 1900 + k, "speaker": "X", "text": f"address {k} " + "w " * (600 + k)} for k in range(40)]
    speeches.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": f"review {k} " * 30, "rating": 1.0}) + "\n" for k in range(400)))
    monkeypatch.setattr("lordba_lab.assets.corpus.ensure_sotu", lambda: speeches)
    monkeypatch.setattr("lordba_lab.assets.vader.ensure_vader_movies", lambda: reviews)


def test_the_suite_is_discovered_and_not_default():
    assert suites()["quant"] is quant and not quant.DEFAULT
    assert quant.CORPORA == {"speeches": "sotu", "reviews": "sentiment"}  # the tasks' held-out text


def test_the_unrounded_q4_base_is_another_quantization_of_the_same_layers():
    rounded = quantize_model(tiny_llama(0), backend="q4", group_size=64)
    unrounded = quant._q4_unrounded(tiny_llama(0))
    pairs = [(n, m, unrounded.get_submodule(n)) for n, m in rounded.named_modules() if isinstance(m, Q4Linear)]
    assert pairs and all(isinstance(other, Q4Linear) and other.bits == m.bits for _, m, other in pairs)
    assert pairs[-1][0] == "lm_head" and pairs[-1][1].bits == 8  # the 8-bit head, quantized as before
    changed = [
        n
        for n, m, other in pairs
        if not torch.equal(unpack_codes(m.qweight, m.bits), unpack_codes(other.qweight, other.bits))
    ]
    assert len(changed) >= len(pairs) // 2 and "lm_head" not in changed


def test_model_losses_per_base_and_corpus(tmp_path, monkeypatch):
    fake_corpora(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128})).eval()  # HQQ: 64s
    losses = quant._model_losses(model, WordTokenizer(), 2)
    assert {"fp32", "q4-4bit", "q4-4bit, zero not rounded", "hqq-4bit"} <= set(losses)
    assert all(set(v) == {"speeches", "reviews"} for v in losses.values())
    assert all(torch.isfinite(torch.tensor(x)) and x > 0 for v in losses.values() for x in v.values())
    assert losses["q4-4bit"] != losses["q4-4bit, zero not rounded"]
    rows = text_blocks("sotu", "eval", WordTokenizer(), 2)  # the loss is the library's held-out loss of the blocks
    assert losses["fp32"]["speeches"] == heldout_loss(model, rows, batch_size=4)


def test_decode_timing_reads_the_flush_buffer_before_each_timed_call():
    """The per-layer decode column times each call with the layer's weights out of cache: the flush
    buffer (1 GiB in the suite) is read before every timed call, never inside it."""
    events = []

    class Flush:
        def sum(self):
            events.append("flush")

    assert quant.FLUSH_BYTES >= 1 << 30
    quant._time(lambda: events.append("call"), 3, Flush())
    assert events == ["call"] + ["flush", "call"] * 3  # one warm-up, then a flush before each timed call
    events.clear()
    quant._time(lambda: events.append("call"), 2)
    assert events == ["call"] * 3


def test_every_layer_timed_is_a_frozen_base_the_fp32_one_included(tmp_path, monkeypatch):
    """fwd+bwd / fp32 compares bases under an adapter: the input's gradient alone. A trainable fp32 weight
    would add its own gradient (a third matmul) to the time every ratio divides by."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128})).eval()
    monkeypatch.setattr("lordba_lab.assets.load_model_and_tokenizer", lambda: (model, None))
    monkeypatch.setattr(quant, "_model_losses", lambda *a: {"fp32": {"speeches": 1.0}})
    monkeypatch.setattr(quant, "FLUSH_BYTES", 1 << 12)
    quant.run(tmp_path, quick=True)
    timed = model.get_submodule(quant.LAYERS[0])
    assert timed.weight.grad is None  # the model's own layer was not trained by the timing
    rows = json.loads((tmp_path / "quant.json").read_text())["rows"]
    assert rows[0]["backend"] == "fp32" and rows[0]["train_bwd_ratio_vs_fp32"] == 1.0
    linear = torch.nn.Linear(128, 128, bias=False)
    for name, make in quant._backends().items():
        layer = make(linear)
        assert not [n for n, p in layer.named_parameters() if p.requires_grad], name
        x = torch.randn(2, 3, 128, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and linear.weight.grad is None, name


def test_a_run_records_its_settings_quick_or_full(tmp_path, monkeypatch):
    """quant.json held the hardware, the rows and the held-out losses but not how they were measured: a quick
    run's losses (4 blocks of 512 tokens a corpus) and medians of 3 read like the full run's (24 blocks,
    medians of 10)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128})).eval()
    blocks = []
    monkeypatch.setattr("lordba_lab.assets.load_model_and_tokenizer", lambda: (model, None))
    monkeypatch.setattr(quant, "_model_losses", lambda m, t, n: blocks.append(n) or {"fp32": {"speeches": 1.0}})
    monkeypatch.setattr(quant, "FLUSH_BYTES", 1 << 12)
    monkeypatch.setattr(quant, "_backends", lambda: {"fp32": lambda lin: copy.deepcopy(lin).requires_grad_(False)})
    quant.run(tmp_path, quick=True)
    settings = json.loads((tmp_path / "quant.json").read_text())["settings"]
    assert settings["quick"] is True and settings["repeats"] == 3 and settings["heldout_blocks"] == blocks[0] == 4
    assert settings["layers"] == [quant.LAYERS[0]] and settings["shapes"]["train"] == [8, 64]
    assert '"heldout_blocks": 4' in (tmp_path / "quant.md").read_text()
