"""`onnxlm bench`: prefill and decode speed at several contexts, memory, and achieved bandwidth.

Decode at context C: a C-token prompt, then `new_tokens` generated with end-of-sequence ignored, so
every engine compares equal token counts. Achieved GB/s = weight bytes × decode tokens/s: the bytes a
decode step must read at least once, beside the machine's measured read bandwidth.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import MODEL_DATA
from .engine import Engine

FILLER = (
    "Our support team answers questions about orders, refunds, delivery dates and account settings. "
    "我们的客服团队回答关于订单、退款、配送日期和账户设置的问题。 "
)


@dataclass
class ContextResult:
    context: int  # prompt tokens
    new_tokens: int
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_gb_per_s: float


@dataclass
class BenchResult:
    bundle: str
    dtype: str
    weight_bytes: int
    threads: int | None
    providers: list[str]
    contexts: list[ContextResult] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    rss_mb: float | None = None  # resident after the runs: what a serving process keeps
    machine_read_gb_per_s: float | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_of(engine: Engine, n: int) -> list[int]:
    """Exactly n token ids of ordinary text (English and Chinese)."""
    one = engine.tokenizer.encode(FILLER, add_special_tokens=False)
    return (one * (n // len(one) + 1))[:n]


def read_bandwidth_gb_per_s(size_mb: int = 512, repeats: int = 3) -> float:
    """Sustained read bandwidth over every CPU this process may use (numpy sums release the GIL)."""
    cpus = len(os.sched_getaffinity(0))
    parts = [np.ones(size_mb * (1 << 20) // 8 // cpus, dtype=np.float64) for _ in range(cpus)]
    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return sum(p.nbytes for p in parts) / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float | None:
    """Resident now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return None


def bench(
    bundle: str | os.PathLike,
    contexts: tuple[int, ...] = (64, 512, 2048),
    new_tokens: int = 128,
    threads: int | None = None,
    providers: list[str] | None = None,
    warmup: bool = True,
    measure_bandwidth: bool = True,
) -> BenchResult:
    engine = Engine.load(bundle, providers=providers, threads=threads)
    window = engine.context_length
    weight_bytes = (Path(bundle) / MODEL_DATA).stat().st_size
    import onnxruntime

    result = BenchResult(
        bundle=str(bundle),
        dtype=engine.manifest.dtype,
        weight_bytes=weight_bytes,
        threads=threads,
        providers=engine.model.session.get_providers(),
        machine={
            "cpus": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
        },
    )
    if warmup:
        engine.generate(prompt_of(engine, 16), max_new_tokens=4, ignore_eos=True)
    for ctx in contexts:
        if ctx + new_tokens > window:
            raise ValueError(f"context {ctx} + {new_tokens} new tokens exceeds the window of {window} tokens")
        done = engine.generate(prompt_of(engine, ctx), max_new_tokens=new_tokens, ignore_eos=True)
        t = done.timings
        result.contexts.append(
            ContextResult(
                context=ctx,
                new_tokens=len(done.token_ids),
                ttft_s=t.ttft_s,
                prefill_tokens_per_s=t.prompt_tokens_per_s,
                decode_tokens_per_s=t.tokens_per_s,
                decode_gb_per_s=weight_bytes * t.tokens_per_s / 1e9,
            )
        )
    result.peak_rss_mb, result.rss_mb = peak_rss_mb(), rss_mb()
    if measure_bandwidth:
        result.machine_read_gb_per_s = read_bandwidth_gb_per_s()
    return result


def format_bench(r: BenchResult) -> str:
    lines = [
        f"bundle {r.bundle} ({r.dtype}, {r.weight_bytes / 1e6:.1f} MB of weights) on {', '.join(r.providers)}, "
        f"{r.machine.get('cpus')} CPUs, onnxruntime {r.machine.get('onnxruntime')}",
        "",
        "| context | TTFT | prefill tok/s | decode tok/s | achieved GB/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in r.contexts:
        lines.append(
            f"| {c.context} | {c.ttft_s * 1000:.0f} ms | {c.prefill_tokens_per_s:.0f} | "
            f"{c.decode_tokens_per_s:.1f} | {c.decode_gb_per_s:.1f} |"
        )
    lines.append("")
    held = f" ({r.rss_mb:.0f} MB resident after the runs)" if r.rss_mb else ""
    lines.append(f"peak RSS {r.peak_rss_mb:.0f} MB{held}")
    if r.machine_read_gb_per_s:
        lines.append(
            f"machine read bandwidth {r.machine_read_gb_per_s:.1f} GB/s (numpy, all CPUs): decode at "
            f"{max((c.decode_gb_per_s for c in r.contexts), default=0) / r.machine_read_gb_per_s:.0%} of it"
        )
    return "\n".join(lines)
