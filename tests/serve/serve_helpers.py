"""A tiny served model: a random Llama whose vocabulary is a character-level tokenizer (printable
ASCII, with a chat template), saved in a folder, and tiny random adapters made for it.

Not a ``conftest.py``: a second module named ``conftest`` would shadow ``tests/conftest.py`` for the
test modules collected after this folder (``from conftest import ...``). Test modules import the
helpers from here (each defines its ``served`` fixture with :func:`make_served`)."""

from __future__ import annotations

import http.client
import json
import string
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.serve.engine import Event

SPECIAL = ["<pad>", "<s>", "</s>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0-2 are <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's vocabulary as word pieces ``▁<char>`` decoded as Llama 2's and Mistral's tokenizers
    decode: ``▁`` is a space and the one leading space where decoding starts is stripped (no encoder needed:
    the tests give ids)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(SPECIAL + ["\u2581" + c for c in CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(seed: int = 0, context: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(CHARS),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def make_adapter(directory: Path, seed: int, quant: str | None = None) -> Path:
    """A random r=4 adapter on every linear layer of the tiny model, saved in ``directory``; with ``quant``, made
    on the tiny model quantized so (groups of 64: its config records that base), its output scales ×30 (an
    adapter that changes the greedy tokens)."""
    base = tiny_model()  # (seeds torch itself: the adapter's seed comes after it)
    if quant is not None:
        from lordba.quant import quantize_model

        base = quantize_model(base, backend=quant, group_size=64)
    torch.manual_seed(seed)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, alpha=16, init="random"))
    if quant is not None:
        with torch.no_grad():
            for adapter in lm.adapter_modules("default").values():
                adapter.scale_out.mul_(30)
    lm.save_pretrained(directory)
    return directory


def make_served(
    tmp_path_factory: pytest.TempPathFactory, quant: str | None = None, names: tuple[str, ...] = ("a", "b", "c")
) -> tuple[Path, Path]:
    """``(model folder, adapters folder)``: the tiny model + tokenizer, and adapters a, b, c (``names``; made on
    the base quantized per ``quant``: :func:`make_adapter`)."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "tiny-llama"
    tiny_model().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    adapters = root / "adapters"
    for i, name in enumerate(names):
        make_adapter(adapters / name, seed=10 + i, quant=quant)
    return model_dir, adapters


def reference(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of ``LoRDBAModel.generate`` for one prompt on one adapter alone (or the base)."""
    from transformers import AutoModelForCausalLM

    lm = LoRDBAModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    names = None
    if adapter_dir is not None:
        lm.load_adapter(adapter_dir, "x")
        names = ["x"]
    with torch.no_grad():
        out = lm.generate(
            torch.tensor([prompt_ids]), adapter_names=names, max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def post(url: str, path: str, body: dict) -> tuple[int, http.client.HTTPMessage, dict]:
    """``(status, headers, JSON body or {"text": ...})`` of one POST."""
    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        try:
            answer = json.loads(data)
        except ValueError:
            answer = {"text": data.decode()}
        return response.status, response.headers, answer
    finally:
        conn.close()


def prompts(*lengths: int) -> list[list[int]]:
    """Random prompts (token ids 3-98, seeded) of ``lengths``."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]


class Collector:
    """A request's sink and ``on_done``: the events it got, set ``done`` at the last, the releases counted."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.released = 0

    def sink(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    def on_done(self) -> None:
        self.released += 1

    @property
    def last(self) -> Event:
        return self.events[-1]


def health_now(port: int) -> int | str:
    """``/health``'s status, asked and waited for now (from inside a request's parse: ``repr`` of the error where the
    event loop never answered, busy parsing)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError as err:
        return repr(err)
    finally:
        conn.close()


def served_model(served: tuple[Path, Path], names: tuple[str, ...]) -> LoRDBAModel:
    """The model of :func:`make_served`'s ``(model folder, adapters folder)`` with the adapters ``names`` loaded."""
    model_dir, adapters = served
    model = LoRDBAModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    for name in names:
        model.load_adapter(adapters / name, name)
    return model
