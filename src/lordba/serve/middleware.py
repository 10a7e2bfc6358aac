"""The HTTP server's ASGI middleware, around every endpoint of :func:`lordba.serve.app.build_app`: a request body over
the limit refused as it arrives (:class:`LimitBody`), requests answered a 503 while the server drains
(:class:`Draining`), and the generation requests counted by status once their response ends (:class:`CountRequests`)."""

from __future__ import annotations

import contextlib

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from lordba.serve import protocol as p
from lordba.serve.engine import Engine
from lordba.serve.errors import UnavailableError
from lordba.serve.state import ServerState

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MIN_BODY_LIMIT = 16 << 20  # bytes: the least a request body may hold (body_limit)
BODY_BYTES_PER_CHAR = 16  # a JSON string's character escaped as a surrogate pair ("\\ud83d\\ude00": 12), with room


def body_limit(state: ServerState) -> int:
    """The most bytes a request body may hold: ``state.max_body_bytes`` (``lordba serve --max-body-bytes``), else
    room for the longest prompt the model's context can take (``state.max_prompt_chars``, else 64 characters a
    token), every character JSON-escaped, at least :data:`MIN_BODY_LIMIT`."""
    if state.max_body_bytes is not None:
        return state.max_body_bytes
    chars = state.max_prompt_chars or state.max_context * 64
    return max(MIN_BODY_LIMIT, chars * BODY_BYTES_PER_CHAR)


class LimitBody:
    """ASGI middleware refusing a request body over ``limit`` bytes with a 413 (OpenAI's error shape) as soon as
    its ``Content-Length`` or the bytes received so far say so, rather than reading it whole into memory."""

    def __init__(self, app: object, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, received = self.limit, 0
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")

        def too_large() -> HTTPException:
            return HTTPException(
                413, f"the request body is larger than {limit} bytes (no prompt of this model needs more)"
            )

        async def limited() -> dict:
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large()
            return message

        await self.app(scope, limited, send)


class Draining:
    """ASGI middleware answering every request but ``/metrics`` with a 503 (OpenAI's error shape) and ``Connection:
    close`` while the server drains (``engine.draining``: its listening socket is still open for the requests in
    flight), as Kubernetes expects of a terminating pod: a load balancer retries it elsewhere."""

    def __init__(self, app: object, engine: Engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or not self.engine.draining or scope.get("path") == "/metrics":
            await self.app(scope, receive, send)
            return
        message = {"more_body": True}
        with contextlib.suppress(HTTPException):  # (a body over the limit: the connection closes all the same)
            while message.get("more_body") and message.get("type", "http.request") == "http.request":
                message = await receive()  # the body, read before the connection closes (unread bytes: a reset)
        error = p.error_body("the server is shutting down", "server_error", code=UnavailableError.code)
        answer = JSONResponse(error, status_code=503)
        answer.headers["Connection"] = "close"
        await answer(scope, receive, send)


class CountRequests:
    """ASGI middleware counting generation requests by path and status (a plain ASGI wrapper: it
    leaves streaming and disconnect handling untouched), once the response has ended: a request whose client left
    before its response ended counts as a 499 (nginx's "client closed request"), streamed or not, even where its
    200 had begun; an unexpected exception, which Starlette's outermost middleware answers with a 500 after this
    one, counts as a 500."""

    def __init__(self, app: object, state: ServerState) -> None:
        self.app, self.metrics = app, state.metrics

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        path = scope.get("path")
        if scope["type"] != "http" or path not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return

        status: str | None = None  # the response's, once begun
        counted = left = False

        def count(as_status: str) -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.requests.labels(path, as_status).inc()

        async def watched() -> dict:
            nonlocal left
            message = await receive()
            left = left or message["type"] == "http.disconnect"
            return message

        async def counting(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count("499" if left else status or "500")  # before the last bytes: a scrape right after sees it
            await send(message)

        try:
            await self.app(scope, watched, counting)
        except Exception:  # answered by Starlette's outermost middleware, outside this one: its 500
            count("499" if left else status or "500")
            raise
        count("499" if left else status or "500")  # (a response cut before its last bytes: its client left)
