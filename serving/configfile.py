"""Serve config files and KubeRay RayServices: the topology of ``unusual serve``, as ``applications:``.

``unusual serve`` deploys an application per model, its ``ModelServer`` the HTTP ingress at
``/v1/models/<name>`` (one hop: proxy -> replica), and the light gateway application at ``/`` for
listing, readiness, ``POST /v1/score`` and jobs (:func:`unusual.serving.app.applications`). A Serve
config file says the same with one entry per application::

    applications:
      - name: unusual-ae                            # one per model
        route_prefix: /v1/models/ae
        import_path: unusual.serving.configfile:model_app
        args: {model: ae, num_cpus: 0.5, max_replicas: 4, ...}
        deployments:
          - name: model-ae
            user_config: {checkpoint: s3://bucket/models/ae, top_k: 3}
      - name: unusual                               # the gateway
        route_prefix: /
        import_path: unusual.serving.configfile:gateway_app
        args: {models: ae=unusual-ae, default_model: ae, ...}

A model application's ``args`` are :class:`~unusual.config.ModelAppConfig` (ServeConfig's fields but
``models``); its checkpoint is its deployment's ``user_config``, so a new checkpoint deployed again
(``serve deploy``, ``kubectl apply``) is loaded by the running replicas in place, with no downtime: Serve
redeploys a whole application, replicas stopped before their successors are up, when its ``args``
change. The gateway's ``models`` map each model to the application that serves it.

:func:`config_file` writes that file from a :class:`~unusual.config.ServeConfig` (``unusual serve
--print-config`` with the same flags as ``unusual serve``); ``serving/serve_config.yaml`` and
``cluster/kuberay/rayservice.yaml`` are its output, and the tests deploy the shipped file.
"""

# No `from __future__ import annotations` here: Serve reads the builders' annotations (classes) to
# validate a config file's args with them before it calls the builder.
from ..config import ModelAppConfig, ServeConfig
from .app import APP_NAME, as_config, gateway_deployment, model_app_name, model_deployment, model_route, replica_args
from .deployments import deployment_name
from .handling import token_digest

# The replicas' settings a model application takes from ServeConfig (the gateway takes them all).
GATEWAY_ONLY = ("models", "default_model", "jobs_address", "jobs_uri_prefixes")


def model_app(args: ModelAppConfig):
    """Serve's typed application builder of one model's application (``import_path:
    unusual.serving.configfile:model_app``): its ``ModelServer``, the application's HTTP ingress. The
    checkpoint comes from the deployment's ``user_config`` in the config file."""
    config = args if isinstance(args, ModelAppConfig) else ModelAppConfig.validated(dict(args))
    config = config.with_environment(resolve=False)  # its models entry is a placeholder: the checkpoint is user_config
    replica = replica_args(config)
    del replica["model"]  # the replica's arguments are a ServeConfig whose one model is config.model
    return model_deployment(config.model, None, config, replica)


def gateway_app(args: ServeConfig):
    """Serve's typed application builder of the gateway (``import_path:
    unusual.serving.configfile:gateway_app``): ``models`` maps each model name to the application
    serving it (``ae=unusual-ae``), which it reaches by handle for ``POST /v1/score`` and readiness."""
    config = as_config(args, resolve=False)  # its models name applications, not checkpoints
    return gateway_deployment(config, {m: (app, deployment_name(m)) for m, app in config.models.items()})


def config_file(config, name: str = APP_NAME, route_prefix: str = "/", host: str = "0.0.0.0",
                port: int = 8000) -> dict:
    """The Serve config (a dict for YAML: ``serve deploy``, a RayService's ``serveConfigV2``) that
    deploys ``config`` as ``unusual serve`` does: an application per model and the gateway ``name``
    at ``route_prefix``. Only the settings that differ from the defaults are written; a bearer
    token as its digest (:func:`~unusual.serving.handling.token_digest`), never itself."""
    config = as_config(config, resolve=False)  # an MLflow URI stays one: the replicas resolve it where they run
    given = config.model_dump(exclude_defaults=True)
    if config.auth_token:
        given["auth_token"] = token_digest(config.auth_token)
    shared = {k: v for k, v in given.items() if k not in GATEWAY_ONLY}
    apps = []
    for model, uri in config.models.items():
        apps.append({
            "name": model_app_name(name, model),
            "route_prefix": model_route(route_prefix, model),
            "import_path": f"{__name__}:model_app",
            "args": {"model": model, **shared},
            "deployments": [{"name": deployment_name(model),
                             "user_config": {"checkpoint": uri, "top_k": config.top_k}}],
        })
    gateway = {**shared, "models": ",".join(f"{m}={model_app_name(name, m)}" for m in config.models)}
    if config.default_model is not None and len(config.models) > 1:
        gateway["default_model"] = config.default_model
    for key in ("jobs_address", "jobs_uri_prefixes"):
        if key in given:
            gateway[key] = ",".join(given[key]) if isinstance(given[key], list) else given[key]
    apps.append({"name": name, "route_prefix": route_prefix, "import_path": f"{__name__}:gateway_app",
                 "args": gateway})
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port}, "applications": apps}


def checkpoints(doc: dict) -> dict[str, str]:
    """Each model's checkpoint in a Serve config (:func:`config_file`'s format): model -> URI."""
    out = {}
    for app in doc.get("applications", []):
        if app.get("import_path", "").endswith(":model_app"):
            for d in app.get("deployments", []):
                out[app["args"]["model"]] = d["user_config"]["checkpoint"]
    return out


def dump(doc: dict) -> str:
    """A Serve config as YAML, with the comment that says how it deploys and swaps checkpoints."""
    import yaml

    head = (
        "# Ray Serve config for unusual (written by `unusual serve --print-config`, the same flags as unusual serve):\n"
        "#   serve deploy this.yaml   (a running cluster);   serve run this.yaml   (a local Ray, in the foreground)\n"
        "# One application per model (its replicas the HTTP ingress at /v1/models/NAME) and the gateway at /.\n"
        "# A new checkpoint: change its user_config.checkpoint and deploy again; the replicas swap in place.\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False, width=120)

