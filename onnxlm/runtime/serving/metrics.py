"""Prometheus metrics in the text exposition format: counters, gauges and histograms, thread-safe,
with no dependency (the server's needs are a handful of series)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    esc = [v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values]
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc, strict=True)) + "}"


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()
        self.mirrors: list[Callable[[float, tuple[str, ...]], None]] = []  # also told of each inc

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount
        for mirror in self.mirrors:
            mirror(amount, labels)

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        lines += [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in items]
        return lines


class Gauge:
    """A value read at scrape time from a callable."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {self.read():g}",
        ]


class ReadCounter(Gauge):
    """A counter kept elsewhere (the prefix cache, the drafter), read at scrape time."""

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} counter",
            f"{self.name} {self.read():g}",
        ]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        self.mirrors: list[Callable[[float], None]] = []  # also told of each observation

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value
        for mirror in self.mirrors:
            mirror(value)

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f"{self.name}_sum {total:g}", f"{self.name}_count {running}"]
        return lines


class ServerMetrics:
    """The series `GET /metrics` shows."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        active: Callable[[], float],
        work: Callable[[], dict[str, float]] = dict,
        memory: Callable[[], dict[str, float]] = dict,
    ):
        self.requests = Counter(
            "onnxlm_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status")
        )
        self.prompt_tokens = Counter("onnxlm_prompt_tokens_total", "Prompt tokens of served requests.")
        self.completion_tokens = Counter("onnxlm_completion_tokens_total", "Tokens generated.")
        self.ttft = Histogram("onnxlm_time_to_first_token_seconds", "From the request to its first token.")
        self.itl = Histogram("onnxlm_inter_token_latency_seconds", "Between successive tokens of a request.")
        self.duration = Histogram("onnxlm_request_duration_seconds", "Generation requests, start to end.")
        self.queue = Gauge("onnxlm_queue_depth", "Requests waiting for a batch row.", queue_depth)
        self.active = Gauge("onnxlm_active_sequences", "Sequences in the running batch.", active)
        saved = [  # work not done twice: from the scheduler's prefix cache and drafter
            ("prefix_cache_hits", "Requests whose prompt started with cached KV."),
            ("prefix_cache_misses", "Requests that found no cached prefix."),
            ("prefix_cache_reused_tokens", "Prompt tokens whose KV came from the prefix cache."),
            ("draft_tokens", "Tokens drafted for speculative decoding."),
            ("draft_accepted_tokens", "Drafted tokens the model agreed with."),
        ]
        self.saved = [
            ReadCounter(f"onnxlm_{key}_total", text, lambda key=key: work().get(key, 0))
            for key, text in saved
        ]

        self.memory = [
            Gauge(f"onnxlm_{key}", text, lambda key=key: memory().get(key, 0))
            for key, text in (
                ("kv_cache_bytes", "Bytes of KV buffers the running batch holds."),
                ("prefix_cache_bytes", "Bytes of KV the prefix cache keeps for reuse."),
            )
        ]

    def render(self) -> str:
        series = (
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.ttft,
            self.itl,
            self.duration,
            self.queue,
            self.active,
            *self.saved,
            *self.memory,
        )
        return "\n".join(line for s in series for line in s.render()) + "\n"
