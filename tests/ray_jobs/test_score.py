"""Batch scoring against a real S3 endpoint (moto server) and a real local Ray.

Bundles are trained once per module with the in-memory API (small, fast);
the job's output is checked row by row against ``Detector.score`` on the same
rows, for counts (rows in = scored + quarantined), the quarantine's content,
and a crash half-way followed by a rerun.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq
import pytest
import s3fs
from s3kit import cardio_with_ids, put_shards
from unusual.models import Detector, SchemaError
from unusual.models.errors import UnusualError
from unusual.models.metrics import roc_auc
from unusual.ray_jobs import sample_data
from unusual.ray_jobs.local_io import filesystem
from unusual.ray_jobs.score import QUARANTINE_DIR, ScoreJob, main, run

from unusual.config import ConfigError


def _read(uri: str) -> pa.Table:
    """The scored rows: every part at the top of the output (not _quarantine/)."""
    pafs, path, fs = filesystem(uri)
    files = sorted(p for p in fs.find(path) if p.rsplit("/", 1)[-1].startswith("part-") and "/_" not in p)
    return pa.concat_tables([pq.read_table(f, filesystem=pafs) for f in files])


@pytest.fixture(scope="module")
def cardio() -> pa.Table:
    return cardio_with_ids()


@pytest.fixture(scope="module")
def cardio_uri(cardio, s3_bucket, ray_cluster) -> str:
    return put_shards(s3_bucket, "score/cardio", cardio, 3, row_group=200)


@pytest.fixture(scope="module")
def ae(cardio, s3_bucket, s3_endpoint):
    normal = cardio.filter(pa.compute.invert(cardio.column("label")))  # fit on normal rows, score them all
    det = Detector("ae", exclude=["label", "id"], epochs=10, seed=0).fit(normal)
    uri = f"s3://{s3_bucket}/score/models/ae"
    det.save(uri, overwrite=True)
    return uri, det


@pytest.fixture(scope="module")
def ae_scored(ae, cardio_uri, s3_bucket):
    out = f"s3://{s3_bucket}/score/out/ae"
    summary = run(
        ScoreJob(
            checkpoint=ae[0], data=cardio_uri, output=out, keep_columns=["id", "label"], unit_rows=400, batch_size=256
        )
    )
    return out, summary


def test_ae_rows_in_equal_rows_out_and_scores_equal_in_memory(ae, ae_scored, cardio):
    out, summary = ae_scored
    n = cardio.num_rows
    assert summary["rows_in"] == summary["rows_scored"] == n
    assert summary["rows_quarantined"] == 0 and summary["quarantine"] is None
    t = _read(out).sort_by("id")
    assert t.num_rows == n
    assert t.column("id").to_pylist() == list(range(n))  # every row once: no loss, no duplicate
    assert t.column_names == ["id", "label", "anomaly_score", "is_anomaly", "top_features", "model_version"]
    expected = ae[1].score(cardio)
    np.testing.assert_allclose(t.column("anomaly_score").to_numpy(), expected, rtol=1e-6, atol=1e-9)
    assert t.column("is_anomaly").to_pylist() == list(expected > ae[1].threshold_)
    assert set(t.column("model_version").to_pylist()) == {ae[1].version}
    assert summary["anomalies"] == int((expected > ae[1].threshold_).sum())
    # Real detection quality on the batch output: cardio's labelled anomalies.
    assert roc_auc(t.column("label").to_numpy(), t.column("anomaly_score").to_numpy()) > 0.75
    feats = t.column("top_features")[0].as_py()
    assert len(feats) == 3 and feats[0]["contribution"] >= feats[-1]["contribution"]


def test_summary_and_spec_are_written(ae_scored):
    out, summary = ae_scored
    fs = s3fs.S3FileSystem()
    path = out.removeprefix("s3://")
    assert json.loads(fs.cat_file(f"{path}/_unusual/summary.json"))["rows_scored"] == summary["rows_scored"]
    spec = json.loads(fs.cat_file(f"{path}/_unusual/job.json"))
    assert spec["model_version"] == summary["model_version"] and len(spec["files"]) == 3


def test_rerun_of_a_complete_job_does_nothing(ae, ae_scored, cardio_uri):
    out, first = ae_scored
    again = run(
        ScoreJob(
            checkpoint=ae[0], data=cardio_uri, output=out, keep_columns=["id", "label"], unit_rows=400, batch_size=256
        )
    )
    assert again["units_resumed"] == again["units"] and again["rows_scored"] == first["rows_scored"]


def test_vae_scores_equal_in_memory(cardio, cardio_uri, s3_bucket):
    det = Detector("vae", exclude=["label", "id"], epochs=3, seed=0).fit(cardio)
    ckpt = f"s3://{s3_bucket}/score/models/vae"
    det.save(ckpt, overwrite=True)
    out = f"s3://{s3_bucket}/score/out/vae"
    # read="tasks": Ray Data read tasks feed the actors, as on GPUs; batches cut units into several parts.
    summary = run(
        ScoreJob(checkpoint=ckpt, data=cardio_uri, output=out, keep_columns=["id"], batch_size=500, read="tasks")
    )
    assert summary["parts"] > summary["units"]
    assert summary["rows_scored"] == cardio.num_rows
    t = _read(out).sort_by("id")
    np.testing.assert_allclose(t.column("anomaly_score").to_numpy(), det.score(cardio), rtol=1e-5, atol=1e-6)


def test_crash_half_way_then_rerun_gives_complete_output_without_duplicates(ae, cardio, cardio_uri, s3_bucket):
    out = f"s3://{s3_bucket}/score/out/crash"
    job = dict(keep_columns=["id"], unit_rows=400, batch_size=100, concurrency=1)
    with pytest.raises(Exception, match="fault injection"):
        run(ScoreJob(checkpoint=ae[0], data=cardio_uri, output=out, fail_after_parts=3, **job))
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    written = [p for p in fs.find(out.removeprefix("s3://")) if p.rsplit("/", 1)[-1].startswith("part-")]
    assert 0 < len(written) < 19  # stopped half-way: some parts, not all
    summary = run(ScoreJob(checkpoint=ae[0], data=cardio_uri, output=out, **job))
    assert summary["rows_in"] == summary["rows_scored"] == cardio.num_rows
    ids = _read(out).column("id").to_numpy()
    assert len(ids) == cardio.num_rows and len(np.unique(ids)) == cardio.num_rows


def test_bad_rows_and_bad_files_go_to_the_quarantine_with_the_reason(ae, cardio, s3_bucket):
    f00 = cardio.column("f00").to_numpy().copy()
    f00[[5, 1000]] = np.nan
    t = cardio.set_column(cardio.column_names.index("f00"), "f00", pa.array(f00))
    uri = put_shards(s3_bucket, "score/dirty", t, 2, row_group=200)
    # A third shard whose f01 is text: its rows cannot be scored at all.
    bad = t.slice(0, 50).set_column(1, "f01", pa.array(["x"] * 50))
    with s3fs.S3FileSystem().open(f"{s3_bucket}/score/dirty/part-009.parquet", "wb") as f:
        pq.write_table(bad, f)
    out = f"s3://{s3_bucket}/score/out/dirty"
    summary = run(ScoreJob(checkpoint=ae[0], data=uri, output=out, keep_columns=["id"]))
    n = cardio.num_rows + 50
    assert summary["rows_in"] == n
    assert summary["rows_quarantined"] == 52 and summary["rows_scored"] == n - 52
    scored = _read(out)
    assert 5 not in scored.column("id").to_pylist() and scored.num_rows == n - 52
    pafs, path, fs = filesystem(f"{out}/{QUARANTINE_DIR}")
    q = [pq.read_table(p, filesystem=pafs) for p in sorted(fs.find(path))]
    rows = [x.select(["id", "source_row", "error"]) for x in q if x.schema.field("f01").type != pa.string()]
    rows = pa.concat_tables(rows).sort_by("id")
    assert rows.column("id").to_pylist() == [5, 1000]
    assert rows.column("source_row").to_pylist() == [5, 1000 - 916]  # row numbers within their source file
    assert rows.column("error").to_pylist() == ["f00: NaN/inf/null"] * 2
    whole = [x for x in q if x.schema.field("f01").type == pa.string()]
    assert len(whole) == 1 and whole[0].num_rows == 50
    assert "column 'f01' has type string" in whole[0].column("error")[0].as_py()
    assert whole[0].column("source_file")[0].as_py().endswith("part-009.parquet")
    # The summary (and the terminal line of `unusual score`) say why, most frequent reason first.
    reasons = summary["quarantine_reasons"]
    assert list(reasons.values()) == [50, 2] and reasons["f00: NaN/inf/null"] == 2
    assert "column 'f01' has type string" in next(iter(reasons))


def test_a_partly_quarantined_run_says_why_on_the_terminal(monkeypatch, capsys):
    import unusual.ray_jobs.score as score

    summary = {"rows_in": 1881, "rows_quarantined": 52, "quarantine": "s3://b/out/_quarantine",
               "quarantine_reasons": {"f01: not a number": 50, "f00: NaN/inf/null": 2}}  # fmt: skip
    monkeypatch.setattr(score, "run", lambda job: summary)
    assert score.command(ScoreJob(checkpoint="c", data="d", output="o")) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == summary
    assert out.err.strip() == (
        "[unusual] 52 of 1,881 rows quarantined, not scored: f01: not a number (50 rows); f00: NaN/inf/null "
        "(2 rows); the rows and their reasons are in s3://b/out/_quarantine"
    )


def test_extreme_finite_values_are_scored_and_flagged_not_lost(ae, cardio, s3_bucket):
    """1e30 / 1e308 / the largest float64: finite, so scored (a finite, very high score) and flagged;
    none quarantined, none NaN."""
    t = cardio.slice(0, 300)
    f03 = t.column("f03").to_numpy().copy()
    extreme = {10: 1e30, 20: -1e30, 30: 1e308, 40: float(np.finfo(np.float64).max)}
    for row, value in extreme.items():
        f03[row] = value
    t = t.set_column(t.column_names.index("f03"), "f03", pa.array(f03))
    uri = put_shards(s3_bucket, "score/extreme", t, 2, row_group=100)
    out = f"s3://{s3_bucket}/score/out/extreme"
    summary = run(ScoreJob(checkpoint=ae[0], data=uri, output=out, keep_columns=["id"]))
    assert summary["rows_in"] == summary["rows_scored"] == t.num_rows and summary["rows_quarantined"] == 0
    scored = _read(out).sort_by("id")
    scores = scored.column("anomaly_score").to_numpy()
    assert np.isfinite(scores).all()
    flagged = scored.column("is_anomaly").to_numpy(zero_copy_only=False)
    assert flagged[list(extreme)].all()
    assert scores[list(extreme)].min() > 1000 * ae[1].threshold_


def test_lstm_scores_equal_in_memory_whatever_the_block_size(s3_bucket, ray_cluster):
    parts = []
    for name in ("nab_ec2_request_latency", "nab_machine_temperature"):
        t = sample_data.load(name).slice(0, 1200).drop_columns(["label"])
        parts.append(t.append_column("host", pa.array([name] * t.num_rows)))
    table = pa.concat_tables(parts)
    det = Detector("lstm", entity_column="host", time_column="timestamp", window=16, epochs=2, seed=0).fit(table)
    ckpt = f"s3://{s3_bucket}/score/models/lstm"
    det.save(ckpt, overwrite=True)
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    uri = put_shards(s3_bucket, "score/series", shuffled, 3, row_group=100)
    expected = det.score(shuffled)
    key = [f"{h}|{t}" for h, t in zip(shuffled.column("host").to_pylist(), shuffled.column("timestamp").to_pylist())]
    want = dict(zip(key, expected))
    for i, sizes in enumerate([{}, {"block_rows": 64, "unit_rows": 300, "bucket_rows": 500}]):
        out = f"s3://{s3_bucket}/score/out/lstm{i}"
        summary = run(ScoreJob(checkpoint=ckpt, data=uri, output=out, **sizes))
        assert summary["rows_scored"] == table.num_rows
        t = _read(out)
        assert t.column_names[:2] == ["host", "timestamp"]  # entity and time are kept by default
        got = {
            f"{h}|{ts}": s
            for h, ts, s in zip(*(t.column(c).to_pylist() for c in ("host", "timestamp", "anomaly_score")))
        }
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in key], [want[k] for k in key], rtol=1e-6, atol=1e-9)


def test_refuses_foreign_or_different_output(ae, ae_scored, cardio_uri, s3_bucket):
    out, _ = ae_scored
    with pytest.raises(UnusualError, match="holds the output of a different scoring job"):
        run(ScoreJob(checkpoint=ae[0], data=cardio_uri, output=out, keep_columns=["id"]))
    # the same units and read columns, but one more kept column (a feature): parts of two schemas otherwise
    with pytest.raises(UnusualError, match="holds the output of a different scoring job"):
        run(ScoreJob(checkpoint=ae[0], data=cardio_uri, output=out, keep_columns=["id", "label", "f00"], unit_rows=400))
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{s3_bucket}/score/foreign/notes.txt", b"mine")
    with pytest.raises(UnusualError, match="already holds files that unusual score did not write"):
        run(ScoreJob(checkpoint=ae[0], data=cardio_uri, output=f"s3://{s3_bucket}/score/foreign"))


def test_bad_requests_name_the_column(ae, cardio, cardio_uri, s3_bucket):
    with pytest.raises(SchemaError, match=r"--keep-columns 'customer' is not a column of .*part-000.parquet"):
        run(
            ScoreJob(
                checkpoint=ae[0], data=cardio_uri, output=f"s3://{s3_bucket}/score/out/x", keep_columns=["customer"]
            )
        )
    uri = put_shards(s3_bucket, "score/nof00", cardio.drop_columns(["f00"]), 1, row_group=200)
    with pytest.raises(SchemaError, match=r"no file can be scored by this model: .*missing column\(s\) \['f00'\]"):
        run(ScoreJob(checkpoint=ae[0], data=uri, output=f"s3://{s3_bucket}/score/out/y"))
    clash = (
        "--keep-columns: ['anomaly_score'] would clash with the output columns "
        "['anomaly_score', 'is_anomaly', 'top_features', 'model_version']"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(clash)}$"):
        ScoreJob.validated(dict(checkpoint=ae[0], data=cardio_uri, output="x", keep_columns=["anomaly_score"]))


def test_cli_writes_local_output(ae, cardio_uri, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["--checkpoint", ae[0], "--data", cardio_uri, "--output", str(out), "--keep-columns", "id"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_scored"] == pq.read_table(out).num_rows == 1831
    assert not [p for p in out.rglob(".tmp-*")]


@pytest.mark.parametrize(
    ("cluster", "concurrency", "expected"),
    [
        # Four actors share a GPU by default; fewer where CPUs are short.
        ({"CPU": 16.0, "GPU": 1.0}, None, {"concurrency": 4, "num_gpus": 0.25, "num_cpus": 1.0}),
        ({"CPU": 16.0, "GPU": 2.0}, None, {"concurrency": 8, "num_gpus": 0.25, "num_cpus": 1.0}),
        ({"CPU": 3.0, "GPU": 1.0}, None, {"concurrency": 2, "num_gpus": 0.5, "num_cpus": 1.0}),
        ({"CPU": 2.0, "GPU": 1.0}, None, {"concurrency": 1, "num_gpus": 1.0, "num_cpus": 1.0}),
        # --concurrency: one actor per GPU, or a share of one.
        ({"CPU": 16.0, "GPU": 2.0}, 2, {"concurrency": 2, "num_gpus": 1.0, "num_cpus": 1.0}),
        ({"CPU": 16.0, "GPU": 1.0}, 3, {"concurrency": 3, "num_gpus": 0.3333, "num_cpus": 1.0}),
    ],
)
def test_gpu_actor_plan(monkeypatch, cluster, concurrency, expected):
    import ray
    from unusual.ray_jobs.score_plan import plan_actors

    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    monkeypatch.setattr(ray, "available_resources", lambda: cluster)
    job = ScoreJob(checkpoint="m", data="d", output="o", use_gpu=True, concurrency=concurrency)
    plan = plan_actors(job, "tasks")
    assert {k: plan[k] for k in expected} == expected


def test_gpu_plan_errors(monkeypatch):
    import ray
    from unusual.ray_jobs.score_plan import plan_actors

    from unusual.runtime import ResourceError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0})
    with pytest.raises(ResourceError, match=r"^--use-gpu needs a GPU; the cluster has 0$"):
        plan_actors(ScoreJob(checkpoint="m", data="d", output="o", use_gpu=True), "tasks")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 400.0, "GPU": 1.0})
    with pytest.raises(ResourceError, match=r"under 1 % of a GPU"):
        plan_actors(ScoreJob(checkpoint="m", data="d", output="o", use_gpu=True, concurrency=200), "tasks")
