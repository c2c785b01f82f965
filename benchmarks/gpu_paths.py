"""The GPU paths, run for real on a machine with a CUDA GPU, next to the CPU paths on the same machine.

    python benchmarks/gpu_paths.py [--data-dir ../shared/data] [--rows 4000000] [--out PATH]

Three parts, each GPU run beside the same CPU run, in one invocation:

1. **In-memory API** (``Detector(device="cuda")``): ae and vae on ODDS cardio, lstm on
   SMD machine-1-2 (train on 70 % of the normal rows, its own seed-0 shuffle); ROC-AUC on CPU
   and on GPU, fit seconds, and the GPU-trained bundle saved, loaded on the CPU and
   scoring within float tolerance of the GPU scores.
2. **Ray Train** (``unusual.ray_jobs.train``): the same AE job on synthetic Parquet with
   ``use_gpu`` (fp32 and bf16) and on CPU workers; samples/s, validation loss, and
   the bundle loading on CPU.
3. **Ray Data batch scoring** (``unusual.ray_jobs.score``): the GPU-trained AE scores the
   same Parquet with ``--use-gpu`` (read tasks feed one GPU actor) and on CPU actors;
   rows/s, rows in = rows out, and the largest score difference between the two.
4. **Ray Serve** (``unusual.serving.app``): ae and vae GPU-trained bundles served with ``use_gpu``
   and on CPU replicas: online scores against the CPU ``Detector``, single-row latency
   (p50 / p99 of sequential requests) and a bulk JSON request's rows/s.

``--parts memory,train,score,serve`` picks the parts (default: all).

Needs ``torch`` with CUDA and ray; exits with status 2 where no GPU is visible.
Writes a JSON record (default ``benchmarks/results/gpu_paths.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import git  # noqa: E402
from unusual.models import Detector  # noqa: E402
from unusual.models.metrics import roc_auc  # noqa: E402


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def semi_split(X: np.ndarray, y: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(y == 0)
    rng.shuffle(normal)
    cut = int(0.7 * len(normal))
    test = np.concatenate([normal[cut:], np.flatnonzero(y == 1)])
    return X[normal[:cut]], X[test], y[test]


def in_memory(data_dir: Path, tmp: Path) -> list[dict]:
    import scipy.io

    m = scipy.io.loadmat(data_dir / "tabular" / "odds" / "cardio.mat")
    Xtr, Xte, yte = semi_split(np.asarray(m["X"], float), np.asarray(m["y"]).ravel().astype(int))
    d = np.load(data_dir / "timeseries" / "smd" / "machine-1-2.npz")
    cases = [
        ("ae", "cardio", Xtr, Xte, yte),
        ("vae", "cardio", Xtr, Xte, yte),
        ("lstm", "smd machine-1-2", d["train"], d["test"], np.asarray(d["test_label"]).astype(int)),
    ]
    out = []
    for kind, name, tr, te, y in cases:
        row = {"kind": kind, "data": name}
        for device in ("cpu", "cuda"):
            t0 = time.perf_counter()
            det = Detector(kind, seed=0, device=device).fit(tr)
            fit_s = time.perf_counter() - t0
            scores = det.score(te)
            row[device] = {
                "roc_auc": roc_auc(y, scores),
                "fit_seconds": fit_s,
                "epochs_run": len(det.history_["val_loss"]),
            }
            if device == "cuda":
                uri = str(tmp / f"bundle-{kind}")
                det.save(uri)
                cpu_scores = Detector.load(uri).score(te)  # loads onto the CPU
                row["cuda_bundle_on_cpu_max_rel_diff"] = float(
                    np.max(np.abs(cpu_scores - scores) / np.maximum(np.abs(scores), 1e-6))
                )
        log(
            f"in-memory {kind:4} {name}: ROC-AUC cpu {row['cpu']['roc_auc']:.3f} gpu {row['cuda']['roc_auc']:.3f}; "
            f"fit s cpu {row['cpu']['fit_seconds']:.1f} gpu {row['cuda']['fit_seconds']:.1f}; "
            f"gpu bundle on cpu max rel diff {row['cuda_bundle_on_cpu_max_rel_diff']:.2e}"
        )
        out.append(row)
    return out


def ray_train(data: Path, tmp: Path, epochs: int, batch_size: int) -> list[dict]:
    from unusual.ray_jobs.train import TrainJob, run

    params = {"epochs": epochs, "batch_size": batch_size, "patience": epochs, "seed": 0, "exclude": ["row_id"]}
    out = []
    for label, kw in [
        ("cpu, 1 worker", {"use_gpu": False}),
        ("gpu fp32, 1 worker", {"use_gpu": True}),
        ("gpu bf16, 1 worker", {"use_gpu": True, "precision": "bf16"}),
    ]:
        dest = tmp / f"train-{label.replace(' ', '').replace(',', '-')}"
        t0 = time.perf_counter()
        manifest = run(
            TrainJob(data=str(data), output=str(dest), model="ae", params=params, num_workers=1, overwrite=True, **kw)
        )
        t = manifest["training"]
        det = Detector.load(str(dest))  # a GPU-trained bundle must load on the CPU
        out.append(
            {
                "runner": label,
                "bundle": str(dest),
                "samples_per_s": t["samples_per_s"],
                "val_loss": min(t["val_loss"]),
                "wall_seconds": time.perf_counter() - t0,
                "resources_per_worker": t.get("resources_per_worker"),
                "loads_on_cpu": det.version == manifest["model_version"],
            }
        )
        log(f"ray train {label}: {t['samples_per_s']:,.0f} samples/s, val loss {min(t['val_loss']):.4f}")
    return out


def ray_score(bundle: str, data: Path, tmp: Path, rows: int, gpu_concurrency: list[str]) -> list[dict]:
    from unusual.ray_jobs.score import ScoreJob, run

    out, frames = [], {}
    runs = [("cpu actors", {"use_gpu": False})]
    for c in gpu_concurrency:
        if c == "default":
            runs.append(("gpu actors sharing the GPU (--use-gpu, default)", {"use_gpu": True}))
        else:
            runs.append((f"{c} gpu actor(s) (--use-gpu --concurrency {c})", {"use_gpu": True, "concurrency": int(c)}))
    for i, (label, kw) in enumerate(runs):
        dest = tmp / f"score-{i}"
        t0 = time.perf_counter()
        summary = run(
            ScoreJob(checkpoint=bundle, data=str(data), output=str(dest), keep_columns=["row_id"], overwrite=True, **kw)
        )
        wall = time.perf_counter() - t0
        t = pq.read_table(dest, columns=["row_id", "anomaly_score"]).sort_by("row_id")
        frames[label] = t
        out.append(
            {
                "runner": label,
                "rows_in": rows,
                "rows_scored": summary["rows_scored"],
                "rows_quarantined": summary["rows_quarantined"],
                "rows_per_s": summary["rows_per_s"],
                "job_seconds": summary["seconds"],
                "wall_seconds": wall,
                "unique_ids": len(set(t.column("row_id").to_numpy())),
            }
        )
        log(f"ray score {label}: {summary['rows_per_s']:,.0f} rows/s, {summary['rows_scored']:,} scored")
    cpu, *gpu = (f.column("anomaly_score").to_numpy() for f in frames.values())
    diff = max(float(np.max(np.abs(g - cpu) / np.maximum(np.abs(cpu), 1e-6))) for g in gpu)
    out.append({"max_rel_diff_gpu_vs_cpu": diff})
    return out


def serve_part(data_dir: Path, tmp: Path, requests_n: int = 200) -> list[dict]:
    """The Serve application with ``use_gpu`` (each model replica on a GPU) and on CPU:
    online scores of GPU-trained bundles against the CPU ``Detector``, single-row latency,
    and a bulk request's rows/s."""
    import requests
    import scipy.io
    from ray import serve
    from unusual.serving.app import start

    from unusual.config import ServeConfig

    m = scipy.io.loadmat(data_dir / "tabular" / "odds" / "cardio.mat")
    Xtr, Xte, _ = semi_split(np.asarray(m["X"], float), np.asarray(m["y"]).ravel().astype(int))
    bundles = {}
    for kind in ("ae", "vae"):
        bundles[kind] = str(tmp / f"serve-{kind}")
        Detector(kind, seed=0, device="cuda").fit(Xtr).save(bundles[kind])
    want = {k: Detector.load(u).score(Xte) for k, u in bundles.items()}  # on the CPU
    rows = [{f"x{j}": float(v) for j, v in enumerate(r)} for r in Xte]
    bulk = rows * max(1, 20_000 // len(rows))
    out = []
    port = 8765
    try:
        for use_gpu in (True, False):
            config = ServeConfig(models=bundles, default_model="ae", use_gpu=use_gpu, num_cpus=1)
            url = start(config, port=port, ready_timeout=300)
            row = {"use_gpu": use_gpu}
            for kind in bundles:
                r = requests.post(f"{url}/v1/models/{kind}/score", json={"rows": rows}, timeout=120)
                r.raise_for_status()
                got = np.array([x["anomaly_score"] for x in r.json()["rows"]])
                row[f"{kind}_max_rel_diff_vs_cpu_detector"] = float(
                    np.max(np.abs(got - want[kind]) / np.maximum(np.abs(want[kind]), 1e-6))
                )
            lat = []
            with requests.Session() as sess:
                for i in range(requests_n):
                    t0 = time.perf_counter()
                    sess.post(f"{url}/v1/models/ae/score", json={"rows": [rows[i % len(rows)]]}, timeout=60)
                    lat.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = sess.post(f"{url}/v1/models/ae/score", json={"rows": bulk}, timeout=300)
                r.raise_for_status()
                bulk_s = time.perf_counter() - t0
            row.update(
                {
                    "single_row_p50_ms": 1000 * float(np.percentile(lat, 50)),
                    "single_row_p99_ms": 1000 * float(np.percentile(lat, 99)),
                    "bulk_rows": len(bulk),
                    "bulk_rows_per_s": len(bulk) / bulk_s,
                }
            )
            log(
                f"serve use_gpu={use_gpu}: single-row p50 {row['single_row_p50_ms']:.1f} ms, "
                f"p99 {row['single_row_p99_ms']:.1f} ms; bulk {row['bulk_rows_per_s']:,.0f} rows/s; "
                f"max rel diff vs CPU detector ae {row['ae_max_rel_diff_vs_cpu_detector']:.1e}, "
                f"vae {row['vae_max_rel_diff_vs_cpu_detector']:.1e}"
            )
            out.append(row)
            serve.delete("unusual")
    finally:
        serve.shutdown()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--rows", type=int, default=4_000_000, help="rows of the synthetic Parquet (train and score)")
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--gpu-concurrency", default="1,default", help="GPU scoring runs: actor counts or 'default'")
    p.add_argument("--parts", default="memory,train,score,serve", help="which parts to run (comma list)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_paths.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible to torch; this benchmark needs one", file=sys.stderr)
        return 2

    import pyarrow as pa
    import ray
    from train_throughput import make_data

    record = {
        "benchmark": "gpu_paths",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git("rev-parse", "HEAD"),
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "ray": ray.__version__,
        },
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        parts = set(args.parts.split(","))
        if "memory" in parts:
            record["in_memory"] = in_memory(Path(args.data_dir), tmp)
        data = tmp / "data"
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
                if "train" in parts:
                    gpu_bundle = record["ray_train"][1]["bundle"]
                else:  # a GPU-trained AE on one shard
                    gpu_bundle = str(tmp / "bundle-score")
                    first = pq.read_table(sorted(data.glob("*.parquet"))[0])
                    Detector("ae", seed=0, device="cuda", epochs=3, exclude=["row_id"]).fit(first).save(gpu_bundle)
                record["ray_score"] = ray_score(gpu_bundle, data, tmp, args.rows, args.gpu_concurrency.split(","))
            if "serve" in parts:
                record["serve"] = serve_part(Path(args.data_dir), tmp)
        finally:
            ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
