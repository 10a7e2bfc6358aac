"""A generation request's body parsed and validated (``lordba.serve.bodies``): a large one off the event loop, without
the cyclic collector walking what its validation makes."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("fastapi")

from lordba.serve import bodies
from lordba.serve.server import Server, build_state

from .serve_helpers import char_tokenizer, health_now, post, tiny_model


def test_a_large_chat_is_validated_with_the_cyclic_collector_off_and_its_message_models_dropped(monkeypatch):
    """Validating a chat of 100,000 messages made 200,000 objects the cyclic collector tracks (each message's model
    and its fields-set): their allocation set off full collections walking them all (0.2-0.35 s each, three per
    request, holding the interpreter lock every stream and ``/health`` need). A large body is validated and converted
    with the collector off, and the message models are dropped before it is on again (freed by reference counting)."""
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_context=50_000)
    seen: dict[str, object] = {}
    collections: list[int] = []

    def counted(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    chat = bodies._chat

    def watched(raw, max_context, **kwargs):
        seen["enabled"] = gc.isenabled()
        gc.callbacks.append(counted)
        try:
            body, messages = chat(raw, max_context, **kwargs)
        finally:
            gc.callbacks.remove(counted)
        seen["models left"], seen["messages"] = len(body.messages), len(messages)
        return body, messages

    monkeypatch.setattr(bodies, "_chat", watched)
    many = [{"role": "user", "content": "x"}] * 20_000  # (over OFFLOAD_BYTES; each message a token at least)
    with Server(state) as server:
        status, _, answer = post(server.url, "/v1/chat/completions", {"model": "tiny-llama", "messages": many})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer  # (160,000 rendered)
    assert seen == {"enabled": False, "models left": 0, "messages": 20_000}
    assert collections == [] and gc.isenabled()


def test_the_collector_is_on_again_once_the_last_large_body_is_validated_as_it_was():
    """Bodies validated at once in several worker threads: the collector stays off until the last of them ends, then
    is as it was before the first (off where someone else had turned it off)."""
    assert gc.isenabled()
    with bodies._collector_off():
        with bodies._collector_off():
            assert not gc.isenabled()
        assert not gc.isenabled()  # (another body is still being validated)
    assert gc.isenabled()
    gc.disable()
    try:
        with bodies._collector_off():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError), bodies._collector_off():
        raise ValueError("a body that fails its validation")
    assert gc.isenabled()


def test_health_is_answered_while_one_large_object_of_numbers_is_parsed(monkeypatch):
    """The parse of a large body gave the interpreter lock back between JSON objects only: one object of many
    numbers, a ``logit_bias`` of a million entries (15 MB), held the event loop 3.8-4.2 s. It is given back at every
    number too: ``/health``, asked from inside the parse of the object's first value, is answered then."""
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama")
    health: list[object] = []
    parse_float = bodies._float

    def parsing(text: str) -> float:  # /health asked (and waited for) from inside the large object's parse
        if not health:
            health.append(health_now(server.port))
        return parse_float(text)

    monkeypatch.setattr(bodies, "_float", parsing)
    bias = {str(i): -1.5 for i in range(10_000)}  # (over OFFLOAD_BYTES)
    with Server(state) as server:
        status, _, answer = post(
            server.url, "/v1/completions", {"model": "tiny-llama", "prompt": "hi", "logit_bias": bias}
        )
    assert health == [200]
    assert status == 400 and answer["error"]["param"] == "logit_bias", answer
    assert bodies._parse(b'{"a": [1, -0, 2.5, 1e400, {"b": 3}]}') == {"a": [1, 0, 2.5, float("inf"), {"b": 3}]}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_logit_bias_is_refused_before_the_body_is_validated(monkeypatch, path):
    """The server implements no ``logit_bias`` and refused a non-empty one after validation, which for a million
    entries took pydantic 1.3 s holding the interpreter lock. It is refused before, with the same answer."""
    from lordba.serve import protocol as p

    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama")
    validated: list[str] = []
    for model in (p.CompletionRequest, p.ChatRequest):
        validate = model.model_validate
        monkeypatch.setattr(model, "model_validate", lambda raw, v=validate: validated.append(1) or v(raw))
    body = {"model": "tiny-llama", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with Server(state) as server:
        for bias in ({"5": 10}, {str(i): -100 for i in range(20_000)}):  # a small body and one over OFFLOAD_BYTES
            status, _, answer = post(server.url, path, {**body, "logit_bias": bias})
            assert status == 400 and answer["error"] == {
                "message": "logit_bias is not supported (only {})",
                "type": "invalid_request_error",
                "param": "logit_bias",
                "code": "invalid_request",
            }, answer
        assert not validated
        status, _, answer = post(server.url, path, {**body, "logit_bias": {}})  # asks for nothing: served
        assert status == 200 and validated == [1], answer


def test_a_list_of_more_prompts_than_the_context_has_tokens_is_refused_before_it_is_validated(monkeypatch):
    """A list of prompts (one request each is served) was validated whole, then refused: a million strings took
    pydantic 2.2 s, a million token-id lists 5.2 s, holding the interpreter lock. One longer than the context has
    tokens is refused before validation, with the same answer."""
    from lordba.serve import protocol as p

    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_context=200)
    validated: list[int] = []
    validate = p.CompletionRequest.model_validate
    monkeypatch.setattr(p.CompletionRequest, "model_validate", lambda raw: validated.append(1) or validate(raw))
    with Server(state) as server:
        for prompts in (["hi"] * 30_000, [[5, 6]] * 201):
            status, _, answer = post(server.url, "/v1/completions", {"model": "tiny-llama", "prompt": prompts})
            assert status == 400 and answer["error"]["param"] == "prompt", answer
            assert answer["error"]["message"] == "send one prompt per request (a list of prompts is not supported)"
        assert not validated
        status, _, answer = post(server.url, "/v1/completions", {"model": "tiny-llama", "prompt": ["hi", "ho"]})
        assert status == 400 and "send one prompt" in answer["error"]["message"] and validated == [1]


@pytest.mark.parametrize(
    ("key", "piece"), [("content", {"type": "text", "text": ""}), ("tool_calls", {"function": {"name": "f"}})]
)
def test_more_content_parts_or_tool_calls_than_the_context_has_tokens_are_refused_before_validation(
    monkeypatch, key, piece
):
    """A chat message's list content and an assistant's tool calls were not counted before validation: a million
    empty text parts (12 MB) took pydantic 6-22 s in a worker thread, holding the interpreter lock, and were then
    served. More of them in all messages than the context has tokens are refused before validation, naming the field;
    as many as it has are validated (and a chat of them served)."""
    from lordba.serve import protocol as p

    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_context=200)
    validated: list[int] = []
    validate = p.ChatRequest.model_validate
    monkeypatch.setattr(p.ChatRequest, "model_validate", lambda raw: validated.append(1) or validate(raw))

    def chat(*counts: int) -> dict:
        role = "user" if key == "content" else "assistant"
        messages = [{"role": role, key: [piece] * n} for n in counts] + [{"role": "user", "content": "hi"}]
        return {"model": "tiny-llama", "messages": messages, "max_tokens": 1}

    with Server(state) as server:
        for body in (chat(150, 51), chat(15_000)):  # in all messages; a body over OFFLOAD_BYTES (within string_limit)
            status, _, answer = post(server.url, "/v1/chat/completions", body)
            assert status == 400 and answer["error"]["param"] == f"messages[].{key}", answer
            assert answer["error"]["code"] == "context_length_exceeded" and "200 tokens" in answer["error"]["message"]
        assert not validated
        status, _, answer = post(server.url, "/v1/chat/completions", chat(150, 50))
        assert status == 200 and validated == [1], answer


def test_a_large_body_of_more_json_strings_than_the_context_needs_is_a_413_before_it_is_parsed(monkeypatch):
    """One JSON object of a million string entries (16 MB) was parsed in one go, 2.3-3.2 s of the interpreter lock
    (json's C parser has no hook per string). A body over OFFLOAD_BYTES is refused with a 413 before parsing when its
    strings, counted from below in its bytes, are more than a request fitting the context needs; one under that
    count is parsed and served."""
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama", max_context=200)
    most = bodies.string_limit(200)
    objects: list[int] = []  # the parser's calls of its object hook: none for a body refused before parsing
    same = bodies._same
    monkeypatch.setattr(bodies, "_same", lambda obj: objects.append(1) or same(obj))

    def request(strings: int) -> dict:  # (an unknown field: ignored once parsed)
        return {"model": "tiny-llama", "prompt": "hi", "max_tokens": 1, "x": {f"k{i:020}": "" for i in range(strings)}}

    with Server(state) as server:
        status, _, answer = post(server.url, "/v1/completions", request(most // 2 + 1))
        assert status == 413 and answer["error"]["code"] == "request_too_large", answer
        assert f"at most {most}" in answer["error"]["message"] and not objects
        status, _, answer = post(server.url, "/v1/completions", request(most // 2 - 10))
        assert status == 200 and len(objects) == 2, answer


def test_escaped_quotes_are_no_strings_to_the_count():
    """The count is from below: a quote inside a string (escaped) is none, so a prompt of quotes is not refused; a
    string ending after an escaped backslash is not counted either."""
    import json

    quotes = json.dumps({"prompt": '"' * 10_000, "stop": ["a\\\\", "b"]}).encode()  # 5 strings, 4 counted
    bodies._count_strings(quotes, 4)
    with pytest.raises(bodies.HTTPException) as err:
        bodies._count_strings(quotes, 3)
    assert err.value.status_code == 413 and "4 JSON strings or more" in err.value.detail
