"""A generation request's body parsed and validated (``lordba.serve.bodies``): a large one off the event loop, without
the cyclic collector walking what its validation makes."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("fastapi")

from lordba.serve import bodies
from lordba.serve.server import Server, build_state

from .serve_helpers import char_tokenizer, post, tiny_model


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
