"""A burst of the requests a chat service gets, all at once, against a real `onnxlm serve` (started
here on loopback): does every request get its answer, and is each greedy or seeded answer the one
the same request gets alone?

    python benchmarks/serve_load.py BUNDLE [--requests 64] [--draft ngram] [--threads 2] [--out results/]

Kinds, in turn (seeded, started a few ms apart): a next chat turn over a shared ~600-token system
prompt (greedy), a new short chat (greedy), a completion of 3 to 300 words (greedy), a JSON-schema
answer (sampled with a seed), a required tool call, a streamed chat with n=2 (sampled with a seed),
and a streamed long answer whose client leaves after a few events. Reports per kind how many answered
and every failure by HTTP status (429 is the server's queue saying "later", counted apart), the wall
time, and for the greedy and seeded kinds how many answers under load equal the same request sent
alone afterwards. Writes serve_load.json and serve_load.md (with the machine and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from serve_reuse import PROMPTS, Server

KINDS = ("turn", "chat", "completion", "json", "tools", "stream_n", "leave")
GREEDY = ("turn", "chat", "completion")
SEEDED = ("json", "stream_n")  # sampled with a seed: the same request alone samples the same tokens
SCHEMA = {
    "type": "object",
    "properties": {"item": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["item", "days"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "leave_balance",
            "description": "An employee's remaining leave days",
            "parameters": {
                "type": "object",
                "properties": {"employee": {"type": "string"}},
                "required": ["employee"],
            },
        },
    }
]


def body_for(kind: str, i: int, handbook: str) -> tuple[str, dict]:
    """(path, body) of request i of `kind`."""
    system = {"role": "system", "content": "Answer from this handbook only.\n\n" + handbook}
    if kind == "turn":
        earlier = [
            system,
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hello! Ask me."},
        ]
        msgs = [*earlier, {"role": "user", "content": f"Question {i}: how many leave days do I get?"}]
        return "/v1/chat/completions", {"messages": msgs, "max_tokens": 24, "temperature": 0}
    if kind == "chat":
        ask = ["Say hi.", "用一句话介绍你自己。", "Name a colour.", "What is 2 + 3?"][i % 4]
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": ask}],
            "max_tokens": 16,
            "temperature": 0,
        }
    if kind == "completion":
        words = ["one", "two", "three"] * (1 + (i * 37) % 100)
        return "/v1/completions", {"prompt": " ".join(words), "max_tokens": 12, "temperature": 0}
    if kind == "json":
        fmt = {"type": "json_schema", "json_schema": {"name": "leave", "schema": SCHEMA}}
        msgs = [system, {"role": "user", "content": "Which leave and how many days?"}]
        return "/v1/chat/completions", {"messages": msgs, "response_format": fmt, "max_tokens": 48, "seed": i}
    if kind == "tools":
        msgs = [{"role": "user", "content": f"How many leave days does employee E{i} have left?"}]
        body = {"messages": msgs, "tools": TOOLS, "tool_choice": "required", "max_tokens": 48}
        return "/v1/chat/completions", body
    if kind == "stream_n":
        msgs = [system, {"role": "user", "content": "Summarise the leave rules."}]
        return "/v1/chat/completions", {"messages": msgs, "max_tokens": 16, "n": 2, "stream": True, "seed": i}
    msgs = [{"role": "user", "content": "Write a long story about a lighthouse."}]
    return "/v1/chat/completions", {"messages": msgs, "max_tokens": 4000, "stream": True}


def send(srv: Server, path: str, body: dict, leave_after: int | None = None) -> tuple[int, str, int | None]:
    """(HTTP status, the answer's text: content, or the streamed deltas joined, the prompt tokens the
    prefix cache gave it: a non-streamed answer's usage says)."""
    c = srv.conn()
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200 or not body.get("stream"):
        raw = r.read().decode()
        if r.status != 200:
            return r.status, raw[:300], None
        answer = json.loads(raw)
        choice = answer["choices"][0]
        cached = ((answer.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        return 200, choice.get("text") or (choice.get("message") or {}).get("content") or "", cached
    texts: dict[int, str] = {}  # by choice index: n choices' deltas arrive interleaved
    events = 0
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            return 503, json.dumps(event)[:300], None
        events += 1
        for ch in event.get("choices", []):
            texts[ch["index"]] = texts.get(ch["index"], "") + ((ch.get("delta") or {}).get("content") or "")
        if leave_after is not None and events >= leave_after:
            c.close()  # the client leaves
            break
    return 200, "\n---\n".join(texts[i] for i in sorted(texts)), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--draft", default=None, help="passed to onnxlm serve --draft")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--port", type=int, default=8094)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    handbook = (PROMPTS / "leave_policy.txt").read_text()[:2500]
    rng = random.Random(a.seed)
    plan = [(KINDS[i % len(KINDS)], i) for i in range(a.requests)]
    results: list[tuple[str, int, int, str, int | None] | None] = [None] * len(plan)
    extra = ["--max-queue", str(4 * a.requests)] + (["--draft", a.draft] if a.draft else [])
    srv = Server(a.bundle, a.threads, a.port, extra, log=out / "serve_load.log")
    try:

        def run(slot: int, kind: str, i: int) -> None:
            path, body = body_for(kind, i, handbook)
            try:
                status, text, cached = send(srv, path, body, leave_after=3 if kind == "leave" else None)
            except OSError as e:
                status, text, cached = 0, repr(e), None
            results[slot] = (kind, i, status, text, cached)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(s, k, i)) for s, (k, i) in enumerate(plan)]
        for t in threads:
            t.start()
            time.sleep(rng.random() * 0.02)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        same, differed = Counter(), []
        for kind, i, status, text, cached in (r for r in results if r is not None):
            if kind in GREEDY + SEEDED and status == 200:
                path, body = body_for(kind, i, handbook)
                _, alone, cached_alone = send(srv, path, body)
                same[kind, alone == text] += 1
                if alone != text:  # how much of its prompt each run took from the prefix cache
                    differed.append(
                        {"kind": kind, "i": i, "cached_under_load": cached, "cached_alone": cached_alone}
                    )
    finally:
        srv.stop()
    import onnxruntime

    done = [r[:4] for r in results if r is not None]
    report = {
        "bundle": a.bundle,
        "draft": a.draft,
        "requests": a.requests,
        "wall_s": wall,
        "answered": dict(Counter(k for k, _, s, _ in done if s == 200)),
        "busy_429": sum(s == 429 for _, _, s, _ in done),
        "failed": [{"kind": k, "i": i, "status": s, "text": t} for k, i, s, t in done if s not in (200, 429)],
        "greedy_same_as_alone": {k: same[k, True] for k in GREEDY},
        "greedy_different": {k: same[k, False] for k in GREEDY},
        "seeded_same_as_alone": {k: same[k, True] for k in SEEDED},
        "seeded_different": {k: same[k, False] for k in SEEDED},
        "differed": differed,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
    }
    (out / "serve_load.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    md = [
        f"serve_load.py on {a.bundle} (draft {a.draft}), {a.requests} requests, {a.threads} threads, "
        f"{report['machine']['cpus']} cpus, onnxruntime {report['versions']['onnxruntime']}",
        "",
        f"- wall {wall:.1f} s; answered {sum(report['answered'].values())}: {report['answered']}",
        f"- busy (429): {report['busy_429']}; failed: {len(report['failed'])}",
        f"- greedy answers under load equal to alone: {report['greedy_same_as_alone']}, "
        f"different: {report['greedy_different']}",
        f"- seeded sampled answers under load equal to alone: {report['seeded_same_as_alone']}, "
        f"different: {report['seeded_different']}",
    ]
    md += [
        f"  - {d['kind']} {d['i']} differed: prompt tokens from the prefix cache {d['cached_under_load']} "
        f"under load, {d['cached_alone']} alone"
        for d in differed
    ]
    md += [f"  - failed {f['kind']} {f['i']}: {f['status']} {f['text'][:160]}" for f in report["failed"][:10]]
    (out / "serve_load.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
