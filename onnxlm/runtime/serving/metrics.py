"""The server's Prometheus series, through prometheus_client (exposition, content negotiation and the
process metrics: CPU seconds, resident memory, open files, Python's GC).

Each app has its own registry, so several apps in one process keep their series apart. Counters and
histograms are wrapped thinly: the Ray Serve deployment mirrors each update into Ray's metrics
(`mirrors`), and the handlers count with positional label values.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Counter:
    def __init__(self, registry, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self._counter = prom.Counter(name, help, labels, registry=registry)
        self.mirrors: list[Callable[[float, tuple[str, ...]], None]] = []  # also told of each inc

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        (self._counter.labels(*labels) if labels else self._counter).inc(amount)
        for mirror in self.mirrors:
            mirror(amount, labels)


class Histogram:
    def __init__(self, registry, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self._histogram = prom.Histogram(name, help, buckets=self.buckets, registry=registry)
        self.mirrors: list[Callable[[float], None]] = []  # also told of each observation

    def observe(self, value: float) -> None:
        self._histogram.observe(value)
        for mirror in self.mirrors:
            mirror(value)


class Gauge:
    """A value read at scrape time from a callable."""

    def __init__(self, registry, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read
        prom.Gauge(name, help, registry=registry).set_function(read)


# work not done twice, counted by the scheduler's prefix cache and drafter: Scheduler.work()'s keys
SAVED = (
    ("prefix_cache_hits", "Requests whose prompt started with cached KV."),
    ("prefix_cache_misses", "Requests that found no cached prefix."),
    ("prefix_cache_reused_tokens", "Prompt tokens whose KV came from the prefix cache."),
    ("draft_tokens", "Tokens drafted for speculative decoding."),
    ("draft_accepted_tokens", "Drafted tokens the model agreed with."),
)


# KV memory the scheduler holds: Scheduler.memory()'s keys
HELD = (
    ("kv_cache_bytes", "Bytes of KV buffers the running batch holds."),
    ("prefix_cache_bytes", "Bytes of KV the prefix cache keeps for reuse."),
)


class _SchedulerCollector:
    """Series the scheduler keeps, read at scrape time (one `work()` and one `memory()` call each)."""

    def __init__(self, work: Callable[[], dict[str, float]], memory: Callable[[], dict[str, float]]):
        self.work, self.memory = work, memory

    def describe(self):
        return []  # nothing to check for duplicates at registration: the names are ours alone

    def collect(self):
        done = self.work()
        for key, text in SAVED:
            yield CounterMetricFamily(f"onnxlm_{key}", text, value=done.get(key, 0))
        held = self.memory()
        for key, text in HELD:
            yield GaugeMetricFamily(f"onnxlm_{key}", text, value=held.get(key, 0))


class ServerMetrics:
    """The series `GET /metrics` shows, in this app's own registry."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        active: Callable[[], float],
        work: Callable[[], dict[str, float]] = dict,
        memory: Callable[[], dict[str, float]] = dict,
    ):
        r = self.registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        prom.PlatformCollector(registry=r)
        prom.GCCollector(registry=r)
        self.requests = Counter(
            r, "onnxlm_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status")
        )
        self.prompt_tokens = Counter(r, "onnxlm_prompt_tokens_total", "Prompt tokens of served requests.")
        self.completion_tokens = Counter(r, "onnxlm_completion_tokens_total", "Tokens generated.")
        self.ttft = Histogram(r, "onnxlm_time_to_first_token_seconds", "From the request to its first token.")
        self.itl = Histogram(
            r, "onnxlm_inter_token_latency_seconds", "Between successive tokens of a request."
        )
        self.duration = Histogram(r, "onnxlm_request_duration_seconds", "Generation requests, start to end.")
        self.queue = Gauge(r, "onnxlm_queue_depth", "Requests waiting for a batch row.", queue_depth)
        self.active = Gauge(r, "onnxlm_active_sequences", "Sequences in the running batch.", active)
        r.register(_SchedulerCollector(work, memory))
        self._replica: prom.Gauge | None = None

    def set_replica(self, replica: str) -> None:
        """Under Ray Serve: `onnxlm_replica_info{replica=...} 1` says which replica these series are."""
        if self._replica is None:
            self._replica = prom.Gauge(
                "onnxlm_replica_info",
                "The Ray Serve replica these series come from.",
                ["replica"],
                registry=self.registry,
            )
            self._replica.labels(replica).set(1)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it has none yet)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition the client's Accept header asks for (Prometheus text, or OpenMetrics), and
        its content type."""
        encoder, content_type = prom.exposition.choose_encoder(accept)
        return encoder(self.registry), content_type
