"""The server under overload: a bounded waiting queue (``--max-waiting``), a chat too long for the context refused
before the work it would take, and the tokenizer's lock held only for the tokenizing (none where its calls only
read it)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")

from lordba.serve.engine import Engine, Request
from lordba.serve.errors import ContextLengthError, QueueFullError
from lordba.serve.sampling import SamplingParams
from lordba.serve.server import Server, build_state

from .serve_helpers import char_tokenizer, health_now, make_adapter, post, tiny_model


@pytest.fixture
def state():
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama")
    try:
        yield state
    finally:
        state.engine.shutdown()


def test_a_chat_whose_contents_exceed_the_context_is_refused_before_it_is_rendered(state, monkeypatch):
    """The chat template rendered all of a 100,000-message chat (0.8 s on the tiny model, under the lock every other
    request's tokenizing waits for) before its length was checked: its contents alone are over the context's
    characters, so it is refused (a 400 naming ``messages``) before rendering."""
    rendered = []
    render = state.encoder.apply_chat_template
    monkeypatch.setattr(state.encoder, "apply_chat_template", lambda *a, **k: rendered.append(1) or render(*a, **k))
    started = time.monotonic()
    with pytest.raises(ContextLengthError, match="100000 characters") as err:
        state.chat_prompt([{"role": "user", "content": "x"}] * 100_000)
    assert err.value.param == "messages" and not rendered
    assert time.monotonic() - started < 0.5
    assert state.chat_prompt([{"role": "user", "content": "hi"}])  # a chat that fits is rendered


def test_a_chat_being_rendered_does_not_hold_up_other_prompts_tokenizing(state, monkeypatch):
    """The chat template was rendered under the encoder's lock: a long chat (100,000 empty messages pass the contents'
    check: seconds of rendering) held up every other request's tokenizing. Rendering touches no tokenizer state: it
    runs outside the lock, which guards the tokenizing alone."""
    other: list[list[int]] = []
    render = state.encoder.apply_chat_template

    def slow_render(*args, **kwargs):  # another request's prompt comes while this chat renders
        worker = threading.Thread(target=lambda: other.append(state.encode("hi")), daemon=True)
        worker.start()
        worker.join(timeout=5)
        return render(*args, **kwargs)

    monkeypatch.setattr(state.encoder, "apply_chat_template", slow_render)
    assert state.chat_prompt([{"role": "user", "content": "hi"}])
    assert other == [state.encode("hi")]


def test_a_long_prompt_being_tokenized_does_not_hold_up_another_prompts_tokenizing(state, monkeypatch):
    """Every prompt was tokenized under the encoder's one lock: a long one (2.3 s for 900,000 characters with
    SmolLM2's tokenizer) held up every other request's tokenizing. A fast tokenizer's calls only read it once one call
    settled its truncation, padding and special-token splitting (:func:`shareable`): they run at once, unlocked."""
    hi, other = state.encode("hi"), []
    tokenize = state.encoder._encode_plus

    def slow(*args, **kwargs):  # another request's prompt comes while this one is being tokenized
        if kwargs.get("text", args[0] if args else None) == "long":
            worker = threading.Thread(target=lambda: other.append(state.encode("hi")), daemon=True)
            worker.start()
            worker.join(timeout=5)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(state.encoder, "_encode_plus", slow)
    assert len(state.encode("long")) >= 4
    assert other == [hi]


def test_a_tokenizer_files_truncation_and_padding_are_settled_before_it_is_shared():
    """transformers' call turns off a truncation or padding its tokenizer.json sets, a write to the Rust tokenizer that
    fails a concurrent call: the server's copy is settled by one call before threads share it, and tokenizes whole
    prompts; a tokenizer without a Rust backend stays under the lock."""
    from lordba.serve.state import shareable

    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.enable_truncation(4)
    tokenizer.backend_tokenizer.enable_padding(length=8)
    state = build_state(tiny_model(), tokenizer, "tiny-llama")
    try:
        assert state.encoder_shared and state.encoder.backend_tokenizer.truncation is None
        assert state.encoder.backend_tokenizer.padding is None
        assert len(state.encode("1234567890")) >= 10
    finally:
        state.engine.shutdown()
    assert not shareable(object())


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.01)
    return predicate()


def test_a_request_past_max_waiting_is_a_503_at_once_and_the_queued_ones_complete():
    """The waiting queue had no bound: a burst of 100,000 requests all queued, each holding its prompt, its adapter
    (never evicted while a request holds it) and its connection, however long the wait. With ``max_waiting`` (``lordba
    serve --max-waiting``), a request finding that many waiting for a batch slot is a 503 ``queue_full`` with
    ``Retry-After`` at once, streamed or not, counted in ``lordba_rejected_requests``; those queued complete."""
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_batch=1, max_waiting=2)
    body = {"model": "tiny-llama", "prompt": "12+3", "max_tokens": 2, "temperature": 0}
    got: list[int] = []
    with Server(state) as server:
        calls = []
        with state.engine.tokenizer_lock:  # the engine's first step blocks: one row admitting, then two waiting
            for load in ((0, 1), (1, 1), (2, 1)):
                calls.append(threading.Thread(target=lambda: got.append(post(server.url, "/v1/completions", body)[0])))
                calls[-1].start()
                assert wait_for(lambda load=load: state.engine.load == load), state.engine.load
            for stream in (False, True):
                started = time.monotonic()
                status, headers, answer = post(server.url, "/v1/completions", {**body, "stream": stream})
                assert time.monotonic() - started < 5
                assert status == 503 and headers.get("Retry-After") == "1", (status, headers, answer)
                assert answer["error"]["code"] == "queue_full" and "--max-waiting 2" in answer["error"]["message"]
            assert state.engine.load == (2, 1)
        for call in calls:
            call.join(30)
        assert got == [200, 200, 200]
        assert state.metrics.rejected_requests.labels("queue_full")._value.get() == 2
        assert state.metrics.requests.labels("/v1/completions", "503")._value.get() == 2


def test_max_waiting_counts_the_requests_beyond_the_free_slots_and_not_those_aborted():
    """A burst to an idle engine waits for its next step all at once: only the requests beyond the free batch slots
    wait for one (``max_waiting`` 0: a 503 only once the batch is full); an aborted request frees its place."""
    engine = Engine(tiny_model(), char_tokenizer(), max_batch=3, max_waiting=0)  # (not started: nothing is admitted)
    requests = [Request([5, 6], "__base__", SamplingParams(1), lambda event: None) for _ in range(4)]
    for request in requests[:3]:
        engine.submit(request)
    with pytest.raises(QueueFullError, match="0 requests already wait"):
        engine.submit(requests[3])
    with pytest.raises(QueueFullError):
        engine.check_room()
    engine.abort(requests[0])
    engine.check_room()
    engine.submit(requests[3])
    engine.shutdown()


def test_requests_being_tokenized_count_against_max_waiting():
    """A burst arrives before any of its requests is submitted: each passed the queue's check (empty), then waited for
    the tokenizer and a worker thread, holding its connection, and was refused only then. The requests being prepared
    count as waiting: the one past ``max_waiting`` is a 503 at once, while the others are still being tokenized."""
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_batch=1, max_waiting=1)
    body = {"model": "tiny-llama", "prompt": "12+3", "max_tokens": 2, "temperature": 0}
    got: list[int] = []
    release, encode = threading.Event(), state.encode
    state.encode = lambda prompt: release.wait(30) and encode(prompt)  # their tokenizing waits (a long prompt's, say)
    with Server(state) as server:
        calls = []
        try:
            for preparing in (1, 2):  # one for the free slot, one waiting for it
                calls.append(threading.Thread(target=lambda: got.append(post(server.url, "/v1/completions", body)[0])))
                calls[-1].start()
                assert wait_for(lambda preparing=preparing: state.preparing == preparing), state.preparing
            status, headers, answer = post(server.url, "/v1/completions", body)
            assert status == 503 and answer["error"]["code"] == "queue_full" and headers["Retry-After"] == "1"
        finally:
            release.set()
        for call in calls:
            call.join(30)
        assert got == [200, 200] and state.preparing == 0


def test_the_load_health_and_queue_gauge_count_no_aborted_request_still_in_the_queue():
    """A request whose client left while it waited for a batch slot stays in the queue until the engine's next step
    drops it (a step of a long prefill: seconds); ``/health``'s ``waiting`` and the ``lordba_queue_length`` gauge
    counted it meanwhile (3 waiting where 2 clients still waited), as the queue's bound (``max_waiting``) did not."""
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_batch=1)  # (not started: nothing admitted)
    requests = [Request([5, 6], "__base__", SamplingParams(1), lambda event: None) for _ in range(3)]
    for request in requests:
        state.engine.submit(request)
    state.engine.abort(requests[1])
    assert state.engine.load == (2, 0)
    state.metrics.queue(*state.engine.load)  # what /metrics does before rendering
    assert b"lordba_queue_length 2.0" in state.metrics.render()
    state.engine.shutdown()


def test_a_burst_of_requests_for_cold_adapters_leaves_worker_threads_to_the_bases_requests(tmp_path):
    """Every request was prepared in the one pool of 40 worker threads, and adapters load one at a time: 45 requests
    for adapters not loaded yet took all 40, each waiting for the load before it, and a request for the base (which
    needs a thread to tokenize its prompt) waited for 21 loads (3.0 s where loads took 0.1 s each; 0.1 s alone).
    Requests that may load an adapter take at most LOAD_THREADS threads; the base's request is served meanwhile."""
    make_adapter(tmp_path / "a0", seed=10)
    for i in range(1, 45):
        shutil.copytree(tmp_path / "a0", tmp_path / f"a{i}")
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", tmp_path, max_batch=64)
    release, real = threading.Event(), state.registry.model.load_adapter
    state.registry.model.load_adapter = lambda *a, **k: release.wait(30) and real(*a, **k)  # each load waits
    body = {"model": "tiny-llama", "prompt": "12+3", "max_tokens": 2, "temperature": 0}
    got: list[int] = []
    with Server(state) as server:
        calls = [
            threading.Thread(
                target=lambda i=i: got.append(post(server.url, "/v1/completions", body | {"model": f"a{i}"})[0])
            )
            for i in range(45)
        ]
        try:
            for call in calls:
                call.start()
            assert wait_for(lambda: state.preparing == 45), state.preparing
            base: list[int] = []
            waiter = threading.Thread(target=lambda: base.append(post(server.url, "/v1/completions", body)[0]))
            waiter.start()
            waiter.join(10)
            assert base == [200] and state.registry.loads == 0  # served while every load still waits
        finally:
            release.set()
            for call in calls:
                call.join(60)
        assert got == [200] * 45 and state.registry.loads == 45


def test_health_is_answered_while_a_large_body_is_parsed(state, monkeypatch):
    """FastAPI parsed a request's JSON body on the event loop, which every stream and /health share: 100,000 chat
    messages (3.4 MB) held it 0.3-0.6 s. A body over OFFLOAD_BYTES is parsed in a worker thread, giving the interpreter
    lock back between JSON objects: /health, asked while the body is being parsed, is answered then."""
    from lordba.serve.bodies import OFFLOAD_BYTES

    health: list[object] = []
    loads = json.loads

    def parsing(text, *args, **kwargs):  # /health asked (and waited for) from inside the large body's parse
        if len(text) > OFFLOAD_BYTES and not health:
            health.append(health_now(server.port))
        return loads(text, *args, **kwargs)

    many = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}] * 5000}
    with Server(state) as server:
        monkeypatch.setattr(json, "loads", parsing)
        status, _, answer = post(server.url, "/v1/chat/completions", many)
    assert health == [200]
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer  # (5000 messages)


def test_a_chat_of_more_messages_than_the_contexts_tokens_is_served_where_the_template_drops_some():
    """A chat of more messages than the context's tokens was refused before validation, as if every message rendered
    as a token at least: under a template that drops empty messages, 250 messages, all but one empty, render as 19
    tokens of a 200-token context, and were a 400 ``context_length_exceeded`` ("250 messages"). The count is checked
    only where the template is seen to render every message (``renders_every_message``: the test template's,
    SmolLM2's)."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['content'] %}<{{ m['role'] }}>{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    state = build_state(tiny_model(), tokenizer, "tiny-llama", max_context=200)
    messages = [{"role": "user", "content": ""}] * 249 + [{"role": "user", "content": "hi"}]
    body = {"model": "tiny-llama", "messages": messages, "max_tokens": 2, "temperature": 0}
    with Server(state) as server:
        status, _, answer = post(server.url, "/v1/chat/completions", body)
        assert status == 200 and answer["usage"]["prompt_tokens"] == len("<user>hi\n<assistant>"), answer
        status, _, answer = post(server.url, "/v1/chat/completions", {**body, "messages": [messages[-1]] * 250})
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer  # (once rendered)
    assert build_state(tiny_model(), char_tokenizer(), "tiny-llama").counts_messages  # (never started)


def test_an_adapter_evicted_after_the_residency_check_loads_on_a_load_thread(tmp_path, monkeypatch):
    """Whether a request may load its adapter was decided on the event loop, before its worker thread ran: an adapter
    resident then and evicted before the thread held it loaded on a thread of the default pool, outside the
    LOAD_THREADS that bound the threads waiting for loads. The default pool's thread now only holds a resident
    adapter; one evicted meanwhile is prepared again on a load thread, which loads it."""
    from lordba.serve import app

    make_adapter(tmp_path / "a", seed=10)
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", tmp_path)
    on_load_thread = threading.local()
    run = app._LoadThreads.run

    async def marked_run(self, func, *args, **kwargs):  # its calls run with on_load_thread.yes set
        def marked(*a, **k):
            on_load_thread.yes = True
            try:
                return func(*a, **k)
            finally:
                on_load_thread.yes = False

        return await run(self, marked, *args, **kwargs)

    monkeypatch.setattr(app._LoadThreads, "run", marked_run)
    loads, load = [], state.registry.model.load_adapter
    state.registry.model.load_adapter = lambda *a, **k: (
        loads.append(getattr(on_load_thread, "yes", False)) or load(*a, **k)
    )
    checked = state.registry.is_resident

    def evicted_after_the_check(name: str) -> bool:
        resident = checked(name)
        if resident:
            state.registry.unload(name)  # (a folder adapter: off the model, loaded again on its next use)
        return resident

    monkeypatch.setattr(state.registry, "is_resident", evicted_after_the_check)
    body = {"model": "a", "prompt": "12+3", "max_tokens": 2, "temperature": 0}
    with Server(state) as server:
        for _ in range(2):  # cold: loaded; then resident at the check, evicted before its thread ran: loaded again
            status, _, answer = post(server.url, "/v1/completions", body)
            assert status == 200, answer
    assert loads == [True, True] and state.registry.loads == 2


def test_a_chat_of_more_messages_than_the_contexts_tokens_is_refused_before_its_body_is_validated():
    """FastAPI validated a request's body on the event loop, which every stream and /health share: a chat of 100,000
    messages held it for seconds of pydantic (a short request waited 3.0 s) only to be refused for its length. A chat
    of more messages than the context's tokens can never fit (each renders as a token at least): it is refused before
    it is validated (a 400 naming ``messages``). A body over OFFLOAD_BYTES is validated in a worker thread, its errors
    naming the field as before."""
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_context=5000)
    with Server(state) as server:
        many = [{"role": "user", "content": "x"}] * 30_001
        status, _, answer = post(server.url, "/v1/chat/completions", {"model": "tiny-llama", "messages": many})
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
        assert answer["error"]["param"] == "messages" and "30001 messages" in answer["error"]["message"]
        bad = [*many[:4000], {"role": "nobody", "content": "x"}]  # over OFFLOAD_BYTES, within the context
        status, _, answer = post(server.url, "/v1/chat/completions", {"model": "tiny-llama", "messages": bad})
        assert status == 400 and answer["error"]["param"] == "messages.4000.role", answer
        ids = {"model": "tiny-llama", "prompt": [5] * 100_000}
        status, _, answer = post(server.url, "/v1/completions", ids)
        assert (
            status == 400 and answer["error"]["param"] == "prompt" and "100000 token ids" in answer["error"]["message"]
        )
