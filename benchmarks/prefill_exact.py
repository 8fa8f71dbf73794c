"""Does a prompt's prefill give the same logits however it runs? One bundle, the shipped prompts: a cold
prefill in one call against the same prompt in chunks of every given size, and against prefills that
start from the cold run's own KV of the first n positions (a prefix-cache hit leaving `left` tokens).
Reports each case's largest |logit difference| at the last position (0.0: bit for bit), and for the
int8 cache's forms which form the call took.

    python benchmarks/prefill_exact.py BUNDLE [--tokens 20,37,300] [--chunks 1,2,3,8,13,...] [--out results/]

No timing: the answer is the same or it is not. Writes prefill_exact.json and prefill_exact.md (with the
machine and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

import onnxlm
from onnxlm.runtime.driver import SharedRows, make_rows
from onnxlm.runtime.prefix import Hit

PROMPTS = Path(__file__).resolve().parent / "prompts"


def last_logits(model, prompt: list[int], chunk: int | None, hit: Hit | None = None):
    """(the last position's logits as float64, the row's KV per layer or None on the concat layout,
    whether the float32 form ran)."""
    rows = make_rows(model, chunk)
    job = rows.start([prompt], None if hit is None else [hit])
    try:
        logits = job.run()[0].astype(np.float64)
        kv = job.cache.read(0) if isinstance(rows, SharedRows) else None
        return logits, kv, bool(getattr(job, "float_form", False))
    finally:
        job.free()


def against(cold: np.ndarray, model, prompt: list[int], case: str, chunk: int | None, hit=None) -> dict:
    """One case's report row: its last logits' largest difference from the cold call's."""
    got, _, form = last_logits(model, prompt, chunk, hit)
    diff = float(np.abs(got - cold).max())
    return {"tokens": len(prompt), "case": case, "float_form": form, "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--tokens", default="20,37,300", help="prompt lengths (the first tokens of the prompts)")
    ap.add_argument("--chunks", default="1,2,3,7,8,13,16,64", help="chunk sizes, besides n-1 and n-2")
    ap.add_argument("--left", default="1,2,5,16,17", help="tokens a prefix hit leaves to prefill")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="results")
    a = ap.parse_args(argv)
    engine = onnxlm.load(a.bundle, threads=a.threads)
    model = engine.model
    text = "\n\n".join(p.read_text() for p in sorted(PROMPTS.glob("*.txt")))
    ids = engine.tokenizer.encode(text)
    rows = []
    for n in (int(x) for x in a.tokens.split(",")):
        prompt = ids[:n]
        cold, kv, _ = last_logits(model, prompt, None)
        chunks = sorted({int(c) for c in a.chunks.split(",")} | {n - 1, n - 2})
        for c in (c for c in chunks if 0 < c < n):
            rows.append(against(cold, model, prompt, f"chunks of {c} (last {n % c or c})", c))
        if kv is None:
            continue  # the concat layout reuses no prefix
        for left in (int(x) for x in a.left.split(",")):
            if 0 < left < n:
                k = n - left
                hit = Hit(k, [x[:, :k] for x in kv])
                rows.append(against(cold, model, prompt, f"hit of {k}, {left} left", 512, hit))
    import onnxruntime

    report = {
        "bundle": a.bundle,
        "float_prefill_above": engine.manifest.io.float_prefill_above,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_exact.json").write_text(json.dumps(report, indent=2))
    md = [
        f"prefill_exact.py on {a.bundle}, {report['machine']['cpus']} cpus, "
        f"onnxruntime {report['versions']['onnxruntime']}; the last position's max |logit difference| "
        "against one cold call",
        "",
        "| tokens | case | float32 form | max abs diff |",
        "| ---: | --- | --- | ---: |",
    ]
    md += [f"| {r['tokens']} | {r['case']} | {r['float_form']} | {r['max_abs_diff']:.5f} |" for r in rows]
    (out / "prefill_exact.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
