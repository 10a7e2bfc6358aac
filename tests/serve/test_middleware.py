"""serve.middleware's ASGI wrappers driven directly (no server: a hand-made app, ``receive`` and ``send``), for what
test_server's requests cannot see: the body limit's default and its boundaries, what ``LimitBody`` leaves unread,
what ``Draining`` reads, answers and lets through, and when and how often ``CountRequests`` counts."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from fastapi import HTTPException

from lordba.serve.metrics import ServeMetrics
from lordba.serve.middleware import (
    BODY_BYTES_PER_CHAR,
    MIN_BODY_LIMIT,
    CountRequests,
    Draining,
    LimitBody,
    body_limit,
)


def http(path: str = "/v1/completions", length: int | None = None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


class Peer:
    """The server's side of one request: ``receive`` hands out ``messages`` in order (then a disconnect, as a server
    does once the body is read), ``send`` keeps what the app sent; ``calls`` counts the receives."""

    def __init__(self, *messages: dict) -> None:
        self.messages, self.sent, self.calls = list(messages), [], 0

    async def receive(self) -> dict:
        self.calls += 1
        return self.messages.pop(0) if self.messages else {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


class Reader:
    """An app that reads the whole body, then answers ``status`` (``calls``: how many requests reached it)."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.calls, self.read = status, 0, b""

    async def __call__(self, scope: dict, receive, send) -> None:
        self.calls += 1
        message = {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            self.read += message.get("body", b"")
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})


def run(middleware, scope: dict, peer: Peer) -> None:
    asyncio.run(middleware(scope, peer.receive, peer.send))


# ---------------------------------------------------------------------------------------------------- body_limit
def state(max_body_bytes=None, max_prompt_chars=None, max_context=1000) -> SimpleNamespace:
    return SimpleNamespace(max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars, max_context=max_context)


def test_the_body_limit_is_the_configured_one_else_room_for_the_longest_prompt_escaped_at_least_the_least():
    assert body_limit(state(max_body_bytes=100, max_prompt_chars=10**9)) == 100  # configured: below the least too
    assert body_limit(state(max_prompt_chars=2_000_000)) == 2_000_000 * BODY_BYTES_PER_CHAR
    assert body_limit(state(max_prompt_chars=None, max_context=100_000)) == 100_000 * 64 * BODY_BYTES_PER_CHAR
    assert body_limit(state(max_prompt_chars=1000)) == MIN_BODY_LIMIT


# ---------------------------------------------------------------------------------------------------- LimitBody
def test_a_body_of_exactly_the_limit_is_read_through_in_pieces_and_one_byte_more_is_a_413():
    app = Reader()
    peer = Peer(body(b"x" * 6, more=True), body(b"y" * 4))
    run(LimitBody(app, limit=10), http(length=10), peer)
    assert app.read == b"x" * 6 + b"y" * 4 and peer.sent[0]["status"] == 200
    over = Peer(body(b"x" * 6, more=True), body(b"y" * 5))
    with pytest.raises(HTTPException) as err:  # (FastAPI's handler answers it: test_server's 413s)
        run(LimitBody(Reader(), limit=10), http(), over)  # no Content-Length: counted as it comes
    assert err.value.status_code == 413 and "larger than 10 bytes" in err.value.detail
    assert over.calls == 2 and not over.sent


def test_a_declared_length_over_the_limit_is_refused_before_any_byte_is_read():
    peer = Peer(body(b"{}"))
    with pytest.raises(HTTPException) as err:
        run(LimitBody(Reader(), limit=10), http(length=11), peer)
    assert err.value.status_code == 413 and peer.calls == 0
    fits = Peer(body(b"{}"))
    run(LimitBody(Reader(), limit=10), http(length=10), fits)  # (declared at the limit: read)
    assert fits.calls >= 1 and fits.sent[0]["status"] == 200


def test_what_is_no_http_request_passes_the_body_limit_untouched():
    seen = []

    async def app(scope, receive, send):
        seen.append(receive)

    peer = Peer()
    run(LimitBody(app, limit=0), {"type": "lifespan"}, peer)
    assert seen == [peer.receive]


# ---------------------------------------------------------------------------------------------------- Draining
def test_while_draining_a_request_is_read_whole_then_a_503_with_connection_close_and_never_reaches_the_app():
    app, engine = Reader(), SimpleNamespace(draining=True)
    peer = Peer(body(b"{", more=True), body(b"}", more=True), body(b""))
    run(Draining(app, engine), http(), peer)
    assert app.calls == 0 and peer.calls == 3 and not peer.messages  # every body message read
    start, answer = peer.sent
    assert start["status"] == 503 and (b"connection", b"close") in start["headers"]
    assert json.loads(answer["body"])["error"] == {
        "message": "the server is shutting down",
        "type": "server_error",
        "param": None,
        "code": "unavailable",
    }


def test_while_draining_metrics_and_other_scopes_still_reach_the_app_and_nothing_does_otherwise():
    engine = SimpleNamespace(draining=True)
    metrics = Reader()
    run(Draining(metrics, engine), {**http("/metrics"), "method": "GET"}, Peer(body(b"")))
    assert metrics.calls == 1
    lifespan = []

    async def app(scope, receive, send):
        lifespan.append(scope["type"])

    run(Draining(app, engine), {"type": "lifespan"}, Peer())
    assert lifespan == ["lifespan"]
    engine.draining = False
    served = Reader()
    peer = Peer(body(b"{}"))
    run(Draining(served, engine), http(), peer)
    assert served.calls == 1 and peer.sent[0]["status"] == 200


def test_while_draining_a_body_over_the_limit_is_still_a_503():
    """``LimitBody`` (outside) raises its 413 from inside ``Draining``'s read: the 503 is answered all the same."""
    peer = Peer(body(b"x" * 20))
    run(LimitBody(Draining(Reader(), SimpleNamespace(draining=True)), limit=10), http(), peer)
    assert peer.sent[0]["status"] == 503


# ---------------------------------------------------------------------------------------------------- CountRequests
def counter(path: str, status: str, metrics: ServeMetrics) -> float:
    return metrics.requests.labels(path, status)._value.get()


def counting(app) -> tuple[CountRequests, ServeMetrics]:
    metrics = ServeMetrics()
    return CountRequests(app, SimpleNamespace(metrics=metrics)), metrics


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_generation_request_is_counted_once_by_status_before_its_last_bytes_are_sent(path):
    seen = []
    middleware, metrics = counting(Reader(400))

    class Watching(Peer):
        async def send(self, message: dict) -> None:
            seen.append(counter(path, "400", metrics))
            await super().send(message)

    run(middleware, http(path), Watching(body(b"{}")))
    assert seen == [0, 1]  # the start not yet, the last body already counted
    assert counter(path, "400", metrics) == 1  # (and not again once the app returned)


def test_other_paths_are_not_counted():
    middleware, metrics = counting(Reader())
    for path in ("/v1/models", "/health", "/v1/load_lora_adapter"):
        run(middleware, {**http(path), "method": "GET"}, Peer(body(b"")))
    assert metrics.requests.collect()[0].samples == []


def test_a_response_whose_client_left_counts_as_a_499_whatever_its_status():
    async def app(scope, receive, send):
        await receive()  # the body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await receive()  # the client left
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware, metrics = counting(app)
    run(middleware, http(), Peer(body(b"{}")))
    assert counter("/v1/completions", "499", metrics) == 1 and counter("/v1/completions", "200", metrics) == 0


def test_a_response_ended_without_its_last_body_is_counted_once_the_app_returns():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})

    middleware, metrics = counting(app)
    run(middleware, http(), Peer())
    assert counter("/v1/completions", "200", metrics) == 1


def test_an_exception_before_the_response_counts_as_a_500_and_goes_on_to_the_outer_middleware():
    async def app(scope, receive, send):
        raise RuntimeError("boom")

    middleware, metrics = counting(app)
    with pytest.raises(RuntimeError, match="boom"):
        run(middleware, http(), Peer())
    assert counter("/v1/completions", "500", metrics) == 1
