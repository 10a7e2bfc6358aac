"""The server's errors: each is a library error (:class:`~lordba.errors.LoRDBAError`) with the HTTP
status and OpenAI error ``type`` it is answered with."""

from __future__ import annotations

from lordba.errors import AdapterFormatError, AdapterStateError, ConfigError, LoRDBAError


class ServeError(LoRDBAError):
    """Base of the server's errors: ``status`` and ``kind`` (OpenAI's error ``type``) say how it is answered."""

    status = 400
    kind = "invalid_request_error"
    code = "invalid_request"
    param: str | None = None
    retry_after: int | None = None  # seconds: the ``Retry-After`` header of the answer

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class BadRequestError(ServeError, ConfigError):
    """A request field is invalid (400)."""


class ContextLengthError(BadRequestError):
    """The prompt (plus ``max_tokens``) does not fit the model's context (400)."""

    code = "context_length_exceeded"
    param = "messages"


class UnknownAdapterError(ServeError, AdapterStateError):
    """No adapter (or base model) of that name (404)."""

    status = 404
    code = "model_not_found"
    param = "model"


class AdapterLoadError(ServeError, AdapterFormatError):
    """The adapter's files are corrupt, tampered with or do not fit the base model (400)."""

    code = "adapter_invalid"
    param = "model"


class AdapterConflictError(ServeError, AdapterStateError):
    """``load_lora_adapter`` for a name that is already loaded (400, as vLLM answers)."""

    code = "adapter_already_loaded"
    param = "lora_name"


class AdapterMemoryError(ServeError, AdapterStateError):
    """No room within ``--max-adapter-memory``: every resident adapter is in use (503)."""

    status = 503
    kind = "server_error"
    code = "adapter_memory_full"
    param = "model"


class AdapterTooLargeError(ServeError, AdapterStateError):
    """The adapter alone is larger than ``--max-adapter-memory`` (400: no retry can succeed; the message names the
    adapter, its size and the budget)."""

    code = "adapter_too_large"
    param = "model"


class UnavailableError(ServeError):
    """The server cannot take the request now (shutting down) (503)."""

    status = 503
    kind = "server_error"
    code = "unavailable"


class QueueFullError(UnavailableError):
    """``--max-waiting`` requests already wait for a batch slot (503, with ``Retry-After``: retry later)."""

    code = "queue_full"
    retry_after = 1
