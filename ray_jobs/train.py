"""Distributed training: Parquet on object storage -> Ray Data -> Ray Train -> bundle.

    unusual train --model ae --data s3://bucket/events/ --output s3://bucket/models/ae-1
    python -m unusual.ray_jobs.train --model ae --data ... --output ...     (the same code path)

1. The Parquet shards are listed and checked (one schema).
2. The data is read, the feature schema fit, rows encoded (or LSTM windows built per entity) and
   split into train / validation by a content hash (:mod:`unusual.ray_jobs.train_data`): by the
   driver for small inputs, by Ray Data tasks otherwise, kept in the object store when it fits.
3. Ray Train runs ``unusual.ray_jobs.train_worker.train_loop`` on N workers (DDP, gloo on CPU,
   NCCL on GPU) with the same epoch loop as the in-memory API
   (``unusual.models.training.train_epochs``): each worker trains from its share in memory (or
   streams it), the losses are all-reduced, rank 0 checkpoints to the run's storage at a cadence
   costing under 5 % of the training time, and early stopping follows the validation loss.
   Failed workers restart from the last checkpoint (``--max-failures``).
4. The threshold is fit on the validation split's full score distribution (the workers score
   the split they hold; only each worker's exact top tail is gathered), the bundle is written
   to ``--output`` and the run's checkpoints are removed (``--keep-checkpoints`` keeps them).
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
from ..models.bundle import build_manifest, save_bundle
from ..models.detector import split_params
from ..models.manifest import Manifest, TrainingRecord
from ..models.registry import family
from ..runtime import (
    ResourceError,
    checkpoint_directory,
    ensure_ray,
    progress,
    quick_ray_train,
    sweep_temp_dirs,
    train_worker_resources,
)
from .local_io import filesystem, refuse_existing_bundle
from .threshold import calibrate_at_scale
from .train_data import prepare
from .train_worker import LoopConfig, TrainState, train_loop

__all__ = ["ResourceError", "TrainJob", "command", "main", "run"]

log = logging.getLogger("unusual")


# --------------------------------------------------------------------------- the job


def default_storage(output: str) -> str:
    """Where a run's checkpoints go without ``--storage``: beside the bundle, never inside it."""
    return f"{output.rstrip('/')}.checkpoints"


def remove_run(storage: str, run_name: str, defaulted: bool) -> None:
    """Delete a finished run's checkpoints (and the default storage folder once empty)."""
    pafs, path, fs = filesystem(storage)
    run_dir = f"{path.rstrip('/')}/{run_name}"
    try:
        if fs.exists(run_dir):
            fs.rm(run_dir, recursive=True)
        if defaulted and fs.exists(path) and not fs.ls(path):
            fs.rm(path, recursive=True)
    except OSError as e:  # the bundle is written; a leftover folder is not worth failing the job
        log.warning("could not remove the checkpoints at %s: %s", run_dir, e)


def run(job: TrainJob) -> Manifest:
    """Train and write the bundle; returns its manifest. With ``job.mlflow``, inside an MLflow run that
    logs the parameters, the per-epoch losses and the bundle, registered as a model
    (:func:`unusual.tracking.track_training`; the manifest then has an ``"mlflow"`` record)."""
    if job.mlflow:
        from ..tracking import track_training

        refuse_existing_bundle(job.output, job.overwrite)  # before an MLflow run is opened
        return track_training(job, _train)
    return _train(job)


def _train(job: TrainJob) -> Manifest:
    refuse_existing_bundle(job.output, job.overwrite)
    sweep_temp_dirs()
    kind, params = job.detector()
    model_cfg, feat_cfg, train_cfg, thr_cfg = split_params(kind, params)
    fam = family(kind)
    ensure_ray(job.address)
    quick_ray_train()
    t_start = time.perf_counter()
    prep = prepare(job, fam, model_cfg, feat_cfg, train_cfg, progress)
    resources = train_worker_resources(job.num_workers, job.use_gpu, job.cpus_per_worker, streaming=prep.pieces is None)
    defaulted = job.storage is None
    storage = job.storage or default_storage(job.output)
    run_name = job.run_name or f"{kind}-{uuid.uuid4().hex[:8]}"
    loop = LoopConfig(
        kind=kind,
        model_config=asdict(model_cfg),
        width=prep.schema.width,
        train=train_cfg,
        threshold=thr_cfg,
        pieces=prep.pieces,
        # For the batch size (the in-memory rule): the split is by hash, so this is its expected size.
        train_samples=int(round(prep.n_samples * (1.0 - train_cfg.val_fraction))),
        precision=job.precision,
        threads=max(1, int(resources["CPU"])),
        checkpoint_every=job.checkpoint_every,
        fail_at_epoch=job.fail_at_epoch,
        fail_marker=os.path.join(tempfile.gettempdir(), f"unusual-fail-{os.getpid()}-{run_name}"),
    )
    progress(
        f"training {kind} on {prep.n_samples:,} {'windows' if fam.sequence else 'rows'} ({prep.how}) with "
        f"{job.num_workers} worker(s) x {resources} (run {run_name}, checkpoints in {storage})"
    )
    state = _fit(job, loop, prep, resources, storage, run_name)
    module, threshold = _calibrated(state, fam, kind, model_cfg, train_cfg, thr_cfg, prep)
    training = _training_record(job, state, prep, train_cfg, resources, run_name, storage)
    training.wall_seconds = time.perf_counter() - t_start
    manifest = build_manifest(kind, asdict(model_cfg), prep.schema, threshold, training)
    manifest = save_bundle(job.output, manifest, module, overwrite=job.overwrite)
    if not job.keep_checkpoints:
        remove_run(storage, run_name, defaulted)
    return manifest


def _training_record(job: TrainJob, state: TrainState, prep, train_cfg, resources: dict, run_name: str,
                     storage: str) -> TrainingRecord:
    """The manifest's ``training``: the history's summary, the data and how the run was made."""
    hist = state.history
    # the distinct training samples (an epoch's count may repeat a few to give workers equal steps)
    distinct = {"train_samples": int(state.train_samples)} if state.train_samples else {}
    return hist.training_record(
        rows=int(prep.n_rows),
        **distinct,
        samples_per_s=float(sum(hist.samples) / max(hist.seconds, 1e-9)),
        config=asdict(train_cfg),
        runner="ray-train",
        num_workers=job.num_workers,
        resources_per_worker=resources,
        use_gpu=job.use_gpu,
        precision=job.precision,
        run_name=run_name,
        started_at_epoch=hist.started_at_epoch,
        epoch_seconds=hist.epoch_seconds,
        data=prep.how,
        cached=prep.how != "streaming",
        storage=storage if job.keep_checkpoints else None,
    )


def _fit(job: TrainJob, loop: LoopConfig, prep, resources: dict, storage: str, run_name: str) -> TrainState:
    """Ray Train's run of :func:`train_loop` on ``job.num_workers`` workers; the final checkpoint's state."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    streaming = prep.pieces is None
    pafs, storage_path, _ = filesystem(storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=pafs,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": prep.train_ds, "val": prep.val_ds} if streaming else None,
        dataset_config=DataConfig(datasets_to_split="all") if streaming else None,
    )
    try:
        result = trainer.fit()
    finally:
        if os.path.exists(loop.fail_marker):
            os.remove(loop.fail_marker)
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with checkpoint_directory(result.checkpoint) as d:
        return TrainState.load(d)


def _calibrated(state: TrainState, fam, kind: str, model_cfg, train_cfg, thr_cfg, prep) -> tuple:
    """The trained module and its threshold record: as the workers calibrated it on the splits they held,
    or (streamed data) calibrated here on the Ray Datasets."""
    module = fam.module(model_cfg, prep.schema.width)
    if state.threshold is not None:  # the workers calibrated on the validation split they hold
        module.load_state_dict(state.calibrated_model)
        return module, state.threshold
    progress("scoring the validation split for the threshold …")
    module.load_state_dict(state.stopper["best_state"])
    calib = prep.val_ds if train_cfg.val_fraction > 0 else prep.train_ds
    every = prep.train_ds.union(prep.val_ds) if train_cfg.val_fraction > 0 else prep.train_ds
    threshold = calibrate_at_scale(module, calib, kind, asdict(model_cfg), prep.schema.width, thr_cfg, every)
    threshold.fit_on = "validation" if train_cfg.val_fraction > 0 else "training"
    return module, threshold


# --------------------------------------------------------------------------- command line


def command(job: TrainJob) -> int:
    """``unusual train``: run the job and print its JSON summary on stdout."""
    manifest = run(job)
    t = manifest.training
    print(
        json.dumps(
            {
                "output": job.output,
                "model_version": manifest.model_version,
                "threshold": manifest.threshold.value,
                "rows": t.rows,
                "train_samples": t.train_samples,
                "epochs_run": len(t.val_loss),
                "best_val_loss": min(t.val_loss),
                "samples_per_s": round(t.samples_per_s, 1),
                "wall_seconds": round(t.wall_seconds, 1),
                **({"mlflow": manifest.mlflow} if manifest.mlflow else {}),
            },
            indent=1,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for("train", command, argv)


if __name__ == "__main__":
    sys.exit(main())
