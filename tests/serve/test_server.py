"""The real server on loopback, driven with the official ``openai`` client (and raw HTTP where a
client would not send such a request). Every request has a timeout; the servers are stopped here."""

from __future__ import annotations

import http.client
import itertools
import json
import shutil
import socket
import sys
import threading
import time
from urllib.parse import urlparse

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lordba import LoRDBAConfig, get_lordba_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from lordba.serve.adapter_files import payload_bytes  # noqa: E402
from lordba.serve.server import Server, build_state, load_base  # noqa: E402

from .serve_helpers import make_served, reference  # noqa: E402

TIMEOUT = 30.0


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return make_served(tmp_path_factory)


@pytest.fixture(scope="module")
def server(served):
    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=8)
    with Server(state) as s:
        yield s


def raw(server: Server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data or b"null")
        except ValueError:
            return response.status, {"text": data.decode()}
    finally:
        conn.close()


def aborts(server: Server) -> float:
    """Generations ended by an abort so far (the server's own counter)."""
    return server.state.metrics.finished_requests.labels("abort")._value.get()


def assert_openai_error(body: dict, *words: str) -> None:
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    for word in words:
        assert word in body["error"]["message"]


# ---------------------------------------------------------------------------- generation
def test_two_adapters_in_flight_each_give_their_own_greedy_output(server, served):
    model_dir, adapters = served
    c = client(server)
    tok = server.state.tokenizer
    prompts = {"a": "The quick brown fox", "b": "Hello"}
    for name in prompts:  # load both first: a load takes the model's lock, which the test holds below
        c.completions.create(model=name, prompt="x", max_tokens=1, temperature=0)
    results: dict[str, str] = {}

    def ask(name: str) -> None:
        r = c.completions.create(model=name, prompt=prompts[name], max_tokens=24, temperature=0)
        results[name] = r.choices[0].text

    engine = server.state.engine
    engine.max_rows_seen = 0
    threads = [threading.Thread(target=ask, args=(n,)) for n in prompts]
    with server.state.engine.model._lock.write():  # hold the engine so that both requests join it
        for t in threads:
            t.start()
        assert wait_for(lambda: sum(engine.load) == 2)
    for t in threads:
        t.join(TIMEOUT)
    assert engine.max_rows_seen >= 2  # one decode forward carried both adapters' rows
    for name, prompt in prompts.items():
        want = reference(model_dir, adapters / name, tok(prompt)["input_ids"], 24)
        assert results[name] == tok.decode(want, skip_special_tokens=True)
    assert results["a"] != results["b"]


def test_base_model_by_its_own_name_and_adapters_differ(server, served):
    model_dir, _ = served
    c = client(server)
    tok = server.state.tokenizer
    base = c.completions.create(model="tiny-llama", prompt="Hello", max_tokens=12, temperature=0)
    want = reference(model_dir, None, tok("Hello")["input_ids"], 12)
    assert base.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert base.usage.prompt_tokens == 5 and base.usage.completion_tokens == len(want)
    assert base.choices[0].finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
    assert base.model == "tiny-llama"
    adapted = c.completions.create(model="c", prompt="Hello", max_tokens=12, temperature=0)
    assert adapted.choices[0].text != base.choices[0].text


def test_chat_uses_the_chat_template_and_streams_the_same_text(server, served):
    model_dir, adapters = served
    c = client(server)
    tok = server.state.tokenizer
    messages = [{"role": "user", "content": "hi there"}]
    r = c.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"]
    assert r.choices[0].message.content == tok.decode(
        reference(model_dir, adapters / "b", ids, 10), skip_special_tokens=True
    )
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    chunks = list(
        c.chat.completions.create(
            model="b",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_a_developer_message_is_the_templates_system_message(server):
    """OpenAI's ``developer`` role is its newer name for the system message: passed to the template as such, it
    rendered a turn of a role the model was never trained on (SmolLM2's template: after its default system prompt)."""
    c = client(server)
    usage = {}
    for role in ("system", "developer"):
        messages = [{"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}]
        r = c.chat.completions.create(model="b", messages=messages, max_tokens=3, temperature=0)
        usage[role] = (r.usage.prompt_tokens, r.choices[0].message.content)
    assert usage["developer"] == usage["system"]


def test_completion_stream_matches_the_whole_response(server):
    c = client(server)
    whole = c.completions.create(model="a", prompt="Streams", max_tokens=16, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="a", prompt="Streams", max_tokens=16, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("chat", [False, True])
def test_every_chunk_of_a_stream_has_the_same_created_timestamp(server, monkeypatch, chat):
    """OpenAI's (and vLLM's) chunks of one stream share ``created``; each chunk took the clock of its own
    writing, so a stream running across a second boundary changed it (here a clock a second on at every read)."""
    ticks = itertools.count(int(time.time()))
    monkeypatch.setattr(time, "time", lambda: float(next(ticks)))
    c = client(server)
    kw = {"model": "a", "max_tokens": 6, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw))
    else:
        chunks = list(c.completions.create(prompt="Clock", **kw))
    assert len(chunks) > 3 and len({ch.id for ch in chunks}) == 1
    assert len({ch.created for ch in chunks}) == 1 and isinstance(chunks[0].created, int)


def test_sampling_seed_top_p_and_stop(server):
    c = client(server)

    def text(**kw) -> str:
        r = c.completions.create(model="a", prompt="Sample", max_tokens=20, **kw)
        return r.choices[0].text

    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)
    assert len({text(temperature=1.5, seed=s) for s in range(4)}) > 1
    assert text(temperature=1.0, top_p=1e-6, seed=3) == text(temperature=0)  # top-p keeps the top token only
    greedy = text(temperature=0)
    stop = greedy[5:8]
    r = c.completions.create(model="a", prompt="Sample", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[: greedy.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="a", prompt="Sample", max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


# ---------------------------------------------------------------------------- adapters
def test_load_and_unload_lora_adapter(server):
    c = client(server)
    status, _ = raw(
        server, "POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "extra", "lora_path": "a"}).encode()
    )
    assert status == 200
    same = [
        c.completions.create(model=m, prompt="Hi", max_tokens=8, temperature=0).choices[0].text for m in ("extra", "a")
    ]
    assert same[0] == same[1]
    assert "extra" in {m.id for m in c.models.list().data}
    status, body = raw(
        server, "POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "extra", "lora_path": "a"}).encode()
    )
    assert status == 400 and body["error"]["code"] == "adapter_already_loaded"
    status, body = raw(
        server, "POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "y", "lora_path": "../x"}).encode()
    )
    assert status == 400 and "outside" in body["error"]["message"]
    status, _ = raw(server, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": "extra"}).encode())
    assert status == 200 and "extra" not in server.state.engine.model.peft_config
    with pytest.raises(openai.NotFoundError, match="extra"):
        c.completions.create(model="extra", prompt="Hi", max_tokens=2)
    status, body = raw(server, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": "extra"}).encode())
    assert status == 404 and "extra" in body["error"]["message"]


def test_models_health_and_metrics(server):
    c = client(server)
    c.completions.create(model="a", prompt="m", max_tokens=3, temperature=0)
    models = c.models.list().data
    assert [m.id for m in models][:1] == ["tiny-llama"] and {"a", "b", "c"} <= {m.id for m in models}
    assert raw(server, "GET", "/health")[0] == 200
    server.state.engine.failure = "RuntimeError: boom"  # as the engine records a loop that stopped
    try:
        status, body = raw(server, "GET", "/health")
        assert status == 503 and body["status"] == "error" and "boom" in body["error"]
    finally:
        server.state.engine.failure = None
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for name in (
        'lordba_requests_total{endpoint="/v1/completions",status="200"}',
        "lordba_generation_tokens_total",
        "lordba_queue_length",
        "lordba_resident_adapters",
        "lordba_adapter_loads_total",
        "lordba_adapter_evictions_total",
        "lordba_time_to_first_token_seconds_bucket",
        "lordba_time_per_output_token_seconds_bucket",
    ):
        assert name in text, name


def test_models_retrieve_gives_the_base_and_each_adapter_and_a_404_naming_an_unknown_one(server):
    """``client.models.retrieve`` (``GET /v1/models/{model}``) answered a bare "Not Found" for every name, the
    base's and the listed adapters' included: the route did not exist."""
    c = client(server)
    base = c.models.retrieve("tiny-llama")
    assert (base.id, base.object, base.model_extra["parent"]) == ("tiny-llama", "model", None)
    adapter = c.models.retrieve("b")
    assert (adapter.id, adapter.model_extra["parent"]) == ("b", "tiny-llama")
    assert {m.id for m in c.models.list().data} >= {"tiny-llama", "b"}
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist") as err:
        c.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    status, body = raw(server, "GET", "/v1/models/")  # the list still
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == "tiny-llama"


# ---------------------------------------------------------------------------- errors
def test_error_cases_answer_in_openai_shape(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "nope" in err.value.message and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:  # the engine's route to the base: no served name (a 400 once)
        c.completions.create(model="__base__", prompt="x", max_tokens=2)
    assert "__base__" in err.value.message and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="invalid adapter name"):
        c.completions.create(model="../a", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as err:
        c.completions.create(model="a", prompt="x" * 300, max_tokens=2)
    assert err.value.body["param"] == "prompt" and err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length") as err:
        c.chat.completions.create(model="a", messages=[{"role": "user", "content": "x" * 300}], max_tokens=2)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model="a", prompt="x" * 250, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="a", prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        c.completions.create(model="a", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="tool messages are not supported"):
        c.chat.completions.create(model="a", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    status, body = raw(server, "POST", "/v1/completions", b'{"model": "a", "prompt": ')
    assert status == 400
    assert_openai_error(body, "JSON")
    assert body["error"]["param"] is None and "body: JSON decode error" in body["error"]["message"]  # no field
    status, body = raw(server, "POST", "/v1/chat/completions", json.dumps({"model": "a"}).encode())
    assert status == 400
    assert_openai_error(body, "messages")
    status, body = raw(server, "GET", "/v1/nothing")
    assert status == 404
    assert_openai_error(body)
    after = c.completions.create(model="a", prompt="still", max_tokens=2, extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 2  # still serving (a random adapter may emit EOS first: ignored)


def test_corrupt_or_mismatched_adapter_is_refused_and_others_keep_serving(server, served):
    _, adapters = served
    shutil.copytree(adapters / "a", adapters / "corrupt")
    weights = adapters / "corrupt" / "lordba_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    torch.manual_seed(0)
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2))
    get_lordba_model(narrow, LoRDBAConfig(r=4, init="random")).save_pretrained(adapters / "mismatched")
    c = client(server)
    try:
        for name, why in [("corrupt", "sha256"), ("mismatched", "in the base model")]:
            with pytest.raises(openai.BadRequestError, match=why) as err:
                c.completions.create(model=name, prompt="x", max_tokens=2)
            assert f"adapter '{name}'" in err.value.message and err.value.body["code"] == "adapter_invalid"
            assert name not in server.state.engine.model.peft_config
        fine = c.completions.create(model="a", prompt="fine", max_tokens=3, extra_body={"ignore_eos": True})
        assert fine.usage.completion_tokens == 3  # "a" still serves (a sampled EOS would end it early: ignored)
    finally:
        shutil.rmtree(adapters / "corrupt")
        shutil.rmtree(adapters / "mismatched")


def test_client_disconnect_mid_stream_frees_its_slot(server):
    engine, registry = server.state.engine, server.state.registry
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    body = {"model": "b", "prompt": "long", "max_tokens": 250, "temperature": 0, "stream": True, "ignore_eos": True}
    before = aborts(server)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event arrived: the request is running
    assert engine.load[1] == 1 and registry._entries["b"].refs == 1
    conn.sock.shutdown(2)
    conn.close()
    assert wait_for(lambda: engine.load == (0, 0) and registry._entries["b"].refs == 0)
    assert aborts(server) == before + 1  # aborted, not run to its 250 tokens
    after = client(server).completions.create(model="b", prompt="x", max_tokens=2, extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 2  # the slot serves the next request (whatever the random adapter says)


# ---------------------------------------------------------------------------- LRU
def test_lru_keeps_adapters_within_the_memory_budget(served):
    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    size = payload_bytes(adapters / "a" / "lordba_model.safetensors")
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_adapter_memory=int(2.5 * size))
    with Server(state) as server:
        c = client(server)
        outputs = {}
        for name in ["a", "b", "c", "a"]:
            outputs.setdefault(name, []).append(
                c.completions.create(model=name, prompt="lru", max_tokens=6, temperature=0).choices[0].text
            )
        resident = state.registry.resident()
        assert list(resident) == ["c", "a"]  # b was least recently used when a came back
        assert sum(resident.values()) <= 2.5 * size
        assert state.registry.evictions == 2 and state.registry.loads == 4
        assert outputs["a"][0] == outputs["a"][1]  # reloaded after eviction: the same adapter


def test_client_disconnect_while_waiting_for_a_whole_response_frees_its_slot(server):
    engine = server.state.engine
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    body = {"model": "c", "prompt": "long", "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    before = aborts(server)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    assert wait_for(lambda: engine.load[1] == 1)
    conn.sock.shutdown(2)
    conn.close()
    assert wait_for(lambda: engine.load == (0, 0) and server.state.registry._entries["c"].refs == 0)
    assert aborts(server) == before + 1  # aborted, not run to its 250 tokens


def test_freeze_heap_moves_the_startup_objects_out_of_the_collectors_reach():
    import gc
    from types import SimpleNamespace

    from lordba.serve.server import freeze_heap

    state = SimpleNamespace(registry=SimpleNamespace(freeze_loads=False))
    try:
        freeze_heap(state)
        assert gc.get_freeze_count() > 0
        assert state.registry.freeze_loads  # its later loads are frozen too
    finally:
        gc.unfreeze()


def test_serve_forever_gives_the_frozen_heap_back_when_it_returns(monkeypatch):
    """``serve_forever`` froze the heap (``freeze_heap``) and never thawed it: a caller's process kept its cyclic
    garbage for good, and at the exit of ``lordba serve`` nanobind reported every triton object still frozen as a
    leak (some 30 lines of "nanobind: leaked ..." after each stop)."""
    import gc
    from types import SimpleNamespace

    import lordba.serve.app
    import lordba.serve.server

    stopped = []
    engine = SimpleNamespace(start=lambda: None, shutdown=lambda timeout=None: stopped.append(gc.get_freeze_count()))
    state = SimpleNamespace(registry=SimpleNamespace(freeze_loads=False), engine=engine)
    monkeypatch.setattr(lordba.serve.app, "build_app", lambda state: None)
    ran = SimpleNamespace(started=True, run=lambda: stopped.append(gc.get_freeze_count()))
    monkeypatch.setattr(lordba.serve.server, "draining_server", lambda config, engine: ran)
    try:
        lordba.serve.server.serve_forever(state, port=0)
        assert stopped[0] > 0 and state.registry.freeze_loads  # frozen while it served
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("stream", [False, True])
def test_a_seed_out_of_the_generators_range_is_a_400_and_holds_no_adapter(server, stream):
    """``seed`` took any integer; one outside what ``torch.Generator.manual_seed`` takes raised while
    the request was built: a 500 (a cut stream when streaming) and the adapter held for ever."""
    registry = server.state.registry
    c = client(server)
    c.completions.create(model="a", prompt="x", max_tokens=1)  # resident
    for seed in (2**64, -(2**63) - 1, 10**30):
        with pytest.raises(openai.BadRequestError, match="seed") as err:
            c.completions.create(model="a", prompt="x", max_tokens=2, temperature=0.7, seed=seed, stream=stream)
        assert err.value.body["param"] == "seed"
    assert wait_for(lambda: registry._entries["a"].refs == 0)
    for seed in (2**64 - 1, -(2**63), 0):  # the generator's whole range is served
        r = c.completions.create(model="a", prompt="x", max_tokens=2, temperature=0.7, seed=seed)
        assert r.usage.completion_tokens >= 1


def test_optional_fields_sent_as_null_take_their_defaults(server):
    """OpenAI's API declares its optional sampling fields nullable, and the ``openai`` client sends an
    explicit ``None`` as ``null``: these were refused with 400 ('Input should be a valid number')."""
    c = client(server)
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, seed=None, stop=None, logprobs=None)
    r = c.completions.create(model="a", prompt="x", max_tokens=2, echo=None, best_of=None, **nulls)
    assert r.usage.completion_tokens >= 1 and r.object == "text_completion"
    chat = c.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "x"}], max_tokens=2, max_completion_tokens=None, **nulls
    )
    assert chat.usage.completion_tokens >= 1 and chat.object == "chat.completion"
    body = {"model": "a", "prompt": "x", "max_tokens": 2, "ignore_eos": None, "stream_options": None, **nulls}
    status, answer = raw(server, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1


def test_an_invalid_stop_list_names_the_stop_field(server):
    """docs/serving.md: an invalid field is a 400 whose ``param`` names it; ``stop`` was checked only
    by SamplingParams, answered as a library error with ``param`` null."""
    for stop in (["a", "b", "c", "d", "e"], ["", "x"], ""):
        body = {"model": "a", "prompt": "x", "max_tokens": 2, "stop": stop}
        status, answer = raw(server, "POST", "/v1/completions", json.dumps(body).encode())
        assert status == 400 and answer["error"]["param"] == "stop", answer
        assert_openai_error(answer, "stop")
    entry = server.state.registry._entries.get("a")  # (loaded only if an earlier test of the module used it)
    assert entry is None or entry.refs == 0


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": [1, "x"]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_a_field_of_several_types_sent_as_none_of_them_is_the_param_not_a_type_name(server, path, fields, param):
    """docs/serving.md: an invalid field's 400 names it in ``param``; for a field that takes several types (``stop``,
    ``prompt``, a message's ``content``) it was pydantic's location with the type tried first: ``stop.str``."""
    body = {"model": "a", "max_tokens": 2, **fields}
    status, answer = raw(server, "POST", path, json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == param, answer
    assert_openai_error(answer, param)


def test_a_whole_response_client_leaving_before_any_text_is_aborted_at_once(server, monkeypatch):
    """A non-streamed request looked for its client's disconnect only when a text delta arrived: a
    client that left while its request waited (a full batch, a long prefill) or produced no text
    (held back, special tokens) kept its place and then its batch slot for its whole length."""
    engine = server.state.engine
    client(server).completions.create(model="a", prompt="x", max_tokens=1)  # resident: no load below
    submitted: list = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda r: (submitted.append(r), submit(r))[1])
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    body = {"model": "a", "prompt": "wait", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with engine.model._lock.write():  # the engine cannot run a step: no token, no text comes
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        assert wait_for(lambda: len(submitted) == 1)
        conn.sock.shutdown(2)
        conn.close()
        assert wait_for(lambda: submitted[0].aborted, 5.0)
    assert wait_for(lambda: engine.load == (0, 0) and server.state.registry._entries["a"].refs == 0)
    assert len(submitted[0].generated) <= 2  # the prefill and decode of the step the lock held back


def test_prompt_ids_past_the_models_embeddings_are_a_400_not_a_failed_batch(served):
    """Prompt token ids were checked against the tokenizer's length only: a model with fewer embedding rows (a
    tokenizer with tokens added and the model not resized) took an id past them into the batch's embedding
    lookup, which failed every row of the step. A chat template that renders nothing is a 400 too."""
    from lordba.serve.errors import BadRequestError

    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    rows = len(tokenizer) - 3
    model.resize_token_embeddings(rows)
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=2)
    try:
        assert state.encode([0, rows - 1]) == [0, rows - 1]
        with pytest.raises(BadRequestError, match=rf"\[0, {rows}\)"):
            state.encode([0, rows])
        state.encoder.chat_template = "{{ '' }}"  # a template that renders nothing: no prompt to continue
        with pytest.raises(BadRequestError, match="empty prompt"):
            state.chat_prompt([{"role": "user", "content": "x"}])
    finally:
        state.engine.shutdown()


def test_prompt_ids_past_the_embeddings_are_a_400_when_the_embeddings_are_trained_per_adapter(served):
    """With an adapter's ``modules_to_save=["embed_tokens"]`` the input embeddings are a ``SavedModule`` (no
    ``num_embeddings``): the rows were not known and an id past them went into the batch's embedding lookup."""
    from lordba.nn.saved import SavedModule
    from lordba.serve.errors import BadRequestError

    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    rows = len(tokenizer) - 3
    model.resize_token_embeddings(rows)
    model.set_input_embeddings(SavedModule(model.get_input_embeddings()))
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=2)
    try:
        assert state.encode([0, rows - 1]) == [0, rows - 1]
        with pytest.raises(BadRequestError, match=rf"\[0, {rows}\)"):
            state.encode([0, rows])
    finally:
        state.engine.shutdown()


def test_tokenizing_a_prompt_does_not_wait_for_the_engines_tokenizer(served):
    """The HTTP threads tokenized prompts under the engine's tokenizer lock, which its thread holds to detokenize
    every step: a long prompt being tokenized held up the running batch (and a busy engine the request)."""
    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=2)
    got = []
    try:
        with state.engine.tokenizer_lock:  # the engine detokenizing
            worker = threading.Thread(target=lambda: got.append(state.encode("12+3?" * 200)))
            worker.start()
            worker.join(timeout=10)
        assert got and got[0] == list(tokenizer("12+3?" * 200)["input_ids"])
    finally:
        state.engine.shutdown()


def test_a_prompt_with_a_lone_surrogate_is_a_400_naming_it(server):
    """JSON may escape a lone UTF-16 surrogate ("\\ud800": half of an emoji cut by a client), which no tokenizer
    takes: the fast tokenizer's TypeError was a 500 internal error, for a prompt and for a chat message."""
    cases = [
        ("/v1/completions", {"prompt": "ok \ud800"}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok \ud83d"}]}, "messages"),
    ]
    for path, fields, param in cases:
        body = json.dumps({"model": "a", "max_tokens": 2, **fields}).encode()  # ensure_ascii: "\ud800" as is
        status, answer = raw(server, "POST", path, body)
        assert status == 400 and answer["error"]["param"] == param, answer
        assert_openai_error(answer, "surrogate")
    entry = server.state.registry._entries.get("a")
    assert entry is None or wait_for(lambda: entry.refs == 0)
    status, answer = raw(
        server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": "ok", "max_tokens": 1}).encode()
    )
    assert status == 200


def test_a_stop_with_requests_in_flight_ends_them_as_aborted_not_cut(served):
    """Stopping the server stopped uvicorn first: it waited ``grace`` seconds for the open requests, then
    cancelled them, and only then was the engine shut down; a generation still running got a plain-text 500
    'Internal Server Error' (whole response) or a stream cut without its end, never the documented 503 'the
    server is shutting down' / ``finish_reason`` ``abort``. The engine is now drained within the grace period
    and what is left is aborted while uvicorn still writes the answers."""
    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=2)
    server = Server(state, grace=0.5).start()
    got: dict = {}

    def call(stream: bool) -> None:
        url = urlparse(server.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
        body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 200, "temperature": 0, "stream": stream}
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            got[stream] = (response.status, response.read().decode())
        except Exception as err:  # a cut connection or stream
            got[stream] = (None, repr(err))
        finally:
            conn.close()

    writing = state.engine.model._lock.write()
    writing.__enter__()  # the engine cannot finish a step: both requests stay in flight past the grace period
    try:
        callers = [threading.Thread(target=call, args=(stream,)) for stream in (False, True)]
        for t in callers:
            t.start()
        assert wait_for(lambda: state.engine.load[0] + state.engine.load[1] == 2)
        threading.Timer(2.0, writing.__exit__, (None, None, None)).start()  # the step ends after the grace period
        server.stop()
    finally:
        for t in callers:
            t.join(TIMEOUT)
    status, text = got[False]
    assert status == 503 and "shutting down" in json.loads(text)["error"]["message"], got[False]
    status, text = got[True]
    assert status == 200 and '"finish_reason": "abort"' in text and text.endswith("data: [DONE]\n\n"), got[True]


def test_a_request_arriving_while_the_server_drains_is_a_503_with_connection_close(served):
    """Once asked to stop, uvicorn closed its listening socket at once, so a request arriving during the grace
    period (a load balancer still routing to the replica) was a refused connection, and one sent on an open
    keep-alive connection was cut, while the requests in flight still ran. The socket now stays open while they
    drain: a new request is a 503 in OpenAI's shape with ``Connection: close`` (retry elsewhere), ``/health``
    a 503, and the requests in flight finish as before."""
    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "tiny-llama", adapters)
    server = Server(state, grace=5.0).start()
    url = urlparse(server.url)
    got: dict = {}

    def call() -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
        body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        got["in flight"] = conn.getresponse().status
        conn.close()

    idle = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)  # a keep-alive connection
    idle.request("GET", "/health")
    idle.getresponse().read()
    writing = state.engine.model._lock.write()
    writing.__enter__()  # the request in flight cannot finish before the new ones come
    caller = threading.Thread(target=call)
    stopper = threading.Thread(target=server.stop)
    try:
        caller.start()
        assert wait_for(lambda: state.engine.load[1] == 1)
        stopper.start()
        assert wait_for(lambda: state.engine.draining, TIMEOUT)  # uvicorn's loop has seen the stop (every 0.1 s)
        late = {"model": "tiny-llama", "prompt": "y", "max_tokens": 1}
        for conn in (http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT), idle):
            try:
                conn.request(
                    "POST", "/v1/completions", body=json.dumps(late), headers={"Content-Type": "application/json"}
                )
                response = conn.getresponse()
                answer = (response.status, response.getheader("connection"), json.loads(response.read()))
            except OSError as err:  # refused, or cut
                answer = (None, None, repr(err))
            finally:
                conn.close()
            assert answer[:2] == (503, "close"), answer
            assert_openai_error(answer[2], "shutting down")
        assert raw(server, "GET", "/health")[0] == 503
        with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:  # a body over the limit
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{")
            assert sock.recv(12) == b"HTTP/1.1 503"  # (not a 500 'internal error')
    finally:
        writing.__exit__(None, None, None)
        caller.join(TIMEOUT)
        stopper.join(TIMEOUT)
    assert got["in flight"] == 200  # finished within the grace period


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_whose_submit_fails_is_a_503_not_a_cut_stream(server, monkeypatch, chat):
    """The stream submitted its job only once the response had begun: an engine that stopped or a server
    shutting down between the request's preparation and its submit raised inside the stream, after a 200
    (and, for a chat, its first chunk), which cut the connection with no error and no ``[DONE]``."""
    from lordba.serve.errors import UnavailableError

    def refuse(request):
        raise UnavailableError("the server is shutting down")

    monkeypatch.setattr(server.state.engine, "submit", refuse)
    body = {"model": "a", "max_tokens": 3, "stream": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    status, answer = raw(server, "POST", "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body))
    assert status == 503, answer
    assert_openai_error(answer, "shutting down")
    assert server.state.registry._entries["a"].refs == 0


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_client_leaving_before_its_stream_starts_lets_go_of_the_adapter(server, chat):
    """A client that left while its stream's response was being started (Starlette then cancels the body
    before it runs, or at its first chunk) left the job unsubmitted and its adapter held for ever: never
    evicted, never unloaded (``refs`` stayed 1). Driven at the ASGI level: a ``send`` that waits (a
    paused transport) and a ``receive`` that reports the disconnect."""
    import asyncio
    import gc

    from lordba.serve.app import build_app

    state = server.state
    client(server).completions.create(model="a", prompt="x", max_tokens=1)  # resident
    body = {"model": "a", "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await asyncio.sleep(0.01)

    async def main() -> None:
        await build_app(state)(scope, receive, send)
        await asyncio.sleep(0.2)

    before = aborts(server)
    asyncio.run(main())
    gc.collect()
    assert wait_for(lambda: state.registry._entries["a"].refs == 0 and state.engine.load == (0, 0))
    assert aborts(server) == before + 1  # aborted, not run to its 40 tokens for nobody


def test_a_stopped_server_leaves_its_model_to_be_freed(served):
    """The endpoints closed over the server's state, and FastAPI keeps every endpoint it has served in
    process-wide caches (4096 entries): a stopped server's state — its model, tokenizer and adapters — was
    never freed (a notebook or a test run starting servers one after another kept every model)."""
    import gc
    import weakref

    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    state = build_state(model, tokenizer, "tiny-llama", adapters, max_batch=2)
    with Server(state) as server:
        c = client(server)
        assert c.completions.create(model="a", prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None
        assert raw(server, "GET", "/health")[0] == 200
    alive = weakref.ref(model)
    del model, state, server, c
    gc.collect()
    assert alive() is None


class _SpyEncoder:
    """The server's encoder, recording the length of every text it tokenizes."""

    def __init__(self, encoder: object) -> None:
        self.encoder, self.lengths = encoder, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.encoder, name)

    def __call__(self, text: str, **kwargs: object) -> object:
        self.lengths.append(len(text))
        return self.encoder(text, **kwargs)


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server, monkeypatch):
    """A prompt of far more characters than the context can hold was tokenized whole (under the lock every other
    request's tokenization waits for): a 50 MB prompt took minutes and ~10 GB on the tiny model's tokenizer before its
    context-length 400. It is refused by its length in characters, and a prompt that fits is still served."""
    spy = _SpyEncoder(server.state.encoder)
    monkeypatch.setattr(server.state, "encoder", spy)
    huge = "x" * 1_000_000
    cases = [
        ("/v1/completions", {"prompt": huge}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}, "messages"),
    ]
    for path, fields, param in cases:
        status, answer = raw(server, "POST", path, json.dumps({"model": "a", "max_tokens": 2, **fields}).encode())
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
        assert answer["error"]["param"] == param and " characters, more than " in answer["error"]["message"]
    assert all(n < 100_000 for n in spy.lengths), spy.lengths
    entry = server.state.registry._entries.get("a")
    assert entry is None or wait_for(lambda: entry.refs == 0)
    fits = "x" * (server.state.max_context - 10)
    status, answer = raw(
        server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": fits, "max_tokens": 2}).encode()
    )
    assert status == 200, answer


def test_a_request_body_over_the_limit_is_a_413_before_it_is_read_whole(server):
    """A body of any size was read whole into memory and parsed (a 300 MB prompt: +930 MB in the server's
    process, kept after) before the prompt was refused. A body larger than any prompt of the model's context can
    need is a 413 in OpenAI's error shape, whether it says its length or comes in chunks; the server goes on."""
    from lordba.serve.app import body_limit

    limit = body_limit(server.state)
    assert limit >= 16 << 20
    huge = b'{"model": "a", "max_tokens": 1, "prompt": "' + b"x" * limit + b'"}'
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT) as sock:  # says its length, sends 1 MB
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(huge)}"
        )
        sock.sendall(head.encode() + b"\r\n\r\n" + huge[: 1 << 20])
        reply = b""
        while b"}}" not in reply and (data := sock.recv(65536)):
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    answer = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert answer["error"]["code"] == "request_too_large", answer
    assert_openai_error(answer, str(limit))

    def chunks():
        for i in range(0, len(huge), 1 << 20):
            yield huge[i : i + (1 << 20)]

    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=chunks(),
            encode_chunked=True,
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        )
        response = conn.getresponse()
        assert response.status == 413, response.read()[:300]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the client was still sending
    finally:
        conn.close()
    fits = json.dumps({"model": "a", "prompt": "hi", "max_tokens": 1}).encode()
    assert raw(server, "POST", "/v1/completions", fits)[0] == 200


def test_a_body_over_the_configured_limit_is_a_413(served):
    """``build_state(max_body_bytes=...)`` (``lordba serve --max-body-bytes``) sets the body limit."""
    model_dir, adapters = served
    model, tokenizer = load_base(model_dir)
    with Server(build_state(model, tokenizer, "tiny-llama", adapters, max_body_bytes=4096)) as server:
        big = json.dumps({"model": "a", "prompt": "x" * 5000, "max_tokens": 1})
        status, answer = raw(server, "POST", "/v1/completions", big)
        assert status == 413 and answer["error"]["code"] == "request_too_large", answer
        assert_openai_error(answer, "4096")
        assert (
            raw(server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": "x", "max_tokens": 1}))[0] == 200
        )


def test_an_unexpected_error_is_a_500_counted_in_the_requests_metric(server, monkeypatch):
    """A handler's unexpected exception is answered (a 500 in OpenAI's shape) by Starlette's outermost
    middleware, outside the one counting requests: ``lordba_requests`` counted every 200, 400 and 503 but no 500."""
    counter = server.state.metrics.requests.labels("/v1/completions", "500")
    before = counter._value.get()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.state, "prepare", broken)
    status, answer = raw(server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": "hi"}))
    assert status == 500, answer
    assert_openai_error(answer, "boom")
    assert counter._value.get() == before + 1


@pytest.mark.parametrize("leave", ["at once", "after its first event"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_request_whose_client_left_counts_as_a_499_streamed_or_not(server, stream, leave):
    """A whole response whose client left was counted as a 499, but a stream left before (or after) its first
    event as a 200: its status line was counted as it began, whether or not anyone was there to read the rest.
    Both now count as a 499 ("client closed request") once the response ends cut; a stream read to its end stays
    a 200. Driven with a raw socket that closes right after its request (or after the first bytes)."""
    counter = server.state.metrics.requests
    path = "/v1/completions"
    left, ok = counter.labels(path, "499"), counter.labels(path, "200")
    before_left, before_ok = left._value.get(), ok._value.get()
    body = {"model": "a", "prompt": "x", "max_tokens": 250, "temperature": 0, "ignore_eos": True, "stream": stream}
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode() + data)
        if leave != "at once":
            if stream:
                assert sock.recv(12) == b"HTTP/1.1 200"  # its response began: the stream is running
            else:
                assert wait_for(lambda: server.state.engine.load[1] == 1)
    assert wait_for(lambda: server.state.engine.load == (0, 0) and left._value.get() == before_left + 1)
    assert ok._value.get() == before_ok
    list(client(server).completions.create(model="a", prompt="x", max_tokens=2, stream=True))  # read to its end
    assert wait_for(lambda: ok._value.get() == before_ok + 1) and left._value.get() == before_left + 1


TOOL_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}{% if m.name %} {{ m.name }}{% endif %}"
    "{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}>{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }} {{ c.function.arguments | tojson }}]"
    "{% endfor %}"
    "\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_a_history_of_tool_calls_and_names_reaches_the_chat_template(server, monkeypatch):
    """A replayed tool-calling history (an assistant's ``tool_calls``, the tool's answer with its ``tool_call_id``,
    a ``name``) lost all of them before the chat template: the model saw an empty assistant turn and an answer to
    no call (here 41 prompt tokens, not 86). They reach it as transformers' templates take them (the arguments'
    JSON string as its object), while ``tools`` themselves are still refused."""
    monkeypatch.setattr(server.state.encoder, "chat_template", TOOL_TEMPLATE)
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "weather"},
    ]
    body = {"model": "a", "messages": messages, "max_tokens": 1}
    status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(body))
    assert status == 200, answer
    rendered = [
        messages[0],
        {
            **messages[1],
            "content": "",
            "tool_calls": [{**call, "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        messages[2],
    ]
    want = server.state.encoder.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    assert "[c1 weather {" in want and "<tool weather c1>sunny" in want and "<user ann>" in want
    assert answer["usage"]["prompt_tokens"] == len(want), want  # one token a character
    status, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(body | {"tools": [{"type": "function"}]}))
    assert status == 400 and answer["error"]["param"] == "tools"
    lone = json.dumps(body | {"messages": [{"role": "user", "content": "hi", "name": "\ud83d"}]})
    status, answer = raw(server, "POST", "/v1/chat/completions", lone)  # rendered now: checked as the content is
    assert status == 400 and "lone surrogate" in answer["error"]["message"], answer


@pytest.mark.parametrize("as_string", [True, False])
def test_deeply_nested_tool_call_arguments_are_a_400_not_a_500(server, as_string):
    """A replayed tool call whose ``arguments`` nest hundreds of levels deep (a JSON string, or the object itself)
    was a 500 'internal error: RecursionError': ``json.loads`` of the string raised RecursionError, which the
    parse did not expect, and the object's strings were walked recursively for their check. A string the parser
    cannot read is kept as it came (as any string that is no JSON object: served, this template renders no tool
    call), an object too deep is a 400 naming ``messages``."""
    # deeper than Python recurses for the walk (two frames a level), within what the JSON parser takes (one a level):
    # relative to the process's limit, which torch.compile's tests raise (700 levels then passed as valid)
    depth = sys.getrecursionlimit() * 7 // 10
    deep = "[" * 5000 + "]" * 5000 if as_string else 1
    for _ in range(0 if as_string else depth):
        deep = {"a": deep}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    messages = [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "user", "content": "hi"}]
    body = json.dumps({"model": "a", "messages": messages, "max_tokens": 1})
    status, answer = raw(server, "POST", "/v1/chat/completions", body)
    if as_string:
        assert status == 200, answer
    else:
        assert status == 400 and answer["error"]["param"] == "messages", answer
        assert_openai_error(answer, "nest too deeply")
    assert raw(server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": "hi", "max_tokens": 1}))[0] == 200


def test_an_unexpected_errors_500_does_not_name_the_servers_adapters_folder(server, monkeypatch):
    """A 500 answered 'internal error: FileNotFoundError: ... /srv/.../adapters/...': the server's path, to any
    client (the --adapters folder removed while serving made GET /v1/models one). It says --adapters instead."""
    folder = server.state.registry.folder

    def broken(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(folder / "a"))

    monkeypatch.setattr(server.state, "prepare", broken)
    status, answer = raw(server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": "hi"}))
    assert status == 500 and str(folder) not in json.dumps(answer), answer
    assert_openai_error(answer, "FileNotFoundError", "--adapters/a")


def test_a_library_errors_400_does_not_name_the_servers_adapters_folder(server, monkeypatch):
    """The 400 answered for a library error raised in a handler kept the message whole, the server's paths in it
    (as the 500 did); it says --adapters instead."""
    from lordba.errors import AdapterFormatError

    folder = server.state.registry.folder

    def broken(*args, **kwargs):
        raise AdapterFormatError(f"{folder / 'a' / 'lordba_model.safetensors'}: truncated")

    monkeypatch.setattr(server.state, "prepare", broken)
    status, answer = raw(server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": "hi"}))
    assert status == 400 and str(folder) not in json.dumps(answer), answer
    assert_openai_error(answer, "--adapters/a/lordba_model.safetensors: truncated")


def test_latency_metrics_count_the_tokenizing_and_the_adapters_load(server, monkeypatch):
    """``lordba_time_to_first_token_seconds`` and ``lordba_request_latency_seconds`` counted from the engine's
    request, made after the prompt was tokenized and its adapter loaded: a request whose adapter took 1 s to load
    was recorded at ~0.07 s. They count from the request's start, as vLLM's count from its arrival."""
    metrics = server.state.metrics
    ttft_before, latency_before = metrics.ttft._sum.get(), metrics.latency._sum.get()
    registry = server.state.registry
    for method in ("acquire", "acquire_resident"):  # (loaded, or held resident: 0.5 s either way)
        real = getattr(registry, method)
        monkeypatch.setattr(registry, method, lambda name, real=real: time.sleep(0.5) or real(name))
    status, answer = raw(server, "POST", "/v1/completions", json.dumps({"model": "a", "prompt": "hi", "max_tokens": 2}))
    assert status == 200, answer
    assert metrics.ttft._sum.get() - ttft_before >= 0.5
    assert metrics.latency._sum.get() - latency_before >= 0.5


def test_the_served_base_is_in_eval_mode_throughout(served):
    """``load_base`` wrapped the eval base in a LoRDBAModel left in training mode (nn.Module's default), so a
    module added later under it (an adapter's dropout) could run in training mode before any adapter load."""
    model_dir, _ = served
    model, _ = load_base(model_dir)
    assert [name for name, module in model.named_modules() if module.training] == []


def test_the_openapi_schema_describes_the_generation_requests_bodies(server):
    """The generation endpoints take the parsed JSON and validate it themselves (serve.bodies): /openapi.json then
    described their bodies as any JSON ({"title": "Raw"}) and lost ChatRequest, CompletionRequest and the models they
    use, which a client generated from the schema is made of."""
    status, schema = raw(server, "GET", "/openapi.json")
    assert status == 200
    models = schema["components"]["schemas"]
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatRequest")):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"
        }
        assert "model" in models[name]["properties"]
    assert {"ChatMessage", "TextPart", "ToolCall", "StreamOptions"} <= set(models)
    assert "#/components/schemas/ChatMessage" in json.dumps(models["ChatRequest"])
