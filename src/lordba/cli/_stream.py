"""The streamer ``lordba generate`` and ``lordba chat`` hand to ``generate``: the text of the new tokens as
they come, decoded as ``lordba serve`` decodes them (:class:`lordba.serve.sampling.IncrementalDecoder`, after the
prompt); the writer that keeps what was written (:class:`Tee`) and the decoder's warnings on stderr
(:func:`decode_warnings_on_stderr`)."""

from __future__ import annotations

import contextlib
import queue
import sys
from collections.abc import Iterator
from typing import Any

from lordba.serve.sampling import IncrementalDecoder


class Cancelled(BaseException):
    """Raised in ``generate``'s thread by :meth:`TextStream.put` after :meth:`TextStream.cancel`: a
    ``BaseException``, so that no ``except Exception`` on the way (a compiled decoder's fallback) runs it again."""


class TextStream:
    """A ``generate`` streamer (``put`` / ``end``, as transformers' streamers) whose iteration gives one piece
    of text per new token (empty while a character is incomplete) until the end.

    transformers' ``TextIteratorStreamer`` restarts decoding after each newline, so a SentencePiece tokenizer
    (Llama 2, Mistral, Gemma: one leading space stripped where decoding starts) lost a space of each indented
    line; here the text is what the new tokens add after the prompt (special tokens skipped), as ``lordba serve``
    gives it. The first ``put`` is the prompt: not shown, the decoder's context (the new tokens decoded alone
    lost the leading space of a SentencePiece tokenizer's first word: "Paris." where serve gives " Paris."). After
    :meth:`cancel` the next ``put`` raises :class:`Cancelled`, which ends ``generate``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._decoder = IncrementalDecoder(tokenizer)
        self._ids: list[int] = []
        self._prompt = True
        self._cancelled = False
        self._shown = 0
        self._queue: queue.Queue[str | None] = queue.Queue()

    def put(self, value: Any) -> None:
        """The prompt (first call, not shown: the context), then each new token (one id, or ``[1, 1]``).

        Raises:
            Cancelled: :meth:`cancel` was called (the reader of the text is gone).
        """
        if self._cancelled:
            raise Cancelled("the text's reader stopped reading")
        if self._prompt:
            self._prompt = False
            self._decoder = IncrementalDecoder(self._tokenizer, value.reshape(-1).tolist())
            return
        self._ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._decoder.update(self._ids)
        self._send(self._decoder.text)  # the text whose characters are complete

    def cancel(self) -> None:
        """Stop ``generate`` at its next token (the thread reading the text is gone: a broken pipe, Ctrl-C)."""
        self._cancelled = True

    def end(self) -> None:
        """The rest of the text (a trailing incomplete character as the tokenizer decodes it), then the end."""
        if self._ids:
            self._send(self._decoder.update(self._ids))
        self._queue.put(None)

    def _send(self, text: str) -> None:
        self._queue.put(text[self._shown :])
        self._shown = max(self._shown, len(text))

    def __iter__(self) -> Iterator[str]:
        while (piece := self._queue.get()) is not None:
            yield piece


class Tee:
    """Writes to ``out`` and remembers what was written (non-empty pieces)."""

    def __init__(self, out: Any, written: list[str]) -> None:
        self.out, self.written = out, written

    def write(self, text: str) -> None:
        if text:
            self.written.append(text)
        self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def decode_warnings_on_stderr() -> Iterator[None]:
    """While it is open, FastDecode's warnings (a compile that failed: decoding eagerly) show on stderr as the CLI's
    other notes: the library logs them (``lordba.decode``), and without a handler Python printed them beside the
    CLI's own line. The handler is removed on leaving (a caller of ``lordba.cli.main`` keeps its loggers as they
    were: the handler left behind printed the library's later warnings there too)."""
    import logging

    log = logging.getLogger("lordba.decode")

    class Stderr(logging.StreamHandler):
        """Writes to ``sys.stderr`` as it is when a record comes (as Python's last-resort handler does)."""

        @property
        def stream(self) -> Any:
            return sys.stderr

        @stream.setter
        def stream(self, value: Any) -> None:
            pass

    handler = Stderr()
    handler.setFormatter(logging.Formatter("[%(message)s]"))
    log.addHandler(handler)  # (records still propagate: an application's own handlers see them too)
    try:
        yield
    finally:
        log.removeHandler(handler)
