"""Putting a server together (model, tokenizer, registry, engine, metrics, app) and running it with
uvicorn: in the foreground (``lordba serve``) or on a background thread (:class:`Server`, for tests,
the benchmark and notebooks)."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lordba._util.modules import context_positions
from lordba.errors import ConfigError
from lordba.nn.model import LoRDBAModel
from lordba.serve.engine import Engine
from lordba.serve.metrics import ServeMetrics
from lordba.serve.registry import AdapterRegistry
from lordba.serve.state import ServerState

DEFAULT_CONTEXT = 2048
SERVE_GRACE = 5.0  # seconds `lordba serve` lets requests in flight finish once asked to stop
ENGINE_STOP = 10.0  # seconds a stop waits for the engine's step in progress


def load_base(
    model_dir: str | Path,
    dtype: str = "float32",
    quant: str = "none",
    bits: int = 4,
    group_size: int = 64,
    q4_compute: str | None = None,
) -> tuple[LoRDBAModel, Any]:
    """``(LoRDBAModel without adapters, tokenizer)`` of the base :func:`lordba.quant.pretrained.load_base` loads from
    a local transformers folder (in ``dtype``, its linear layers quantized per ``quant``: ``q4``, ``hqq``, ``bnb`` or
    ``none``, with ``bits`` and ``group_size``, a quantized base cached on disk as ``lordba generate`` and ``lordba
    train`` cache theirs; the q4 base computing per ``q4_compute``, None: its default). Adapters trained on a
    quantized base (their ``base_quantization``) give their trained outputs on that base only.

    Raises:
        ConfigError: an unknown ``dtype``; a folder without ``config.json``, or one transformers cannot
            load (a config that is not JSON, no tokenizer), as ``lordba generate`` says it; a quantization
            ``quantize_model`` refuses (``bits`` or ``group_size`` the backend does not take).
    """
    from lordba.quant.pretrained import load_base as load_pretrained

    model, tokenizer = load_pretrained(model_dir, dtype, quant, bits, group_size, q4_compute)
    return LoRDBAModel(model).eval(), tokenizer  # serving: dropout off from the first request


def context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The most tokens a sequence may hold: the model config's positions, else the tokenizer's limit."""
    positions = context_positions(model)
    if positions is not None:
        return positions
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else DEFAULT_CONTEXT


def build_state(
    model: torch.nn.Module,
    tokenizer: Any,
    base_name: str,
    adapters: str | Path | None = None,
    max_adapter_memory: int | None = None,
    max_batch: int = 32,
    max_context: int | None = None,
    allow_base_mismatch: bool = False,
    max_body_bytes: int | None = None,
    max_waiting: int | None = None,
) -> ServerState:
    """The server's parts around ``model`` (a :class:`LoRDBAModel`, or a plain model to wrap):
    the base served as ``base_name``, adapters from the folder ``adapters``, an LRU within
    ``max_adapter_memory`` bytes, at most ``max_batch`` requests in flight; an adapter that records another
    quantized base than ``model``'s is refused unless ``allow_base_mismatch``; a request body over
    ``max_body_bytes`` is a 413 (None: over what the longest prompt of the context needs); a request finding
    ``max_waiting`` others waiting for a batch slot is a 503 (None: no bound)."""
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError("the base model needs a non-empty served name")
    lm = model if isinstance(model, LoRDBAModel) else LoRDBAModel(model)
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics = ServeMetrics()
    registry = AdapterRegistry(
        lm, adapters, max_adapter_memory, (base_name,), metrics, allow_base_mismatch=allow_base_mismatch
    )
    engine = Engine(lm, tokenizer, max_batch=max_batch, observer=metrics, max_waiting=max_waiting)
    context = max_context or context_length(lm, tokenizer)
    return ServerState(engine, registry, metrics, tokenizer, base_name, context, max_body_bytes)


class Server:
    """A server on a background thread: ``with Server(state) as s: ... s.url``. Port 0 takes a free
    port; :meth:`stop` ends the engine and uvicorn (open streams are cut after ``grace`` seconds)."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, grace: float = 2.0) -> None:
        import uvicorn

        from lordba.serve.app import build_app

        self.state = state
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(state), log_level="warning", lifespan="off", timeout_graceful_shutdown=grace, access_log=False
        )
        self._server = draining_server(config, state.engine)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        """Start the engine and the HTTP server; returns once it accepts connections."""
        self.state.engine.start()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: uvicorn first (no new requests), then the engine."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.state.engine.shutdown(ENGINE_STOP)
        self._sock.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def freeze_heap(state: ServerState | None = None) -> None:
    """Collect, then move every object alive now (the base model, torch, transformers: most of the
    process) out of the cyclic garbage collector's reach (``gc.freeze``): its full collections,
    which adapter loads trigger by allocating, then walk only what came later (tens of ms saved per
    full collection on SmolLM2, fewer slow loads). Objects frozen are still freed by reference
    counting; call it once, after startup. Given ``state``, its registry freezes each adapter it
    loads from then on as well."""
    gc.collect()
    gc.freeze()
    if state is not None:
        state.registry.freeze_loads = True


def serve_forever(state: ServerState, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``state`` on ``host:port`` until interrupted (Ctrl-C, SIGTERM): requests in flight then get
    :data:`SERVE_GRACE` seconds to finish, and those still running end as aborted (a 503, a stream's
    ``abort``). The heap frozen at startup (:func:`freeze_heap`) is given back to the collector when it returns:
    left frozen, a caller's process kept its cyclic garbage for good, and at exit nanobind (triton's bindings, which
    ``torch._dynamo`` imports where triton is installed) reported every object it still held as leaked, some 30
    lines of "nanobind: leaked ..." after each stop of ``lordba serve``."""
    import uvicorn

    from lordba.serve.app import build_app

    freeze_heap(state)
    state.engine.start()
    config = uvicorn.Config(
        build_app(state), host=host, port=port, log_level="info", timeout_graceful_shutdown=SERVE_GRACE
    )
    server = draining_server(config, state.engine)
    try:
        server.run()
    finally:
        state.engine.shutdown(ENGINE_STOP)
        gc.unfreeze()
    if not server.started:  # the port is taken, say: uvicorn has logged why (uvicorn.run's exit status)
        raise SystemExit(3)


def drain(engine: Engine, grace: float, give_up: Callable[[], bool] = lambda: False) -> None:
    """Let ``engine``'s requests finish for up to ``grace`` seconds (sooner if ``give_up()``), then shut it
    down: those still waiting or running end with ``abort``."""
    deadline = time.monotonic() + grace
    while engine.load != (0, 0) and time.monotonic() < deadline and not give_up():
        time.sleep(0.02)
    engine.shutdown(ENGINE_STOP)


def draining_server(config: Any, engine: Engine) -> Any:
    """A ``uvicorn.Server`` for ``config`` whose shutdown drains ``engine`` within the configured grace period
    (``timeout_graceful_shutdown``) before uvicorn closes its listening socket: a request arriving meanwhile (a load
    balancer still routing here) is answered a 503 with ``Connection: close`` (:attr:`Engine.draining`), not refused
    nor cut; the requests still running then end as aborted and their answers (a 503, a stream's ``abort`` and
    ``[DONE]``) are written before uvicorn's own wait, which is lengthened by :data:`ENGINE_STOP`, cancels what is
    left. Uvicorn alone cancelled them at the grace period and the engine stopped after: a plain-text 500 or a cut
    stream. A stop by SIGTERM or Ctrl-C that drained so ends the process normally (``lordba serve`` exits 0); uvicorn
    alone raised the signal again once stopped (killed by SIGTERM; Ctrl-C exited 130, interrupted), as a second
    Ctrl-C (forced: nothing drained) still does."""
    import uvicorn

    grace = config.timeout_graceful_shutdown or 0.0
    config.timeout_graceful_shutdown = grace + ENGINE_STOP + 1.0

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            engine.draining = True  # a request arriving from now on: a 503 with Connection: close (the app's)
            stopping = asyncio.get_running_loop().run_in_executor(None, drain, engine, grace, lambda: self.force_exit)
            try:  # uvicorn's own shutdown closes the listening socket: only once the requests in flight are over
                await asyncio.wait({stopping})  # (its error, if any, is raised below)
                await super().shutdown(sockets)
            finally:
                await stopping
            if not self.force_exit:  # drained: the stop asked for is the server's normal end, not a kill by it
                getattr(self, "_captured_signals", []).clear()  # (uvicorn raises them again once it has stopped)

    return DrainingServer(config)
