"""Evaluation of batch-scoring output on a real S3 endpoint (moto server) with a real local Ray.

The metrics computed at scale (per-block summaries and histograms merged with Ray
Data's aggregation API) are checked against scikit-learn and the in-memory ``unusual.models.metrics``
functions on the same rows.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import s3fs
from s3kit import put_shards
from sklearn.metrics import average_precision_score, roc_auc_score
from unusual.models import SchemaError
from unusual.models.metrics import adjusted_scores, best_f1, label_segments, point_adjust, prf
from unusual.models.vus import vus
from unusual.ray_jobs.evaluate import EvaluateJob, main, run
from unusual.ray_jobs.local_io import DataError

TOP = pa.list_(pa.struct([("feature", pa.string()), ("contribution", pa.float64())]))


def _scores_table(score: np.ndarray, flag: np.ndarray, versions, **keep) -> pa.Table:
    """A table shaped like the batch scoring job's output, with the kept columns."""
    top = pa.array([[{"feature": "x0", "contribution": float(v)}] for v in score], TOP)
    return pa.table(
        {"anomaly_score": score, "is_anomaly": flag, "top_features": top, "model_version": versions, **keep}
    )


def _read_json(uri: str) -> dict:
    with s3fs.S3FileSystem().open(uri.removeprefix("s3://"), "r") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tabular(s3_bucket, ray_cluster):
    """4 000 scored rows in 4 shards, 40 without a label; plus a quarantine file and the
    job's metadata, which are not data."""
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.random(n) < 0.08
    score = np.round(rng.gamma(2.0, 1.0, n) + 2.5 * y, 3)
    flag = score >= 6.0
    label = pa.array(y.astype(np.int64), mask=np.arange(n) % 100 == 7)
    versions = ["ae-v1"] * (n // 2) + ["ae-v2"] * (n - n // 2)
    table = _scores_table(score, flag, versions, label=label, row_id=np.arange(n))
    uri = put_shards(s3_bucket, "eval/tabular", table, 4)
    fs = s3fs.S3FileSystem()
    bad = _scores_table(np.full(50, 1e9), np.ones(50, bool), ["zz"] * 50, label=np.ones(50, np.int64))
    with fs.open(f"{s3_bucket}/eval/tabular/_quarantine/part-000.parquet", "wb") as f:
        pq.write_table(bad.append_column("row_id", pa.array(np.arange(50))), f)
    with fs.open(f"{s3_bucket}/eval/tabular/_unusual/job.json", "w") as f:
        json.dump({"model_version": "ae-v2", "threshold": 6.0}, f)
    with fs.open(f"{s3_bucket}/eval/tabular/_unusual/summary.parquet", "wb") as f:
        pq.write_table(pa.table({"x": [1]}), f)
    return uri, score, flag, label.to_numpy(zero_copy_only=False)


def test_metrics_match_sklearn(tabular, s3_bucket):
    uri, score, flag, label = tabular
    m = run(EvaluateJob(scores=uri, label_column="label"))
    has = ~np.isnan(label)
    s, y, f = score[has], label[has].astype(bool), flag[has]
    assert (m["rows"], m["rows_without_label"], m["rows_without_score"]) == (4000, 40, 0)
    assert (m["positives"], m["negatives"]) == (y.sum(), (~y).sum())
    # fewer scores than the reservoir holds: the bins are the distinct scores and the metrics exact
    assert m["exact"] is True and m["bins"] == np.unique(s).size
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    b = best_f1(s, y)
    assert (m["best_f1"], m["best_f1_threshold"]) == pytest.approx((b["f1"], b["threshold"]), abs=1e-12)
    at = prf(f, y)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((at["precision"], at["recall"], at["f1"]))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == ((f & y).sum(), (f & ~y).sum(), (~f & y).sum(), (~f & ~y).sum())
    assert (m["threshold"], m["threshold_source"]) == (6.0, "job.json")
    assert m["model_versions"] == ["ae-v1", "ae-v2"]  # not the quarantine's "zz"
    assert "pa_roc_auc" not in m and "segments" not in m
    # written next to the scores, under _evaluation (which a later evaluation skips)
    assert _read_json(f"{uri}/_evaluation/metrics.json") == m
    with s3fs.S3FileSystem().open(f"{s3_bucket}/eval/tabular/_evaluation/report.html", "r") as fh:
        report = fh.read()
    assert report.count("<svg") == 3 and "roc_auc" in report and "threshold 6" in report
    # self-contained: no script, no source, links only within the page (the charts' SVG markers)
    assert "<script" not in report and "src=" not in report
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', report))


@pytest.fixture(scope="module")
def series(s3_bucket, ray_cluster):
    """Three entities' series, shuffled across 3 shards; host 'a' ends and host 'b' starts
    inside a labelled segment, so joining the two series would change the result; host 'c'
    has no anomaly (no VUS of its own)."""
    rng = np.random.default_rng(1)
    parts = []
    for host, starts, n in (("a", [50, 300, 700, 1180], 1200), ("b", [0, 200, 640, 900], 1200), ("c", [], 300)):
        y = np.zeros(n, bool)
        for a in starts:
            y[a : a + int(rng.integers(20, 40))] = True
        score = rng.gamma(2.0, 1.0, n) + 1.5 * y * (rng.random(n) < 0.4)
        ts = np.datetime64("2024-01-01T00:00:00") + 60 * np.arange(n).astype("timedelta64[s]")
        parts.append((host, ts, score, y))
    host = np.concatenate([np.full(p[1].size, p[0]) for p in parts])
    ts = np.concatenate([p[1] for p in parts])
    score = np.concatenate([p[2] for p in parts])
    y = np.concatenate([p[3] for p in parts])
    flag = score >= 5.5
    table = _scores_table(score, flag, ["lstm-1"] * score.size, host=host, ts=ts, label=y)
    table = table.take(pa.array(rng.permutation(table.num_rows)))
    return put_shards(s3_bucket, "eval/series", table, 3), parts


def test_point_adjusted_per_entity(series, s3_bucket):
    uri, parts = series
    out = f"s3://{s3_bucket}/eval/reports/series"
    job = EvaluateJob(
        scores=uri, label_column="label", output=out, entity_column="host", time_column="ts", vus_window=64
    )
    m = run(job)
    # the in-memory functions, per entity in time order (the fixture built each series in order)
    adj = np.concatenate([adjusted_scores(s, y) for _, _, s, y in parts])
    pa_pred = np.concatenate([point_adjust(s >= 5.5, y) for _, _, s, y in parts])
    s = np.concatenate([p[2] for p in parts])
    y = np.concatenate([p[3] for p in parts])
    assert m["rows"] == 2700 and m["exact"] is True
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["segments"] == sum(len(label_segments(p[3])) for p in parts) == 8
    assert m["pa_roc_auc"] == pytest.approx(roc_auc_score(y, adj), abs=1e-12)
    assert m["pa_pr_auc"] == pytest.approx(average_precision_score(y, adj), abs=1e-12)
    assert m["pa_best_f1"] == pytest.approx(best_f1(adj, y)["f1"], abs=1e-12)
    at = prf(pa_pred, y)
    assert (m["pa_precision"], m["pa_recall"], m["pa_f1"]) == pytest.approx(
        (at["precision"], at["recall"], at["f1"]), abs=1e-12
    )
    assert m["pa_f1"] > m["f1"]
    # no job.json: the threshold is the smallest score the model flagged
    assert (m["threshold"], m["threshold_source"]) == (s[s >= 5.5].min(), "smallest flagged score")
    assert _read_json(f"{out}/metrics.json") == m
    # VUS: vus() on each entity's labelled scores in time order, read back from the score files, averaged
    # over the entities with anomalies ('c' has none)
    back = pq.read_table(uri.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).sort_by(
        [("host", "ascending"), ("ts", "ascending")]
    )
    want = {}
    for host in ("a", "b", "c"):
        rows = back.filter(pc.equal(back.column("host"), host))
        y_h, s_h = rows.column("label").to_numpy(), rows.column("anomaly_score").to_numpy()
        if y_h.any():
            want[host] = (vus(y_h, s_h, window=64), vus(y_h, s_h))
    assert sorted(want) == ["a", "b"] and (m["vus_series"], m["vus_window"]) == (2, 64)
    for key in ("vus_pr", "vus_roc"):
        assert abs(m[key] - np.mean([w[0][key] for w in want.values()])) <= 1e-9
        assert abs(m[key] - np.mean([w[1][key] for w in want.values()])) > 1e-6  # the window reached the tasks
    with s3fs.S3FileSystem().open(f"{s3_bucket}/eval/reports/series/report.html", "r") as fh:
        report = fh.read()
    assert "VUS-PR" in report and f'<div class="v">{m["vus_pr"]:.4g}</div>' in report


def test_cli_with_more_scores_than_the_sample(s3_bucket, ray_cluster, capsys):
    """60 000 scores: more than the reservoir holds, so the bins sit at sample quantiles."""
    rng = np.random.default_rng(2)
    n = 60_000
    y = rng.random(n) < 0.03
    score = np.exp(rng.standard_t(3, size=n) + 1.2 * y)  # heavy-tailed
    table = pa.table({"anomaly_score": score, "is_anomaly": score > 20, "model_version": ["v"] * n, "y": y})
    uri = put_shards(s3_bucket, "eval/many", table, 2)
    out = f"s3://{s3_bucket}/eval/reports/many"
    assert main(["--scores", uri, "--label-column", "y", "--bins", "2000", "--output", out]) == 0
    printed = json.loads(capsys.readouterr().out)
    m = _read_json(f"{out}/metrics.json")
    assert printed == m
    assert m["exact"] is False and 1000 < m["bins"] <= 2000
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-3)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, score), abs=1e-3)
    assert m["best_f1"] == pytest.approx(best_f1(score, y)["f1"], abs=1e-2)
    assert m["tp"] == (y & (score > 20)).sum()


# --------------------------------------------------------------------------- errors


def test_missing_label_column(tabular, ray_cluster):
    uri = tabular[0]
    with pytest.raises(SchemaError) as e:
        run(EvaluateJob(scores=uri, label_column="nope"))
    assert str(e.value) == (
        "label column 'nope' is not in the scores at s3://unusual-test/eval/tabular; "
        "columns: anomaly_score, is_anomaly, top_features, model_version, label, row_id"
    )
    assert e.value.column == "nope"


def test_not_batch_scoring_output(s3_bucket, ray_cluster):
    uri = put_shards(s3_bucket, "eval/raw", pa.table({"x": [1.0, 2.0], "label": [0, 1]}), 1)
    with pytest.raises(
        SchemaError,
        match=re.escape(
            "the data at s3://unusual-test/eval/raw is not batch-scoring output: it has no 'anomaly_score' column; "
            "columns: x, label"
        ),
    ):
        run(EvaluateJob(scores=uri, label_column="label"))


def test_one_class(s3_bucket, ray_cluster):
    rng = np.random.default_rng(3)
    score = rng.random(300)
    table = _scores_table(score, score > 0.9, ["v"] * 300, label=np.zeros(300, np.int8))
    uri = put_shards(s3_bucket, "eval/one-class", table, 2)
    with pytest.raises(DataError) as e:
        run(EvaluateJob(scores=uri, label_column="label"))
    assert str(e.value) == (
        "label column 'label' has only one class: 0 positive and 300 negative labelled rows at "
        "s3://unusual-test/eval/one-class; ROC-AUC, PR-AUC and F1 need both"
    )


def test_no_score_files(s3_bucket, ray_cluster):
    with pytest.raises(DataError, match="no Parquet files at s3://unusual-test/eval/nothing"):
        run(EvaluateJob(scores=f"s3://{s3_bucket}/eval/nothing", label_column="label"))
