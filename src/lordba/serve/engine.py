"""The serving engine: continuous batching of requests across adapters on one LoRDBA model.

One thread runs the loop. Each iteration admits waiting requests (up to ``max_batch`` running):
their prompts go through one prefill forward together, each row routed to its own adapter
(``adapter_names``), and the new rows join the running batch (:meth:`KVBatch.merge`); then one
decode forward advances every running row by one token, again each row on its own adapter.
Finished and aborted rows leave the batch between steps. Callers never wait on each other: a
request's events (text deltas, then its end) go to its own ``sink`` from the engine thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lordba._util.modules import end_of_sequence_ids
from lordba.nn.saved import embedding_rows
from lordba.serve.batch import KVBatch, decode, prefill
from lordba.serve.errors import QueueFullError, UnavailableError
from lordba.serve.sampling import IncrementalDecoder, SamplingParams, TextAssembler, sample

log = logging.getLogger("lordba.serve")
_IDS = itertools.count()


@dataclass(frozen=True)
class Event:
    """What a request's sink receives: a text ``delta``; when ``finish_reason`` is set, the request
    is over (``stop``, ``length``, ``abort`` or ``error`` with ``error`` set) and ``text`` is all of it."""

    delta: str
    finish_reason: str | None = None
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Observer(Protocol):
    """What the engine reports (:class:`lordba.serve.metrics.ServeMetrics` implements it)."""

    def queue(self, waiting: int, running: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None: ...
    def rejected(self, reason: str) -> None: ...


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, the adapter its rows route to (``__base__`` for the base),
    sampling parameters, a ``sink`` for its events and an ``on_done`` called once when it leaves."""

    prompt: list[int]
    adapter: str
    params: SamplingParams
    sink: Callable[[Event], None]
    on_done: Callable[[], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_IDS)}")
    generated: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    aborted: bool = False
    finished: bool = False
    prefilled: bool = False  # its prompt went through a prefill forward (what the metrics count)

    def __post_init__(self) -> None:
        self.rng = None if self.params.greedy else self.params.generator()
        self.text = TextAssembler(self.params.stop)
        self.decoder: IncrementalDecoder | None = None  # set by the engine (it knows the tokenizer)


class Engine:
    """Continuous batching of :class:`Request` s on a :class:`~lordba.nn.model.LoRDBAModel`.

    Takes the model, its tokenizer, the most rows in flight (``max_batch``), the most padded
    prompt tokens per prefill forward, an optional :class:`Observer` for metrics, and the most requests that may
    wait for a batch slot (``max_waiting``: beyond the free slots; None, no bound), a 503 past them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_batch: int = 32,
        max_prefill_tokens: int = 8192,
        observer: Observer | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_prefill_tokens = max(1, max_batch), max(1, max_prefill_tokens)
        self.observer = observer
        self.max_waiting = max_waiting
        self.tokenizer_lock = threading.Lock()  # the tokenizer is shared with the HTTP threads
        self.eos_ids = end_of_sequence_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.eos_ids, embedding_rows(model))
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._batch: KVBatch | None = None
        self._admitting = 0  # rows taken from the queue whose prefill has not joined the batch yet
        self._stop = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the engine loop stopped, if it did (:meth:`_supervised`)
        self.draining = False  # the server is stopping: it takes no new request (a 503), those in flight finish
        self.steps = 0  # decode forwards run (tests and the benchmark read it)
        self.max_rows_seen = 0  # the most rows one decode forward carried

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervised, name="lordba-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: requests still waiting or running end with ``abort``. A step still in progress after
        ``timeout`` seconds is left to end (logged): the engine thread aborts its requests then, never this one
        under its forward (their adapters released mid-forward, the batch emptied under the step)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine's step did not end within %s s: its requests end (abort) when it does", timeout)
                return
        self._abort_held()

    def _abort_held(self) -> None:
        """End every request still waiting or running with ``abort`` (the loop has stopped)."""
        with self._cond:
            held = [*self._waiting, *self._running]
            self._waiting.clear()
            self._running, self._batch = [], None
        for req in held:
            self._finish(req, "abort")

    def submit(self, request: Request) -> None:
        """Queue ``request``; it joins the running batch at the next step.

        Raises:
            UnavailableError: the server is shutting down, or the engine stopped (:attr:`failure`).
            QueueFullError: ``max_waiting`` requests already wait for a slot (:meth:`check_room`)."""
        request.decoder = IncrementalDecoder(self.tokenizer, request.prompt)  # the text after the prompt
        with self._cond:
            if self.failure is not None:
                raise UnavailableError(
                    f"the engine stopped after an internal error ({self.failure}): restart the server"
                )
            if self._stop:
                raise UnavailableError("the server is shutting down")
            waiting = self._queued()
            if waiting is None:
                self._waiting.append(request)
                self._cond.notify_all()
        if waiting is not None:
            raise self._full(waiting)

    def check_room(self, ahead: int = 0) -> None:
        """Refuse a request now if ``max_waiting`` requests already wait for a batch slot, counting ``ahead`` more
        about to be submitted (those being tokenized), before its prompt is tokenized and its adapter loaded
        (:meth:`submit` checks again).

        Raises:
            QueueFullError: the queue is full (counted by the observer's ``rejected``)."""
        with self._cond:
            waiting = self._queued(ahead)
        if waiting is not None:
            raise self._full(waiting)

    def _queued(self, ahead: int = 0) -> int | None:
        """The requests waiting beyond the free batch slots (and ``ahead``) if there are ``max_waiting`` of them (no
        room for one more), else None (lock held). Requests the next step admits do not count, nor those aborted."""
        if self.max_waiting is None:
            return None
        free = max(0, self.max_batch - len(self._running) - self._admitting)
        waiting = sum(not r.aborted for r in self._waiting) + ahead - free
        return waiting if waiting >= self.max_waiting else None

    def _full(self, waiting: int) -> QueueFullError:
        if self.observer is not None:
            self.observer.rejected("queue_full")
        return QueueFullError(
            f"the server is overloaded: {waiting} requests already wait for a batch slot (--max-waiting "
            f"{self.max_waiting}); retry later"
        )

    def abort(self, request: Request) -> None:
        """Drop ``request`` at the next step boundary (its slot and adapter are freed then)."""
        with self._cond:
            request.aborted = True
            self._cond.notify_all()

    @property
    def load(self) -> tuple[int, int]:
        """``(waiting, running)`` request counts (running includes rows being prefilled); a waiting request whose
        client left (aborted, dropped at the next step) is not counted."""
        with self._cond:
            return sum(not r.aborted for r in self._waiting), len(self._running) + self._admitting

    # ------------------------------------------------------------------ loop
    def _supervised(self) -> None:
        """:meth:`_loop`; should it end by an error outside the steps it guards (a bug), the engine records it
        (:attr:`failure`: later requests are 503s, ``/health`` says so) and ends the requests it holds with
        ``error``, rather than leaving them, and every later one, waiting for a thread that is gone."""
        try:
            self._loop()
            self._abort_held()  # stopped (:meth:`shutdown`): after the last step, in this thread
        except BaseException as err:
            log.exception("the engine loop stopped")
            with self._cond:
                self.failure = f"{type(err).__name__}: {err}"[:300]
                self._stop = True
                held = [*self._waiting, *self._running]
                self._waiting.clear()
                self._running, self._batch = [], None
            for req in held:
                with contextlib.suppress(Exception):
                    self._finish(req, "error", self.failure)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    return
                new, aborted = self._take_waiting()
                self._admitting = len(new)
            for req in aborted:
                self._finish(req, "abort")
            self._guarded(list(self._running), self._drop_aborted)  # (its KV copy may fail: out of memory)
            if new:
                self._guarded(new, self._prefill, new)
            with self._cond:
                self._admitting = 0
            if self._running:
                self._guarded(list(self._running), self._decode_step)
            if self.observer is not None:
                self.observer.queue(*self.load)

    def _take_waiting(self) -> tuple[list[Request], list[Request]]:
        """``(admitted, aborted)``: pop the waiting requests that fit (slots and prefill tokens), oldest
        first, and those aborted while waiting (lock held)."""
        aborted = [r for r in self._waiting if r.aborted]
        if aborted:
            self._waiting = deque(r for r in self._waiting if not r.aborted)
        new: list[Request] = []
        while self._waiting and len(self._running) + len(new) < self.max_batch:
            width = max(len(r.prompt) for r in [*new, self._waiting[0]])
            if new and width * (len(new) + 1) > self.max_prefill_tokens:
                break
            new.append(self._waiting.popleft())
        return new, aborted

    def _guarded(self, rows: list[Request], step: Callable[..., None], *args: Any) -> None:
        """Run one step; if it fails, its rows end with ``error`` and the engine goes on."""
        try:
            step(*args)
        except Exception as err:  # a bug or a broken adapter: fail these rows, keep serving
            log.exception("engine step failed")
            for req in rows:
                self._finish(req, "error", f"{type(err).__name__}: {err}")
            ids = {id(r) for r in rows}
            keep = [i for i, r in enumerate(self._running) if id(r) not in ids]
            self._keep(keep)

    def _prefill(self, new: list[Request]) -> None:
        logits, batch = prefill(self.model, [r.prompt for r in new], [r.adapter for r in new], self.pad_id)
        for req in new:
            req.prefilled = True
        done = self._advance(new, logits)
        keep = [i for i, r in enumerate(new) if r not in done]
        part = batch.select(keep)
        if part is not None:
            self._batch = part if self._batch is None else self._batch.merge(part)
        with self._cond:
            self._running = self._running + [new[i] for i in keep]
            self._admitting = 0

    def _decode_step(self) -> None:
        rows = self._running
        logits = decode(self.model, self._batch, [r.generated[-1] for r in rows], [r.adapter for r in rows])
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        done = self._advance(rows, logits)
        if done:
            self._keep([i for i, r in enumerate(rows) if r not in done])

    def _drop_aborted(self) -> None:
        """End the running rows aborted now (``abort``) and drop them; one aborted meanwhile (from another thread,
        while these end) is dropped at the next step, not dropped without its end."""
        gone = {r for r in self._running if r.aborted}  # (read once: the rows ended are the rows dropped)
        if gone:
            for r in self._running:
                if r in gone:
                    self._finish(r, "abort")
            self._keep([i for i, r in enumerate(self._running) if r not in gone])

    def _keep(self, keep: Sequence[int]) -> None:
        """Keep only the running rows ``keep`` (their KV cache too)."""
        with self._cond:
            self._running = [self._running[i] for i in keep]
        self._batch = self._batch.select(keep) if self._batch is not None else None
        if not self._running:
            self._batch = None

    # ------------------------------------------------------------------ tokens
    def _advance(self, rows: Sequence[Request], logits: torch.Tensor) -> set[Request]:
        """Sample one token per row, stream its text; returns the rows that finished. A row whose own
        token or text fails ends with ``error`` alone: its neighbours in the step go on."""
        done: set[Request] = set()
        now = time.monotonic()
        greedy = logits.argmax(-1).tolist()
        for i, req in enumerate(rows):
            try:
                token = greedy[i] if req.params.greedy else sample(logits[i], req.params, req.rng)
                self._observe_token(req, now)
                req.generated.append(token)
                reason = self._finish_reason(req, token)
            except Exception as err:  # this row's parameters, generator or detokenization
                log.exception("request %s failed", req.id)
                done.add(req)
                self._finish(req, "error", f"{type(err).__name__}: {err}")
                continue
            if reason is None:
                delta = req.text.take_delta()
                if delta:
                    req.sink(Event(delta))
            else:
                done.add(req)
                self._finish(req, reason)
        return done

    def _observe_token(self, req: Request, now: float) -> None:
        if self.observer is not None:
            if req.last_token_at is None:
                self.observer.first_token(now - req.arrival)
            else:
                self.observer.next_token(now - req.last_token_at)
        req.last_token_at = now

    def _finish_reason(self, req: Request, token: int) -> str | None:
        eos = token in self.eos_ids and not req.params.ignore_eos
        with self.tokenizer_lock:
            text = req.decoder.update(req.generated[:-1] if eos else req.generated)
        if req.text.update(text) or eos:
            return "stop"
        return "length" if len(req.generated) >= req.params.max_tokens else None

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End ``req``: its last event, its ``on_done``, the metrics (each at most once). An ``on_done`` that raises
        (the adapter's release) ends this row with ``error``, logged; it never reaches the step's other rows."""
        if req.finished:
            return
        req.finished = True
        delta = req.text.take_delta(final=True) if reason in ("stop", "length") else ""
        try:
            if req.on_done is not None:
                req.on_done()  # first: whoever sees the last event may count on the adapter being released
        except Exception as err:
            log.exception("request %s: releasing it failed", req.id)
            reason, error = "error", f"releasing the request failed: {type(err).__name__}: {err}"
        finally:
            try:  # counted before the last event is sent: a scrape right after a response sees it
                if self.observer is not None:
                    # a prompt never prefilled (aborted while it waited, a prefill that failed) ran no tokens
                    prompt_tokens = len(req.prompt) if req.prefilled else 0
                    self.observer.finished(reason, prompt_tokens, len(req.generated), time.monotonic() - req.arrival)
            finally:
                req.sink(Event(delta, reason, req.text.text, len(req.prompt), len(req.generated), error))


def _pad_id(tokenizer: Any, eos_ids: frozenset[int], rows: int | None = None) -> int:
    """The id put in padded positions (masked out, so any valid id does): the tokenizer's pad, else its smallest
    end-of-sequence id, among the ``rows`` ids the model's input embeddings hold (a pad token added to the
    tokenizer past them failed every prefill of prompts of different lengths), else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    valid = [int(t) for t in (pad, *sorted(eos_ids)) if t is not None and (rows is None or 0 <= int(t) < rows)]
    return valid[0] if valid else 0
