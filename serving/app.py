"""The Ray Serve application: online and bulk scoring from checkpoint bundles.

:func:`start` (``unusual serve``, the demo, the tests, the benchmarks) deploys one Serve application
per model, its ``ModelServer`` the HTTP ingress at ``/v1/models/<name>`` (a scoring request crosses
one hop: proxy -> model replica; each replica scores through :class:`unusual.models.Scorer`,
batching the requests that arrive together), plus the light ``Gateway`` application at ``/`` for
listing, readiness, the default route and jobs (:mod:`.deployments` lists the routes). On a Ray
that ``start`` starts itself, the proxy is HAProxy straight to the replicas and Serve runs
throughput-optimized where HAProxy exists (:mod:`.fastpath`).

The application's arguments are a :class:`~unusual.config.ServeConfig`. For Serve config files and
KubeRay there is :func:`build_app`, Serve's typed application builder: ``serve run
unusual.serving.app:build_app models=ae=s3://… max_batch_size=8``, ``serve deploy`` with
``serving/serve_config.yaml``, a RayService's ``import_path: unusual.serving.app:build_app`` with
``args``. It builds one application (the gateway in front of the model deployments: two hops).

A new checkpoint for a model: ``start`` again with the changed config (or deploy the changed config
file). The checkpoint is the model deployment's ``user_config``: its running replicas load the new
bundle in place (``ModelServer.reconfigure``) and keep answering, so no request fails (tests/serving:
a swap under load). Every deployment ``start`` deploys carries a version made of its code and its
arguments (:func:`pinned`), so a deployment whose code and arguments did not change (the gateway,
the other models) is left running; Serve's imperative API would otherwise roll every replica of
every application on each ``start``, and requests met the gateway draining with no successor up.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation (a class) to
# validate the arguments with it (ray.serve._private.api.call_user_app_builder_with_args_if_necessary).
import os
import socket
import sys
import time

from ray import serve
from ray.serve.config import RequestRouterConfig

from .. import rayprivate
from ..config import ServeConfig, ServeJob, loopback
from ..models.errors import UnusualError
from ..runtime import ResourceError, embedded, ensure_ray, progress
from . import fastpath
from .deployments import Gateway, ModelReplica, ModelServer, StreamReplica, deployment_name, stream_deployment_name
from .handling import token_digest
from .streaming import ROUTER, ROUTER_KWARGS
from .versions import pinned

APP_NAME = "unusual"
STOP_SECONDS = 10  # unusual serve stops within this after SIGINT / SIGTERM
STREAM_CPUS = 0.1  # a stream replica's share: one model call per request's readings, idle for a row model


class PortInUse(UnusualError):
    """The HTTP port is taken: refused before anything starts."""


def as_config(args, resolve: bool = True) -> ServeConfig:
    """A ServeConfig from a ServeConfig, a ServeJob (its application part) or a mapping of arguments
    (a ConfigError naming the argument at fault), completed by this process
    (:meth:`~unusual.config.ServeConfig.with_environment`: the token, and with ``resolve`` each MLflow
    model URI as its bundle): it is called where the application is started or built, never in a replica."""
    if isinstance(args, ServeJob):
        return args.app_config().with_environment(resolve)
    if isinstance(args, ServeConfig):
        return args.with_environment(resolve)
    return ServeConfig.validated(dict(args)).with_environment(resolve)


# --------------------------------------------------------------------------- resources


def replica_resources(config: ServeConfig) -> dict:
    """The Ray resources of one model replica."""
    return {"num_cpus": config.num_cpus, "num_gpus": config.gpus_per_replica if config.use_gpu else 0}


def check_cluster(config: ServeConfig, resources: dict) -> None:
    """Refuse at once what the cluster can never place (a replica would wait forever):
    ``resources`` is ``ray.cluster_resources()``."""
    n = len(config.models) * max(1, config.min_replicas)
    need = replica_resources(config)
    for key, label in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
        want, have = n * need[key], float(resources.get(label, 0))
        if want > have + 1e-9:
            flag = "--gpus-per-replica" if label == "GPU" else "--num-cpus"
            raise ResourceError(
                f"{len(config.models)} model(s) x {max(1, config.min_replicas)} replica(s) x {need[key]:g} {label} "
                f"need {want:g} {label}(s); the cluster has {have:g}. Use a smaller {flag}, "
                "fewer models or fewer --min-replicas"
            )


# --------------------------------------------------------------------------- building the application


def model_deployment(name: str, checkpoint: str | None, config: ServeConfig, args: dict | None = None,
                     cls=ModelServer, with_stream: bool = True):
    """The bound ``ModelServer`` (``cls``) of one model; its checkpoint is the ``user_config`` (swapped
    live; None: a Serve config file's ``deployments:`` gives it). ``args``: what its replicas get. A
    sequence model's (or one whose kind is not known here) is bound with its StreamReplica deployment,
    unless ``with_stream`` is False (:func:`build`: the gateway holds the stream deployments)."""
    deployment = serve.deployment(
        cls,
        name=deployment_name(name),
        ray_actor_options=replica_resources(config),
        autoscaling_config=autoscaling(config),
        max_ongoing_requests=max(8, 4 * config.max_batch_size),
        user_config=None if checkpoint is None else {"checkpoint": checkpoint, "top_k": config.top_k},
        health_check_period_s=5,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=5,
        logging_config=logging_config(config),
    )
    args = args if args is not None else replica_args(config)
    stream = stream_deployment(name, config, args) if with_stream and streams(config, checkpoint) else None
    return pinned(deployment, name, args, stream is not None).bind(name, args, stream)


def autoscaling(config: ServeConfig) -> dict:
    """A model's replicas (and its stream replicas) scale between ``min_replicas`` and ``max_replicas``."""
    return {
        "min_replicas": config.min_replicas,
        # Only where it scales to zero: Serve resets the target to initial_replicas on every
        # changed config (a new checkpoint), which scaled a busy model back down mid-swap.
        **({"initial_replicas": 1} if config.min_replicas == 0 else {}),
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
    }


def streams(config: ServeConfig, checkpoint: str | None) -> bool:
    """Whether a model gets the /stream route: ``streaming`` when set, else whether its bundle scores
    sequences with a time column (read from its manifest; a checkpoint not known or not readable here,
    as in a config file, counts as one)."""
    if config.streaming is not None:
        return config.streaming
    if checkpoint is None:
        return True
    try:
        from ..models.bundle import read_manifest
        from ..models.registry import family

        manifest = read_manifest(checkpoint)
        return family(manifest.kind).sequence and bool(manifest.family_config.get("time_column"))
    except Exception:  # noqa: BLE001 - an MLflow URI, a bundle not there yet: the replicas will say
        return True


def stream_deployment(name: str, config: ServeConfig, args: dict):
    """The bound StreamReplica of one model: the entities' rows, reached by consistent hashing on the
    entity (Serve refuses a custom request router on an ingress under HAProxy, so it is a deployment of
    its own behind the model's replicas)."""
    deployment = serve.deployment(
        StreamReplica,
        name=stream_deployment_name(name),
        ray_actor_options={"num_cpus": STREAM_CPUS},  # idle until a reading comes; CPU: one window per reading
        autoscaling_config=autoscaling(config),
        max_ongoing_requests=max(8, 4 * config.max_batch_size),
        request_router_config=RequestRouterConfig(request_router_class=ROUTER, request_router_kwargs=ROUTER_KWARGS),
        health_check_period_s=5,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=5,
        logging_config=logging_config(config),
    )
    return pinned(deployment, name, args).bind(name, args)


def replica_args(config: ServeConfig) -> dict:
    """What a replica is given: the config with its bearer token as a digest (the Ray dashboard shows
    every deployment's arguments; the replicas compare digests, :func:`.handling.check_auth`)."""
    args = config.model_dump()
    if args.get("auth_token"):
        args["auth_token"] = token_digest(args["auth_token"])
    return args


def logging_config(config: ServeConfig) -> dict:
    """The replicas' Serve logs: a line per request only with ``access_log`` (it costs throughput)."""
    return {"enable_access_log": config.access_log, "log_level": "INFO" if config.access_log else "WARNING"}


def gateway_deployment(config: ServeConfig, models: dict, streaming: dict | None = None):
    """The bound ``Gateway``: ``models`` maps names to bound model deployments (one application) or
    to ``(application, deployment)`` names (an application per model). Serve resolves bound models
    inside the dict to handles."""
    deployment = serve.deployment(
        Gateway,
        name="gateway",
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=256,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": 16,  # it mostly lists and forwards: many requests per replica
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        },
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=5,
        logging_config=logging_config(config),
    )
    return pinned(deployment, replica_args(config), models).bind(replica_args(config), models, streaming or {})


def model_app_name(name: str, model: str) -> str:
    """The Serve application of ``model`` beside the gateway application ``name``."""
    return f"{name}-{model}"


def model_route(route_prefix: str, model: str) -> str:
    return f"{route_prefix.rstrip('/')}/v1/models/{model}"


def applications(config, name: str = APP_NAME, route_prefix: str = "/") -> list:
    """What :func:`start` deploys: one application per model (``<name>-<model>`` at
    ``<route_prefix>v1/models/<model>``, its ModelServer the ingress) and the gateway application
    ``name`` at ``route_prefix``, as ``serve.RunTarget`` s. Nothing is checked or loaded here."""
    config = as_config(config)
    # The replicas' arguments name each model's application, not its checkpoint (the user_config): a new
    # checkpoint leaves the gateway's arguments as they were.
    apps = {m: model_app_name(name, m) for m in config.models}
    args = ServeConfig.model_validate({**config.model_dump(), "models": apps})
    targets, models = [], {}
    for model, uri in config.models.items():
        app = model_app_name(name, model)
        bound = model_deployment(model, uri, config, replica_args(args))
        targets.append(serve.RunTarget(bound, name=app, route_prefix=model_route(route_prefix, model)))
        models[model] = (app, deployment_name(model))
    targets.append(serve.RunTarget(gateway_deployment(args, models), name=name, route_prefix=route_prefix))
    return targets


def build(config: ServeConfig):
    """One application: the Gateway in front of one ModelServer deployment per model (two hops per
    request; Serve config files and RayServices deploy this through :func:`build_app`).

    It does not check the cluster's resources: a Serve config file or RayService may deploy it on
    a cluster whose autoscaler adds the GPU nodes later. :func:`start` checks them
    (:func:`check_cluster`) before it deploys."""
    config = as_config(config)
    models = {name: model_deployment(name, uri, config, cls=ModelReplica, with_stream=False)
              for name, uri in config.models.items()}
    streaming = {name: stream_deployment(name, config, replica_args(config))
                 for name, uri in config.models.items() if streams(config, uri)}
    return gateway_deployment(config, models, streaming)


def build_app(args: ServeConfig):
    """Serve's typed application builder (``serve run unusual.serving.app:build_app models=…``, Serve
    config files, KubeRay's RayService ``import_path: unusual.serving.app:build_app`` with ``args``).

    Serve validates the arguments with :class:`~unusual.config.ServeConfig` before it calls this
    (``key=value`` strings become the fields' types; an unknown argument is an error naming it).
    Called directly, a mapping of arguments is validated here (a one-line ConfigError)."""
    return build(as_config(args))


# --------------------------------------------------------------------------- running it


def wait_ready(url: str, timeout: float = 180.0) -> None:
    """Block until ``url``/readyz answers 200 (every model loaded); TimeoutError after ``timeout`` s."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Serve application at {url} did not become ready in {timeout:.0f} s")


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on (PortInUse, one line). Ray's proxy binds with
    SO_REUSEPORT, so without this a second server would silently share the port with the first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no owner
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as e:
            raise PortInUse(
                f"port {port} on {host or '0.0.0.0'} is in use ({e.strerror}): another server (perhaps another "
                "unusual serve) listens there; stop it or choose another port with --port"
            ) from None


def running_serve_port() -> int | None:
    """The HTTP port of the Serve already running in the connected cluster, or None."""
    return rayprivate.serve_http_port()


def start(
    config,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    name: str = APP_NAME,
    route_prefix: str = "/",
    check_resources: bool = True,
    ready_timeout: float | None = 180.0,
    fast: bool | None = None,
) -> str:
    """Deploy the applications of ``config`` (a ServeConfig, a ServeJob's application part, or a
    mapping of arguments) and return the gateway's URL.

    Connects to Ray (``address``, else RAY_ADDRESS, else a local Ray started here: first the fast
    path is set up for it, :mod:`.fastpath`, ``fast`` None = where HAProxy exists; a connected
    driver stays as it is). Refuses a port in use (PortInUse) and a placement the cluster can never
    make (ResourceError), before anything starts. Starts Serve's HTTP proxy on ``host``:``port``
    (when Serve already runs in the cluster, on another port: PortInUse naming it), deploys the
    applications (:func:`applications`; again with a changed config, Serve rolls the replicas
    over to it) and, unless ``ready_timeout`` is None, waits until every model is loaded (TimeoutError)."""
    import ray

    config = as_config(config)
    check_checkpoints(config)
    own_ray = not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))
    if own_ray:
        check_port(host, port)
        on, line = fastpath.configure(fast)
        progress(line)
    ray = ensure_ray(address)
    if check_resources:
        check_cluster(config, ray.cluster_resources())
    current = running_serve_port()
    if current is None:
        if not own_ray:
            check_port(host, port)
        serve.start(http_options={"host": host, "port": port})
    elif current != port:
        raise PortInUse(
            f"Serve already runs in this cluster on port {current}; it cannot move to {port}: "
            f"use --port {current}, or stop it first (serve shutdown)"
        )
    serve.run_many(applications(config, name, route_prefix), wait_for_applications_running=False)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{local}:{port}{route_prefix.rstrip('/')}"
    if ready_timeout is not None:
        wait_ready(url, ready_timeout)
    return url


def check_checkpoints(config: ServeConfig) -> None:
    """Every model's bundle is there and sound before anything starts: a BundleError naming the model
    and the URI (the replicas would fail one after another, and Serve end in "Failed to update the
    deployments" after a page of tracebacks). Registry URIs (``models:/``, ``runs:/``) are resolved
    by the replicas."""
    from ..models.bundle import read_bundle
    from ..models.errors import BundleError

    for model, uri in config.models.items():
        if str(uri).startswith(("models:/", "runs:/")):
            continue
        try:
            read_bundle(uri)
        except BundleError as e:
            raise BundleError(f"--checkpoint {model}={uri}: {e}") from None


def remove(config, name: str = APP_NAME) -> None:
    """Delete the applications :func:`start` deployed as ``name`` (the gateway and each model's)."""
    for model in as_config(config, resolve=False).models:
        serve.delete(model_app_name(name, model))
    serve.delete(name)


def stop(timeout: float = 6.0) -> bool:
    """Shut Serve down in the connected cluster (its applications, proxies and HAProxy); False when
    that did not finish within ``timeout`` s (then it goes on in the background)."""
    return _within(serve.shutdown, timeout)


def _within(fn, timeout: float) -> bool:
    """Run ``fn()`` in a thread; whether it returned within ``timeout`` s."""
    import threading

    done = threading.Event()

    def run():
        try:
            fn()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(timeout)


def _exit_now(t0: float, why: str) -> None:
    """End this process now: the Ray it started is half gone, and ray.shutdown() would wait seconds
    for the dead; its processes are ended first, then our HAProxy and folder."""
    _kill_local_ray()
    fastpath.cleanup()
    progress(f"stopped in {time.time() - t0:.1f} s ({why})")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _kill_local_ray() -> None:
    """SIGKILL the processes of the Ray this process started (none when it joined a cluster)."""
    rayprivate.kill_local_ray()


def serve_forever(job: ServeJob) -> int:
    """``unusual serve``: :func:`start` the applications of ``job`` (not waiting for the models to
    load), print where it listens, and block until Ctrl-C or SIGTERM; then shut Serve down (and the
    Ray it started) within :data:`STOP_SECONDS`."""
    import json
    import signal
    import threading

    import ray

    config = job.app_config()
    if job.print_config:
        from .configfile import config_file, dump

        print(dump(config_file(config, port=job.port)), end="", flush=True)
        return 0
    if job.insecure and not config.auth_token and not loopback(job.host):
        progress(f"no token on {job.host} (--insecure): anyone who reaches port {job.port} can score")
    start(config, host=job.host, port=job.port, address=job.address, ready_timeout=None)
    summary = {"url": f"http://{job.host}:{job.port}", "models": config.models, "docs": "/docs",
               "fast_path": fastpath.is_on()}
    print(json.dumps(summary, indent=1), flush=True)
    # Ray's own SIGTERM handler (Kubernetes, systemd) would abort the process and leave the application running.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    while not stopping.wait(3600):
        pass
    t0 = time.time()
    progress("stopping")
    if embedded():
        # Our own Ray: nothing outlives it, so no graceful Serve shutdown (its replicas drain for seconds):
        # HAProxy first (the port is free at once), then Ray and its processes.
        fastpath.reap_haproxy()
        if not _within(ray.shutdown, STOP_SECONDS * 0.4):
            # Ray's own processes were signalled too (a process-group SIGTERM: systemd's default,
            # `kill -- -PGID`) and are shutting down on their own, slowly: end them.
            _exit_now(t0, "Ray's processes were signalled too: ended them")
        fastpath.cleanup()
        progress(f"stopped in {time.time() - t0:.1f} s")
        return 0
    if not stop(STOP_SECONDS * 0.8):
        progress(f"Serve did not answer within {STOP_SECONDS * 0.8:.0f} s; its applications may still run")
    ray.shutdown()
    progress(f"stopped in {time.time() - t0:.1f} s")
    return 0
