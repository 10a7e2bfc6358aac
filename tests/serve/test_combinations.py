"""Features combined through the command line and the server: ``lordba convert`` then ``lordba serve`` of its output,
an adapter training modules in full served beside one that does not, a converted adapter loaded, unloaded and another
loaded under its name, chat templates with adapters and ``stop``; each checked against the adapter alone
(``lordba generate`` or ``LoRDBAModel.generate``)."""

from __future__ import annotations

import json
import shutil

import pytest

from lordba.cli import main

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from lordba.serve.server import Server, build_state, load_base  # noqa: E402
from tiny_model import save_peft_lora  # noqa: E402

from .serve_helpers import char_tokenizer, make_adapter, reference, tiny_model  # noqa: E402

TIMEOUT = 30.0


def peft_lora(directory, seed: int, modules_to_save: list[str] | None = None):
    """A PEFT LoRA on the tiny served model whose update changes its greedy tokens (and its ``modules_to_save``
    changed too)."""
    return save_peft_lora(tiny_model(), directory, seed, modules_to_save)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(model folder, adapters folder, work folder)``: ``conv`` converted with --target-bpw and int8 scales from a
    PEFT LoRA whose lm_head is trained in full, ``conv2`` converted from another one without, ``a`` trained (no
    module trained in full)."""
    root = tmp_path_factory.mktemp("combos")
    model_dir = root / "tiny-llama"
    tiny_model().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    adapters = root / "adapters"
    make_adapter(adapters / "a", seed=10)
    common = ["--quiet", "--iters", "2", "--scale-dtype", "int8"]
    assert (
        main(
            [
                "convert",
                str(peft_lora(root / "lora", 1, ["lm_head"])),
                str(adapters / "conv"),
                *common,
                "--target-bpw",
                "3",
            ]
        )
        == 0
    )
    assert main(["convert", str(peft_lora(root / "lora2", 2)), str(root / "conv2"), *common, "--r", "4"]) == 0
    return model_dir, adapters, root


@pytest.fixture(scope="module")
def server(folders):
    model_dir, adapters, _ = folders
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=8)
    with Server(state) as s:
        yield s


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def post(server: Server, path: str, body: dict) -> int:
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def greedy(server: Server, model: str, prompt: str, n: int = 12) -> str:
    r = client(server).completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text


def want(folders, adapter, prompt: str, n: int = 12) -> str:
    model_dir = folders[0]
    tok = char_tokenizer()
    ids = reference(model_dir, adapter, tok(prompt)["input_ids"], n)
    return tok.decode(ids, skip_special_tokens=True)


def test_a_converted_int8_adapter_is_served_as_lordba_generate_gives_it(server, folders, capsys):
    model_dir, adapters, _ = folders
    got = greedy(server, "conv", "The quick", 12)
    argv = ["generate", "--model", str(model_dir), "--adapter", str(adapters / "conv"), "--quant", "none"]
    assert main([*argv, "--branch-compute", "exact", "--max-new-tokens", "12", "The quick"]) == 0
    assert capsys.readouterr().out == got + "\n"
    assert got == want(folders, adapters / "conv", "The quick") and got != greedy(server, "tiny-llama", "The quick")


def in_one_batch(server: Server, asks: list[tuple[str, str]], n: int = 12) -> list[str]:
    """The greedy texts of ``(model, prompt)`` requests decoded in one batch (the engine held until all joined)."""
    import threading
    import time

    c = client(server)
    for name, _ in asks:  # loaded first: a load takes the model's lock, which is held below
        c.completions.create(model=name, prompt="x", max_tokens=1, temperature=0)
    texts: list[str | None] = [None] * len(asks)

    def ask(i: int) -> None:
        name, prompt = asks[i]
        texts[i] = c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    engine = server.state.engine
    engine.max_rows_seen = 0
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    with engine.model._lock.write():
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while sum(engine.load) < len(asks) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(TIMEOUT)
    assert engine.max_rows_seen >= len(asks)
    return texts


def test_an_adapter_training_the_head_in_full_beside_one_without_in_one_batch(server, folders):
    """Each row's tokens are its adapter's alone: the head trained in full by ``conv`` only for its rows."""
    _, adapters, _ = folders
    asks = [("conv", "The quick"), ("a", "The quick"), ("tiny-llama", "Hello"), ("conv", "Hello")]
    got = in_one_batch(server, asks)
    for (name, prompt), text in zip(asks, got):
        assert text == want(folders, None if name == "tiny-llama" else adapters / name, prompt), name
    assert got[0] != got[1]


def test_load_unload_then_load_another_adapter_under_the_same_name(server, folders):
    """The name's second adapter gives its own tokens, not the first one's kept calls or caches."""
    _, adapters, root = folders
    shutil.copytree(root / "conv2", adapters / "other", dirs_exist_ok=True)
    first = greedy(server, "conv", "Hello")
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "swap", "lora_path": "conv"}) == 200
    assert greedy(server, "swap", "Hello") == first
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "swap"}) == 200
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "swap", "lora_path": "other"}) == 200
    second = greedy(server, "swap", "Hello")
    assert second == want(folders, root / "conv2", "Hello") and second != first
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "swap"}) == 200


def test_a_folder_adapter_unloaded_and_replaced_on_disk_serves_its_new_files(server, folders):
    _, adapters, root = folders
    shutil.copytree(adapters / "a", adapters / "moved")
    first = greedy(server, "moved", "Hello")
    assert first == want(folders, adapters / "a", "Hello")
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "moved"}) == 200
    shutil.rmtree(adapters / "moved")
    shutil.copytree(root / "conv2", adapters / "moved")
    assert greedy(server, "moved", "Hello") == want(folders, root / "conv2", "Hello")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_templates_with_adapters_and_stop_sequences(server, folders, stream):
    """A chat request on each adapter (and the base) is its template's prompt completed greedily, cut before the
    first ``stop``; streamed or not, the same text."""
    _, adapters, _ = folders
    tok = server.state.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    c = client(server)
    for name in ("a", "conv", "tiny-llama"):
        full = want(folders, None if name == "tiny-llama" else adapters / name, prompt, 16)
        stops = [full[4:6], full[9:12]]
        cut = min((full.index(s) for s in stops if s), default=len(full))
        kw = dict(model=name, messages=messages, max_tokens=16, temperature=0, stop=stops)
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True))
        else:
            text = c.chat.completions.create(**kw).choices[0].message.content
        assert text == full[:cut], name


def test_a_prompt_of_token_ids_with_stop_and_usage_on_a_converted_adapter(server, folders):
    """A prompt given as token ids is the text's completion, cut before ``stop``, whole or streamed with its usage."""
    _, adapters, _ = folders
    ids = server.state.tokenizer("The quick")["input_ids"]
    full = want(folders, adapters / "conv", "The quick", 12)
    stop = full[3:5]
    cut = full[: full.index(stop)]
    c = client(server)
    assert (
        c.completions.create(model="conv", prompt=ids, max_tokens=12, temperature=0, stop=[stop]).choices[0].text == cut
    )
    chunks = list(
        c.completions.create(
            model="conv",
            prompt=ids,
            max_tokens=12,
            temperature=0,
            stop=stop,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == cut
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens >= len(cut)


def test_an_adapter_evicted_by_the_lru_and_loaded_again_gives_its_tokens(folders):
    """A budget that holds one adapter: ``conv``, ``a``, ``conv`` again, each its own tokens."""
    model_dir, adapters, _ = folders
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=4)
    with Server(state) as s:
        first = greedy(s, "conv", "Hello")
        second = greedy(s, "a", "Hello")
        registry = s.state.registry
        sizes = registry.resident()
        registry.unload("conv")
        registry.unload("a")
        registry.max_bytes = sizes["conv"] + sizes["a"] - 1  # room for one of them
        assert greedy(s, "tiny-llama", "Hello") == want(folders, None, "Hello")
        for _ in range(2):
            assert greedy(s, "conv", "Hello") == first == want(folders, adapters / "conv", "Hello")
            assert greedy(s, "a", "Hello") == second == want(folders, adapters / "a", "Hello")
        assert registry.evictions >= 3


@pytest.mark.parametrize("prompt", ["Hi", "What is 2+3?"])
def test_a_chat_request_gives_lordba_generate_chat_templates_text(server, folders, prompt, capsys):
    """``lordba generate --chat-template`` and the server's chat completion on one adapter: the same greedy text."""
    model_dir, adapters, _ = folders
    argv = ["generate", "--model", str(model_dir), "--adapter", str(adapters / "conv"), "--quant", "none"]
    assert main([*argv, "--branch-compute", "exact", "--chat-template", "--max-new-tokens", "12", prompt]) == 0
    messages = [{"role": "user", "content": prompt}]
    r = client(server).chat.completions.create(model="conv", messages=messages, max_tokens=12, temperature=0)
    assert capsys.readouterr().out == r.choices[0].message.content + "\n"


def test_lordba_serve_of_converted_and_trained_adapters_takes_the_unquantized_base(folders, monkeypatch, capsys):
    """``lordba serve --adapters`` (``--quant auto``) of a converted adapter and a trained one, none recording a base:
    unquantized, and each adapter's greedy tokens in one batch."""
    import lordba.serve.server

    model_dir, adapters, _ = folders
    built = []
    monkeypatch.setattr(lordba.serve.server, "serve_forever", lambda state, host, port: built.append(state))
    assert main(["serve", "--model", str(model_dir), "--adapters", str(adapters)]) == 0
    assert "serving the base unquantized" in capsys.readouterr().err
    with Server(built[0]) as s:
        asks = [("conv", "Hello"), ("a", "Hello")]
        for (name, prompt), text in zip(asks, in_one_batch(s, asks)):
            assert text == want(folders, adapters / name, prompt), name
