"""``unusual score --incremental`` against a real S3 endpoint (moto server) and a real local Ray: partitions
land between runs, a run crashes half-way, a file is rewritten, a new model version arrives; every input
row ends scored exactly once per model version (ids checked), and the anomaly-rate watch flags a
partition whose anomalies are concentrated."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from s3kit import cardio_with_ids
from unusual.models import Detector
from unusual.ray_jobs.incremental import run
from unusual.ray_jobs.local_io import filesystem
from unusual.ray_jobs.score import ScoreJob, main

from unusual.config import ConfigError

DAYS = [f"dt=2026-12-0{d}" for d in range(1, 8)]


@pytest.fixture(scope="module")
def cardio() -> pa.Table:
    """Cardio with ids, shuffled once, anomalies kept (the data as users have it)."""
    t = cardio_with_ids()
    return t.take(pa.array(np.random.default_rng(0).permutation(t.num_rows)))


@pytest.fixture(scope="module")
def bundles(cardio, s3_bucket, ray_cluster):
    out = {}
    for seed in (0, 1):  # two model versions
        det = Detector("ae", exclude=["label", "id"], epochs=8, seed=seed).fit(cardio)
        uri = f"s3://{s3_bucket}/inc/models/ae-{seed}"
        det.save(uri, overwrite=True)
        out[seed] = (uri, det)
    return out


def _partition(cardio: pa.Table, i: int) -> pa.Table:
    """Day i's rows: a seventh of cardio."""
    step = -(-cardio.num_rows // len(DAYS))
    return cardio.slice(i * step, step)


def _put(bucket: str, root: str, name: str, table: pa.Table, files: int = 2) -> None:
    fs = s3fs.S3FileSystem()
    step = -(-table.num_rows // files)
    for j in range(files):
        with fs.open(f"{bucket}/{root}/{name}/part-{j}.parquet", "wb") as f:
            pq.write_table(table.slice(j * step, step), f, row_group_size=100)


def _scored(uri: str) -> pa.Table:
    """Every scored row under an incremental output's model version folders (parts, not quarantine)."""
    pafs, path, fs = filesystem(uri)
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(path) if p.rsplit("/", 1)[-1].startswith("part-") and "/_" not in p)
    return pa.concat_tables([pq.read_table(f, filesystem=pafs) for f in files])


def _run(capsys, *args) -> dict:
    """``unusual score --incremental`` ARGS: its JSON summary, with what it said on stderr as ``"stderr"``."""
    assert main(["--incremental", "--keep-columns", "id,label", "--unit-rows", "200", *args]) == 0
    said = capsys.readouterr()
    return {**json.loads(said.out), "stderr": said.err}


def test_runs_with_new_partitions_and_a_crash_score_every_row_once(cardio, bundles, s3_bucket, capsys):
    data, out = f"s3://{s3_bucket}/inc/events", f"s3://{s3_bucket}/inc/scores"
    uri, det = bundles[0]
    args = ["--checkpoint", uri, "--data", data, "--output", out]
    for i in range(3):
        _put(s3_bucket, "inc/events", DAYS[i], _partition(cardio, i))
    first = _run(capsys, *args)
    assert first["partitions_scored"] == 3 and first["partitions_already_scored"] == 0
    assert first["scores"] == f"{out}/model_version={det.version}"

    for i in range(3, 5):
        _put(s3_bucket, "inc/events", DAYS[i], _partition(cardio, i))
    crash = ScoreJob(checkpoint=uri, data=data, output=out, incremental=True, keep_columns=["id", "label"],
                     unit_rows=200, concurrency=1, fail_after_parts=2)
    with pytest.raises(Exception, match="fault injection"):
        run(crash)
    capsys.readouterr()
    second = _run(capsys, *args)
    assert second["resumed_run"] and second["partitions_scored"] == 2 and second["partitions_already_scored"] == 3

    _put(s3_bucket, "inc/events", DAYS[5], _partition(cardio, 5))
    third = _run(capsys, *args)
    assert third["partitions_scored"] == 1 and third["partitions_already_scored"] == 5

    given = pa.concat_tables([_partition(cardio, i) for i in range(6)]).sort_by("id")
    t = _scored(third["scores"]).sort_by("id")
    assert t.column("id").to_pylist() == given.column("id").to_pylist()  # every row once: none lost, none twice
    assert sum(r["rows_scored"] for r in (first, second, third)) == given.num_rows
    np.testing.assert_allclose(t.column("anomaly_score").to_numpy(), det.score(given), rtol=1e-6, atol=1e-9)
    fs = s3fs.S3FileSystem()
    for i in range(6):  # each partition's scores under its own partition path, with its record
        assert fs.ls(f"{third['scores'].removeprefix('s3://')}/{DAYS[i]}")
    assert len(fs.ls(third["ledger"].removeprefix("s3://"))) == 6

    nothing = _run(capsys, *args)
    assert nothing["partitions_scored"] == 0 and nothing["partitions_already_scored"] == 6


def test_a_rewritten_file_is_scored_again_and_reported(cardio, bundles, s3_bucket, capsys):
    data, out = f"s3://{s3_bucket}/inc/changed", f"s3://{s3_bucket}/inc/changed-scores"
    uri, det = bundles[0]
    args = ["--checkpoint", uri, "--data", data, "--output", out]
    for i in range(2):
        _put(s3_bucket, "inc/changed", DAYS[i], _partition(cardio, i))
    assert _run(capsys, *args)["partitions_scored"] == 2
    smaller = _partition(cardio, 1).slice(0, 100)
    with s3fs.S3FileSystem().open(f"{s3_bucket}/inc/changed/{DAYS[1]}/part-1.parquet", "wb") as f:
        pq.write_table(smaller, f)
    again = _run(capsys, *args)
    err = again["stderr"]
    assert again["partitions_scored"] == 1 and again["partitions_changed"] == 1
    assert f"partition {DAYS[1]} changed since it was scored: {DAYS[1]}/part-1.parquet: size " in err
    day1 = _partition(cardio, 1)
    given = pa.concat_tables([_partition(cardio, 0), day1.slice(0, -(-day1.num_rows // 2)), smaller])
    t = _scored(again["scores"])
    assert sorted(t.column("id").to_pylist()) == sorted(given.column("id").to_pylist())


def test_a_crashed_run_whose_partition_changed_is_dropped_not_resumed(cardio, bundles, s3_bucket, capsys):
    """A run in flight cannot resume once a file of its partitions changed (its plan would differ): it is
    dropped, its half-written partition cleared and scored afresh; what it did not touch stays committed."""
    data, out = f"s3://{s3_bucket}/inc/dropped", f"s3://{s3_bucket}/inc/dropped-scores"
    uri, _ = bundles[0]
    args = ["--checkpoint", uri, "--data", data, "--output", out]
    _put(s3_bucket, "inc/dropped", DAYS[0], _partition(cardio, 0))
    assert _run(capsys, *args)["partitions_scored"] == 1
    _put(s3_bucket, "inc/dropped", DAYS[1], _partition(cardio, 1))
    crash = ScoreJob(checkpoint=uri, data=data, output=out, incremental=True, keep_columns=["id", "label"],
                     unit_rows=200, concurrency=1, fail_after_parts=1)
    with pytest.raises(Exception, match="fault injection"):
        run(crash)
    capsys.readouterr()
    smaller = _partition(cardio, 1).slice(0, 150)
    _put(s3_bucket, "inc/dropped", DAYS[1], smaller)  # rewritten before the next run
    again = _run(capsys, *args)
    assert "dropping run" in again["stderr"] and again["partitions_scored"] == 1 and not again["resumed_run"]
    given = pa.concat_tables([_partition(cardio, 0), smaller])
    assert sorted(_scored(again["scores"]).column("id").to_pylist()) == sorted(given.column("id").to_pylist())


def test_filter_and_a_new_model_version(cardio, bundles, s3_bucket, capsys):
    data, out = f"s3://{s3_bucket}/inc/versions", f"s3://{s3_bucket}/inc/versions-scores"
    for i in range(4):
        _put(s3_bucket, "inc/versions", DAYS[i], _partition(cardio, i), files=1)
    old = _run(capsys, "--checkpoint", bundles[0][0], "--data", data, "--output", out,
               "--partition-filter", "dt>=2026-12-03")
    assert [p["partition"] for p in old["partitions"]] == [DAYS[2], DAYS[3]]
    new = _run(capsys, "--checkpoint", bundles[1][0], "--data", data, "--output", out)
    assert new["model_version"] == bundles[1][1].version != old["model_version"]
    assert new["partitions_scored"] == 4 and new["scores"] != old["scores"]
    assert _scored(new["scores"]).num_rows == sum(_partition(cardio, i).num_rows for i in range(4))
    assert _scored(old["scores"]).num_rows == sum(_partition(cardio, i).num_rows for i in (2, 3))


def test_the_watch_flags_a_partition_of_concentrated_anomalies(cardio, bundles, s3_bucket, capsys):
    data, out = f"s3://{s3_bucket}/inc/watch", f"s3://{s3_bucket}/inc/watch-scores"
    # a feed gone wrong, played by cardio's 176 labelled anomalies landing as one partition
    _put(s3_bucket, "inc/watch", "dt=jump", cardio.filter(cardio.column("label")), 1)
    for i in range(4):
        _put(s3_bucket, "inc/watch", f"dt=normal-{i}", _partition(cardio, i), 1)
    summary = _run(capsys, "--checkpoint", bundles[0][0], "--data", data, "--output", out)
    err = summary["stderr"]
    alarms = {p["partition"]: p["alarm"] for p in summary["partitions"]}
    assert alarms == {"dt=jump": "high", **{f"dt=normal-{i}": None for i in range(4)}}
    assert len(summary["rate_alarms"]) == 1 and "dt=jump" in err and "anomaly-rate watch" in err
    prom = s3fs.S3FileSystem().cat(f"{out.removeprefix('s3://')}/_unusual/metrics.prom").decode()
    assert f'unusual_partition_rate_alarm{{partition="dt=jump",model_version="{bundles[0][1].version}"}} 1' in prom
    # unusual evaluate on the version's folder charts the rate over the partitions, from the ledger
    from unusual.ray_jobs.evaluate import main as evaluate

    assert evaluate(["--scores", summary["scores"], "--label-column", "label"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert [(r["partition"], r["alarm"]) for r in metrics["partition_rates"]] == [
        ("dt=jump", "high"), *((f"dt=normal-{i}", None) for i in range(4))]
    html = s3fs.S3FileSystem().cat(f"{summary['scores'].removeprefix('s3://')}/_evaluation/report.html").decode()
    assert 'aria-label="Anomaly rate by partition"' in html


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"partition_filter": ["dt>=1"]}, "--partition-filter needs --incremental"),
        ({"incremental": True, "partition_filter": ["dt>"]},
         "--partition-filter: 'dt>': expected KEY<OP>VALUE with OP one of >= <= > < = !=, e.g. dt>=2026-12-01"),
        ({"incremental": True, "overwrite": True},
         "--overwrite deletes the record --incremental keeps: use --rescore to score again"),
    ],
)
def test_incremental_options_are_checked_before_any_work(given, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        ScoreJob.validated(dict(checkpoint="c", data="d", output="o", **given))


def test_delta_and_iceberg_appends_are_scored_exactly_once(cardio, bundles, s3_bucket, s3_endpoint, monkeypatch,
                                                           tmp_path, capsys):
    """Delta and Iceberg tables (Iceberg with PyIceberg's SQL catalog on SQLite), each on local disk and on the
    S3 endpoint: a run, an append, a run, a run with nothing new; the appended rows, and only they, are scored
    by the second run."""
    deltalake = pytest.importorskip("deltalake")
    pytest.importorskip("pyiceberg")
    from test_lakehouse import iceberg_catalog
    from unusual.ray_jobs.lakehouse import delta_storage_options

    uri, det = bundles[0]
    halves = [cardio.slice(0, 1000), cardio.slice(1000)]

    def delta(location: str):
        return f"delta+{location}", lambda t: deltalake.write_deltalake(
            location, t, mode="append", storage_options=delta_storage_options(location))

    def iceberg(name: str, warehouse: str, **props):
        catalog = iceberg_catalog(monkeypatch, name, tmp_path / f"{name}.db", warehouse, **props)
        return f"iceberg://{name}/sensors.raw.cardio", catalog.create_table(("sensors", "raw", "cardio"),
                                                                            schema=cardio.schema).append

    s3 = {"s3.endpoint": s3_endpoint, "s3.region": "us-east-1"}  # the writer's catalog; the reader takes AWS_*
    tables = dict([
        delta(str(tmp_path / "delta-events")), delta(f"s3://{s3_bucket}/inc/delta-events"),
        iceberg("localcat", f"file://{tmp_path}/warehouse"), iceberg("s3cat", f"s3://{s3_bucket}/inc/warehouse", **s3),
    ])
    for i, (data, append) in enumerate(tables.items()):
        out = f"s3://{s3_bucket}/inc/table-scores-{i}"
        args = ["--checkpoint", uri, "--data", data, "--output", out]
        append(halves[0])
        first = _run(capsys, *args)
        append(halves[1])
        second = _run(capsys, *args)
        third = _run(capsys, *args)
        assert (first["rows_scored"], second["rows_scored"], third["rows_scored"]) == (1000, halves[1].num_rows, 0)
        assert [p["partition"].partition("=")[0] for p in first["partitions"] + second["partitions"]] == [
            "table_version"] * 2
        t = _scored(second["scores"]).sort_by("id")
        assert t.column("id").to_pylist() == sorted(cardio.column("id").to_pylist()), data  # each row once
        np.testing.assert_allclose(t.column("anomaly_score").to_numpy(), det.score(cardio.sort_by("id")),
                                   rtol=1e-6, atol=1e-9)
    # without --incremental, a table is scored whole at its current version, as a folder of Parquet is
    whole = f"s3://{s3_bucket}/inc/delta-all"
    assert main(["--checkpoint", uri, "--data", next(iter(tables)), "--output", whole]) == 0
    assert json.loads(capsys.readouterr().out)["rows_scored"] == cardio.num_rows
