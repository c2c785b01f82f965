"""Distributed training against a real S3 endpoint (moto server) and a real local Ray.

Each model kind is trained once with 2 workers on CPU; the bundles are then
checked like any other: loaded by the in-memory API, scored, and judged on
real data (the shipped ODDS cardio set) with a ROC-AUC floor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from s3kit import put_shards
from unusual.models import BundleError, Detector, SchemaError, Scorer
from unusual.models.metrics import roc_auc
from unusual.ray_jobs import sample_data
from unusual.ray_jobs.data import DataError
from unusual.ray_jobs.train import ResourceError, TrainJob, run

FAST = {"epochs": 3, "hidden": [32, 16]}


@pytest.fixture(scope="module")
def cardio_uri(s3_bucket, ray_cluster) -> str:
    return put_shards(s3_bucket, "data/cardio", sample_data.load("cardio"), 4)


@pytest.fixture(scope="module")
def series_uri(s3_bucket, ray_cluster) -> str:
    """Two real NAB series as two entities, shuffled across shards."""
    parts = []
    for name in ("nab_ec2_request_latency", "nab_machine_temperature"):
        t = sample_data.load(name).slice(0, 1500).drop_columns(["label"])
        parts.append(t.append_column("host", pa.array([name] * t.num_rows)))
    table = pa.concat_tables(parts)
    table = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    return put_shards(s3_bucket, "data/series", table, 3)


@pytest.fixture(scope="module")
def ae_run(cardio_uri, s3_bucket):
    out = f"s3://{s3_bucket}/models/ae"
    return out, run(
        TrainJob(data=cardio_uri, output=out, model="ae", params={"exclude": ["label"], **FAST}, num_workers=2)
    )


def test_ae_bundle_from_s3(ae_run):
    out, manifest = ae_run
    t = manifest.training
    assert manifest.kind == "ae" and t.runner == "ray-train"
    # Small data is read and encoded by the driver; the workers hold it in memory and share every CPU.
    assert t.data == "driver" and t.cached is True
    assert t.num_workers == 2 and t.resources_per_worker == {"CPU": 1.0}
    assert len(t.val_loss) == 3 and t.rows == 1831
    # The checkpoints went to the run's storage beside the bundle and were removed on success.
    fs = s3fs.S3FileSystem()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("s3://"))) == ["manifest.json", "weights.pt"]
    assert not fs.exists(out.removeprefix("s3://") + ".checkpoints") and t.storage is None
    # Every row is in exactly one split; the validation part is ~15 %.
    assert 0.10 * 1831 < manifest.threshold.n_scores < 0.20 * 1831
    assert manifest.threshold.fit_on == "validation"
    det = Detector.load(out)
    assert det.version == manifest.model_version
    # Per-column error levels (and the joint score's latent statistics) were calibrated across the cluster.
    scale = det.bundle_.module.error_scale
    assert (scale > 0).all() and not torch.allclose(scale, torch.ones_like(scale))
    cardio = sample_data.load("cardio")
    x = cardio.drop_columns(["label"])
    scores = det.score(x)
    assert np.array_equal(scores, Scorer(out).scores(x))
    # Real data: cardio's pathologic rows score higher (measured 0.93 with 3 epochs).
    assert roc_auc(cardio.column("label").to_numpy(), scores) > 0.80


def test_existing_bundle_is_refused(ae_run, cardio_uri):
    out, _ = ae_run
    with pytest.raises(BundleError, match="a bundle already exists at .*; pass --overwrite"):
        run(TrainJob(data=cardio_uri, output=out, model="ae", params={"exclude": ["label"], **FAST}))


def test_vae_resumes_after_a_worker_dies(cardio_uri, s3_bucket):
    """One worker process exits at epoch 2; the group restarts from the epoch-1 checkpoint.
    This run also streams the shards from S3 every epoch (no cache), the path for
    data larger than memory, and keeps its checkpoints."""
    out = f"s3://{s3_bucket}/models/vae"
    from ray._common.utils import get_default_system_temp_dir

    locks = Path(get_default_system_temp_dir()) / "_ray_lockfiles"  # Ray Train's TempFileLock files
    before = set(os.listdir(locks)) if locks.is_dir() else set()
    manifest = run(
        TrainJob(
            data=cardio_uri,
            output=out,
            model="vae",
            params={"exclude": ["label"], **FAST},
            num_workers=2,
            fail_at_epoch=2,
            max_failures=1,
            cache=False,
            checkpoint_every=1,
            keep_checkpoints=True,
            storage=f"s3://{s3_bucket}/runs",
            run_name="vae-resumes",
        )
    )
    t = manifest.training
    assert t.cached is False and t.data == "streaming"
    assert s3fs.S3FileSystem().ls(f"{s3_bucket}/runs/vae-resumes") and t.storage == f"s3://{s3_bucket}/runs"
    # Restarted once, from the checkpoint of epoch 1, not from scratch.
    assert t.started_at_epoch == [0, 2]
    # Reading the checkpoints back (the restarted workers, the driver) left no lock files behind.
    assert (set(os.listdir(locks)) if locks.is_dir() else set()) <= before
    assert len(t.val_loss) == 3
    det = Detector.load(out)
    cardio = sample_data.load("cardio")
    assert roc_auc(cardio.column("label").to_numpy(), det.score(cardio.drop_columns(["label"]))) > 0.80


def test_lstm_windows_per_entity(series_uri, s3_bucket):
    out = f"s3://{s3_bucket}/models/lstm"
    params = {"entity_column": "host", "time_column": "timestamp", "window": 8, "epochs": 2, "hidden": 16}
    # driver_read_mb=0: Ray Data reads, windows per entity in its tasks and keeps the windows
    # in the object store; each worker fetches its share once. A worker dies at epoch 1: the
    # restarted group fetches its shares again and resumes from the epoch-0 checkpoint.
    job = TrainJob(
        data=series_uri,
        output=out,
        model="lstm",
        params=params,
        num_workers=2,
        driver_read_mb=0,
        fail_at_epoch=1,
        max_failures=1,
        checkpoint_every=1,
    )
    manifest = run(job)
    t = manifest.training
    assert t.data == "object-store" and t.started_at_epoch == [0, 1] and len(t.val_loss) == 2
    # Full windows only, never across entities: 2 series x (1500 - 9 + 1) windows in all,
    # each in exactly one split.
    n_windows = 2 * (1500 - 9 + 1)
    assert t.train_samples + manifest.threshold.n_scores == n_windows
    det = Detector.load(out)
    table = pq.read_table(series_uri.replace("s3://", ""), filesystem=s3fs.S3FileSystem())
    scores = det.score(table)
    assert scores.shape == (table.num_rows,) and np.isfinite(scores).all()


# --------------------------------------------------------------------------- bad data and resources


def test_shards_with_different_schemas(s3_bucket, ray_cluster):
    fs = s3fs.S3FileSystem()
    with fs.open(f"{s3_bucket}/bad/mixed/a.parquet", "wb") as f:
        pq.write_table(pa.table({"x": [1.0, 2.0], "y": [1.0, 2.0]}), f)
    with fs.open(f"{s3_bucket}/bad/mixed/b.parquet", "wb") as f:
        pq.write_table(pa.table({"x": [1.0, 2.0], "y": ["a", "b"]}), f)
    with pytest.raises(
        DataError,
        match=r"shards disagree on their schema: .*a.parquet has \(x: double, y: double\) "
        r"but .*b.parquet has \(x: double, y: string\)",
    ):
        run(TrainJob(data=f"s3://{s3_bucket}/bad/mixed", output=f"s3://{s3_bucket}/models/x", model="ae"))


def test_undeclared_non_numeric_column(s3_bucket, ray_cluster):
    fs = s3fs.S3FileSystem()
    with fs.open(f"{s3_bucket}/bad/strings/a.parquet", "wb") as f:
        pq.write_table(pa.table({"x": [1.0, 2.0], "proto": ["tcp", "udp"], "svc": ["http", "ftp"]}), f)
    with pytest.raises(SchemaError, match="column 'svc' has non-numeric type string and is not declared categorical"):
        run(
            TrainJob(
                data=f"s3://{s3_bucket}/bad/strings",
                output=f"s3://{s3_bucket}/models/x",
                model="ae",
                params={"categorical": ["proto"]},
            )
        )


def test_empty_prefix(s3_bucket, ray_cluster):
    with pytest.raises(DataError, match="no Parquet files at s3://unusual-test/nothing/here"):
        run(TrainJob(data=f"s3://{s3_bucket}/nothing/here", output=f"s3://{s3_bucket}/models/x", model="ae"))


def test_missing_bucket(ray_cluster):
    with pytest.raises(DataError, match="s3://no-such-bucket-4242/data"):
        run(TrainJob(data="s3://no-such-bucket-4242/data", output="/tmp/unusual-never-written", model="ae"))


def test_impossible_resources(cardio_uri, s3_bucket):
    with pytest.raises(ResourceError, match=r"needs 1 GPU\(s\); the cluster has 0"):
        run(TrainJob(data=cardio_uri, output=f"s3://{s3_bucket}/models/x", model="ae", use_gpu=True))
    with pytest.raises(ResourceError, match=r"4 worker\(s\) x 1 CPU need 4 CPUs; the cluster has 2"):
        run(
            TrainJob(data=cardio_uri, output=f"s3://{s3_bucket}/models/x", model="ae", num_workers=4, cpus_per_worker=1)
        )


def test_wrong_credentials(cardio_uri, s3_bucket, monkeypatch):
    """With moto's IAM checks on, unknown keys are refused: a clear error, no hang."""
    from moto.core.authorization import enable_iam_authentication

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with enable_iam_authentication():
            with pytest.raises(DataError, match=r"access denied checking s3://unusual-test/models/x: check the cred"):
                run(TrainJob(data=cardio_uri, output=f"s3://{s3_bucket}/models/x", model="ae"))
            with pytest.raises(DataError, match=r"access denied reading s3://unusual-test/data/cardio: check the cred"):
                run(TrainJob(data=cardio_uri, output="/tmp/unusual-never-written", model="ae"))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
