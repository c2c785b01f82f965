"""The Ray Serve application: online and bulk scoring from checkpoint bundles.

One ``ModelServer`` deployment per model (autoscaled, dynamically batched, each replica scoring
through :class:`unusual.models.Scorer`) behind one ``Gateway`` ingress deployment (FastAPI) that
routes by model name (:mod:`.deployments` lists the routes).

The application's arguments are a :class:`~unusual.config.ServeConfig`. Build it with

- :func:`build_app`, Serve's typed application builder: ``serve run unusual.serving.app:build_app
  models=ae=s3://… max_batch_size=8``, ``serve deploy`` with ``serving/serve_config.yaml``, a KubeRay
  RayService's ``import_path: unusual.serving.app:build_app`` with ``args``;
- :func:`build` from a config in Python;
- :func:`start`, which checks the cluster can place the replicas, starts Serve's HTTP proxy, deploys
  the application and waits until every model is loaded (``unusual serve``, the demo, the tests and
  the benchmarks); :func:`serve_forever` is ``unusual serve``: start, then block until Ctrl-C / SIGTERM.

A new checkpoint for a model is a new ``user_config`` (deploy the changed config, or ``start`` /
``serve.run(build(config))`` again): the live replicas swap the bundle, nothing restarts.
"""

# No `from __future__ import annotations` here: Serve reads build_app's annotation (a class) to
# validate the arguments with it (ray.serve._private.api.call_user_app_builder_with_args_if_necessary).
import time

from ray import serve

from ..config import ServeConfig, ServeJob
from ..runtime import ResourceError, ensure_ray
from .deployments import Gateway, ModelServer

APP_NAME = "unusual"


def as_config(args) -> ServeConfig:
    """A ServeConfig from a ServeConfig, a ServeJob (its application part) or a mapping of arguments
    (a ConfigError naming the argument at fault)."""
    if isinstance(args, ServeJob):
        return args.app_config()
    if isinstance(args, ServeConfig):
        return args
    return ServeConfig.validated(dict(args))


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


def model_deployment(name: str, checkpoint: str, config: ServeConfig):
    """The bound ``ModelServer`` of one model; its checkpoint is the ``user_config`` (swapped live)."""
    return serve.deployment(
        ModelServer,
        name=f"model-{name}",
        ray_actor_options=replica_resources(config),
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "initial_replicas": max(1, config.min_replicas),
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        },
        max_ongoing_requests=max(8, 4 * config.max_batch_size),
        user_config={"checkpoint": checkpoint, "top_k": config.top_k},
        health_check_period_s=5,
    ).bind(name, config.model_dump())


def build(config: ServeConfig):
    """The application: one ModelServer deployment per model behind the Gateway.

    It does not check the cluster's resources: a Serve config file or RayService may deploy it on
    a cluster whose autoscaler adds the GPU nodes later. :func:`start` checks them
    (:func:`check_cluster`) before it deploys."""
    config = as_config(config)
    handles = {name: model_deployment(name, uri, config) for name, uri in config.models.items()}
    gateway = serve.deployment(
        Gateway,
        name="gateway",
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=256,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": 16,  # it only routes bytes: many requests per replica
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        },
    )
    return gateway.bind(config.model_dump(), handles)  # Serve resolves the bound models inside the dict


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
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Serve application at {url} did not become ready in {timeout:.0f} s")


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
) -> str:
    """Deploy the application of ``config`` (a ServeConfig, a ServeJob's application part, or a
    mapping of arguments) and return its URL.

    Connects to Ray (``address``, else RAY_ADDRESS, else a local Ray; a connected driver stays as
    it is), refuses a placement the cluster can never make (ResourceError, before anything starts),
    starts Serve's HTTP proxy on ``host``:``port`` (if Serve already runs in the cluster, its HTTP
    options stay as they are), deploys the application as ``name`` at ``route_prefix`` (again with a
    changed config: the live replicas swap their bundles) and, unless ``ready_timeout`` is None,
    waits until every model is loaded (TimeoutError)."""
    config = as_config(config)
    ray = ensure_ray(address)
    if check_resources:
        check_cluster(config, ray.cluster_resources())
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(config), name=name, route_prefix=route_prefix, blocking=False)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{local}:{port}{route_prefix.rstrip('/')}"
    if ready_timeout is not None:
        wait_ready(url, ready_timeout)
    return url


def serve_forever(job: ServeJob) -> int:
    """``unusual serve``: :func:`start` the application of ``job`` (not waiting for the models to load),
    print where it listens, and block until Ctrl-C or SIGTERM, which shut Serve down cleanly."""
    import json
    import signal
    import threading

    config = job.app_config()
    start(config, host=job.host, port=job.port, address=job.address, ready_timeout=None)
    summary = {"url": f"http://{job.host}:{job.port}", "models": config.models, "docs": "/docs"}
    print(json.dumps(summary, indent=1), flush=True)
    # Ray's own SIGTERM handler (Kubernetes, systemd) would abort the process and leave the application running.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0
