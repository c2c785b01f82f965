"""The GPU paths, run for real on a machine with a CUDA GPU, each beside its CPU twin on the same machine: the
in-memory API, Ray Train, Ray Data batch scoring and Ray Serve. Exits with status 2 where torch sees no CUDA GPU.
The parts and the results: benchmarks/README.md, "GPU paths".

    python benchmarks/gpu_paths.py [--data-dir ../shared/data] [--rows 4000000] [--parts memory,train,score,serve]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from harness import RESULTS, ROOT, make_data, options, provenance, write_result
from unusual.models import Detector
from unusual.models.metrics import roc_auc


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def rel_diff(a, ref) -> float:
    return float(np.max(np.abs(a - ref) / np.maximum(np.abs(ref), 1e-6)))


def cardio(data_dir: Path):
    """ODDS cardio: train on 70 % of the normal rows (a seed-0 shuffle); test on the rest and every anomaly."""
    import scipy.io
    m = scipy.io.loadmat(data_dir / "tabular" / "odds" / "cardio.mat")
    X, y = np.asarray(m["X"], float), np.asarray(m["y"]).ravel().astype(int)
    normal = np.flatnonzero(y == 0)
    np.random.default_rng(0).shuffle(normal)
    cut = int(0.7 * len(normal))
    test = np.concatenate([normal[cut:], np.flatnonzero(y == 1)])
    return X[normal[:cut]], X[test], y[test]


def in_memory(data_dir: Path, tmp: Path) -> list[dict]:
    """Detector(device="cpu" | "cuda"): ae and vae on cardio, lstm on SMD machine-1-2; the GPU bundle on the CPU."""
    d = np.load(data_dir / "timeseries" / "smd" / "machine-1-2.npz")
    out, smd = [], (d["train"], d["test"], np.asarray(d["test_label"]).astype(int))
    for kind, name, (tr, te, y) in [("ae", "cardio", cardio(data_dir)), ("vae", "cardio", cardio(data_dir)),
                                    ("lstm", "smd machine-1-2", smd)]:
        row = {"kind": kind, "data": name}
        for device in ("cpu", "cuda"):
            t0 = time.perf_counter()
            det = Detector(kind, seed=0, device=device).fit(tr)
            fit_s, scores = time.perf_counter() - t0, det.score(te)
            row[device] = {"roc_auc": roc_auc(y, scores), "fit_seconds": fit_s,
                           "epochs_run": len(det.history_.val_loss)}
        det.save(str(tmp / f"bundle-{kind}"))  # the GPU's, loaded on the CPU
        row["cuda_bundle_on_cpu_max_rel_diff"] = rel_diff(Detector.load(str(tmp / f"bundle-{kind}")).score(te), scores)
        log(f"in-memory {kind} {name}: {row}")
        out.append(row)
    return out


def ray_train(data: Path, tmp: Path, epochs: int, batch_size: int) -> list[dict]:
    """The same AE job on CPU and with use_gpu (fp32, bf16), 1 worker; each bundle must load on the CPU."""
    from train_throughput import ray_run
    params = {"epochs": epochs, "batch_size": batch_size, "patience": epochs, "seed": 0, "exclude": ["row_id"]}
    out = []
    for label, kw in [("cpu, 1 worker", {"use_gpu": False}), ("gpu fp32, 1 worker", {"use_gpu": True}),
                      ("gpu bf16, 1 worker", {"use_gpu": True, "precision": "bf16"})]:
        dest = tmp / f"train-{label.replace(' ', '').replace(',', '-')}"
        r = ray_run(data, params, 1, dest, label, **kw)
        r.update(bundle=str(dest), loads_on_cpu=Detector.load(str(dest)).version == r["model_version"])
        log(f"ray train {label}: {r['samples_per_s']:,.0f} samples/s, val loss {r['val_loss']:.4f}")
        out.append(r)
    return out


def ray_score(bundle: str, data: Path, tmp: Path, rows: int, gpu_concurrency: list[str]) -> list[dict]:
    """The GPU-trained AE scores the same Parquet on CPU actors and on GPU actors (--use-gpu, --concurrency)."""
    from unusual.ray_jobs.score import ScoreJob, run
    out, scores = [], []
    runs = [("cpu actors", {"use_gpu": False})] + [
        ("gpu actors sharing the GPU (--use-gpu, default)", {"use_gpu": True}) if c == "default" else
        (f"{c} gpu actor(s) (--use-gpu --concurrency {c})", {"use_gpu": True, "concurrency": int(c)})
        for c in gpu_concurrency]
    for i, (label, kw) in enumerate(runs):
        t0 = time.perf_counter()
        s = run(ScoreJob(checkpoint=bundle, data=str(data), output=str(tmp / f"score-{i}"), keep_columns=["row_id"],
                         overwrite=True, **kw))
        wall = time.perf_counter() - t0
        t = pq.read_table(tmp / f"score-{i}", columns=["row_id", "anomaly_score"]).sort_by("row_id")
        scores.append(t.column("anomaly_score").to_numpy())
        out.append({"runner": label, "rows_in": rows, "rows_scored": s["rows_scored"], "rows_per_s": s["rows_per_s"],
                    "rows_quarantined": s["rows_quarantined"], "job_seconds": s["seconds"], "wall_seconds": wall,
                    "unique_ids": len(set(t.column("row_id").to_numpy()))})
        log(f"ray score {label}: {s['rows_per_s']:,.0f} rows/s, {s['rows_scored']:,} scored")
    return [*out, {"max_rel_diff_gpu_vs_cpu": max(rel_diff(g, scores[0]) for g in scores[1:])}]


def serve_part(data_dir: Path, tmp: Path, requests_n: int = 200) -> list[dict]:
    """The Serve application with use_gpu and on CPU: online scores of GPU-trained ae / vae bundles against the
    CPU Detector's, single-row latency (p50 / p99 of sequential requests) and a bulk request's rows/s."""
    import requests
    from ray import serve
    from unusual.serving.app import start

    from unusual.config import ServeConfig
    Xtr, Xte, _ = cardio(data_dir)
    bundles = {kind: str(tmp / f"serve-{kind}") for kind in ("ae", "vae")}
    for kind, uri in bundles.items():
        Detector(kind, seed=0, device="cuda").fit(Xtr).save(uri)
    want = {k: Detector.load(u).score(Xte) for k, u in bundles.items()}  # on the CPU
    rows = [{f"x{j}": float(v) for j, v in enumerate(r)} for r in Xte]
    bulk, out = rows * max(1, 20_000 // len(rows)), []
    try:
        for use_gpu in (True, False):
            url = start(ServeConfig(models=bundles, default_model="ae", use_gpu=use_gpu, num_cpus=1), port=8765,
                        ready_timeout=300)
            row, lat = {"use_gpu": use_gpu}, []
            for kind in bundles:
                r = requests.post(f"{url}/v1/models/{kind}/score", json={"rows": rows}, timeout=120)
                r.raise_for_status()
                got = np.array([x["anomaly_score"] for x in r.json()["rows"]])
                row[f"{kind}_max_rel_diff_vs_cpu_detector"] = rel_diff(got, want[kind])
            with requests.Session() as sess:
                for i in range(requests_n):
                    t0 = time.perf_counter()
                    sess.post(f"{url}/v1/models/ae/score", json={"rows": [rows[i % len(rows)]]}, timeout=60)
                    lat.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sess.post(f"{url}/v1/models/ae/score", json={"rows": bulk}, timeout=300).raise_for_status()
                bulk_s = time.perf_counter() - t0
            row.update(single_row_p50_ms=1000 * float(np.percentile(lat, 50)), bulk_rows=len(bulk),
                       single_row_p99_ms=1000 * float(np.percentile(lat, 99)), bulk_rows_per_s=len(bulk) / bulk_s)
            log(f"serve: {row}")
            out.append(row)
            serve.delete("unusual")
    finally:
        serve.shutdown()
    return out


def main() -> int:
    args = options(__doc__, data_dir=ROOT.parent / "shared" / "data", rows=4_000_000, features=32, epochs=3,
                   batch_size=4096, gpu_concurrency=["1", "default"], parts=["memory", "train", "score", "serve"],
                   out=RESULTS / "gpu_paths.json")
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible to torch; this benchmark needs one", file=sys.stderr)
        return 2
    import pyarrow as pa
    import ray
    record = {**provenance("gpu_paths", ("torch", "ray"), gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda),
              "args": vars(args)}
    parts = set(args.parts)
    with tempfile.TemporaryDirectory() as t:
        tmp, data = Path(t), Path(t) / "data"
        if "memory" in parts:
            record["in_memory"] = in_memory(args.data_dir, tmp)
        if parts & {"train", "score"}:
            make_data(data, args.rows, args.features, shards=16)
            for i, f in enumerate(sorted(data.glob("*.parquet"))):  # an id column, to match rows across runs
                tab = pq.read_table(f)
                ids = np.arange(tab.num_rows, dtype=np.int64) + i * tab.num_rows
                pq.write_table(tab.append_column("row_id", pa.array(ids)), f, row_group_size=131072)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            if "train" in parts:
                record["ray_train"] = ray_train(data, tmp, args.epochs, args.batch_size)
            if "score" in parts:
                bundle = record["ray_train"][1]["bundle"] if "train" in parts else str(tmp / "bundle-score")
                if "train" not in parts:  # a GPU-trained AE on one shard
                    first = pq.read_table(sorted(data.glob("*.parquet"))[0])
                    Detector("ae", seed=0, device="cuda", epochs=3, exclude=["row_id"]).fit(first).save(bundle)
                record["ray_score"] = ray_score(bundle, data, tmp, args.rows, args.gpu_concurrency)
            if "serve" in parts:
                record["serve"] = serve_part(args.data_dir, tmp)
        finally:
            ray.shutdown()
    write_result(args.out, record)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
