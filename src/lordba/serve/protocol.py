"""The OpenAI-compatible request bodies (pydantic) and response objects of the server.

Fields the server does not implement are refused (``n`` > 1, ``logprobs``, ``echo``, ``best_of``, the
penalties, ``logit_bias``, vLLM's ``top_k``/``min_p``/``repetition_penalty``/``min_tokens``, a completion's
``suffix``) rather than silently ignored; unknown extra fields are ignored, as OpenAI-compatible servers do, and a
field sent as ``null`` takes its default.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from lordba.serve.engine import Event
from lordba.serve.errors import BadRequestError, ServeError
from lordba.serve.sampling import MAX_STOPS, SEED_RANGE, valid_stops


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """A field sent as ``null`` takes its default: OpenAI's optional fields are nullable, and its
        client sends an explicit ``None`` as ``null`` (a required field then reads as missing)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# sampling fields the server does not implement, each with the values that ask for nothing (vLLM's top_k: -1 or 0)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "top_k": (-1, 0),
    "min_p": (0,),
    "repetition_penalty": (1,),
    "min_tokens": (0,),
}


# other APIs' request fields the server does not implement (OpenAI's audio output, vLLM's extensions), each with the
# values that ask for nothing: unknown fields are ignored, and these would have been ignored while asking for something
_EXTENSIONS: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"], []),
    "audio": (),
    "stop_token_ids": ([],),
    "include_stop_str_in_output": (False,),
    "use_beam_search": (False,),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
}

# number fields, where a JSON boolean is refused rather than read as 1 / 0 (chat's max_completion_tokens and a
# completion's best_of are their endpoint's own)
_NUMBERS = ("max_tokens", "temperature", "top_p", "seed", "n", *(k for k in _NEUTRAL if k != "logit_bias"))
_NUMBERS += ("max_completion_tokens", "best_of")


def unsupported(name: str) -> BadRequestError:
    """The 400 refusing ``name``, a sampling or extension field the server does not implement, sent asking for
    something (naming the value that asks for nothing, where there is one)."""
    neutral = _NEUTRAL.get(name, _EXTENSIONS.get(name, ()))
    only = f" (only {neutral[0]!r})" if neutral else ""
    return BadRequestError(f"{name} is not supported{only}", param=name)


def several_prompts() -> BadRequestError:
    """The 400 refusing a completion's list of several prompts."""
    return BadRequestError("send one prompt per request (a list of prompts is not supported)", "prompt")


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes (benchmarks)
    # not implemented: refused unless neutral (:data:`_NEUTRAL`), never ignored
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    # other APIs' fields, not implemented: refused unless they ask for nothing (:data:`_EXTENSIONS`), never ignored
    modalities: Any = None
    audio: Any = None
    stop_token_ids: Any = None
    include_stop_str_in_output: Any = None
    use_beam_search: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @field_validator(*_NUMBERS, mode="before", check_fields=False)
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        """A JSON ``true`` / ``false`` is no number (pydantic would read it as 1 / 0: ``"temperature": false``
        sampled greedily); a 400 naming the field, as OpenAI answers."""
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """Up to ``MAX_STOPS`` non-empty strings (a 400 naming ``stop``)."""
        if not valid_stops([stop] if isinstance(stop, str) else stop or []):
            raise ValueError(f"stop must be up to {MAX_STOPS} non-empty strings")
        return stop

    def check_supported(self) -> None:
        """Refuse what the server does not implement (400)."""
        if self.n != 1:
            raise BadRequestError("only n=1 is supported", param="n")
        if self.stream_options is not None and not self.stream:
            raise BadRequestError("stream_options is only allowed when stream is true", param="stream_options")
        if self.logprobs is not None and not self._logprobs_off(self.logprobs):
            raise BadRequestError("logprobs are not supported", param="logprobs")
        for name, neutral in (*_NEUTRAL.items(), *_EXTENSIONS.items()):
            value = getattr(self, name)
            if value is not None and value not in neutral:
                raise unsupported(name)

    @staticmethod
    def _logprobs_off(value: Any) -> bool:
        """Whether a non-null ``logprobs`` asks for none: chat's boolean ``false``."""
        return value is False or (type(value) is int and value == 0)

    def stops(self) -> tuple[str, ...]:
        """``stop`` as a tuple of strings."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (one prompt); ``max_tokens``
    defaults to 16, as in OpenAI's and vLLM's completions (chat's runs to the context's end)."""

    max_tokens: int | None = Field(default=16, ge=1)
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]  # strict: a JSON true is no token id
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @staticmethod
    def _logprobs_off(value: Any) -> bool:
        """A completion's ``logprobs`` is a count of alternatives: even ``0`` asks for the sampled tokens'."""
        return value is False

    def check_supported(self) -> None:
        """Refuse what the server does not implement (400)."""
        super().check_supported()
        if self.echo:
            raise BadRequestError("echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise BadRequestError("best_of is not supported", param="best_of")
        if self.suffix:
            raise BadRequestError("suffix is not supported", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a batch of several is refused: send one request each)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise several_prompts()
            p = p[0]
        if isinstance(p, list) and not p:
            raise BadRequestError("prompt is empty", param="prompt")
        return p


class TextPart(_Body):
    """One part of a message's content (text only)."""

    type: Literal["text"] = "text"
    text: str


class ToolFunction(_Body):
    """The function an assistant message's tool call called: its name and its arguments (OpenAI: a JSON string)."""

    name: str
    arguments: str | dict[str, Any] = ""


ARGUMENTS_PARSED_BYTES = 1 << 20  # a tool call's ``arguments`` string longer than this goes to the template as it came


class ToolCall(_Body):
    """One of an assistant message's ``tool_calls`` (a history the client replays: the server makes none)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolFunction

    def for_template(self) -> dict[str, Any]:
        """The call as transformers' chat templates take it: ``arguments`` a JSON object string given as that
        object (templates write it with ``tojson``; vLLM passes it so), any other string (or one nesting deeper than
        the parser goes) as it came, and so does one longer than :data:`ARGUMENTS_PARSED_BYTES`: JSON's parser holds
        the interpreter lock from start to end, so a 14 MB object of a million entries (within the body limit) held
        every stream up ~4.5 s in the request's worker thread."""
        arguments = self.function.arguments
        if isinstance(arguments, str) and len(arguments) <= ARGUMENTS_PARSED_BYTES:
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(arguments)
                arguments = parsed if isinstance(parsed, dict) else arguments
        call = {"type": self.type, "function": {"name": self.function.name, "arguments": arguments}}
        return call | ({"id": self.id} if self.id is not None else {})


class ChatMessage(_Body):
    """One chat message: an assistant's may hold the ``tool_calls`` it made, a tool's the ``tool_call_id`` it
    answers; any may hold a ``name``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template takes it: OpenAI's ``developer`` role (its newer name for the system
        message) as ``system``, the role templates know (SmolLM2's rendered a ``developer`` turn it was never
        trained on, after its default system prompt; others refuse the role); ``name``, ``tool_calls`` and
        ``tool_call_id`` where the message has them."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: Any = None
    # not implemented: refused unless absent or neutral, never ignored (a client asking for JSON or a tool call
    # would get free text it then fails to parse)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    def check_supported(self) -> None:
        """Refuse what the server does not implement (400): ``top_logprobs`` (once an ignored field), tools and
        function calling, and a ``response_format`` other than plain text."""
        super().check_supported()
        if self.top_logprobs is not None and not (type(self.top_logprobs) is int and self.top_logprobs == 0):
            raise BadRequestError("top_logprobs are not supported", param="top_logprobs")
        for name in ("tools", "functions"):
            if getattr(self, name):  # None and [] ask for nothing
                raise BadRequestError(f"{name} (tool / function calling) are not supported", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise BadRequestError(f"{name} is not supported (tool / function calling)", param=name)
        fmt = self.response_format
        if fmt is not None and fmt != {"type": "text"}:
            raise BadRequestError("response_format is not supported (only {'type': 'text'})", param="response_format")

    def limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class LoadAdapterRequest(_Body):
    """``POST /v1/load_lora_adapter`` (vLLM's body)."""

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Body):
    """``POST /v1/unload_lora_adapter`` (vLLM's body; ``lora_int_id`` is accepted and ignored)."""

    lora_name: str
    lora_int_id: int | None = None


# ---------------------------------------------------------------------- responses
def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_for(err: ServeError) -> dict:
    """The error object of a server error."""
    return error_body(str(err), err.kind, err.param, err.code)


def new_id(prefix: str) -> str:
    """A response id such as ``cmpl-…``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(event: Event) -> dict:
    """The ``usage`` object of a finished generation."""
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def completion(rid: str, model: str, event: Event, chat: bool, created: int) -> dict:
    """The whole (non-streamed) response, from the generation's last event; ``created``: when the request came."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": event.text}, "logprobs": None}
    else:
        choice = {"index": 0, "text": event.text, "logprobs": None}
    choice["finish_reason"] = event.finish_reason
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(event),
    }


def chunk(
    rid: str, model: str, delta: str | None, finish: str | None, chat: bool, created: int, first: bool = False
) -> dict:
    """One streamed chunk: a text delta and/or the finish reason; ``created`` is the stream's (every chunk of a
    stream has the same timestamp, as OpenAI's and vLLM's)."""
    if chat:
        d: dict[str, Any] = {}
        if first:
            d["role"] = "assistant"
        if delta is not None:
            d["content"] = delta
        choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None}
    choice["finish_reason"] = finish
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, event: Event, chat: bool, created: int) -> dict:
    """The last chunk with ``stream_options.include_usage``: no choices, the token counts."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(event),
    }


def model_card(name: str, parent: str | None) -> dict:
    """One entry of ``GET /v1/models``."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "lordba", "root": name, "parent": parent}
