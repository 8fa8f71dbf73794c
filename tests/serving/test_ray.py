"""onnxlm under Ray Serve: the option checks and the example config (no Ray started), and, marked slow,
`onnxlm serve --ray` with two replicas of a tiny bundle, one of them killed mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxlm.cli import cli
from onnxlm.runtime import load
from onnxlm.runtime.serving.app import create_app
from onnxlm.runtime.serving.ray_serve import DEPLOYMENT, ReplicaArgs, Scaling, deployment_options
from tests.bundles import build_bundle, tiny_bundle
from tests.serving.loopback import ServerThread, free_port, http

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ray_serve.yaml"


# --- without Ray ------------------------------------------------------------------------------------
def test_fixed_replicas_and_their_resources():
    opts = deployment_options(
        Scaling(replicas=2, cpus_per_replica=0.5, grace=7), ReplicaArgs("/b", max_batch=4)
    )
    assert opts["name"] == DEPLOYMENT and opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 0.5}
    assert opts["max_ongoing_requests"] == 4 + 64  # the replica's batch and queue, not Ray's default 5
    assert opts["graceful_shutdown_timeout_s"] == 7


def test_autoscaling_bounds():
    opts = deployment_options(Scaling(replicas=2, min_replicas=1, max_replicas=4), ReplicaArgs("/b"))
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 8.0,
    }
    # one bound given: the other defaults around --replicas
    assert Scaling(replicas=3, min_replicas=2).max_replicas == 3
    assert Scaling(replicas=2, max_replicas=5).min_replicas == 1


def test_ray_accepts_the_options():
    pytest.importorskip("ray")
    from onnxlm.runtime.serving.ray_serve import replica_class

    fixed = replica_class().options(
        **deployment_options(Scaling(replicas=2, cpus_per_replica=0.5), ReplicaArgs("/b"))
    )
    assert (fixed.num_replicas, fixed.ray_actor_options["num_cpus"], fixed.max_ongoing_requests) == (
        2,
        0.5,
        72,
    )
    scaled = replica_class().options(
        **deployment_options(
            Scaling(replicas=2, min_replicas=1, max_replicas=4, target_ongoing=3), ReplicaArgs("/b")
        )
    )
    auto = scaled._deployment_config.autoscaling_config  # Ray's own model, validated by options()
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas, auto.target_ongoing_requests) == (
        1,
        2,
        4,
        3,
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"replicas": 0}, "--replicas must be >= 1"),
        ({"cpus_per_replica": 0}, "--cpus-per-replica must be > 0"),
        (
            {"replicas": 5, "min_replicas": 1, "max_replicas": 4},
            "min-replicas <= --replicas <= --max-replicas",
        ),
        ({"target_ongoing": 4}, "--target-ongoing needs"),
    ],
)
def test_bad_scaling_is_refused(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Scaling(**kw)


def test_bad_replica_args_are_refused():
    with pytest.raises(ValueError, match="bundle path is required"):
        ReplicaArgs("")
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        ReplicaArgs("/b", max_batch=0)


def test_cli_refuses_bad_ray_options_before_starting_ray(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["serve", str(tmp_path), "--replicas", "2"])
    assert r.exit_code == 2 and "--replicas need --ray" in r.output
    r = runner.invoke(cli, ["serve", str(tmp_path), "--ray", "--replicas", "0"])
    assert r.exit_code == 1 and "--replicas must be >= 1, got 0" in r.output
    r = runner.invoke(cli, ["serve", str(tmp_path), "--ray", "--min-replicas", "3", "--max-replicas", "2"])
    assert r.exit_code == 1 and "autoscaling needs" in r.output


def test_more_cpus_than_a_local_ray_has_is_refused_not_waited_for():
    from onnxlm.runtime.serving.ray_serve import _check_cpus

    _check_cpus(Scaling(replicas=2, cpus_per_replica=0.5), 1.0)
    with pytest.raises(
        ValueError, match=r"2 replica\(s\) x 1 CPUs need 2 CPUs and this machine's Ray has 1:"
    ):
        _check_cpus(Scaling(replicas=2), 1.0)


def test_only_the_deployment_module_imports_ray():
    importers = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "onnxlm").rglob("*.py")
        if re.search(r"^\s*(import ray|from ray)\b", p.read_text(), re.M)
    ]
    assert importers == ["onnxlm/runtime/serving/ray_serve.py"]
    code = (
        "import sys, onnxlm, onnxlm.cli, onnxlm.runtime.serving.app, onnxlm.runtime.serving.ray_serve;"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_example_config_is_a_valid_serve_config():
    yaml = pytest.importorskip("yaml")
    schema = pytest.importorskip("ray.serve.schema")
    config = yaml.safe_load(EXAMPLE.read_text())
    schema.ServeDeploySchema.model_validate(config)  # Ray's own check, as `serve run`/`serve deploy` do
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("onnxlm.runtime.serving.ray_serve", "build")
    ReplicaArgs(**app["args"])  # the args are the builder's
    (dep,) = app["deployments"]
    assert dep["name"] == DEPLOYMENT


def test_config_builder_takes_string_args_and_keeps_the_batch_uncapped():
    pytest.importorskip("ray")
    from onnxlm.runtime.serving.ray_serve import build

    # `serve run onnxlm.runtime.serving.ray_serve:build bundle=/b max_batch=4` passes strings
    deployment = build(
        {"bundle": "/b", "max_batch": "4", "max_queue": "12", "providers": "A,B"}
    )._bound_deployment
    (args,) = deployment.init_args
    assert (args["max_batch"], args["max_queue"], args["providers"]) == (4, 12, ["A", "B"])
    assert deployment.max_ongoing_requests == 16  # not Ray's default 5
    with pytest.raises(ValueError, match="bundle path is required"):
        build({"bundle": ""})


def test_ready_reports_a_stopped_generation_loop():
    """What Ray's health check asks (Service.not_ready), seen through GET /ready."""
    srv = ServerThread(create_app(load(tiny_bundle("fused").path)))
    try:
        assert http("GET", srv.base + "/ready").status_code == 200
        assert srv.service.not_ready() is None
        srv.service.scheduler.close()
        r = http("GET", srv.base + "/ready")
        assert r.status_code == 503 and r.json()["reason"] == "the generation loop has stopped"
        assert srv.service.not_ready() == "the generation loop has stopped"
    finally:
        srv.stop()


# --- with Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """`onnxlm serve --ray` as a user runs it: two replicas of half a CPU each; the test joins its Ray."""
    pytest.importorskip("ray")
    pytest.importorskip("openai")
    # a long context, so a request can still be running when its replica is killed
    bundle = build_bundle(tmp_path_factory.mktemp("ray") / "tiny", context_length=4096, graph="fused").path
    port = free_port()
    cmd = [sys.executable, "-m", "onnxlm", "serve", str(bundle), "--ray", "--replicas", "2"]
    cmd += ["--cpus-per-replica", "0.5", "--port", str(port), "--grace", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not any("through Ray Serve" in line for line in lines):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("onnxlm serve --ray did not come up:\n" + "".join(lines))
        time.sleep(0.2)
    import ray

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    try:
        yield f"http://127.0.0.1:{port}", bundle
    finally:
        ray.shutdown()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        reader.join(5)
        assert rc == 0, "".join(lines)


def replica_pids() -> dict[str, int]:
    """Replica id -> its process id, from Ray's named actors (SERVE_REPLICA::app#deployment#id)."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::onnxlm#{DEPLOYMENT}#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids[actor["name"].rsplit("#", 1)[1]] = ray.get(
                handle.__ray_call__.remote(lambda self: os.getpid())
            )
    return pids


def replica_states():
    from ray import serve

    status = serve.status().applications["onnxlm"].deployments[DEPLOYMENT]
    return getattr(status.status, "value", status.status), dict(status.replica_states)


@pytest.mark.slow
def test_two_replicas_serve_the_openai_api_and_survive_a_killed_one(ray_server):
    import openai

    base, bundle = ray_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    name = bundle.name

    # the same API as `onnxlm serve`: answers equal the engine's, streamed or not, from either replica
    expected = load(bundle).generate("Once", max_new_tokens=12, temperature=0).text
    assert [m.id for m in client.models.list()] == [name]
    seen = set()
    for _ in range(8):
        raw = client.completions.with_raw_response.create(
            model=name, prompt="Once", max_tokens=12, temperature=0
        )
        seen.add(raw.headers["x-onnxlm-replica"])
        assert raw.parse().choices[0].text == expected
    streamed = client.completions.create(model=name, prompt="Once", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    chat = dict(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**chat).choices[0].message.content
    parts = client.chat.completions.create(**chat, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole
    bad = pytest.raises(openai.BadRequestError, match="temperature")
    with bad:
        client.completions.create(model=name, prompt="Once", temperature=-1)
    assert len(seen) == 2, "requests were routed to both replicas"
    metrics = http("GET", base + "/metrics")
    assert "onnxlm_requests_total" in metrics.text
    assert f'onnxlm_replica_info{{replica="{metrics.headers["x-onnxlm-replica"]}"}} 1.0' in metrics.text

    # and every replica's series through Ray's own metrics export, tagged with the replica
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.time() + 45  # Ray reports metrics every few seconds
    while True:
        exported = http("GET", f"http://127.0.0.1:{port}/metrics").text
        tagged = [line for line in exported.splitlines() if line.startswith("ray_onnxlm_requests")]
        if all(any(r in line for line in tagged) for r in seen):
            break
        assert time.time() < deadline, "\n".join(tagged) or exported[-2000:]
        time.sleep(1)
    assert any(
        line.startswith("ray_onnxlm_time_to_first_token_seconds_bucket") for line in exported.splitlines()
    )

    # long requests in flight on both replicas; kill the process of the one serving the first stream
    long = dict(model=name, prompt="Once", max_tokens=4000, temperature=0, extra_body={"ignore_eos": True})
    outcome: dict[str, tuple] = {}
    started = threading.Event()

    def stream(key):
        replica = None
        try:
            raw = client.completions.with_raw_response.create(**long, stream=True)
            replica = raw.headers["x-onnxlm-replica"]
            outcome[key + "-replica"] = (replica,)
            n = 0
            for chunk in raw.parse():
                n += bool(chunk.choices and chunk.choices[0].finish_reason is None)
                if n == 5 and key == "s0":
                    started.set()
            outcome[key] = ("ok", replica, time.time())
        except Exception as e:
            outcome[key] = ("error", replica, time.time(), e)

    def plain(key):
        try:
            raw = client.completions.with_raw_response.create(**long)
            outcome[key] = ("ok", raw.headers["x-onnxlm-replica"], time.time(), raw.parse().usage)
        except Exception as e:
            outcome[key] = ("error", None, time.time(), e)

    threads = [threading.Thread(target=stream, args=("s0",))]
    threads[0].start()
    assert started.wait(30), outcome
    threads += [threading.Thread(target=stream, args=("s1",))]
    threads += [threading.Thread(target=plain, args=(k,)) for k in ("p0", "p1")]
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)
    victim = outcome["s0-replica"][0]
    pids = replica_pids()
    assert set(pids) == seen and victim in pids
    assert "s0" not in outcome, "the stream ended before its replica was killed"
    killed_at = time.time()
    os.kill(pids[victim], signal.SIGKILL)

    # the endpoint keeps answering, from the survivor, while Ray replaces the dead replica
    for _ in range(5):
        r = client.completions.create(model=name, prompt="Once", max_tokens=12, temperature=0)
        assert r.choices[0].text == expected
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    # the stream on the dead replica ends with an error at once; requests elsewhere finish whole
    status, replica, ended, *rest = outcome["s0"]
    assert status == "error" and replica == victim and ended - killed_at < 15
    assert isinstance(rest[0], openai.APIConnectionError | openai.APIStatusError), rest
    for key in ("s1", "p0", "p1"):
        status, replica, ended, *rest = outcome[key]
        if status == "ok":
            assert replica != victim
            if key.startswith("p"):
                assert rest[0].completion_tokens == 4000
        else:  # it was on the dead replica: a 5xx from Ray's proxy or a cut connection, soon
            assert ended - killed_at < 15
            err = rest[0]
            assert isinstance(err, openai.APIConnectionError) or (
                isinstance(err, openai.APIStatusError) and err.status_code >= 500
            ), err

    # Ray restarts the replica: two healthy ones again, one of them new
    # (Serve may report two running replicas a moment before the new one is listed as a named actor)
    deadline = time.time() + 60
    while replica_states() != ("HEALTHY", {"RUNNING": 2}) or len(replica_pids()) != 2:
        assert time.time() < deadline, (replica_states(), replica_pids())
        time.sleep(0.5)
    fresh = set(replica_pids())
    assert len(fresh) == 2 and victim not in fresh
    r = client.chat.completions.create(**chat)
    assert r.choices[0].message.content == whole
