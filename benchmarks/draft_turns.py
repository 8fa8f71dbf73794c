"""A target and its draft model take turns on the same cores: what each session's thread spinning
costs the other.

    python benchmarks/draft_turns.py TARGET_BUNDLE DRAFT_BUNDLE --context 1000 --rounds 10 --out results/

For each setting of the two sessions (both spin between runs, only the target does, neither does:
onnxruntime's `session.force_spinning_stop`, onnxlm's `session_options(idle_spin=False)`), after a
prefill of --context token ids in both: the target's verify of --width tokens alone, and right after
--draft-steps one-token steps of the draft (which are timed too), then the target's one-token step
right after those. Each setting runs in its own process, one after another, so that no idle session of
another setting shares the cores; medians over --rounds. Writes draft_turns.json and draft_turns.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speculate import versions

SETTINGS = {"both spin": (True, True), "draft stops": (True, False), "both stop": (False, False)}


def measure(target: str, draft: str, spins: tuple[bool, bool], a) -> dict[str, float]:
    import numpy as np

    from onnxlm.bundle import MODEL, check_bundle
    from onnxlm.runtime.driver import make_rows
    from onnxlm.runtime.generate import Model
    from onnxlm.runtime.session import make_session

    vocab = check_bundle(Path(target)).model.vocab_size
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, vocab, a.context)]

    def rows_of(path: str, spin: bool):
        root = Path(path)
        session = make_session(root / MODEL, threads=a.threads, idle_spin=spin)
        rows = make_rows(Model(session, check_bundle(root)), 512)
        job = rows.start([prompt])
        job.run()
        rows.join(job)
        for _ in range(3):  # the first steps grow the KV buffer
            rows.decode([[5]])
        return rows

    t_rows, d_rows = rows_of(target, spins[0]), rows_of(draft, spins[1])

    def timed(rows, width: int) -> float:
        t0 = time.perf_counter()
        rows.decode([[7] * width])
        secs = time.perf_counter() - t0
        if width > 1:
            rows.rollback(0, width)
        return secs * 1e3

    out: dict[str, list[float]] = {
        "verify alone": [],
        "draft step": [],
        "verify after draft": [],
        "step after": [],
    }
    for _ in range(a.rounds):
        for _ in range(4):
            timed(t_rows, 1)
        out["verify alone"].append(timed(t_rows, a.width))
        for _ in range(a.draft_steps):
            out["draft step"].append(timed(d_rows, 1))
        out["verify after draft"].append(timed(t_rows, a.width))
        out["step after"].append(timed(t_rows, 1))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target")
    ap.add_argument("draft")
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--width", type=int, default=4, help="tokens in the target's verify call")
    ap.add_argument("--draft-steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=__import__("os").cpu_count())
    ap.add_argument("--setting", choices=sorted(SETTINGS), help=argparse.SUPPRESS)  # one, in a child
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    if a.setting:
        print(json.dumps(measure(a.target, a.draft, SETTINGS[a.setting], a)))
        return
    results = {"versions": versions(), "context": a.context, "width": a.width, "settings": {}}
    for name in SETTINGS:
        child = [sys.executable, __file__, *sys.argv[1:], "--setting", name]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: {done.stderr[-3000:]}")
        results["settings"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results["settings"][name], file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft_turns.json").write_text(json.dumps(results, indent=2))
    md = [
        f"draft_turns.py: context {a.context}, verify of {a.width} tokens, {a.draft_steps} draft steps, "
        f"{a.rounds} rounds, {a.threads} threads; {results['versions']}",
        "",
        "| sessions | verify alone | draft step | verify after draft steps | step after |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["settings"].items():
        md.append(
            f"| {name} | {r['verify alone']:.1f} ms | {r['draft step']:.1f} ms | "
            f"{r['verify after draft']:.1f} ms | {r['step after']:.1f} ms |"
        )
    (out / "draft_turns.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
