"""onnxlm as replicas under Ray Serve: each replica loads the bundle into an Engine and serves
`create_app`'s OpenAI endpoints (same request models, validation and streaming) through Ray Serve's
ASGI ingress. Ray brings replicas, routing, autoscaling, health checks, restarts and multi-node; each
replica's scheduler still batches the requests Ray routes to it.

    onnxlm serve BUNDLE --ray --replicas 2                 # a local Ray, or --ray-address to join one
    serve run examples/ray_serve.yaml                       # Ray's own CLI, with a config file
    serve run onnxlm.runtime.serving.ray_serve:build bundle=/abs/path/to/bundle

Needs the `ray` extra (`pip install 'onnxlm[ray]'`); ray is imported here only, and lazily, so the
option checks below work without it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("onnxlm.serving")

APP_NAME = "onnxlm"
DEPLOYMENT = "onnxlm"  # the name a config file's `deployments:` entry overrides


@dataclass
class ReplicaArgs:
    """What each replica needs to build its app: the arguments of `build` (a config file's `args:`)."""

    bundle: str
    model_name: str | None = None
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    threads: int | None = None
    providers: list[str] | None = None
    draft: str | None = None  # "ngram" or a draft bundle's path (on every node)
    prefix_cache_mb: float = 256
    draft_inexact: bool = False  # speculate on a graph that verifies inexactly (Engine.use_draft)
    allowed_hosts: list[str] | None = None  # without a key: Host names answered besides loopback ones
    cors_origins: list[str] | None = None  # web origins allowed to call from a browser (CORS)

    def __post_init__(self):
        if not self.bundle:
            raise ValueError("a bundle path is required (args: {bundle: /path/to/bundle})")
        if self.max_batch < 1 or self.max_queue < 0:
            raise ValueError(
                f"max_batch must be >= 1 and max_queue >= 0, got {self.max_batch}, {self.max_queue}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass
class Scaling:
    """How many replicas and what each gets. `min_replicas`/`max_replicas` switch on Ray's autoscaler,
    which starts at `replicas` and aims at `target_ongoing` requests per replica."""

    replicas: int = 1
    cpus_per_replica: float = 1.0
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing: float | None = None
    grace: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"--cpus-per-replica must be > 0, got {self.cpus_per_replica}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            if self.min_replicas is None:
                self.min_replicas = 1
            else:
                self.max_replicas = max(self.min_replicas, self.replicas)
        if self.min_replicas is not None:
            if not 0 <= self.min_replicas <= self.replicas <= self.max_replicas:
                raise ValueError(
                    "autoscaling needs 0 <= --min-replicas <= --replicas <= --max-replicas, got "
                    f"{self.min_replicas}, {self.replicas}, {self.max_replicas}"
                )
        elif self.target_ongoing is not None:
            raise ValueError("--target-ongoing needs --min-replicas or --max-replicas (autoscaling)")


def deployment_options(scaling: Scaling, args: ReplicaArgs) -> dict[str, Any]:
    """Ray Serve `deployment.options(...)` for these replicas (plain data, so testable without ray)."""
    opts: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica},
        # Ray's default (5) would cap each replica's batch; let the scheduler's own queue (and 429) decide.
        "max_ongoing_requests": args.max_batch + args.max_queue,
        "graceful_shutdown_timeout_s": scaling.grace,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    if scaling.min_replicas is None:
        opts["num_replicas"] = scaling.replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing or float(args.max_batch),
        }
    opts.update(scaling.extra)
    return opts


def _assigned_threads() -> int:
    """As many onnxruntime threads as CPUs Ray gave the replica (onnxruntime's default, a thread per
    core, oversubscribes a machine that replicas share)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


@functools.cache
def replica_class():
    """The deployment class (built on first use so importing this module needs no ray)."""
    from ray import serve

    class OnnxlmReplica:
        """One replica: an Engine, its scheduler, and the OpenAI app Ray's proxy forwards to."""

        def __init__(self, args: dict[str, Any]):
            from ..engine import Engine
            from .app import create_app

            a = ReplicaArgs(**args)
            a.threads = a.threads or _assigned_threads()
            engine = Engine.load(
                a.bundle,
                providers=a.providers,
                threads=a.threads,
                draft=a.draft,
                prefix_cache_mb=a.prefix_cache_mb,
                draft_inexact=a.draft_inexact,
            )
            self._app = create_app(
                engine,
                model_name=a.model_name,
                api_key=a.api_key,
                max_batch=a.max_batch,
                max_queue=a.max_queue,
                allowed_hosts=a.allowed_hosts or (),
                cors_origins=a.cors_origins or (),
            )
            self._svc = self._app.state.service
            self._svc.scheduler.start()
            self._app.state.replica = _replica_id()
            self._stop_gauges = _mirror_to_ray(self._svc.metrics)
            log.warning("replica %s (pid %d) serves %s", self._app.state.replica, os.getpid(), a.bundle)

        def __serve_build_asgi_app__(self):
            return _tag_responses(self._app, self._app.state.replica)

        def check_health(self) -> None:
            """Ray calls this every health_check_period_s; raising makes Ray replace the replica."""
            reason = self._svc.not_ready()
            if reason:
                raise RuntimeError(f"onnxlm replica not ready: {reason}")

        def __del__(self):
            self._stop_gauges.set()
            self._svc.scheduler.close(timeout=5)

    return serve.deployment(name=DEPLOYMENT)(serve.ingress()(OnnxlmReplica))


def _tag_responses(app, replica: str):
    """Every response says which replica made it (X-Onnxlm-Replica): for logs, metrics and debugging."""
    header = (b"x-onnxlm-replica", replica.encode())

    async def tagged(scope, receive, send):
        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, send_tagged if scope["type"] == "http" else send)

    return tagged


def _mirror_to_ray(m) -> threading.Event:
    """Record every series into Ray's metrics too. Ray tags them with the application, deployment and
    replica and exports them from each node's metrics port, so Prometheus gets every replica's series
    (GET /metrics through Ray's proxy reaches one replica at a time). Returns what stops the gauges."""
    from ray.serve import metrics as rm

    for c in (m.requests, m.prompt_tokens, m.completion_tokens):
        counter = rm.Counter(c.name.removesuffix("_total"), description=c.help, tag_keys=c.labels or None)
        c.mirrors.append(
            lambda amount, labels, counter=counter, keys=c.labels: counter.inc(
                amount, tags=dict(zip(keys, labels, strict=True))
            )
        )
    for h in (m.ttft, m.itl, m.duration):
        h.mirrors.append(rm.Histogram(h.name, description=h.help, boundaries=list(h.buckets)).observe)
    gauges = [(rm.Gauge(g.name, description=g.help), g.read) for g in (m.queue, m.active)]
    stop = threading.Event()

    def poll() -> None:  # our gauges are read at scrape time; Ray's must be set
        while not stop.wait(1.0):
            for gauge, read in gauges:
                gauge.set(read())

    threading.Thread(target=poll, name="onnxlm-ray-gauges", daemon=True).start()
    return stop


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (tests)
        return f"pid-{os.getpid()}"


def build(args: dict[str, Any]):
    """The application builder Ray's `serve run` and config files point at (`import_path:
    onnxlm.runtime.serving.ray_serve:build`); `args` are ReplicaArgs' fields. Replica counts and
    resources come from the config's `deployments:` entry named "onnxlm"."""
    a = ReplicaArgs(**{k: _coerce(k, v) for k, v in args.items()})
    # defaults a config's deployment entry may override; Ray's own max_ongoing_requests (5) caps the batch
    keep = ("max_ongoing_requests", "health_check_period_s", "health_check_timeout_s")
    defaults = {k: v for k, v in deployment_options(Scaling(), a).items() if k in keep}
    return replica_class().options(**defaults).bind(asdict(a))


def _coerce(key: str, value: Any) -> Any:
    # `serve run ... key=value` passes strings
    if key in ("max_batch", "max_queue", "threads") and isinstance(value, str):
        return int(value)
    if key == "providers" and isinstance(value, str):
        return [p for p in value.split(",") if p]
    return value


def application(args: ReplicaArgs, scaling: Scaling):
    """The bound Ray Serve application for these replicas."""
    return replica_class().options(**deployment_options(scaling, args)).bind(asdict(args))


def deploy(
    args: ReplicaArgs,
    scaling: Scaling,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    block: bool = True,
) -> str:
    """Start (or join, with `address`) Ray, deploy the replicas and wait until they are ready; with
    `block`, serve until SIGTERM / Ctrl-C, then remove the app (and stop Ray if this started it).
    Returns the base URL."""
    ray, serve = _ray()
    if not Path(args.bundle).is_absolute():
        raise ValueError(f"the bundle path must be absolute for Ray's workers, got {args.bundle!r}")
    own = address is None
    if own:  # fail here, not in each replica after Ray's retries
        from ...bundle import check_bundle

        check_bundle(Path(args.bundle))
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    stop = threading.Event()
    # after ray.init, whose own SIGTERM handler would end the process without removing the app
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if block else None
    done = deployed = False
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        if own:  # Ray would wait for the CPUs forever; a local Ray will never get more
            _check_cpus(scaling, ray.cluster_resources().get("CPU", 0.0))
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(args, scaling), name=APP_NAME, route_prefix="/", blocking=False)
        deployed = True
        count = (
            scaling.replicas
            if scaling.min_replicas is None
            else f"{scaling.min_replicas}..{scaling.max_replicas}"
        )
        log.warning(
            "serving %s with %s replica(s) on %s/v1 through Ray Serve%s",
            args.bundle,
            count,
            url,
            "" if own else f" (cluster {address})",
        )
        if not block:
            done = True
            return url
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if not done:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if deployed:
                log.warning("stopping: removing the app (running requests get up to %gs)", scaling.grace)
            if own:
                serve.shutdown()
                ray.shutdown()
            elif deployed:
                serve.delete(APP_NAME)
    return url


def _check_cpus(scaling: Scaling, available: float) -> None:
    need = scaling.replicas * scaling.cpus_per_replica
    if need > available:
        raise ValueError(
            f"{scaling.replicas} replica(s) x {scaling.cpus_per_replica:g} CPUs need {need:g} CPUs and this "
            f"machine's Ray has {available:g}: lower --replicas or --cpus-per-replica (it may be fractional)"
        )


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(
            f"`onnxlm serve --ray` needs the ray extra: pip install 'onnxlm[ray]' ({e})"
        ) from None
    return ray, serve
