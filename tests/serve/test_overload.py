"""The server under overload: a chat too long for the context refused before the work it would take, and the
tokenizer's lock held only for the tokenizing."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")

from lordba.serve.errors import ContextLengthError
from lordba.serve.server import build_state

from .serve_helpers import char_tokenizer, tiny_model


@pytest.fixture
def state():
    state = build_state(tiny_model(), char_tokenizer(), "tiny-llama")
    try:
        yield state
    finally:
        state.engine.shutdown()


def test_a_chat_whose_contents_exceed_the_context_is_refused_before_it_is_rendered(state, monkeypatch):
    """The chat template rendered all of a 100,000-message chat (0.8 s on the tiny model, under the lock every other
    request's tokenizing waits for) before its length was checked: its contents alone are over the context's
    characters, so it is refused (a 400 naming ``messages``) before rendering."""
    rendered = []
    render = state.encoder.apply_chat_template
    monkeypatch.setattr(state.encoder, "apply_chat_template", lambda *a, **k: rendered.append(1) or render(*a, **k))
    started = time.monotonic()
    with pytest.raises(ContextLengthError, match="100000 characters") as err:
        state.chat_prompt([{"role": "user", "content": "x"}] * 100_000)
    assert err.value.param == "messages" and not rendered
    assert time.monotonic() - started < 0.5
    assert state.chat_prompt([{"role": "user", "content": "hi"}])  # a chat that fits is rendered


def test_a_chat_being_rendered_does_not_hold_up_other_prompts_tokenizing(state, monkeypatch):
    """The chat template was rendered under the encoder's lock: a long chat (100,000 empty messages pass the contents'
    check: seconds of rendering) held up every other request's tokenizing. Rendering touches no tokenizer state: it
    runs outside the lock, which guards the tokenizing alone."""
    other: list[list[int]] = []
    render = state.encoder.apply_chat_template

    def slow_render(*args, **kwargs):  # another request's prompt comes while this chat renders
        worker = threading.Thread(target=lambda: other.append(state.encode("hi")), daemon=True)
        worker.start()
        worker.join(timeout=5)
        return render(*args, **kwargs)

    monkeypatch.setattr(state.encoder, "apply_chat_template", slow_render)
    assert state.chat_prompt([{"role": "user", "content": "hi"}])
    assert other == [state.encode("hi")]
