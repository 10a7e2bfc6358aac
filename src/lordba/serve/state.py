"""What the HTTP layer drives: the model's engine, the adapter registry, the tokenizer, the metrics,
and the steps of one request (resolve the adapter, tokenize, check the context, generate)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lordba._util.jsonio import unencodable_at
from lordba.nn.layer import BASE_ROW
from lordba.nn.saved import embedding_rows
from lordba.serve.engine import Engine, Event, Request
from lordba.serve.errors import BadRequestError, ContextLengthError
from lordba.serve.metrics import ServeMetrics
from lordba.serve.registry import AdapterRegistry
from lordba.serve.sampling import SamplingParams

CHAR_MARGIN = 4  # characters a token of the vocabulary may stand for, over its own length (prompt_char_limit)


@dataclass
class Job:
    """One request ready for the engine: prompt ids, the served model name, the adapter its rows
    route to (``__base__`` for the base) and its sampling parameters."""

    prompt: list[int]
    model: str
    route: str
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)  # when the server began it (time.monotonic())


@dataclass
class ServerState:
    """The server's parts; ``base_name`` is the name under which the base model is served and
    ``max_context`` the most tokens (prompt + generated) a request may use; ``max_body_bytes`` the most bytes a
    request body may hold (None: room for the longest prompt, :func:`lordba.serve.middleware.body_limit`)."""

    engine: Engine
    registry: AdapterRegistry
    metrics: ServeMetrics
    tokenizer: Any
    base_name: str
    max_context: int
    # prompts are tokenized by the HTTP threads with a copy of the tokenizer: the engine's thread detokenizes with the
    # original under engine.tokenizer_lock, so a long prompt being tokenized never holds up the running batch; the
    # copy is shared without a lock where concurrent calls only read it (encoder_shared), so a long prompt never
    # holds up the others' tokenizing either, else under encoder_lock
    encoder: Any = field(init=False, repr=False)
    encoder_lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)
    encoder_shared: bool = field(init=False, repr=False, default=False)

    max_prompt_chars: int | None = field(init=False, repr=False, default=None)
    # a chat of more messages than max_context is refused before its body is validated (renders_every_message)
    counts_messages: bool = field(init=False, repr=False, default=False)
    max_body_bytes: int | None = None  # the most bytes a request body may hold (None: middleware.body_limit)
    preparing: int = field(init=False, repr=False, default=0)  # requests being tokenized, not yet submitted (the app's)

    def __post_init__(self) -> None:
        self.encoder = copy.deepcopy(self.tokenizer)
        self.encoder_shared = shareable(self.encoder)
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, self.max_context)
        self.counts_messages = renders_every_message(self.encoder)

    # ------------------------------------------------------------------ preparing
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt string (with the tokenizer's special tokens), or the ids given,
        each checked to be within the vocabulary."""
        if isinstance(prompt, str):
            _check_text(prompt, "prompt")
            self._check_chars(prompt, "prompt")
            with self._encoding():
                ids = list(self.encoder(prompt)["input_ids"])
        else:
            vocab = self._vocabulary()
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
                raise BadRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise BadRequestError("prompt is empty", param="prompt")
        return ids

    def _encoding(self) -> contextlib.AbstractContextManager:
        """What a call of the encoder holds: nothing where calls may run at once (:func:`shareable`), else its lock."""
        return contextlib.nullcontext() if self.encoder_shared else self.encoder_lock

    def _check_chars(self, text: str, field: str) -> None:
        """Refuse a text of more characters than ``max_context`` tokens can spell (:func:`prompt_char_limit`) before
        tokenizing it: tokenizing all of a 50 MB prompt takes minutes and gigabytes, under the lock every other
        request's tokenization waits for, only to be refused for its length then (a 400 naming ``field``)."""
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_context} tokens. However, your {field} is "
                f"{len(text)} characters, more than {self.max_context} tokens of this tokenizer can hold "
                f"(at most {self.max_prompt_chars}). Please reduce the length of the {field}.",
                field,
            )

    def _vocabulary(self) -> int:
        """The ids a prompt may hold: the tokenizer's, at most the model's input embeddings' rows (an id past
        them would fail the whole batch's embedding lookup)."""
        vocab = len(self.tokenizer)
        rows = embedding_rows(self.engine.model)  # (through a SavedModule: embeddings trained per adapter)
        return vocab if rows is None else min(vocab, rows)

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of the chat ``messages`` through the model's chat template (refused without one)."""
        if not getattr(self.encoder, "chat_template", None):
            raise BadRequestError(f"model '{self.base_name}' has no chat template: use /v1/completions", "messages")
        # the contents alone over the limit: so is the rendered chat, refused before rendering it (seconds for 100,000
        # messages, and the rendering's own characters for the check after it)
        contents = [message.get("content") for message in messages]
        self._check_chars("".join(c for c in contents if isinstance(c, str)), "messages")
        try:
            texts = [text for message in messages for text in _strings(message)]  # content, names, tool calls
        except RecursionError:  # a tool call's arguments nesting deeper than Python recurses
            raise BadRequestError("messages nest too deeply (a tool call's arguments)", "messages") from None
        for text in texts:  # all of them are rendered
            _check_text(text, "messages")
        try:  # (outside the lock: rendering the template, a Jinja template, leaves the Rust tokenizer alone)
            text = self.encoder.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as err:  # the template refuses these messages (e.g. a role it does not know)
            raise BadRequestError(f"the chat template refuses these messages: {err}", "messages") from None
        self._check_chars(text, "messages")
        with self._encoding():
            ids = list(self.encoder(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise BadRequestError("the chat template gives an empty prompt for these messages", "messages")
        return ids

    def prepare(
        self,
        model: str,
        prompt: Callable[[], list[int]],
        max_tokens: int | None,
        field: str = "prompt",
        load: bool = True,
        **sampling: Any,
    ) -> Job | None:
        """Resolve ``model`` and hold its adapter (loading it on first use), then tokenize (``prompt``)
        and check the context (an error names ``field``, the request's field of the prompt: ``prompt`` or
        ``messages``); returns the :class:`Job` (its adapter is held: the engine releases it). Without ``load``,
        None where the adapter is not resident (nothing held, nothing tokenized): the caller prepares it again where
        a load may run (the app's load threads).

        Raises :class:`UnknownAdapterError` (404), :class:`AdapterLoadError` (400),
        :class:`ContextLengthError` (400), :class:`BadRequestError` (400), :class:`AdapterTooLargeError` (400),
        :class:`AdapterMemoryError` (503)."""
        arrival = time.monotonic()  # latencies count the tokenizing and the adapter's load (vLLM's: from arrival)
        route = BASE_ROW if model == self.base_name else self.registry.check_name(model)
        if route != BASE_ROW:
            if load:
                self.registry.acquire(route)
            elif not self.registry.acquire_resident(route):
                return None
        try:
            ids = prompt()
            room = self.max_context - len(ids)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise ContextLengthError(
                    f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                    f"{len(ids) + (max_tokens or 1)} tokens ({len(ids)} in the prompt, {max_tokens or 1} for the "
                    "completion). Please reduce the length of the prompt or of max_tokens.",
                    field,
                )
            return Job(ids, model, route, SamplingParams(max_tokens or room, **sampling), arrival)
        except BaseException:
            if route != BASE_ROW:
                self.registry.release(route)
            raise

    def release(self, job: Job) -> None:
        """Let go of the job's adapter."""
        if job.route != BASE_ROW:
            self.registry.release(job.route)

    # ------------------------------------------------------------------ generating
    def generate(self, job: Job) -> Generation:
        """Submit an acquired job to the engine now (before any response begins: a refusal, such as a
        server shutting down, is still the request's own error) and return its events. Closing them before
        the last one (a client that disconnected) aborts the job, which frees its batch slot and its adapter;
        events never read or closed run the job to its end, which frees them too.

        Raises :class:`UnavailableError` (503) if the engine takes no request; the job is released then."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        try:
            request = Request(job.prompt, job.route, job.params, sink, lambda: self.release(job), arrival=job.arrival)
            self.engine.submit(request)
        except Exception:
            self.release(job)
            raise
        return Generation(self.engine, request, queue)


class Generation:
    """The events of a submitted request, up to its last one (an async iterator); :meth:`aclose` aborts
    the request if it has not finished."""

    def __init__(self, engine: Engine, request: Request, queue: asyncio.Queue[Event]) -> None:
        self.engine, self.request, self.queue = engine, request, queue
        self.done = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        event = await self.queue.get()
        self.done = event.finish_reason is not None
        return event

    async def aclose(self) -> None:
        """Stop listening; the request is aborted at the engine's next step unless it has finished."""
        self.done = True
        if not self.request.finished:
            self.engine.abort(self.request)


def prompt_char_limit(tokenizer: Any, max_context: int) -> int | None:
    """The most characters a text of ``max_context`` tokens can hold, with a wide margin: the context times the
    longest token of the vocabulary (byte-level pieces spell a byte per character, never fewer characters than
    they stand for), times :data:`CHAR_MARGIN` (a normalizer may drop or compose characters); None where the
    vocabulary cannot be read."""
    try:
        longest = max((len(piece) for piece in tokenizer.get_vocab()), default=0)
    except Exception:  # a tokenizer without a readable vocabulary: no limit
        return None
    return max_context * max(longest, 1) * CHAR_MARGIN if longest > 0 else None


_PROBED = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
_PROBED.append({"role": "user", "content": "c"})


def renders_every_message(encoder: Any) -> bool:
    """Whether ``encoder``'s chat template renders every message as a token at least, as probed: a message of each
    role, empty or not, put at each place of a short chat gives more tokens (a template that drops empty messages, or
    keeps one system message of several, does not: then a chat of more messages than the context's tokens may still
    fit it). False without a template, or where it refuses the probe's chat."""

    def tokens(messages: list[dict[str, str]]) -> int:
        text = encoder.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(encoder(text, add_special_tokens=False)["input_ids"])

    if not getattr(encoder, "chat_template", None):
        return False
    try:
        least = tokens(_PROBED)
    except Exception:
        return False
    for role in ("system", "user", "assistant"):
        for content in ("", "x"):
            for at in range(len(_PROBED) + 1):
                try:
                    more = tokens([*_PROBED[:at], {"role": role, "content": content}, *_PROBED[at:]])
                except Exception:  # (the template refuses this chat: so it would the requests like it)
                    continue
                if more <= least:
                    return False
    return True


def shareable(encoder: Any) -> bool:
    """Whether threads may tokenize with ``encoder`` at once, without a lock (once this call settled it): a fast
    tokenizer (Rust, ``tokenizers``) encodes through a shared borrow, the interpreter lock released; what fails a
    concurrent call ("Already borrowed") is a write, which transformers' call makes only where the tokenizer's
    truncation, padding or special-token splitting differ from the call's (set in its ``tokenizer.json``, say). The
    server's calls ask for none of them: after one call they match, and its calls only read the tokenizer. Any other
    tokenizer (Python, or a truncation or padding that stays on) is shared under a lock."""
    try:
        from tokenizers import Tokenizer

        backend = getattr(encoder, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            return False
        encoder("")  # turns off a truncation or padding of the file's, splits special tokens as the calls ask
        split = bool(getattr(encoder, "split_special_tokens", False))
        return backend.truncation is None and backend.padding is None and backend.encode_special_tokens == split
    except Exception:  # (a tokenizer that refuses the empty text: kept under the lock)
        return False


def _check_text(text: str, param: str) -> None:
    """Refuse text that is not Unicode a tokenizer takes: JSON may escape a lone UTF-16 surrogate (half of a
    character a client cut), on which the tokenizer raises TypeError (a 400 naming ``param``, not a 500)."""
    at = unencodable_at(text)
    if at is not None:
        raise BadRequestError(
            f"{param} holds a lone surrogate (U+{ord(text[at]):04X} at character {at}): not valid Unicode text", param
        )


def _strings(value: Any) -> list[str]:
    """Every string in ``value`` (dicts' keys and values, lists), depth first."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []
