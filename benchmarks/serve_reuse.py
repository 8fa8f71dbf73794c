"""The server not doing work twice, measured against a running `onnxlm serve` (started here on
loopback): prefix reuse across chat turns, running streams while a long prompt is prefilled, a burst
of long requests whose clients leave, and the KV memory rows hold.

    python benchmarks/serve_reuse.py BUNDLE [--threads 2] [--out results/]

1. chat: a ~1,500-token history (a handbook as the system message, earlier turns), turn after turn;
   time to first token of each turn and `usage.prompt_tokens_details.cached_tokens`; then each turn's
   request once more (a retry), with its time to first token and whether the answer is the first's.
2. prefill: four streams decoding; a ~2,000-token prompt arrives; the streams' inter-token gaps over
   the whole prefill (median, p99).
3. abandoned: 20 streamed requests with max_tokens 10000 read their first token and disconnect; then
   the time to answer a new request.
4. memory: 8 streams of ~100-token prompts asking 8,000 tokens; the KV bytes the server holds
   (`onnxlm_kv_cache_bytes` in /metrics) after each has generated N tokens.
Writes serve_reuse.json and serve_reuse.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

THIS = Path(__file__).resolve()
PROMPTS = THIS.parent / "prompts"


class Server:
    """`onnxlm serve BUNDLE` on loopback (batch 8, queue 64 unless `extra` says otherwise); its log
    goes to `log` (a file: a pipe nobody reads would fill and stall a server that logs much)."""

    def __init__(self, bundle: str, threads: int, port: int, extra: list[str] | None = None, log=None):
        self.port = port
        cmd = [sys.executable, "-m", "onnxlm", "serve", bundle, "--port", str(port), "--max-batch", "8"]
        cmd += ["--threads", str(threads), "--max-queue", "64", *(extra or [])]
        self.log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server did not start (its log: {log})")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def get(self, path: str) -> tuple[int, str]:
        c = self.conn()
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()

    def stream(self, body: dict, on_token, stop_after: int | None = None) -> dict:
        """POST a streamed chat request; on_token(time) per content delta; returns usage (if sent)."""
        c = self.conn()
        c.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
            {"Content-Type": "application/json"},
        )
        r = c.getresponse()
        usage, n = {}, 0
        self.text = ""  # the answer's content, for the caller to compare
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for ch in event.get("choices", []):
                if ch.get("delta", {}).get("content"):
                    self.text += ch["delta"]["content"]
                    n += 1
                    on_token(time.perf_counter())
            if stop_after is not None and n >= stop_after:
                c.close()  # the client leaves
                return usage
        return usage

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def chat_turns(srv: Server, turns: int = 4) -> list[dict]:
    doc = (PROMPTS / "leave_policy.txt").read_text() + "\n" + (PROMPTS / "returns_policy.txt").read_text()
    history = [{"role": "system", "content": "Answer from this handbook only.\n\n" + doc}]
    questions = [
        "How many days of annual leave do full-time employees get?",
        "And how many can be carried over?",
        "What happens if I am sick for more than three days?",
        "How long is partner leave?",
        "Can I take a sabbatical?",
    ]
    out, requests = [], []

    def ask(messages: list[dict]) -> dict:
        t0, first = time.perf_counter(), []
        usage = srv.stream(
            {"messages": messages, "max_tokens": 48, "temperature": 0},
            lambda t, first=first: first.append(t) if not first else None,
        )
        return {
            "ttft_s": first[0] - t0 if first else float("nan"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens"),
            "text": srv.text,
        }

    for q in questions[:turns]:
        history.append({"role": "user", "content": q})
        requests.append(list(history))
        out.append(ask(history))
        history.append(
            {"role": "assistant", "content": "(answer)"}
        )  # a short stand-in keeps turns comparable
    for turn, messages in enumerate(requests):  # each request again, as a client's retry
        again = ask(messages)
        out.append({**again, "retry_of": turn + 1, "same_answer": again["text"] == out[turn]["text"]})
    return out


def prefill_stall(srv: Server) -> dict:
    gaps: list[list[float]] = [[] for _ in range(4)]
    stamps: list[list[float]] = [[] for _ in range(4)]
    window: dict[str, float] = {}

    def run(i):
        body = {
            "messages": [{"role": "user", "content": f"Write a long story number {i}."}],
            "max_tokens": 400,
        }
        srv.stream({**body, "temperature": 0, "ignore_eos": True}, stamps[i].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)  # the four are decoding
    doc = "\n".join(
        (PROMPTS / n).read_text() for n in ("leave_policy.txt", "returns_policy.txt", "meeting_notes.txt")
    )
    window["start"] = time.perf_counter()
    first: list[float] = []
    srv.stream(
        {"messages": [{"role": "user", "content": "Summarise:\n" + doc}], "max_tokens": 1, "temperature": 0},
        lambda t: first.append(t),
    )
    window["end"] = first[0] if first else time.perf_counter()
    for t in threads:
        t.join()
    during, before = [], []
    for i in range(4):
        s = stamps[i]
        for a, b in zip(s, s[1:], strict=False):
            (during if window["start"] <= b <= window["end"] else before).append(b - a)
        gaps[i] = [b - a for a, b in zip(s, s[1:], strict=False)]
    allg = sorted(g for g in during)
    every = sorted(g for gs in gaps for g in gs)
    p99 = allg[int(0.99 * (len(allg) - 1))] if allg else float("nan")
    return {
        "prefill_s": window["end"] - window["start"],
        "gaps_during_prefill": len(allg),
        "median_gap_s": statistics.median(every) if every else float("nan"),
        "p99_gap_during_prefill_s": p99,
        "max_gap_during_prefill_s": max(allg) if allg else float("nan"),
    }


def abandoned(srv: Server, n: int = 20) -> dict:
    threads = []
    for i in range(n):
        body = {
            "messages": [{"role": "user", "content": f"Count to ten thousand, {i}."}],
            "max_tokens": 10000,
        }
        t = threading.Thread(target=srv.stream, args=({**body, "ignore_eos": True}, lambda t: None, 1))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    t0, first = time.perf_counter(), []
    srv.stream({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, lambda t: first.append(t))
    return {"new_request_first_token_s": (first[0] - t0) if first else float("nan")}


def memory(srv: Server, rows: int = 8, checkpoints=(50, 200, 400)) -> dict:
    counts = [0] * rows
    stop = threading.Event()

    def run(i):
        def tick(t):
            counts[i] += 1
            if stop.is_set():
                raise ConnectionAbortedError

        body = {
            "messages": [{"role": "user", "content": "Tell me about the sea. " * 12 + str(i)}],
            "max_tokens": 8000,
        }
        try:
            srv.stream({**body, "ignore_eos": True}, tick)
        except (ConnectionAbortedError, OSError):
            pass

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(rows)]
    for t in threads:
        t.start()
    out = {}
    for c in checkpoints:
        while min(counts) < c:
            time.sleep(0.05)
        out[f"kv_mb_after_{c}_tokens"] = srv.metric("onnxlm_kv_cache_bytes") / 1e6
    stop.set()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--out", default="results")
    ap.add_argument("--parts", default="chat,prefill,abandoned,memory")
    a = ap.parse_args()
    parts = a.parts.split(",")
    results: dict = {"bundle": a.bundle, "python": platform.python_version(), "cpus": os.cpu_count()}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    srv = Server(a.bundle, a.threads, a.port, log=Path(a.out) / "serve_reuse.log")
    try:
        if "chat" in parts:
            results["chat"] = chat_turns(srv)
        if "prefill" in parts:
            results["prefill"] = prefill_stall(srv)
        if "abandoned" in parts:
            results["abandoned"] = abandoned(srv)
        if "memory" in parts:
            results["memory"] = memory(srv)
    finally:
        srv.stop()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_reuse.json").write_text(json.dumps(results, indent=2))
    md = [f"serve_reuse.py on {a.bundle}, {a.threads} threads", ""]
    for turn, t in enumerate(results.get("chat", []), 1):
        what = f"turn {turn}" if "retry_of" not in t else f"turn {t['retry_of']} again"
        same = "" if "retry_of" not in t else f", same answer: {'yes' if t['same_answer'] else 'no'}"
        md.append(
            f"- chat {what}: TTFT {t['ttft_s'] * 1000:.0f} ms, prompt {t['prompt_tokens']}, "
            f"cached {t['cached_tokens']}{same}"
        )
    for key in ("prefill", "abandoned", "memory"):
        if key in results:
            md.append(f"- {key}: " + ", ".join(f"{k} {v:.3g}" for k, v in results[key].items()))
    (out / "serve_reuse.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
