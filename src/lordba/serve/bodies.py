"""Parsing a generation request's body (:class:`OffLoopRoute`) and validating it into its protocol model, in a worker
thread when it is large: validating 100,000 chat messages takes seconds of pydantic, during which the event loop, which
every stream shares, served nobody. A list that can never fit the context (more chat messages or prompt token ids than
its tokens, where the chat template renders every message as a token at least; more content parts or tool calls in
all messages than its tokens) is refused before it is validated."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError

from lordba.serve import protocol as p
from lordba.serve.errors import ContextLengthError

OFFLOAD_BYTES = 64 << 10  # a body of more bytes is parsed and validated in a worker thread, not on the event loop
STRINGS_PER_TOKEN = 16  # JSON strings a large body may hold per token of the context (string_limit), with room
STRINGS_OF_FIELDS = 65_536  # and for the body's own fields (a floor: 68K strings parse in ~30 ms, 1M in ~1 s)


class OffLoopRoute(APIRoute):
    """FastAPI's route, a JSON body of more than :data:`OFFLOAD_BYTES` parsed in a worker thread: parsed on the event
    loop, which every stream and ``/health`` share, 100,000 chat messages (3.4 MB) held it 0.3-0.6 s. FastAPI still
    decides whether the body is JSON and answers its errors (a ``json_invalid``, naming the position) as before."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_JsonOffLoop(request.scope, request.receive))

        return route


class _JsonOffLoop(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > OFFLOAD_BYTES:
                state = getattr(self.app.state, "serve", None)
                most = string_limit(state.max_context) if state is not None else None
                self._json = await anyio.to_thread.run_sync(_parse, body, most)
            else:
                self._json = json.loads(body)
        return self._json


def string_limit(max_context: int) -> int:
    """The most JSON strings a request body may hold: :data:`STRINGS_PER_TOKEN` a token of the context, and
    :data:`STRINGS_OF_FIELDS` for the body's own fields."""
    return STRINGS_PER_TOKEN * max_context + STRINGS_OF_FIELDS


def _parse(body: bytes, most_strings: int | None = None) -> Any:
    """``json.loads(body)``, giving the interpreter lock back at every JSON object and number: the parser holds it
    from start to end of a document, so that in a worker thread it still held up the event loop as long (each hook
    call is Python code, where another thread may take it). The numbers' hooks, as the object's, give the values
    ``json.loads`` gives: without them one object of many numbers, a ``logit_bias`` of a million entries (15 MB), held
    the loop 3.8-4.2 s, with them 0.13-0.16 s. A body of more than ``most_strings`` JSON strings is refused first
    (:func:`_count_strings`)."""
    if most_strings is not None:
        _count_strings(body, most_strings)
    return json.loads(body, object_hook=_same, parse_int=_int, parse_float=_float)


def _count_strings(body: bytes, most: int) -> None:
    """Refuse (a 413) a body holding more than ``most`` JSON strings, counted from below without parsing it: its
    ``"`` bytes less those after a backslash (an escaped quote, or a string's end after an escaped backslash), halved.
    JSON's C parser gives no hook per string: one object of a million string entries (16 MB) held the interpreter
    lock 2.3-3.2 s in one go, every stream waiting. A request that fits the context holds far fewer (a message, a
    content part, a tool call: a few strings each, all in the context's tokens, :func:`string_limit`); ~20-70 ms on
    16 MB, in the worker thread."""
    strings = (body.count(b'"') - body.count(b'\\"')) // 2
    if strings > most:
        raise HTTPException(
            413,
            f"the request body holds {strings} JSON strings or more, more than a request fitting this model's "
            f"context needs (at most {most})",
        )


def _same(obj: dict) -> dict:
    return obj


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


async def completion(request: Request, raw: Any, max_context: int) -> tuple[p.CompletionRequest, str | list[int]]:
    """``(body, its one prompt)`` of ``POST /v1/completions`` (the server's refusals checked)."""
    return await _off_loop(request, _completion, raw, max_context)


async def chat(
    request: Request, raw: Any, max_context: int, count_messages: bool = True
) -> tuple[p.ChatRequest, list[dict[str, Any]]]:
    """``(body, its messages as the chat template takes them)`` of ``POST /v1/chat/completions``; ``count_messages``:
    more messages than ``max_context`` are refused before validation (the chat template renders each one as a token
    at least: :func:`lordba.serve.state.renders_every_message`)."""
    return await _off_loop(request, functools.partial(_chat, count_messages=count_messages), raw, max_context)


async def _off_loop(request: Request, work, raw: Any, max_context: int):  # noqa: ANN001
    if len(await request.body()) <= OFFLOAD_BYTES:  # (the bytes FastAPI read: cached)
        return work(raw, max_context)
    return await anyio.to_thread.run_sync(_collector_paused(work), raw, max_context)


_pause_lock = threading.Lock()
_paused = 0  # large bodies being validated now (the cyclic collector is off while there are any)
_was_enabled = True  # whether the collector was on when the first of them began


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    """Python's cyclic garbage collector off while a large body is validated and converted (and on again once no other
    thread validates one; as it was before, should someone else have turned it off). Validating 100,000 chat messages
    makes 200,000 objects it tracks (each message's model and its fields-set), so their allocation set off full
    collections that walked them all, holding the interpreter lock every stream and ``/health`` need: 0.2-0.35 s each,
    three in one such request. Converted, they are dropped before it resumes (:func:`_chat`), freed by their reference
    counts, never walked. Process-wide, but bounded: a body can hold no more than the context's messages or token ids
    (refused before validation), and what other threads leave in cycles meanwhile is collected once it resumes."""
    global _paused, _was_enabled
    with _pause_lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _pause_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


def _collector_paused(work: Callable[..., Any]) -> Callable[..., Any]:
    """``work`` run with the cyclic collector off (:func:`_collector_off`)."""

    @functools.wraps(work)
    def paused(*args: Any) -> Any:
        with _collector_off():
            return work(*args)

    return paused


def _completion(raw: Any, max_context: int) -> tuple[p.CompletionRequest, str | list[int]]:
    _refuse_unsupported(raw)
    prompt = raw.get("prompt") if isinstance(raw, dict) else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) and len(prompt) == 1:
        prompt = prompt[0]  # (one prompt in a list of them)
    if isinstance(prompt, list) and len(prompt) > max_context and isinstance(prompt[0], int):
        raise ContextLengthError(
            f"This model's maximum context length is {max_context} tokens. However, your prompt holds {len(prompt)} "
            "token ids. Please reduce the length of the prompt.",
            "prompt",
        )
    if isinstance(prompt, list) and len(prompt) > max_context and isinstance(prompt[0], (str, list)):
        raise p.several_prompts()  # (a million of them took seconds of validation, to be refused for this after it)
    body = _validated(p.CompletionRequest, raw)
    body.check_supported()
    return body, body.single_prompt()


def _chat(raw: Any, max_context: int, count_messages: bool = True) -> tuple[p.ChatRequest, list[dict[str, Any]]]:
    _refuse_unsupported(raw)
    messages = raw.get("messages") if isinstance(raw, dict) else None
    if count_messages and isinstance(messages, list) and len(messages) > max_context:  # each renders as a token
        raise ContextLengthError(
            f"This model's maximum context length is {max_context} tokens. However, your messages are "
            f"{len(messages)} messages, each at least one token once rendered. Please reduce the number of messages.",
            "messages",
        )
    if isinstance(messages, list):
        _count_pieces(messages, max_context)
    body = _validated(p.ChatRequest, raw)
    body.check_supported()
    messages = [m.for_template() for m in body.messages]
    body.messages = []  # (their models: freed now, not left to the cyclic collector; the dicts above are all it needs)
    return body, messages


_PIECES = (("content", "content parts"), ("tool_calls", "tool calls"))


def _count_pieces(messages: list, max_context: int) -> None:
    """Refuse messages holding more content parts, or more tool calls, than the context has tokens (each a piece of
    the prompt: parts are text a client split, calls are rendered whole), before validation: a million empty parts
    (12 MB) or tool calls took pydantic 6-22 s in a worker thread, holding the interpreter lock, to be served. A 400
    ``context_length_exceeded`` naming ``messages[].content`` or ``messages[].tool_calls``."""
    counts = [0, 0]
    for message in messages:
        if isinstance(message, dict):
            for i, (key, _) in enumerate(_PIECES):
                if isinstance(pieces := message.get(key), list):
                    counts[i] += len(pieces)
    for (key, what), count in zip(_PIECES, counts):
        if count > max_context:
            raise ContextLengthError(
                f"This model's maximum context length is {max_context} tokens. However, your messages hold {count} "
                f"{what} (messages[].{key}), more than the context's tokens. Please join or reduce them.",
                f"messages[].{key}",
            )


def _refuse_unsupported(raw: Any) -> None:
    """Refuse a non-empty ``logit_bias`` before validation, with the answer validation would give (the server does not
    implement it: :meth:`lordba.serve.protocol._Sampling.check_supported`): a million entries took pydantic 1.3 s,
    holding the interpreter lock, to be refused after."""
    bias = raw.get("logit_bias") if isinstance(raw, dict) else None
    if isinstance(bias, dict) and bias:
        raise p.unsupported("logit_bias")


def _validated(model: type[p._Body], raw: Any) -> Any:
    """``raw`` validated as ``model``; its errors as FastAPI reports a body's (their location under ``body``)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]
        raise RequestValidationError(errors, body=raw) from None


def document(app: FastAPI) -> None:
    """Put the generation requests' models back in ``/openapi.json``: their endpoints take the parsed JSON and
    validate it themselves (:func:`completion`, :func:`chat`), which FastAPI documents as any JSON."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            models = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in (("/v1/completions", p.CompletionRequest), ("/v1/chat/completions", p.ChatRequest)):
                own = model.model_json_schema(ref_template="#/components/schemas/{model}")
                models.update(own.pop("$defs", {}))
                models[model.__name__] = own
                body = schema["paths"][path]["post"]["requestBody"]
                body["content"]["application/json"]["schema"] = {"$ref": f"#/components/schemas/{model.__name__}"}
        return app.openapi_schema

    app.openapi = openapi
