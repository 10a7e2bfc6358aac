"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so that several
servers in one process (tests, the benchmark) do not mix their numbers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_LOAD = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServeMetrics:
    """The server's counters, gauges and histograms (names prefixed ``lordba_``); it is the engine's
    and the registry's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lordba_requests", "HTTP generation requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("lordba_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lordba_generation_tokens", "tokens generated", registry=r)
        self.finished_requests = Counter(
            "lordba_finished_requests", "generations ended, by reason", ["reason"], registry=r
        )
        self.rejected_requests = Counter(
            "lordba_rejected_requests", "requests refused before they queued, by reason", ["reason"], registry=r
        )
        self.waiting = Gauge("lordba_queue_length", "requests waiting to join the running batch", registry=r)
        self.running = Gauge("lordba_running_requests", "requests in the running batch", registry=r)
        self.resident = Gauge("lordba_resident_adapters", "adapters loaded on the model", registry=r)
        self.resident_bytes = Gauge("lordba_resident_adapter_bytes", "bytes held by resident adapters", registry=r)
        self.loads = Counter("lordba_adapter_loads", "adapters loaded from their files", registry=r)
        self.load_failures = Counter("lordba_adapter_load_failures", "adapter files refused by the loader", registry=r)
        self.evictions = Counter("lordba_adapter_evictions", "adapters evicted by the LRU", registry=r)
        self.load_seconds = Histogram(
            "lordba_adapter_load_seconds", "cold load time of an adapter", buckets=_LOAD, registry=r
        )
        self.ttft = Histogram("lordba_time_to_first_token_seconds", "time to first token", buckets=_LATENCY, registry=r)
        self.tpot = Histogram(
            "lordba_time_per_output_token_seconds", "time between two tokens of a request", buckets=_TOKEN, registry=r
        )
        self.latency = Histogram(
            "lordba_request_latency_seconds", "time from arrival to the last token", buckets=_LATENCY, registry=r
        )

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    # engine observer
    def queue(self, waiting: int, running: int) -> None:
        """Current queue length and running batch size."""
        self.waiting.set(waiting)
        self.running.set(running)

    def first_token(self, seconds: float) -> None:
        """A request produced its first token ``seconds`` after arriving."""
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        """A request produced another token ``seconds`` after its previous one."""
        self.tpot.observe(seconds)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """A generation ended (``stop``, ``length``, ``abort``, ``error``); ``prompt_tokens``: those its prefill ran
        (0 for a request that never reached one)."""
        self.finished_requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.latency.observe(seconds)

    def rejected(self, reason: str) -> None:
        """A request was refused before it queued (``queue_full``: ``--max-waiting`` requests were waiting)."""
        self.rejected_requests.labels(reason).inc()

    # registry observer
    def adapter_loaded(self, seconds: float) -> None:
        """An adapter was loaded in ``seconds``."""
        self.loads.inc()
        self.load_seconds.observe(seconds)

    def adapter_load_failed(self) -> None:
        """The loader refused an adapter's files."""
        self.load_failures.inc()

    def adapter_evicted(self) -> None:
        """The LRU evicted an adapter."""
        self.evictions.inc()

    def adapters_resident(self, count: int, nbytes: int) -> None:
        """How many adapters are resident, and their bytes."""
        self.resident.set(count)
        self.resident_bytes.set(nbytes)
