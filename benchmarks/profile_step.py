"""Where a decode step's time goes: onnxruntime's profiler over greedy decode steps of one bundle,
by operator type, beside the wall time of the steps and the Python side of the loop.

    python benchmarks/profile_step.py BUNDLE [BUNDLE ...] --context 100 --tokens 64 --out results/

For each bundle: wall ms per decode step (whole generate_steps round: graph call + sampling), the
time onnxruntime reports for its runs (model_run), what the operators inside add up to, by op type
(nodes inside an If's branches are counted under their own op type, and the If under "If (own)":
its time minus its branches'), and the remainder (the Python loop, binding, sampling). Writes
profile.json and profile.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path


def profiled_engine(bundle: str, threads: int, prefix: str):
    import onnxruntime as ort

    from onnxlm.bundle import MODEL, check_bundle
    from onnxlm.runtime import Engine
    from onnxlm.runtime.session import choose_providers, session_options

    root = Path(bundle)
    manifest = check_bundle(root)
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    session = ort.InferenceSession(str(root / MODEL), sess_options=so, providers=choose_providers(None))
    return Engine.from_parts(root, manifest, session, prefix_cache_mb=0)


def summarize(trace: list[dict], skip_runs: int) -> dict:
    """Per op type total µs over the decode runs (the first skip_runs model_run events are prefill)."""
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"])
    if len(runs) <= skip_runs:
        raise SystemExit("the profile holds no decode runs")
    decode = runs[skip_runs:]
    start = decode[0]["ts"]
    end = decode[-1]["ts"] + decode[-1]["dur"]
    by_op: dict[str, float] = defaultdict(float)
    if_total = 0.0
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not start <= e["ts"] <= end:
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op == "If":
            if_total += e["dur"]
        else:
            by_op[op] += e["dur"]
    inner = sum(by_op.values())
    n = len(decode)
    return {
        "runs": n,
        "model_run_us": sum(e["dur"] for e in decode) / n,
        "ops_us": {k: v / n for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "if_us": if_total / n,
        "ops_total_us": inner / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for bundle in a.bundles:
        engine = profiled_engine(bundle, a.threads, str(out / "ort_profile"))
        text = (Path(__file__).parent.parent / "onnxlm" / "data" / "eval_en.txt").read_text(encoding="utf-8")
        ids = engine.tokenizer.encode(text)[: a.context]
        chunks = (a.context + 511) // 512
        step_s = []
        t_prev = None
        for step in engine.steps([ids], max_new_tokens=a.tokens, ignore_eos=True):
            now = time.perf_counter()
            if step.index > 1:
                step_s.append(now - t_prev)
            t_prev = now
        path = engine.model.session.end_profiling()
        trace = json.loads(Path(path).read_text())
        Path(path).unlink()
        s = summarize(trace, chunks)
        wall_us = statistics.median(step_s) * 1e6
        s["wall_step_us"] = wall_us
        s["outside_onnxruntime_us"] = wall_us - s["model_run_us"]
        report[bundle] = s
        print(f"{bundle}: {wall_us:.0f} µs a step, model_run {s['model_run_us']:.0f}", file=sys.stderr)
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    md = [f"profile_step.py: context {a.context}, {a.tokens} decode steps, µs per step", ""]
    for bundle, s in report.items():
        md += [f"#### {bundle}", ""]
        md.append(
            f"wall {s['wall_step_us']:.0f} = onnxruntime model_run {s['model_run_us']:.0f} + outside "
            f"(Python loop, binding, sampling) {s['outside_onnxruntime_us']:.0f}; operators "
            f"{s['ops_total_us']:.0f}, If nodes (incl. their branches) {s['if_us']:.0f}"
        )
        md += ["", "| op | µs/step | share of model_run |", "| --- | ---: | ---: |"]
        for op, us in list(s["ops_us"].items())[:12]:
            md.append(f"| {op} | {us:.0f} | {us / s['model_run_us']:.0%} |")
        md.append("")
    (out / "profile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
