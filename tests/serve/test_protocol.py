"""The request bodies' checks (no server): what the server does not implement is refused, not ignored."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")

from lordba.serve.errors import BadRequestError
from lordba.serve.protocol import ChatRequest, CompletionRequest

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("fields", [{"logprobs": 0}, {"logprobs": 2}, {"logprobs": True}])
def test_a_completion_asking_for_logprobs_is_refused_logprobs_0_included(fields):
    """``logprobs: 0`` asks a completion for the sampled tokens' log probabilities (OpenAI, vLLM): it was
    taken as "no logprobs" (``0 in (None, False)``) and answered ``"logprobs": null``, a silent omission."""
    with pytest.raises(BadRequestError) as err:
        CompletionRequest(model="a", prompt="x", **fields).check_supported()
    assert err.value.param == "logprobs"


@pytest.mark.parametrize("fields", [{"logprobs": True}, {"logprobs": 1}, {"top_logprobs": 3}])
def test_a_chat_asking_for_logprobs_or_top_logprobs_is_refused(fields):
    """``top_logprobs`` was an unknown extra field, ignored: the client got no log probabilities and no error."""
    with pytest.raises(BadRequestError) as err:
        ChatRequest(**CHAT, **fields).check_supported()
    assert err.value.param in ("logprobs", "top_logprobs")


@pytest.mark.parametrize("fields", [{}, {"logprobs": None}, {"logprobs": False}, {"top_logprobs": 0}])
def test_a_chat_without_logprobs_is_served(fields):
    ChatRequest(**CHAT, **fields).check_supported()


def test_a_completion_without_logprobs_is_served():
    CompletionRequest(model="a", prompt="x", logprobs=False).check_supported()
    CompletionRequest(model="a", prompt="x").check_supported()
    CompletionRequest(model="a", prompt="x", logprobs=None).check_supported()
