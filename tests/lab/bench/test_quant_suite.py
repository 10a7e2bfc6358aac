"""The quant suite's whole-model part on a tiny model (the real-model measurement is
``lordba bench --suite quant``): the held-out corpora's blocks, the q4 base before it took HQQ's zero
rounding, and the losses per base and corpus."""

import json
import zlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lordba.kernels.q4 import unpack_codes
from lordba.quant import Q4Linear, quantize_model
from lordba_lab.bench import quant, suites

from conftest import TINY, tiny_llama


class WordTokenizer:
    """One id per word (below the tiny model's vocabulary; the same in every process)."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [zlib.crc32(w.encode()) % TINY["vocab_size"] for w in text.split()]}


def fake_corpora(tmp_path, monkeypatch):
    speeches = tmp_path / "sotu.jsonl"
    speeches.write_text("".join(json.dumps({"text": " ".join(["w"] * (600 + k))}) + "\n" for k in range(5)))
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": f"review {k} " * 30}) + "\n" for k in range(100)))
    monkeypatch.setattr("lordba_lab.assets.corpus.ensure_sotu", lambda: speeches)
    monkeypatch.setattr("lordba_lab.assets.vader.ensure_vader_movies", lambda: reviews)


def test_the_suite_is_discovered_and_not_default():
    assert suites()["quant"] is quant and not quant.DEFAULT


def test_corpora_are_blocks_of_512_tokens_from_the_end_of_the_speeches(tmp_path, monkeypatch):
    fake_corpora(tmp_path, monkeypatch)
    corpora = quant._corpora(WordTokenizer(), 3)
    assert set(corpora) == {"speeches", "reviews"}
    assert [x.shape for x in corpora["speeches"]] == [(1, 512)] * 3  # the last three, cut to 512 tokens
    assert [x.shape for x in corpora["reviews"]] == [(1, 512)] * 3
    assert not torch.equal(corpora["reviews"][0], corpora["reviews"][1])  # consecutive blocks, not one repeated


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
