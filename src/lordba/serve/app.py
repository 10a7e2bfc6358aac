"""The HTTP API (FastAPI): OpenAI's completions, chat completions and models, vLLM's adapter
loading, health and Prometheus metrics. Every error is answered in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lordba.errors import LoRDBAError
from lordba.serve import bodies
from lordba.serve import protocol as p
from lordba.serve.engine import Event
from lordba.serve.errors import ServeError, UnknownAdapterError
from lordba.serve.middleware import CountRequests, Draining, LimitBody
from lordba.serve.middleware import body_limit as body_limit  # (lordba.serve.app.body_limit, as before)
from lordba.serve.state import Generation, Job, ServerState

DISCONNECT_POLL = 0.25  # seconds between checks for a whole response's client while no event comes
LOAD_THREADS = 4  # worker threads adapter loads, registrations and unloads take at most (one at a time loads anyway)


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state`` (held by ``app.state.serve``; the endpoints hold it weakly:
    FastAPI keeps every endpoint it has served in process-wide caches, which would keep a stopped server's
    model alive)."""
    app = FastAPI(title="lordba serve", docs_url=None, redoc_url=None)
    app.router.route_class = bodies.OffLoopRoute  # (a large JSON body parsed off the event loop; before the routes)
    app.state.serve = state
    _error_handlers(app)
    bodies.document(app)

    app.add_middleware(Draining, engine=state.engine)
    app.add_middleware(CountRequests, state=state)
    app.add_middleware(LimitBody, limit=body_limit(state))
    served = weakref.ref(state)
    del state
    loads = _LoadThreads(LOAD_THREADS)

    @app.get("/health")
    async def health() -> Response:
        state = served()
        waiting, running = state.engine.load
        if state.engine.failure is not None:  # the engine loop stopped: a load balancer should take us out
            failure = state.registry.redact(state.engine.failure)  # (the server's paths: the log has them)
            body = {"status": "error", "error": failure, "waiting": waiting, "running": running}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "waiting": waiting, "running": running})

    @app.get("/metrics")
    async def metrics() -> Response:
        state = served()
        waiting, running = state.engine.load
        state.metrics.queue(waiting, running)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        state = served()
        names = await run_in_threadpool(state.registry.names)
        cards = [p.model_card(state.base_name, None)] + [p.model_card(n, state.base_name) for n in names]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")  # (path: a served name may hold a '/', as "org/model")
    async def model(model: str) -> dict:
        state = served()
        if not model:  # /v1/models/ is the list, as it was (a redirect) before this route took the path
            return await models()
        if model == state.base_name:
            return p.model_card(model, None)
        if model in await run_in_threadpool(state.registry.names):
            return p.model_card(model, state.base_name)
        raise UnknownAdapterError(f"The model '{model}' does not exist")

    @app.post("/v1/completions")
    async def completions(raw: Annotated[Any, Body()], request: Request) -> Response:
        state = served()
        body, prompt = await bodies.completion(request, raw, state.max_context)  # (p.CompletionRequest)
        job = await _prepare(state, loads, body, lambda: state.encode(prompt), body.max_tokens, "prompt")
        return await _respond(state, job, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(raw: Annotated[Any, Body()], request: Request) -> Response:
        state = served()
        body, messages = await bodies.chat(request, raw, state.max_context, state.counts_messages)  # (p.ChatRequest)
        job = await _prepare(state, loads, body, lambda: state.chat_prompt(messages), body.limit(), "messages")
        return await _respond(state, job, body, request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: p.LoadAdapterRequest) -> Response:
        state = served()
        await loads.run(state.registry.register, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: p.UnloadAdapterRequest) -> Response:
        state = served()
        await loads.run(state.registry.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


async def _prepare(
    state: ServerState, loads: _LoadThreads, body: p._Sampling, prompt: Callable, max_tokens: int | None, field: str
) -> Job:
    """Resolve, load, tokenize and check in a worker thread (loading reads files and takes the model's lock); a
    request whose adapter is not resident in one of ``loads``' threads: a burst for cold adapters, each waiting for
    the registry's one load at a time, took every worker thread, and the base's requests waited for their loads.
    ``field``: the request's field that holds the prompt (named by a context-length error). A full queue refuses it
    first (:meth:`Engine.check_room`: a 503 without the tokenizing, the adapter's load or a worker thread), the
    requests being prepared counted as waiting (a burst would all pass the check, then wait for the worker threads).
    A request whose adapter was resident when checked, evicted before its worker thread held it, is prepared again
    in one of ``loads``' threads: its load never runs on another."""
    state.engine.check_room(state.preparing)
    sampling = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stops(),
        "ignore_eos": body.ignore_eos,
    }
    state.preparing += 1  # (on the event loop, as the check: its caller submits the job before it next awaits)
    try:
        args = (state.prepare, body.model, prompt, max_tokens, field)
        if body.model == state.base_name:
            return await run_in_threadpool(*args, **sampling)
        if state.registry.is_resident(body.model):  # held in this thread only if it still is (load=False)
            job = await run_in_threadpool(*args, load=False, **sampling)
            if job is not None:
                return job
        return await loads.run(*args, **sampling)
    finally:
        state.preparing -= 1


async def _respond(state: ServerState, job: Job, body: p._Sampling, request: Request, chat: bool) -> Response:
    """The whole response, or a server-sent event stream when ``body.stream``."""
    rid, created = p.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    events = state.generate(job)  # submitted before any response begins: a refusal is still this request's 503
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # the background task runs once the response ends, even one Starlette never started or cut at a chunk
        # because its client left (a body never started runs no ``finally``): the job is aborted, not run to its end
        stream = _stream(events, job, rid, created, chat, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", background=BackgroundTask(events.aclose))
    try:
        while (event := await _next_event(events, request)) is not None:  # None: the client left
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    return _error(500, "generation failed: " + (event.error or "unknown error"), "server_error")
                if event.finish_reason == "abort":
                    return _error(503, "the request was aborted: the server is shutting down", "server_error")
                return JSONResponse(p.completion(rid, job.model, event, chat, created))
    finally:
        await events.aclose()
    return Response(status_code=499)


async def _next_event(events: AsyncIterator[Event], request: Request, every: float = DISCONNECT_POLL) -> Event | None:
    """The next event of a whole (non-streamed) response, or None once its client has disconnected:
    checked at each event and every ``every`` seconds while none comes (a request still waiting for
    a batch slot, or whose tokens add no text yet). Leaving early cancels the wait; the caller's
    ``aclose`` then aborts the job."""
    step = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({step}, timeout=every)
            if done:
                event = step.result()
                if event.finish_reason is None and await request.is_disconnected():
                    return None
                return event
            if await request.is_disconnected():
                return None
    finally:
        if not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step


async def _stream(
    events: Generation, job: Job, rid: str, created: int, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of the submitted ``events``: text deltas, the finish reason, optionally the usage,
    then ``[DONE]``; every chunk carries the request's ``id`` and ``created``."""
    try:
        if chat:
            yield _sse(p.chunk(rid, job.model, "", None, chat, created, first=True))
        async for event in events:
            if event.finish_reason == "error":
                yield _sse(p.error_body("generation failed: " + (event.error or "unknown error"), "server_error"))
                break
            if event.delta:
                yield _sse(p.chunk(rid, job.model, event.delta, None, chat, created))
            if event.finish_reason is not None:
                yield _sse(p.chunk(rid, job.model, None, event.finish_reason, chat, created))
                if include_usage:
                    yield _sse(p.usage_chunk(rid, job.model, event, chat, created))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client that disconnected lands here: the job is aborted


class _LoadThreads:
    """At most ``tokens`` worker threads for the calls that may load an adapter (waiting for the registry's load
    lock): those past them wait on the event loop, leaving the other worker threads to the other requests."""

    def __init__(self, tokens: int) -> None:
        self.tokens, self.limiter = tokens, None

    async def run(self, func: Callable, *args: object, **kwargs: object) -> object:
        if self.limiter is None:  # (made on the event loop that uses it)
            self.limiter = anyio.CapacityLimiter(self.tokens)
        return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs), limiter=self.limiter)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, kind, param, code), status_code=status)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
        return JSONResponse(p.error_for(err), status_code=err.status, headers=headers)

    @app.exception_handler(LoRDBAError)
    async def library_error(request: Request, err: LoRDBAError) -> JSONResponse:
        return _error(400, request.app.state.serve.registry.redact(err), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for e in err.errors():
            problems.append(f"{_field(e) or 'body'}: {e.get('msg')}")
        first = err.errors()[0] if err.errors() else {}
        return _error(400, "invalid request: " + "; ".join(problems), "invalid_request_error", _param(first))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return _error(
            err.status_code, str(err.detail), kind, code="request_too_large" if err.status_code == 413 else None
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:  # (the server log has it whole)
        state = request.app.state.serve
        return _error(500, state.registry.redact(f"internal error: {type(err).__name__}: {err}"), "server_error")


def _field(error: dict) -> str:
    """The request field a validation error names (``messages.0.content``); ``""`` for the body as a whole,
    e.g. a body that is no JSON (whose location is the character position, not a field)."""
    if error.get("type") == "json_invalid":
        return ""
    return ".".join(str(x) for x in error.get("loc", ()) if x != "body")


_BODIES = (p.CompletionRequest, p.ChatRequest, p.ChatMessage, p.TextPart, p.ToolCall, p.ToolFunction, p.StreamOptions)
_BODIES += (p.LoadAdapterRequest,)
_FIELDS = frozenset(name for body in (*_BODIES, p.UnloadAdapterRequest) for name in body.model_fields)


def _param(error: dict) -> str | None:
    """OpenAI's ``param`` of a validation error: its field (:func:`_field`) less the member of a union type that
    pydantic puts in the location (``stop.str`` is ``stop``, ``messages.0.content.list[TextPart].0.text`` is
    ``messages.0.content.0.text``); None for the body as a whole."""
    if not _field(error):
        return None
    return ".".join(str(x) for x in error.get("loc", ()) if isinstance(x, int) or x in _FIELDS) or None
