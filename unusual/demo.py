"""``unusual demo``: the whole system on a laptop, on shipped real data.

1. Starts a local S3 endpoint (moto's server on localhost) and a local Ray.
2. Writes real data as Parquet shards to the bucket: ODDS *cardio* (tabular;
   training on 70 % of the normal rows, testing on the rest plus every
   anomaly) and two NAB series as two entities of one time-series table
   (training on the first half of each, testing on all of it).
3. Trains ``ae`` and ``vae`` on cardio and ``lstm`` on the series with Ray
   Train (2 workers), thresholds calibrated across the cluster.
4. Batch-scores the test data on Ray (``unusual score``'s job).
5. Evaluates the scores (``unusual evaluate``'s job; point-adjusted for the
   series) and writes an HTML report per model.
6. Starts the Serve endpoint with the three bundles and sends it real
   requests, checking that online scores equal the batch scores.
7. Copies every artefact from the (in-memory) bucket to ``--workdir``, prints
   the evaluation and where everything lies, and stops Serve, Ray and S3.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .models.registry import family
from .ray_jobs import sample_data
from .runtime import ensure_ray, free_port

BUCKET = "unusual-demo"
SERIES = ("nab_ec2_request_latency", "nab_machine_temperature")


def _say(step: str, msg: str) -> None:
    print(f"[demo {step}] {msg}", file=sys.stderr, flush=True)


def _put(fs, prefix: str, table: pa.Table, shards: int) -> str:
    import pyarrow.parquet as pq

    step = -(-table.num_rows // shards)
    for i in range(shards):
        with fs.open(f"{BUCKET}/{prefix}/part-{i:03d}.parquet", "wb") as f:
            pq.write_table(table.slice(i * step, step), f)
    return f"s3://{BUCKET}/{prefix}"


def demo_data() -> dict[str, pa.Table]:
    """The demo's train / test tables from the shipped real data."""
    cardio = sample_data.load("cardio")
    cardio = cardio.append_column("id", pa.array(np.arange(cardio.num_rows, dtype=np.int64)))
    labels = cardio.column("label").to_numpy()
    rng = np.random.default_rng(0)
    normal = np.flatnonzero(~labels)
    train = np.sort(rng.choice(normal, int(0.7 * normal.size), replace=False))
    test = np.setdiff1d(np.arange(cardio.num_rows), train)
    parts_train, parts_test = [], []
    for name in SERIES:
        t = sample_data.load(name)
        t = t.append_column("host", pa.array([name] * t.num_rows))
        parts_train.append(t.slice(0, t.num_rows // 2).drop_columns(["label"]))
        parts_test.append(t)
    series_test = pa.concat_tables(parts_test)
    shuffle = pa.array(np.random.default_rng(1).permutation(series_test.num_rows))
    return {
        "cardio_train": cardio.take(pa.array(train)).drop_columns(["label", "id"]),
        "cardio_test": cardio.take(pa.array(test)),
        "series_train": pa.concat_tables(parts_train),
        "series_test": series_test.take(shuffle),  # shards in no order: the jobs must regroup them
    }


def run_demo(workdir: str, quick: bool = False) -> int:
    """Run the demo; returns 0 when every step worked and online == batch scores."""
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    _say("1/7", "starting a local S3 endpoint and a local Ray …")
    import ray

    from .ray_jobs.local_s3 import local_s3
    from .serving import fastpath

    with local_s3(bucket=BUCKET, key="demo") as env:
        # A Ray of its own, even if another runs on this machine; quiet as every job (-v: not); its
        # Serve on the fast path where HAProxy exists, as `unusual serve` runs it.
        fastpath.configure()
        ensure_ray("local", num_cpus=max(2, os.cpu_count() or 2), runtime_env={"env_vars": env})
        try:
            return _steps(work, quick, t_start)
        finally:
            from ray import serve

            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - Serve never started
                pass
            ray.shutdown()
            fastpath.cleanup()


def _steps(work: Path, quick: bool, t_start: float) -> int:
    import s3fs

    from .config import EvaluateJob, ScoreJob, TrainJob
    from .ray_jobs.evaluate import run as evaluate
    from .ray_jobs.score import run as score
    from .ray_jobs.train import run as train

    fs = s3fs.S3FileSystem()
    data = demo_data()
    uris = {name: _put(fs, f"data/{name}", t, 4) for name, t in data.items()}
    _say("2/7", f"wrote cardio and NAB ({', '.join(SERIES)}) as Parquet shards to s3://{BUCKET}/data/")

    # A demo budget: 15 epochs (5 with --quick) keep it to a few minutes on 2 cores.
    epochs = {"epochs": 5} if quick else {"epochs": 15}
    specs = {
        "ae": (uris["cardio_train"], {}),
        "vae": (uris["cardio_train"], {}),
        "lstm": (uris["series_train"], {"entity_column": "host", "time_column": "timestamp"}),
    }
    bundles, versions = {}, {}
    for kind, (data_uri, params) in specs.items():
        out = f"s3://{BUCKET}/models/{kind}"
        _say("3/7", f"training {kind} with Ray Train on {data_uri} …")
        manifest = train(
            TrainJob(data=data_uri, output=out, model=kind, params={**params, **epochs}, num_workers=2, overwrite=True)
        )
        bundles[kind], versions[kind] = out, manifest.model_version
        t = manifest.training
        _say("3/7", f"{kind}: {manifest.model_version}, {len(t.val_loss)} epochs, {t.wall_seconds:.0f} s")

    scored, evaluations = {}, {}
    for kind in bundles:
        tabular = not family(kind).sequence
        data_uri = uris["cardio_test"] if tabular else uris["series_test"]
        out = f"s3://{BUCKET}/scores/{kind}"
        _say("4/7", f"batch-scoring {data_uri} with {kind} on Ray …")
        keep = ["id", "label"] if tabular else ["label"]
        job = ScoreJob(checkpoint=bundles[kind], data=data_uri, output=out, keep_columns=keep, overwrite=True)
        summary = score(job)
        scored[kind] = (out, summary)
        _say("5/7", f"evaluating the {kind} scores …")
        series = {} if tabular else {"entity_column": "host", "time_column": "timestamp"}
        evaluations[kind] = evaluate(EvaluateJob(scores=out, label_column="label", **series))

    _say("6/7", "starting the Serve endpoint and sending it requests …")
    online = _serve_and_request(bundles, data, scored)

    local = work / "artifacts"
    if local.exists():
        import shutil

        shutil.rmtree(local)
    fs.get(f"{BUCKET}/", str(local), recursive=True)
    _say("7/7", f"copied the bucket to {local}")
    _print_results(evaluations, scored, versions, online, local, time.perf_counter() - t_start)
    return 0 if all(o["equal"] for o in online.values()) else 1


def _serve_and_request(bundles: dict, data: dict, scored: dict) -> dict:
    """Serve the three bundles, score real rows online and compare with their batch scores."""
    import pyarrow.parquet as pq
    import requests
    from ray import serve

    from .config import ServeConfig
    from .ray_jobs.local_io import filesystem
    from .serving.app import start

    url = start(ServeConfig(models=bundles, default_model="ae", num_cpus=0.2), port=free_port(), ready_timeout=180)

    def batch_scores(kind: str) -> pa.Table:
        pafs, path, _ = filesystem(scored[kind][0])
        return pq.read_table(path, filesystem=pafs)

    results = {}
    test = data["cardio_test"]
    labels = test.column("label").to_numpy()
    pick = np.r_[np.flatnonzero(~labels)[:4], np.flatnonzero(labels)[:4]]
    rows = test.take(pa.array(pick))
    for kind in [k for k in bundles if not family(k).sequence]:
        body = {"rows": rows.drop_columns(["label", "id"]).to_pylist()}
        r = requests.post(f"{url}/v1/models/{kind}/score", json=body, timeout=60)
        r.raise_for_status()
        got = np.array([x["anomaly_score"] for x in r.json()["rows"]])
        batch = batch_scores(kind)
        by_id = dict(zip(batch.column("id").to_pylist(), batch.column("anomaly_score").to_pylist()))
        want = np.array([by_id[i] for i in rows.column("id").to_pylist()])
        results[kind] = {
            "model_version": r.json()["model_version"],
            "rows": len(got),
            "flagged": int(sum(x["is_anomaly"] for x in r.json()["rows"])),
            "labelled_anomalies": int(labels[pick].sum()),
            "equal": bool(np.allclose(got, want, rtol=1e-6, atol=1e-9)),
        }
    results["lstm"] = _lstm_online(url, data, batch_scores("lstm"))
    results["url"] = url
    serve.shutdown()
    return results


def _lstm_online(url: str, data: dict, batch: pa.Table) -> dict:
    """An LSTM request carries an entity's recent rows (its window and the rows to score): its scores
    against the batch job's for the rows whose window lies inside the request."""
    import requests

    listing = requests.get(f"{url}/v1/models", timeout=30).json()
    w = next(m for m in listing["models"] if m["name"] == "lstm")["window"]
    n = w + 1 + 60  # 60 rows whose whole window (and look-ahead: the request ends with the series) is in it
    series = data["series_test"].filter(pc.equal(data["series_test"].column("host"), SERIES[0]))
    series = series.sort_by("timestamp")
    tail = series.slice(series.num_rows - n)
    body = {"rows": [{**r, "timestamp": r["timestamp"].isoformat()} for r in tail.drop_columns(["label"]).to_pylist()]}
    r = requests.post(f"{url}/v1/models/lstm/score", json=body, timeout=60)
    r.raise_for_status()
    got = np.array([x["anomaly_score"] for x in r.json()["rows"]])
    # The batch job saw the whole series: compare the rows whose window lies inside the request.
    batch = batch.filter(pc.equal(batch.column("host"), SERIES[0])).sort_by("timestamp")
    want = batch.column("anomaly_score").to_numpy()[-n:]
    return {
        "model_version": r.json()["model_version"],
        "rows": len(got),
        "flagged": int(sum(x["is_anomaly"] for x in r.json()["rows"])),
        "equal": len(got) == n and bool(np.allclose(got[w + 1 :], want[w + 1 :], rtol=1e-5, atol=1e-8)),
    }


def _print_results(evaluations, scored, versions, online, local: Path, seconds: float) -> None:
    url = online.pop("url")
    print("\nBatch scoring and evaluation (held-out real data):\n")
    head = f"{'model':<6} {'version':<17} {'rows':>6} {'flagged':>7} {'ROC-AUC':>7} {'PR-AUC':>6} {'F1':>5}"
    head += f" {'best F1':>7}"
    print(head + "  VUS-PR  point-adjusted F1 / best F1 (inflated)")
    for kind, m in evaluations.items():
        s = scored[kind][1]
        vus = f"{m['vus_pr']:>6.3f}" if m.get("vus_pr") is not None else f"{'-':>6}"
        pa_cols = f"  {vus}  {m['pa_f1']:.3f} / {m['pa_best_f1']:.3f}" if "pa_f1" in m else ""
        print(
            f"{kind:<6} {versions[kind]:<17} {s['rows_scored']:>6,} {s['anomalies']:>7,} {m['roc_auc']:>7.3f} "
            f"{m['pr_auc']:>6.3f} {m['f1']:>5.3f} {m['best_f1']:>7.3f}{pa_cols}"
        )
    print(f"\nOnline scoring at {url} (stopped):")
    for kind, o in online.items():
        same = "equal to" if o["equal"] else "DIFFERENT FROM"
        print(f"  {kind}: {o['rows']} rows, {o['flagged']} flagged, scores {same} the batch scores", end="")
        print(f" ({o['model_version']})")
    print(f"\nArtefacts (copied from s3://{BUCKET}/, an in-memory bucket gone with the demo) under {local}:")
    print(f"  models/<kind>/          bundles (inspect: unusual info {local / 'models' / 'ae'})")
    print("  scores/<kind>/          scored Parquet parts, _unusual/summary.json")
    print(f"  scores/<kind>/_evaluation/report.html   e.g. {local / 'scores' / 'ae' / '_evaluation' / 'report.html'}")
    print("  data/                   the Parquet shards the jobs read")
    print(f"\ndone in {seconds:.0f} s; Serve, Ray and the S3 endpoint are stopped.")


def command(job) -> int:
    """``unusual demo``: ``job`` (``unusual.cli.DemoCommand``) has ``workdir`` and ``quick``."""
    return run_demo(job.workdir, quick=job.quick)
