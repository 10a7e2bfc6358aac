"""The request bodies' checks (no server): what the server does not implement is refused, not ignored."""

from __future__ import annotations

import pydantic
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


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatRequest])
@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 1.5},
        {"frequency_penalty": -0.5},
        {"logit_bias": {"50256": -100}},
        {"top_k": 40},
        {"min_p": 0.1},
        {"repetition_penalty": 1.2},
        {"min_tokens": 5},
    ],
)
def test_sampling_fields_that_are_not_implemented_are_refused_not_ignored(request_type, fields):
    """``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (OpenAI) and vLLM's ``top_k``, ``min_p``,
    ``repetition_penalty``, ``min_tokens`` were unknown extra fields, dropped: the request was served as if it
    had asked for none of them (a penalty or a top-k cut that never happened), with no error."""
    body = {"model": "a", "prompt": "x"} if request_type is CompletionRequest else CHAT
    with pytest.raises(BadRequestError) as err:
        request_type(**body, **fields).check_supported()
    assert err.value.param == next(iter(fields))


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatRequest])
@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 0},
        {"frequency_penalty": 0.0},
        {"logit_bias": {}},
        {"top_k": -1},
        {"top_k": 0},
        {"min_p": 0},
        {"repetition_penalty": 1},
        {"min_tokens": 0},
        {"presence_penalty": None, "top_k": None, "logit_bias": None},
    ],
)
def test_sampling_fields_at_their_neutral_values_are_served(request_type, fields):
    body = {"model": "a", "prompt": "x"} if request_type is CompletionRequest else CHAT
    request_type(**body, **fields).check_supported()


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatRequest])
@pytest.mark.parametrize(
    "fields",
    [
        {"modalities": ["text", "audio"]},
        {"audio": {"voice": "alloy", "format": "wav"}},
        {"stop_token_ids": [2]},
        {"include_stop_str_in_output": True},
        {"use_beam_search": True},
        {"guided_json": {"type": "object"}},
        {"guided_choice": ["yes", "no"]},
        {"structured_outputs": {"regex": "a+"}},
    ],
)
def test_other_apis_fields_that_ask_for_something_are_refused_not_ignored(request_type, fields):
    """OpenAI's audio output and vLLM's extensions (``stop_token_ids``, guided decoding, beam search) were unknown
    fields, dropped: a client asking for a stop at a token id or for JSON-constrained output got neither, no error."""
    body = {"model": "a", "prompt": "x"} if request_type is CompletionRequest else CHAT
    with pytest.raises(BadRequestError) as err:
        request_type(**body, **fields).check_supported()
    assert err.value.param == next(iter(fields))


@pytest.mark.parametrize(
    "fields",
    [
        {"modalities": ["text"]},
        {"stop_token_ids": []},
        {"include_stop_str_in_output": False},
        {"use_beam_search": False},
        {"guided_json": None, "audio": None},
        {"extensions": {"use_beam_search": True}},  # (no such request field: the sent fields are what is checked)
    ],
)
def test_other_apis_fields_that_ask_for_nothing_are_served(fields):
    ChatRequest(**CHAT, **fields).check_supported()
    assert "extensions" not in ChatRequest(**CHAT, **fields).model_dump()


def test_a_completion_suffix_is_refused_not_ignored():
    with pytest.raises(BadRequestError) as err:
        CompletionRequest(model="a", prompt="x", suffix="END").check_supported()
    assert err.value.param == "suffix"
    CompletionRequest(model="a", prompt="x", suffix="").check_supported()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [TOOL]},
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"functions": [TOOL["function"]]},
        {"function_call": "auto"},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
    ],
)
def test_tools_and_response_formats_are_refused_not_ignored(fields):
    """Chat's tools / function calling and a JSON ``response_format`` were unknown extra fields, dropped: a client
    asking for a tool call or JSON got free text (200) that it then failed to parse."""
    with pytest.raises(BadRequestError) as err:
        ChatRequest(**CHAT, **fields).check_supported()
    assert err.value.param == next(iter(fields))


@pytest.mark.parametrize(
    "fields", [{"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}}, {"tools": None}]
)
def test_tools_and_response_format_asking_for_nothing_are_served(fields):
    ChatRequest(**CHAT, **fields).check_supported()


@pytest.mark.parametrize("prompt", [[1, True, 3], [[True]], [1.5]])
def test_a_token_id_prompt_takes_integers_only(prompt):
    """A JSON ``true`` in a token-id prompt was read as token id 1 (pydantic's lax int)."""
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(model="a", prompt=prompt)


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatRequest])
@pytest.mark.parametrize(
    "fields",
    [{"temperature": False}, {"max_tokens": True}, {"seed": True}, {"n": True}, {"top_p": True}, {"min_tokens": False}],
)
def test_a_boolean_in_a_number_field_is_refused(request_type, fields):
    """A JSON ``true`` / ``false`` was read as 1 / 0 (pydantic's lax numbers): ``"temperature": false`` sampled
    greedily, ``"max_tokens": true`` stopped after one token, and OpenAI answers both with a 400."""
    body = {"model": "a", "prompt": "x"} if request_type is CompletionRequest else CHAT
    with pytest.raises(pydantic.ValidationError) as err:
        request_type(**body, **fields)
    assert err.value.errors()[0]["loc"] == (next(iter(fields)),)


@pytest.mark.parametrize(
    "request_type, fields",
    [(ChatRequest, {"max_completion_tokens": True}), (CompletionRequest, {"best_of": True})],
)
def test_a_boolean_in_a_number_field_of_one_endpoint_is_refused(request_type, fields):
    """Chat's ``max_completion_tokens`` (OpenAI's newer name of ``max_tokens``) and a completion's ``best_of`` took a
    JSON ``true`` as 1: ``"max_completion_tokens": true`` stopped after one token where ``"max_tokens": true`` is a
    400 naming the field."""
    body = {"model": "a", "prompt": "x"} if request_type is CompletionRequest else CHAT
    with pytest.raises(pydantic.ValidationError) as err:
        request_type(**body, **fields)
    assert err.value.errors()[0]["loc"] == (next(iter(fields)),)


@pytest.mark.parametrize("request_type", [CompletionRequest, ChatRequest])
def test_stream_options_without_stream_is_refused(request_type):
    """``stream_options`` with ``stream`` false was ignored (OpenAI and vLLM refuse it)."""
    body = {"model": "a", "prompt": "x"} if request_type is CompletionRequest else CHAT
    with pytest.raises(BadRequestError) as err:
        request_type(**body, stream_options={"include_usage": True}).check_supported()
    assert err.value.param == "stream_options"
    request_type(**body, stream=True, stream_options={"include_usage": True}).check_supported()


def test_a_completion_without_max_tokens_stops_after_16_as_openai_and_vllm():
    """A completion without ``max_tokens`` ran to the end of the context (8k tokens on SmolLM2) where OpenAI's and
    vLLM's completions stop at 16; chat still runs to the context's end, as theirs do."""
    assert CompletionRequest(model="a", prompt="x").max_tokens == 16
    assert CompletionRequest(model="a", prompt="x", max_tokens=None).max_tokens == 16
    assert ChatRequest(**CHAT).limit() is None


def test_a_tool_call_arguments_string_longer_than_the_bound_goes_to_the_template_as_it_came():
    """An ``arguments`` JSON string is given to the chat template as its object, but one longer than
    ARGUMENTS_PARSED_BYTES is not parsed: json.loads holds the interpreter lock throughout (a 14 MB object of a
    million entries held every stream up ~4.5 s in the request's worker thread)."""
    import json

    from lordba.serve import protocol as p

    def call(arguments: str) -> dict:
        message = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}
        request = ChatRequest.model_validate({"model": "m", "messages": [message, {"role": "user", "content": "x"}]})
        return request.messages[0].for_template()["tool_calls"][0]["function"]["arguments"]

    small = json.dumps({"city": "Paris"})
    assert call(small) == {"city": "Paris"}
    at_bound = json.dumps({"k": "x" * (p.ARGUMENTS_PARSED_BYTES - 9)})
    assert len(at_bound) == p.ARGUMENTS_PARSED_BYTES and call(at_bound) == {"k": "x" * (p.ARGUMENTS_PARSED_BYTES - 9)}
    large = json.dumps({f"k{i}": 1 for i in range(p.ARGUMENTS_PARSED_BYTES // 8)})
    assert len(large) > p.ARGUMENTS_PARSED_BYTES and call(large) == large
