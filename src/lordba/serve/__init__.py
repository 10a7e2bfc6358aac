"""``lordba serve``: an OpenAI-compatible server batching many adapters on one base model.

Parts: :mod:`~lordba.serve.batch` (the running batch's KV cache), :mod:`~lordba.serve.engine`
(continuous batching across adapters), :mod:`~lordba.serve.sampling`, :mod:`~lordba.serve.registry`
(adapters by name, LRU within a memory budget), :mod:`~lordba.serve.metrics` (Prometheus),
:mod:`~lordba.serve.protocol` and :mod:`~lordba.serve.app` (the HTTP API on FastAPI; its ASGI
:mod:`~lordba.serve.middleware`),
:mod:`~lordba.serve.server` (putting it together, uvicorn). The HTTP parts need the ``serve``
extra: ``pip install 'lordba[serve]'``. See docs/serving.md.
"""

EXTRA_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def missing_extra() -> list[str]:
    """The ``serve`` extra's modules that are not installed (empty when it is)."""
    import importlib.util

    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
