"""Load test for `onnxlm serve`: an open-loop generator on loopback.

    python benchmarks/serve.py BUNDLE                       # starts `onnxlm serve BUNDLE` on a free port
    python benchmarks/serve.py --url http://127.0.0.1:8000  # or measures a server already running
    python benchmarks/serve.py BUNDLE --ray-replicas 2      # starts `onnxlm serve BUNDLE --ray --replicas 2`

Phases (each request: a short prompt, `--max-tokens` tokens with ignore_eos, streamed):
1. single    one stream alone: decode tokens/s
2. batch     `--concurrency` streams at once: aggregate decode tokens/s (target >= 3x single) and the
             capacity in requests/s
3. load      `--requests` requests arriving open-loop (Poisson) at `--load` x capacity: requests/s,
             time to first token and inter-token latency p50/p99, tokens/s, failures (target 0)
4. overload  arrivals at `--overload` x capacity against a short queue: how fast rejections come back
             (target p99 < 100 ms) and the server's memory before/after (when this script started it)

Prints a markdown table; `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Result:
    status: int = 0
    start: float = 0.0
    first: float | None = None  # first token's arrival
    times: list[float] = field(default_factory=list)  # every content event's arrival
    tokens: int = 0
    end: float = 0.0
    error: str | None = None
    replica: str | None = None  # X-Onnxlm-Replica: which Ray Serve replica answered


async def one_request(host: str, port: int, body: dict, key: str | None) -> Result:
    """POST /v1/completions with stream: true over a raw connection; time every event."""
    res = Result(start=time.perf_counter())
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "")
        + "\r\n"
    ).encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + data)
        await writer.drain()
        res.status = int((await reader.readline()).split()[1])
        while line := (await reader.readline()).strip():  # headers
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "x-onnxlm-replica":
                res.replica = value.strip()
        if res.status != 200:
            await reader.read()
            res.error = f"HTTP {res.status}"
        else:
            async for line in reader:
                if not line.startswith(b"data: "):
                    continue  # chunk sizes, blank lines
                if line.startswith(b"data: [DONE]"):
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = event["error"]["message"]
                    continue
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["text"]:
                    now = time.perf_counter()
                    res.first = res.first or now
                    res.times.append(now)
        writer.close()
    except (OSError, ValueError, IndexError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.end = time.perf_counter()
    return res


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def summarize(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.status == 200 and r.error is None]
    ttft = [r.first - r.start for r in ok if r.first]
    itl = [b - a for r in ok for a, b in zip(r.times, r.times[1:], strict=False)]
    tokens = sum(r.tokens for r in ok)
    rejected = [r for r in results if r.status in (429, 503)]
    return {
        "requests": len(results),
        "ok": len(ok),
        "failures": len(results) - len(ok) - len(rejected),
        "rejected": len(rejected),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "reject_p50_s": pct([r.end - r.start for r in rejected], 50),
        "reject_p99_s": pct([r.end - r.start for r in rejected], 99),
        "errors": sorted({r.error for r in results if r.error and r.status not in (429, 503)})[:5],
        "by_replica": dict(collections.Counter(r.replica for r in ok if r.replica)),
    }


def decode_rate(results: list[Result]) -> float:
    """Aggregate decode tokens/s: tokens after the first over the span from first tokens to last."""
    ok = [r for r in results if r.first and len(r.times) > 1]
    if not ok:
        return 0.0
    span = max(r.times[-1] for r in ok) - min(r.first for r in ok)
    return sum(len(r.times) - 1 for r in ok) / span if span > 0 else 0.0


async def closed(host, port, key, body, n) -> tuple[list[Result], float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(host, port, body, key) for _ in range(n)))
    return list(results), time.perf_counter() - t0


async def open_loop(host, port, key, body, rate, n, seed=0) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.ensure_future(one_request(host, port, body, key)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_server(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "onnxlm", "-q", "serve", args.bundle, "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.ray_replicas:
        cmd += [
            "--ray",
            "--replicas",
            str(args.ray_replicas),
            "--cpus-per-replica",
            str(args.cpus_per_replica),
        ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        if models_ok(url, args.api_key):  # under Ray the port opens before the replicas are ready
            return proc, url
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not come up")


def models_ok(url: str, key: str | None) -> bool:
    import urllib.request

    req = urllib.request.Request(
        url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def fmt(x, unit="", scale=1.0, digits=1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}{unit}"


def table(report: dict) -> str:
    rows = [
        "| phase | requests | ok | failures | rejected | req/s | tok/s | TTFT p50 / p99 | ITL p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("single", "batch", "load", "overload"):
        s = report.get(name)
        if not s:
            continue
        rows.append(
            f"| {name} | {s['requests']} | {s['ok']} | {s['failures']} | {s['rejected']} | {s['requests_per_s']:.2f} | "
            f"{s['tokens_per_s']:.1f} | {fmt(s['ttft_p50_s'], ' ms', 1e3, 0)} / {fmt(s['ttft_p99_s'], ' ms', 1e3, 0)} | "
            f"{fmt(s['itl_p50_s'], ' ms', 1e3, 0)} / {fmt(s['itl_p99_s'], ' ms', 1e3, 0)} |"
        )
    d = report["derived"]
    rows += [
        "",
        f"- decode tokens/s: single {d['single_decode_tok_s']:.1f}, {d['concurrency']} streams {d['batch_decode_tok_s']:.1f} "
        f"(x{d['batch_speedup']:.2f}; target >= 3)",
        f"- capacity {d['capacity_req_s']:.2f} req/s; load at {d['load_rate_req_s']:.2f} req/s: "
        f"{report['load']['failures'] + report['load']['rejected'] if report.get('load') else '-'} failed or rejected (target 0)",
    ]
    spread = [
        f"{n} " + ", ".join(str(v) for v in sorted(b.values(), reverse=True))
        for n in ("batch", "load")
        if (b := report.get(n, {}).get("by_replica"))
    ]
    if spread:  # under Ray Serve: how the router spread the requests
        rows.append("- requests per replica: " + "; ".join(spread))
    if report.get("overload"):
        o = report["overload"]
        rows.append(
            f"- overload at {d['overload_rate_req_s']:.2f} req/s: {o['rejected']} rejected, p99 {fmt(o['reject_p99_s'], ' ms', 1e3, 0)} "
            f"(target < 100 ms); server RSS {fmt(d['rss_before_mb'], ' MB', 1, 0)} -> {fmt(d['rss_after_mb'], ' MB', 1, 0)}"
        )
    return "\n".join(rows)


async def run(args, host, port, pid) -> dict:
    body = {
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    report: dict = {"config": {k: v for k, v in vars(args).items() if k != "api_key"}}
    await closed(host, port, args.api_key, {**body, "max_tokens": 4}, 1)  # warm up
    single, el = await closed(host, port, args.api_key, body, 1)
    report["single"] = summarize(single, el)
    batch, el = await closed(host, port, args.api_key, body, args.concurrency)
    report["batch"] = summarize(batch, el)
    capacity = report["batch"]["requests_per_s"]
    derived = {
        "concurrency": args.concurrency,
        "single_decode_tok_s": decode_rate(single),
        "batch_decode_tok_s": decode_rate(batch),
        "capacity_req_s": capacity,
        "load_rate_req_s": args.rate or args.load * capacity,
        "overload_rate_req_s": args.overload * capacity,
    }
    derived["batch_speedup"] = (
        derived["batch_decode_tok_s"] / derived["single_decode_tok_s"]
        if derived["single_decode_tok_s"]
        else 0.0
    )
    report["derived"] = derived
    if args.requests and capacity:
        load, el = await open_loop(host, port, args.api_key, body, derived["load_rate_req_s"], args.requests)
        report["load"] = summarize(load, el)
    if args.overload_requests and capacity:
        derived["rss_before_mb"] = rss_mb(pid)
        over, el = await open_loop(
            host, port, args.api_key, body, args.overload * capacity, args.overload_requests, seed=1
        )
        report["overload"] = summarize(over, el)
        derived["rss_after_mb"] = rss_mb(pid)
    return report


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("bundle", nargs="?", help="start `onnxlm serve BUNDLE` (or give --url)")
    p.add_argument("--url", help="a running server")
    p.add_argument("--api-key", default=os.environ.get("ONNXLM_API_KEY"))
    p.add_argument("--prompt", default="Write a short note to a customer about their delayed order.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=500, help="requests in the load phase (0: skip)")
    p.add_argument("--load", type=float, default=0.8, help="load phase rate, as a fraction of capacity")
    p.add_argument(
        "--rate", type=float, default=None, help="load phase rate in requests/s (instead of --load)"
    )
    p.add_argument(
        "--overload", type=float, default=3.0, help="overload phase rate, as a multiple of capacity"
    )
    p.add_argument(
        "--overload-requests", type=int, default=300, help="requests in the overload phase (0: skip)"
    )
    p.add_argument("--max-batch", type=int, default=8, help="with BUNDLE: the server's --max-batch")
    p.add_argument("--max-queue", type=int, default=16, help="with BUNDLE: the server's --max-queue")
    p.add_argument("--threads", type=int, default=None, help="with BUNDLE: the server's --threads")
    p.add_argument(
        "--ray-replicas", type=int, default=0, help="with BUNDLE: serve it with `--ray --replicas N`"
    )
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="with --ray-replicas: CPUs Ray reserves per replica",
    )
    p.add_argument("--json", dest="json_path", help="write the report here")
    args = p.parse_args()
    if bool(args.bundle) == bool(args.url):
        p.error("give BUNDLE or --url")
    if args.ray_replicas and not args.bundle:
        p.error("--ray-replicas starts a server: give BUNDLE, not --url")
    proc = None
    if args.bundle:
        proc, args.url = start_server(args)
    parts = urlsplit(args.url)
    pid = proc.pid if proc and not args.ray_replicas else None  # under Ray the replicas are other processes
    try:
        report = asyncio.run(run(args, parts.hostname, parts.port or 80, pid))
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)
    print(table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
