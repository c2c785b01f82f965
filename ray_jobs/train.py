"""Distributed training: Parquet on object storage -> Ray Data -> Ray Train -> bundle.

    unusual train --model ae --data s3://bucket/events/ --output s3://bucket/models/ae-1
    python -m unusual.ray_jobs.train --model ae --data ... --output ...     (the same code path)

1. The Parquet shards are listed and checked (one schema) and read with Ray Data.
2. The feature schema is fit from per-block statistics merged on the driver.
3. Ray Data encodes rows (or builds LSTM windows per entity) and splits them
   into train / validation by a content hash, so every pass agrees.
4. Ray Train runs :func:`train_loop` on N workers (DDP, gloo on CPU, NCCL on
   GPU) with the same ``unusual.models.training.train_step`` as the in-memory API;
   each epoch all-reduces the losses, checkpoints to the run's storage and
   early-stops on the validation loss. Failed workers restart from the last
   checkpoint (``--max-failures``).
5. The validation split is scored across the cluster and the threshold fit on
   its full score distribution (the exact top tail is collected, not every
   score); the bundle is written to ``--output``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..models.bundle import MANIFEST, build_manifest, save_bundle
from ..models.detector import split_params
from ..models.errors import BundleError, SchemaError
from ..models.features import _NumStats
from ..models.registry import family
from ..models.thresholds import fit_threshold_tail, tail_fraction
from ..models.training import (
    EarlyStopping,
    Objective,
    TrainConfig,
    error_sums,
    eval_loss,
    make_optimizer,
    train_step,
)
from ..runtime import ResourceError, ensure_ray, progress  # noqa: F401  (ResourceError: part of this API)

log = logging.getLogger("unusual")

STATE_FILE = "state.pt"


@dataclass
class TrainJob:
    data: str
    output: str
    kind: str = "ae"
    params: dict = field(default_factory=dict)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: sized from the cluster, leaving room for Ray Data
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU only)
    storage: str | None = None  # run storage for per-epoch checkpoints; default <output>/_train
    run_name: str | None = None
    max_failures: int = 2
    overwrite: bool = False
    address: str | None = None
    cache: bool | None = None  # cache encoded data in the object store; None: when it fits in 25 % of it
    fail_at_epoch: int | None = None  # testing: one worker process dies at this epoch, once

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1; got {self.num_workers}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16; got {self.precision!r}")


# --------------------------------------------------------------------------- resources


def plan_resources(num_workers: int, use_gpu: bool, cpus_per_worker: float | None) -> dict:
    """Resources per training worker, checked against what the cluster has.

    By default half the cluster's CPUs (at most) go to the training workers,
    so Ray Data's read and encode tasks always have CPUs left: on a 2-core
    machine two workers get 0.5 CPU each. Asking for more than the cluster can
    ever place is an error now, not a training run that waits forever.
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if use_gpu and gpus < num_workers:
        raise ResourceError(
            f"--use-gpu with {num_workers} worker(s) needs {num_workers} GPU(s); the cluster has {gpus:g}"
        )
    if cpus_per_worker is None:
        budget = cpus / 2 if not use_gpu else max(cpus - 1, 0) / 2
        cpus_per_worker = max(0.25, min(float(math.floor(budget / num_workers)) or budget / num_workers, 8.0))
        cpus_per_worker = round(cpus_per_worker, 2)
    if cpus_per_worker * num_workers > cpus:
        raise ResourceError(
            f"{num_workers} worker(s) x {cpus_per_worker:g} CPU need {cpus_per_worker * num_workers:g} CPUs; "
            f"the cluster has {cpus:g}. Use fewer --num-workers or a smaller --cpus-per-worker"
        )
    res = {"CPU": cpus_per_worker}
    if use_gpu:
        res["GPU"] = 1
    return res


# --------------------------------------------------------------------------- the worker loop


def _save_state(module, opt, stopper, hist, epoch) -> str:
    d = tempfile.mkdtemp(prefix="unusual-ckpt-")
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": opt.state_dict(),
            "stopper": stopper.state_dict(),
            "history": hist,
            "epoch": epoch,
        },
        os.path.join(d, STATE_FILE),
    )
    return d


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop(config: dict) -> None:
    """Ray Train's per-worker loop (also runs alone for ``num_workers=1``)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["threads"])))
    cfg = TrainConfig(**config["train"])
    torch.manual_seed(cfg.seed)
    fam = family(config["kind"])
    module = fam.module(fam.stored_config(config["model_config"]), config["width"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    stopper = EarlyStopping(cfg.patience)
    hist = {"train_loss": [], "val_loss": [], "epoch_seconds": [], "samples": []}
    start = 0
    opt_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = load_state(d)
        module.load_state_dict(st["model"])
        opt_state = st["optimizer"]
        stopper.load_state_dict(st["stopper"])
        hist = st["history"]
        start = int(st["epoch"]) + 1
        if rank == 0:
            print(f"[unusual] resumed from the checkpoint of epoch {start}", flush=True)
    hist.setdefault("started_at_epoch", []).append(start)  # one entry per (re)start of the worker group

    objective = ray.train.torch.prepare_model(Objective(module))
    opt = make_optimizer(objective, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"]) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    stop = start >= cfg.epochs or (stopper.best_state is not None and stopper.stale >= stopper.patience)
    epoch = start
    while not stop and epoch < cfg.epochs:
        if config.get("fail_at_epoch") == epoch and rank == world - 1:
            marker = config["fail_marker"]
            if not os.path.exists(marker):
                open(marker, "w").close()
                print(f"[unusual] fault injection: worker {rank} exits at epoch {epoch}", flush=True)
                # Ray Train's controller collects reports on its health-check poll
                # (every 2 s); let it register the last checkpoint, so the test
                # knows which epoch the run must resume from.
                time.sleep(5)
                os._exit(1)
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for batch in train_shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            dtypes=torch.float32,
            device=device,
            local_shuffle_buffer_size=cfg.batch_size * 8,
            local_shuffle_seed=cfg.seed + epoch,
        ):
            x = batch["x"]
            total += train_step(objective, x, opt, cfg.grad_clip, amp, scaler) * len(x)
            count += len(x)
        vtotal, vcount = eval_loss(
            objective,
            (b["x"] for b in val_shard.iter_torch_batches(batch_size=4096, dtypes=torch.float32, device=device)),
        )
        sums = torch.tensor([total, count, vtotal, vcount], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(sums)
        total, count, vtotal, vcount = sums.tolist()
        train_loss = total / max(count, 1)
        val_loss = vtotal / vcount if vcount else train_loss
        stop = stopper.update(epoch, val_loss, module)
        hist["train_loss"].append(train_loss)
        hist["val_loss"].append(val_loss)
        hist["epoch_seconds"].append(time.perf_counter() - t0)
        hist["samples"].append(int(count))
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": stopper.best,
            "samples_per_s": count / max(hist["epoch_seconds"][-1], 1e-9),
        }
        if rank == 0:
            print(
                f"[unusual] epoch {epoch + 1}/{cfg.epochs} train_loss={train_loss:.5f} val_loss={val_loss:.5f} "
                f"samples={int(count):,} ({metrics['samples_per_s']:,.0f}/s){' early stop' if stop else ''}",
                flush=True,
            )
            d = _save_state(module, opt, stopper, hist, epoch)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        epoch += 1


# --------------------------------------------------------------------------- threshold at scale


def _block_module(kind: str, model_config: dict, width: int, state):
    import ray

    fam = family(kind)
    module = fam.module(fam.config(**model_config), width)
    module.load_state_dict(ray.get(state) if isinstance(state, ray.ObjectRef) else state)
    return module.eval()


def _score_block(batch: dict, kind: str, model_config: dict, width: int, state) -> dict:
    module = _block_module(kind, model_config, width, state)
    with torch.inference_mode():
        s, _ = module.score_terms(torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32)))
    return {"score": s.double().numpy()}


def _error_block(batch: dict, kind: str, model_config: dict, width: int, state) -> dict:
    module = _block_module(kind, model_config, width, state)
    sums = error_sums(module, [torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32))])
    return {"sum": sums[0].numpy()[None, :], "n": np.array([sums[1]])}


def calibrate_at_scale(module, data, kind: str, model_config: dict, width: int) -> None:
    """``unusual.models.training.calibrate_error_scale`` over a Ray Dataset: per-block
    column sums of the errors, added up on the driver."""
    import ray

    if error_sums(module, []) is None:
        return
    kwargs = {"kind": kind, "model_config": model_config, "width": width, "state": ray.put(module.state_dict())}
    parts = data.map_batches(_error_block, batch_format="numpy", fn_kwargs=kwargs).take_all()
    n = sum(int(p["n"]) for p in parts)
    if n:
        module.set_error_scale(torch.from_numpy(sum(p["sum"] for p in parts) / n).float())


def _block_sample(batch: dict) -> dict:
    import pickle

    stats = _NumStats.of(np.asarray(batch["score"], np.float64), np.random.default_rng(0))
    return {"stats": np.array([pickle.dumps(stats)], dtype=object)}


def fit_threshold_at_scale(scores, cfg) -> dict:
    """The threshold over a Ray Dataset of scores without collecting them all.

    Pass 1 merges per-block counts and reservoir samples to find a score below
    which at most the needed top tail lies (with a safety margin); pass 2
    collects the exact scores above it. The result equals fitting on every
    score (``unusual.models.thresholds.fit_threshold_tail``).
    """
    import pickle
    from functools import reduce

    parts = scores.map_batches(_block_sample, batch_format="numpy", batch_size=None).take_all()
    if not parts:
        raise ValueError("cannot fit a threshold: the validation split is empty")
    stats = reduce(lambda a, b: a.merge(b, np.random.default_rng(0)), (pickle.loads(p["stats"]) for p in parts))
    n = stats.count
    if n == 0:
        raise ValueError("cannot fit a threshold on zero finite scores")
    need = int(math.ceil(tail_fraction(cfg) * n)) + 2
    frac = min(1.0, 2.0 * need / n + 0.001)
    lower = float(np.quantile(stats.sample, 1.0 - frac)) if frac < 1.0 else -math.inf
    while True:
        tail = np.sort(
            np.concatenate(
                [b["score"] for b in scores.filter(expr=f"score >= {lower!r}").iter_batches(batch_format="numpy")]
                or [np.empty(0)]
            )
        )
        tail = tail[np.isfinite(tail)]
        if tail.size >= need or lower == -math.inf:
            break
        lower = -math.inf  # the sample misjudged the tail: take every score
    rec = fit_threshold_tail(tail, n, cfg)
    rec["collected"] = int(tail.size)
    return rec


# --------------------------------------------------------------------------- the job


def _output_exists(uri: str) -> bool:
    import fsspec

    from .data import storage_errors

    with storage_errors(uri, "checking"):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs.exists(f"{path.rstrip('/')}/{MANIFEST}")


def run(job: TrainJob) -> dict:
    """Train and write the bundle; returns its manifest."""
    if _output_exists(job.output) and not job.overwrite:
        raise BundleError(f"a bundle already exists at {job.output}; pass --overwrite to replace it")
    model_cfg, feat_cfg, train_cfg, thr_cfg = split_params(job.kind, job.params)
    fam = family(job.kind)
    ray = ensure_ray(job.address)
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from . import data as rdata

    t_start = time.perf_counter()
    resources = plan_resources(job.num_workers, job.use_gpu, job.cpus_per_worker)
    ds, schema_pa = rdata.read_parquet(job.data)
    reserved = (model_cfg.entity_column, model_cfg.time_column) if fam.sequence else ()
    progress(f"fitting the feature schema on {job.data} …")
    schema, n_rows = rdata.fit_schema(ds, schema_pa, feat_cfg, reserved, train_cfg.seed)
    allowed = tuple(c for c in reserved if c)
    if fam.sequence:
        context = model_cfg.context_length
        windows = rdata.window_dataset(
            ds,
            schema,
            model_cfg.entity_column,
            model_cfg.time_column,
            context,
            train_cfg.val_fraction,
            train_cfg.seed,
        ).materialize()
        if windows.count() == 0:
            raise SchemaError(
                f"window {model_cfg.window} is longer than every series: a training window needs {context} rows"
            )
        train_ds, val_ds = rdata.select_part(windows, "train"), rdata.select_part(windows, "val")
    else:
        train_ds = rdata.encoded_rows(ds, schema, "train", train_cfg.val_fraction, train_cfg.seed, allowed)
        val_ds = rdata.encoded_rows(ds, schema, "val", train_cfg.val_fraction, train_cfg.seed, allowed)

    # Encoded data that fits comfortably in the object store is cached there
    # once, so epochs do not re-read and re-encode the shards; larger data
    # streams from storage every epoch.
    store = ray.cluster_resources().get("object_store_memory", 0)
    encoded_bytes = n_rows * schema.width * 4 * (model_cfg.context_length if fam.sequence else 1)
    cached = job.cache if job.cache is not None else encoded_bytes < 0.25 * store
    if cached:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()

    storage = job.storage or f"{job.output.rstrip('/')}/_train"
    pafs, storage_path, _ = rdata.filesystem(storage)
    run_name = job.run_name or f"{job.kind}-{uuid.uuid4().hex[:8]}"
    loop_config = {
        "kind": job.kind,
        "model_config": asdict(model_cfg),
        "width": schema.width,
        "train": asdict(train_cfg),
        "precision": job.precision,
        "threads": max(1, int(resources["CPU"])),
        "fail_at_epoch": job.fail_at_epoch,
        "fail_marker": os.path.join(tempfile.gettempdir(), f"unusual-fail-{run_name}"),
    }
    progress(
        f"training {job.kind} on {n_rows:,} rows with {job.num_workers} worker(s) x {resources} "
        f"(run {run_name}, checkpoints in {storage})"
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=pafs,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    best = state["stopper"]["best_state"]
    hist = state["history"]

    progress("scoring the validation split for the threshold …")
    module = fam.module(model_cfg, schema.width)
    module.load_state_dict(best)
    calib = val_ds if train_cfg.val_fraction > 0 else train_ds
    calibrate_at_scale(module, calib, job.kind, asdict(model_cfg), schema.width)
    scores = calib.map_batches(
        _score_block,
        batch_format="numpy",
        fn_kwargs={
            "kind": job.kind,
            "model_config": asdict(model_cfg),
            "width": schema.width,
            "state": ray.put(module.state_dict()),
        },
    ).materialize()
    threshold = fit_threshold_at_scale(scores, thr_cfg)
    threshold["fit_on"] = "validation" if train_cfg.val_fraction > 0 else "training"
    seconds = sum(hist["epoch_seconds"])
    training = {
        "train_loss": hist["train_loss"],
        "val_loss": hist["val_loss"],
        "best_epoch": int(state["stopper"]["best_epoch"]),
        "stopped_early": len(hist["val_loss"]) < train_cfg.epochs,
        "seconds": seconds,
        "rows": int(n_rows),
        "train_samples": int(hist["samples"][-1]) if hist["samples"] else 0,
        "samples_per_s": float(sum(hist["samples"]) / max(seconds, 1e-9)),
        "config": asdict(train_cfg),
        "runner": "ray-train",
        "num_workers": job.num_workers,
        "resources_per_worker": resources,
        "use_gpu": job.use_gpu,
        "precision": job.precision,
        "run_name": run_name,
        "started_at_epoch": hist.get("started_at_epoch", []),
        "cached": bool(cached),
        "storage": storage,
        "wall_seconds": time.perf_counter() - t_start,
    }
    manifest = build_manifest(job.kind, asdict(model_cfg), schema, threshold, training)
    manifest = save_bundle(job.output, manifest, module, overwrite=job.overwrite)
    return manifest


# --------------------------------------------------------------------------- CLI


def job_from_args(args) -> TrainJob:
    from ..cli import model_params

    kind, params = model_params(args)
    return TrainJob(
        data=args.data,
        output=args.output,
        kind=kind,
        params=params,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        precision=args.precision,
        storage=args.storage,
        run_name=args.run_name,
        max_failures=args.max_failures,
        overwrite=args.overwrite,
        address=args.address,
    )


def cmd_train(args) -> int:
    manifest = run(job_from_args(args))
    t = manifest["training"]
    print(
        json.dumps(
            {
                "output": args.output,
                "model_version": manifest["model_version"],
                "threshold": manifest["threshold"]["value"],
                "epochs_run": len(t["val_loss"]),
                "best_val_loss": min(t["val_loss"]),
                "samples_per_s": round(t["samples_per_s"], 1),
                "wall_seconds": round(t["wall_seconds"], 1),
            },
            indent=1,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
