"""What long prompts leave in the process: resident memory after load, then after each prompt of the
given lengths (prefilled, a few tokens generated, the request finished), one engine in this process.

    python benchmarks/prefill_memory.py BUNDLE [--tokens 100,1000,1000,2000,4000,100] [--out results/]

A prompt's KV buffers and the prefill's activations are freed when it ends; what the process still
holds after it (onnxruntime's arenas, the C heap's free blocks) shows as growth over the size after
load. Prompts are the first tokens of the shipped prompts, repeated to the longest length asked for.
Writes prefill_memory.json and prefill_memory.md (with the machine and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import onnxlm

PROMPTS = Path(__file__).resolve().parent / "prompts"


def rss_mb() -> float:
    """This process's resident memory (Linux /proc), MB."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--tokens", default="100,1000,1000,2000,4000,100", help="prompt lengths, in order")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prefix-cache-mb", type=float, default=0, help="the engine's prefix cache (0: off)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="results")
    a = ap.parse_args(argv)
    lengths = [int(x) for x in a.tokens.split(",")]
    engine = onnxlm.load(a.bundle, threads=a.threads, prefix_cache_mb=a.prefix_cache_mb)
    loaded = rss_mb()
    text = "\n\n".join(p.read_text() for p in sorted(PROMPTS.glob("*.txt")))
    ids = engine.tokenizer.encode(text)
    while len(ids) < max(lengths):
        ids += ids
    rows = []
    for n in lengths:
        t = time.perf_counter()
        engine.generate(ids[:n], max_new_tokens=a.new_tokens, ignore_eos=True)
        rows.append({"tokens": n, "seconds": time.perf_counter() - t, "rss_mb": rss_mb()})
    import onnxruntime

    report = {
        "bundle": a.bundle,
        "rss_after_load_mb": loaded,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_memory.json").write_text(json.dumps(report, indent=2))
    md = [
        f"prefill_memory.py on {a.bundle}, {report['machine']['cpus']} cpus, onnxruntime "
        f"{report['versions']['onnxruntime']}; resident after load {loaded:.0f} MB",
        "",
        "| prompt tokens | seconds | resident after | growth over load |",
        "| ---: | ---: | ---: | ---: |",
    ]
    md += [
        f"| {r['tokens']} | {r['seconds']:.2f} | {r['rss_mb']:.0f} MB | {r['rss_mb'] - loaded:+.0f} MB |"
        for r in rows
    ]
    (out / "prefill_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
