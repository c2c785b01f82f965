"""The ``unusual`` command line.

    unusual train     distributed training on Ray (Ray Data + Ray Train) into a bundle
    unusual score     batch scoring with Ray Data: Parquet in, scores + quarantine out
    unusual evaluate  metrics and a report from scored data with labels
    unusual serve     the Ray Serve endpoint: online JSON and bulk Arrow / Parquet scoring
    unusual fit       train one detector in this process and write its bundle
    unusual info      print a bundle's manifest summary
    unusual demo      the whole system on shipped real data: local S3 + Ray, train, score, serve

Model parameters come from ``--config`` (a YAML mapping of Detector
parameters) and ``--param key=value`` flags, flags winning. Credentials for
object storage come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` …), never from flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from .models.errors import UnusualError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _param(value: str) -> tuple[str, object]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"--param expects key=value; got {value!r}")
    key, raw = value.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds a detector."""
    p.add_argument("--model", choices=["ae", "vae", "lstm"], help="model family (default: the config's, else ae)")
    p.add_argument("--config", help="YAML file of Detector parameters; flags override it")
    p.add_argument("--features", type=_csv, help="comma-separated feature columns (default: all others)")
    p.add_argument("--exclude", type=_csv, help="comma-separated columns to leave out (ids, labels)")
    p.add_argument("--categorical", type=_csv, help="comma-separated categorical columns (default: string columns)")
    p.add_argument("--entity-column", help="LSTM: column naming the series each row belongs to")
    p.add_argument("--time-column", help="LSTM: column ordering rows within a series")
    p.add_argument("--window", type=int, help="LSTM: rows of history per window")
    p.add_argument("--epochs", type=int, help="maximum training epochs (early stopping may end sooner)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument(
        "--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
        help="any other Detector parameter, e.g. --param latent=8 --param threshold=pot",
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="Parquet file, folder or prefix of shards (local, s3://, gs://)")
    p.add_argument("--output", required=True, help="bundle URI (local path or s3://…)")
    p.add_argument("--overwrite", action="store_true", help="replace a bundle already at --output")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (DDP over NCCL)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: sized from the cluster)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast on GPU")
    p.add_argument("--storage", help="run storage for per-epoch checkpoints (default: <output>/_train)")
    p.add_argument("--run-name", help="name of the run in its storage (default: <model>-<random>)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default 2)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    p.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the encoded data in the object store between epochs (default: when it fits in 25%% of it)",
    )
    add_model_args(p)


def model_params(args: argparse.Namespace) -> tuple[str, dict]:
    params: dict = {}
    if args.config:
        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"--config {args.config}: expected a mapping of parameters")
        params.update(loaded)
    kind = args.model or params.pop("model", None) or params.pop("kind", None) or "ae"
    params.pop("model", None)
    params.pop("kind", None)
    flags = {
        "features": args.features,
        "exclude": args.exclude,
        "categorical": args.categorical,
        "entity_column": args.entity_column,
        "time_column": args.time_column,
        "window": args.window,
        "epochs": args.epochs,
        "seed": args.seed,
    }
    params.update({k: v for k, v in flags.items() if v is not None})
    params.update(dict(args.param))
    return kind, params


def cmd_fit(args) -> int:
    from .models import Detector
    from .ray_jobs.local_io import read_table

    kind, params = model_params(args)
    table = read_table(args.data)
    print(f"read {table.num_rows:,} rows x {table.num_columns} columns from {args.data}", file=sys.stderr)
    det = Detector(kind, **params).fit(table)
    version = det.save(args.output, overwrite=args.overwrite)
    h = det.history_
    print(
        json.dumps(
            {
                "output": args.output,
                "model_version": version,
                "threshold": det.threshold_,
                "epochs_run": len(h["val_loss"]),
                "best_val_loss": min(h["val_loss"]),
                "seconds": round(h["seconds"], 2),
            },
            indent=1,
        )
    )
    return 0


def _cmd_train(args) -> int:
    # Imported when used: the training job pulls in PyTorch, the other commands need not.
    from .ray_jobs.train import cmd_train

    return cmd_train(args)


def cmd_serve(args) -> int:
    """Start the Serve application on a local (or ``--address``) Ray and block until Ctrl-C / SIGTERM."""
    import signal
    import threading

    from ray import serve

    from .runtime import ensure_ray
    from .serving.app import ServeSettings, build, parse_models

    models = {}
    for spec in args.checkpoint:
        name, uri = spec.split("=", 1) if "=" in spec else (None, spec)
        if name is None:
            from .models.bundle import read_bundle

            name = read_bundle(uri)[0]["kind"]
        models[name] = uri
    models.update(parse_models(args.models or ""))
    settings = ServeSettings(
        models=models,
        default_model=args.default_model,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        max_batch_size=args.max_batch_size,
        use_gpu=args.use_gpu,
        gpus_per_replica=args.gpus_per_replica,
        auth_token=args.token,
    )
    ray = ensure_ray(args.address)
    settings.check_cluster(ray.cluster_resources())  # before Serve starts anything
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(settings), name="unusual", route_prefix="/", blocking=False)
    print(
        json.dumps({"url": f"http://{args.host}:{args.port}", "models": models, "docs": "/docs"}, indent=1), flush=True
    )
    # Ctrl-C or SIGTERM (Kubernetes, systemd) stop Serve cleanly; Ray's own SIGTERM
    # handler would abort the process and leave the application running.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


def cmd_info(args) -> int:
    from .models import load_bundle

    b = load_bundle(args.checkpoint)
    m = b.manifest
    cols = m["features"]["columns"]
    print(
        json.dumps(
            {
                "model_version": m["model_version"],
                "kind": m["kind"],
                "format_version": m["format_version"],
                "model_config": m["model_config"],
                "features": [f"{c['name']} ({c['kind']})" for c in cols],
                "threshold": m["threshold"],
                "training": {k: m["training"].get(k) for k in ("rows", "best_epoch", "seconds", "runner")},
                "libraries": m["libraries"],
            },
            indent=1,
        )
    )
    return 0


def cmd_demo(args) -> int:
    from .ray_jobs.demo import run_demo

    return run_demo(args.workdir, quick=args.quick)


def _sub(sub, name: str, help: str) -> argparse.ArgumentParser:
    # No abbreviated flags: ``--keep`` must not silently mean ``--keep-columns`` in a manifest.
    return sub.add_parser(name, help=help, allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unusual", description="Deep-learning anomaly detection at cluster scale.", allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log training progress per epoch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _sub(sub, "fit", help="train one detector in this process and write its checkpoint bundle")
    p.add_argument("--data", required=True, help="Parquet file/folder/prefix or CSV file (local or s3://…)")
    p.add_argument("--output", required=True, help="bundle URI (local path or s3://…)")
    p.add_argument("--overwrite", action="store_true", help="replace a bundle already at --output")
    add_model_args(p)
    p.set_defaults(func=cmd_fit)

    p = _sub(sub, "train", help="distributed training with Ray Data + Ray Train; writes a bundle")
    add_train_args(p)
    p.set_defaults(func=_cmd_train)

    from .ray_jobs.score import add_score_args, cmd_score

    p = _sub(sub, "score", help="batch-score Parquet data with Ray Data; writes scores and a quarantine")
    add_score_args(p)
    p.set_defaults(func=cmd_score)

    from .ray_jobs.evaluate import add_evaluate_args, cmd_evaluate

    p = _sub(sub, "evaluate", help="ROC-AUC, PR-AUC, F1 and an HTML report from scored data with labels")
    add_evaluate_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = _sub(sub, "serve", help="start the Ray Serve endpoint (online JSON + bulk Arrow/Parquet scoring)")
    p.add_argument(
        "--checkpoint", action="append", default=[], metavar="[NAME=]URI",
        help="a bundle to serve, named NAME (default: its kind); repeat for several models",
    )
    p.add_argument("--models", help="name=URI,name=URI (the same as repeated --checkpoint NAME=URI)")
    p.add_argument("--default-model", help="the model of POST /v1/score (default: the only one)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaling floor per model (default 1)")
    p.add_argument("--max-replicas", type=int, default=2, help="autoscaling ceiling per model (default 2)")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests batched into one model call (64)")
    p.add_argument("--use-gpu", action="store_true", help="model replicas score on GPUs (a share of one each)")
    p.add_argument(
        "--gpus-per-replica", type=float, default=0.25,
        help="share of a GPU per model replica with --use-gpu (default 0.25: four replicas per GPU)",
    )
    p.add_argument("--token", help="require Authorization: Bearer TOKEN (default: $UNUSUAL_SERVE_TOKEN)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    p.set_defaults(func=cmd_serve)

    p = _sub(sub, "info", help="print a checkpoint bundle's manifest summary")
    p.add_argument("checkpoint", help="bundle URI")
    p.set_defaults(func=cmd_info)

    p = _sub(sub, "demo", help="the whole system on shipped real data: local S3 + Ray, train, score, serve")
    p.add_argument("--workdir", default="artifacts/demo", help="where the artefacts are copied at the end")
    p.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (UnusualError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"unusual {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
