"""`onnxlm serve` as a process: the CLI's options, the API key file, and SIGTERM draining (running and
queued streams finish within the grace period, or end with an error event and [DONE]; exit 0)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from onnxlm.runtime import load
from onnxlm.runtime.serving.app import create_app
from tests.bundles import tiny_bundle
from tests.serving.loopback import ServerThread, free_port, http, sse_lines


def start_server(*args, env=None):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "onnxlm",
        "serve",
        str(tiny_bundle("fused").path),
        "--port",
        str(port),
        "--threads",
        "1",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        try:
            if http("GET", base + "/health", timeout=1).status_code == 200:
                return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not come up")


def collect(base, body, out, headers=None):
    out.extend(sse_lines(base + "/v1/completions", body, headers=headers))


def events(lines):
    return [json.loads(x[6:]) for x in lines[1:] if x.startswith("data: {")]


@pytest.mark.parametrize("grace", [10.0, 0.0])
def test_sigterm_drains_then_exits_0(grace, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    proc, base = start_server(
        "--max-batch", "1", "--max-queue", "4", "--grace", str(grace), "--api-key-file", str(key_file)
    )
    auth = {"Authorization": "Bearer s3cret"}
    try:
        assert http("GET", base + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        assert http("GET", base + "/v1/models").status_code == 401
        body = {"prompt": "Once", "max_tokens": 100, "ignore_eos": True, "stream": True, "temperature": 0}
        results = [[] for _ in range(4)]
        threads = [threading.Thread(target=collect, args=(base, body, r, auth)) for r in results]
        for t in threads:
            t.start()
        # every request accepted (headers sent), one stream running, the others waiting in the queue
        while not (all(results) and any(len(r) > 2 for r in results)):
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    for r in results:
        assert r[0] == 200 and "data: [DONE]" in r[-2:], r[-3:]
        evs = events(r)
        if grace:
            assert evs[-1]["choices"][0]["finish_reason"] == "length"  # drained: every stream finished
            assert sum(len(e["choices"][0]["text"]) > 0 for e in evs) > 0
        else:
            assert "error" in evs[-1] or evs[-1]["choices"][0]["finish_reason"] == "length"
    if not grace:  # queued streams cannot have finished: they were ended with an error event
        assert sum("error" in events(r)[-1] for r in results) >= 2
    with pytest.raises(OSError):
        http("GET", base + "/health", timeout=2)  # no longer accepting


def test_cli_refuses_bad_options(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    bundle = str(tiny_bundle("fused").path)
    for args, message in [
        (["--api-key-file", str(empty)], "empty"),
        (["--api-key", "a", "--api-key-file", str(empty)], "not both"),
        (["--max-batch", "0"], "max-batch"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "onnxlm", "serve", bundle, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)


def test_draining_app_refuses_new_work_and_is_not_ready():
    srv = ServerThread(create_app(load(tiny_bundle("fused").path, threads=1)))
    try:
        srv.service.drain()
        assert http("GET", srv.base + "/ready").status_code == 503
        r = http("POST", srv.base + "/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert "retry-after" in r.headers
        assert http("GET", srv.base + "/health").status_code == 200
    finally:
        srv.stop()
