"""Choosing the next token (greedy, temperature, top-p, per-request seed) and assembling the text
(incremental detokenization, stop strings, what a stream may already show).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lordba.errors import ConfigError

MAX_STOPS = 4  # OpenAI's limit on `stop`


def valid_stops(stops: Sequence[object]) -> bool:
    """Whether ``stops`` are at most :data:`MAX_STOPS` non-empty strings (what a request's ``stop`` may hold)."""
    return len(stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in stops)


CONTEXT_TOKENS = 6  # prompt ids an IncrementalDecoder decodes the first new tokens after (vLLM: 5)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: ``temperature`` 0 is greedy (argmax); ``top_p`` keeps the smallest
    set of tokens whose probability reaches it; ``seed`` makes sampling reproducible; generation
    ends after ``max_tokens`` tokens, at an end-of-sequence token, or where a ``stop`` string
    appears (the text is cut before it); ``ignore_eos`` (vLLM's extension, for benchmarks) goes on
    past end-of-sequence tokens."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ConfigError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}")
        if not valid_stops(self.stop):
            raise ConfigError(f"stop must be up to {MAX_STOPS} non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        """A CPU random generator for this request (seeded by ``seed``, else from the OS)."""
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one row: takes its float logits ``[vocab]``, the request's parameters and
    random generator (unused when greedy); returns the token id."""
    if params.greedy:
        return int(logits.argmax())
    x = logits.float().cpu()
    # The top logit at 0 before dividing: a temperature below float32's range (any value in (0, 2] is
    # a valid request) leaves the top token at 0 and the others at -inf (greedy), never inf - inf.
    scaled = (x - x.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        drop = before >= params.top_p  # a top_p below float32's range compares as 0 here
        drop[0] = False  # the first token is always kept
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TextAssembler:
    """The text of the generated tokens so far, cut at the first stop string.

    ``update`` decodes all generated ids (a tokenizer may merge pieces across tokens) and reports
    whether a stop string appeared; ``take_delta`` gives the text a stream may show now: it holds
    back a trailing incomplete character (its U+FFFDs) and any tail that could still become a stop string.
    """

    stops: Sequence[str] = ()
    text: str = ""
    shown: int = 0
    stopped: bool = field(default=False)

    def update(self, text: str) -> bool:
        """Set the full decoded text; returns True (and cuts the text) when a stop string appears."""
        self.text = text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text = text[: min(found)]
            self.stopped = True
        return self.stopped

    def take_delta(self, final: bool = False) -> str:
        """The text not yet shown that is safe to show (all of it when ``final``)."""
        end = len(self.text)
        if not final:
            # every trailing U+FFFD: byte-fallback tokens (Llama 2, Mistral) decode each byte of an incomplete
            # character to one, and the character, once whole, replaces them all
            end = len(self.text.rstrip("\ufffd"))
            end -= _held(self.text, end, self.stops)  # a tail that starts a stop string waits
        delta = self.text[self.shown : max(end, self.shown)]
        self.shown = max(end, self.shown)
        return delta


def _held(text: str, end: int, stops: Sequence[str]) -> int:
    """The length of the longest tail of ``text[:end]`` that is the start of a stop string (shorter than it).

    Only the tails that begin with a stop's first character are compared, each first on its first characters:
    trying every tail length up to the longest stop's (a client's stop string may be a megabyte) copied and
    compared the whole tail at each, a cost quadratic in the text on the engine's thread at every token."""
    held = 0
    for stop in stops:
        i = max(end - len(stop) + 1, 0)
        while end - i > held and (i := text.find(stop[0], i, end - held)) >= 0:
            if text.startswith(stop[: min(end - i, 16)], i) and stop.startswith(text[i:end]):
                held = end - i  # the leftmost such tail of this stop: its longest
                break
            i += 1
    return held


class IncrementalDecoder:
    """The text of a growing list of token ids, decoding only a short window per new token.

    vLLM's scheme: the text added by the newest tokens is ``decode(ids[prefix:])`` minus
    ``decode(ids[prefix:read])``, both decoded from the same ``prefix`` so that tokenizers whose
    pieces depend on their neighbours (SentencePiece's leading spaces) agree with decoding
    everything; the window moves on once the new text is complete (no trailing incomplete
    character). Special tokens are skipped. ``context``: the ids before the first one (the prompt's
    last :data:`CONTEXT_TOKENS` are kept), decoded with it and not part of the text, so that the first
    token's text is what it adds after the prompt: a SentencePiece tokenizer (Llama 2, Mistral) strips
    the leading space where decoding starts, which would take the space of a completion's first word.
    A context whose text ends inside a character is not used.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.context = list(context)[-CONTEXT_TOKENS:] if CONTEXT_TOKENS else []
        self.prefix = 0
        self.read = len(self.context)  # (decoded at the first update: on the thread that decodes)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _window(self, ids: Sequence[int], start: int, end: int | None = None) -> list[int]:
        """``(context + ids)[start:end]``."""
        n = len(self.context)
        if start >= n:
            return list(ids[start - n : None if end is None else end - n])
        return self.context[start:end] + list(ids[: None if end is None else max(end - n, 0)])

    def update(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (the same list as before, with tokens appended)."""
        before = self._decode(self._window(ids, self.prefix, self.read))
        if self.prefix < len(self.context) and before.endswith("\ufffd"):  # the prompt ends inside a character
            self.context, self.read, before = [], 0, ""
        now = self._decode(self._window(ids, self.prefix))
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.context) + len(ids)
            return self.text
        return self.text + now[len(before) :] if now.startswith(before) else self.text
