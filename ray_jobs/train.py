"""Distributed training: Parquet on object storage -> Ray Data -> Ray Train -> bundle.

    unusual train --model ae --data s3://bucket/events/ --output s3://bucket/models/ae-1
    python -m unusual.ray_jobs.train --model ae --data ... --output ...     (the same code path)

1. The Parquet shards are listed and checked (one schema) and read with Ray Data.
2. The feature schema is fit from per-block statistics merged on the driver.
3. Ray Data encodes rows (or builds LSTM windows per entity) and splits them
   into train / validation by a content hash, so every pass agrees.
4. Ray Train runs ``unusual.ray_jobs.train_worker.train_loop`` on N workers
   (DDP, gloo on CPU, NCCL on GPU) with the same epoch loop as the in-memory API
   (``unusual.models.training.train_epochs``); each epoch all-reduces the losses,
   checkpoints to the run's storage and early-stops on the validation loss.
   Failed workers restart from the last checkpoint (``--max-failures``).
5. The validation split is scored across the cluster and the threshold fit on
   its full score distribution (the exact top tail is collected, not every
   score); the bundle is written to ``--output``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict

from ..config import TrainJob, main_for
from ..models.bundle import build_manifest, save_bundle, threshold_of
from ..models.detector import split_params
from ..models.errors import SchemaError
from ..models.registry import family
from ..runtime import ResourceError, ensure_ray, progress, train_worker_resources
from .local_io import filesystem, refuse_existing_bundle
from .threshold import calibrate_at_scale
from .train_worker import load_state, train_loop

__all__ = ["ResourceError", "TrainJob", "command", "main", "run"]

log = logging.getLogger("unusual")


# --------------------------------------------------------------------------- the job


def run(job: TrainJob) -> dict:
    """Train and write the bundle; returns its manifest."""
    refuse_existing_bundle(job.output, job.overwrite)
    kind, params = job.detector()
    model_cfg, feat_cfg, train_cfg, thr_cfg = split_params(kind, params)
    fam = family(kind)
    ray = ensure_ray(job.address)
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from . import data as rdata

    t_start = time.perf_counter()
    resources = train_worker_resources(job.num_workers, job.use_gpu, job.cpus_per_worker)
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
        n_samples = windows.count()
        if n_samples == 0:
            raise SchemaError(
                f"window {model_cfg.window} is longer than every series: a training window needs {context} rows"
            )
        train_ds, val_ds = rdata.select_part(windows, "train"), rdata.select_part(windows, "val")
    else:
        n_samples = n_rows
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
    pafs, storage_path, _ = filesystem(storage)
    run_name = job.run_name or f"{kind}-{uuid.uuid4().hex[:8]}"
    loop_config = {
        "kind": kind,
        "model_config": asdict(model_cfg),
        "width": schema.width,
        "train": asdict(train_cfg),
        # For the batch size (the in-memory rule): the split is by hash, so this is its expected size.
        "train_samples": int(round(n_samples * (1.0 - train_cfg.val_fraction))),
        "precision": job.precision,
        "threads": max(1, int(resources["CPU"])),
        "fail_at_epoch": job.fail_at_epoch,
        "fail_marker": os.path.join(tempfile.gettempdir(), f"unusual-fail-{run_name}"),
    }
    progress(
        f"training {kind} on {n_rows:,} rows with {job.num_workers} worker(s) x {resources} "
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
    threshold = calibrate_at_scale(module, calib, kind, asdict(model_cfg), schema.width, thr_cfg)
    threshold["fit_on"] = "validation" if train_cfg.val_fraction > 0 else "training"
    training = {
        **hist.summary(),
        "rows": int(n_rows),
        "samples_per_s": float(sum(hist.samples) / max(hist.seconds, 1e-9)),
        "config": asdict(train_cfg),
        "runner": "ray-train",
        "num_workers": job.num_workers,
        "resources_per_worker": resources,
        "use_gpu": job.use_gpu,
        "precision": job.precision,
        "run_name": run_name,
        "started_at_epoch": hist.started_at_epoch,
        "cached": bool(cached),
        "storage": storage,
        "wall_seconds": time.perf_counter() - t_start,
    }
    manifest = build_manifest(kind, asdict(model_cfg), schema, threshold, training)
    manifest = save_bundle(job.output, manifest, module, overwrite=job.overwrite)
    return manifest


# --------------------------------------------------------------------------- command line


def command(job: TrainJob) -> int:
    """``unusual train``: run the job and print its JSON summary on stdout."""
    manifest = run(job)
    t = manifest["training"]
    print(
        json.dumps(
            {
                "output": job.output,
                "model_version": manifest["model_version"],
                "threshold": threshold_of(manifest),
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
    return main_for("train", command, argv)


if __name__ == "__main__":
    sys.exit(main())
