"""Training throughput: Ray Train with 1 and 2 workers vs a plain single-process loop.

    python benchmarks/train_throughput.py [--rows 1000000] [--features 32] [--epochs 3] [--batch-size 4096]

All three runs train the same AE (same config, batch size, epochs, seed) on the same Parquet
shards on the same cores. At 1M rows Ray Data reads them and keeps the encoded rows in the
object store; each Ray Train worker fetches its share once. The plain loop reads the shards
with pyarrow into memory and calls the same ``unusual.models.training.train_step``. Written to
``benchmarks/results/train_throughput.json``: samples/s of each (training epochs only, from the
per-epoch timings; also after the first epoch), the ratio to the plain loop, the wall time of
the whole job and the validation loss each reaches. This machine's speed drifts by tens of percent
from minute to minute, so the runners alternate ``--repeat`` times and medians are compared.
First, a new user's tiny run as commands, cold: ``unusual fit`` and ``unusual train`` on the
shipped cardio sample, wall seconds and lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unusual.models.detector import split_params  # noqa: E402
from unusual.models.features import FeatureSchema  # noqa: E402
from unusual.models.registry import family  # noqa: E402
from unusual.models.training import EarlyStopping, Objective, eval_loss, make_optimizer, train_step  # noqa: E402


def make_data(path: Path, rows: int, features: int, shards: int, seed: int = 0) -> None:
    """Correlated Gaussian features (a low-rank signal plus noise), like telemetry."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, features))
    path.mkdir(parents=True, exist_ok=True)
    per = rows // shards
    for i in range(shards):
        z = rng.normal(size=(per, 4))
        x = z @ basis + 0.1 * rng.normal(size=(per, features))
        pq.write_table(pa.table({f"f{j:02d}": x[:, j] for j in range(features)}), path / f"part-{i:03d}.parquet")


def plain_loop(data: Path, params: dict) -> dict:
    """The baseline: one process, pyarrow into memory, the same schema, split and train_step."""
    from unusual.ray_jobs.data import row_uniforms

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model_cfg, feat_cfg, train_cfg, _ = split_params("ae", params)
    table = pq.read_table(data)
    schema = FeatureSchema.fit(table, feat_cfg)
    x, _, _ = schema.transform(table)
    is_val = row_uniforms(x, train_cfg.seed) < train_cfg.val_fraction
    xt, xv = torch.from_numpy(x[~is_val]), torch.from_numpy(x[is_val])
    torch.manual_seed(train_cfg.seed)
    module = family("ae").module(model_cfg, schema.width)
    objective = Objective(module)
    opt = make_optimizer(module, train_cfg)
    stopper = EarlyStopping(train_cfg.patience)
    rng = np.random.default_rng(train_cfg.seed)
    epoch_s, val_losses = [], []
    for epoch in range(train_cfg.epochs):
        e0 = time.perf_counter()
        perm = torch.from_numpy(rng.permutation(len(xt)))
        for a in range(0, len(xt), train_cfg.batch_size):
            train_step(objective, xt[perm[a : a + train_cfg.batch_size]], opt, train_cfg.grad_clip)
        total, n = eval_loss(objective, [xv[a : a + 4096] for a in range(0, len(xv), 4096)])
        val_losses.append(total / n)
        epoch_s.append(time.perf_counter() - e0)
        if stopper.update(epoch, val_losses[-1], module):
            break
    return {
        "runner": "plain single-process loop",
        "samples_per_s": len(xt) * len(epoch_s) / sum(epoch_s),
        "val_loss": min(val_losses),
        "val_loss_per_epoch": val_losses,
        "epoch_seconds": epoch_s,
        "samples_per_s_after_epoch_1": len(xt) * (len(epoch_s) - 1) / max(sum(epoch_s[1:]), 1e-9),
        "wall_seconds": time.perf_counter() - t0,
        "train_samples_per_epoch": int(len(xt)),
    }


def ray_run(data: Path, params: dict, workers: int, out: Path) -> dict:
    from unusual.ray_jobs.train import TrainJob, run

    t0 = time.perf_counter()
    manifest = run(
        TrainJob(data=str(data), output=str(out), model="ae", params=params, num_workers=workers, overwrite=True)
    )
    t = manifest["training"]
    return {
        "runner": f"ray train, {workers} worker(s)",
        "samples_per_s": t["samples_per_s"],
        "val_loss": min(t["val_loss"]),
        "val_loss_per_epoch": t["val_loss"],
        "epoch_seconds": t["epoch_seconds"],
        "samples_per_s_after_epoch_1": t["train_samples"] * (len(t["epoch_seconds"]) - 1)
        / max(sum(t["epoch_seconds"][1:]), 1e-9),
        "wall_seconds": time.perf_counter() - t0,
        "train_samples_per_epoch": t["train_samples"],
        "resources_per_worker": t["resources_per_worker"],
        "data": t.get("data"),
        "cached": t["cached"],
    }


def fixed_cost(tmp: Path, epochs: int = 5, repeat: int = 1) -> dict:
    """A new user's tiny run, cold, as commands: `unusual fit` and `unusual train` (its own local Ray)
    on the shipped cardio sample (1,831 rows), interleaved ``repeat`` times: wall seconds and lines."""
    from unusual.ray_jobs import sample_data

    data = str(Path(sample_data.__file__).parent / "cardio.parquet")
    out = {"fit": {"runs": []}, "train": {"runs": []}}
    for i in range(repeat):
        for command in ("fit", "train"):
            cmd = [sys.executable, "-m", "unusual", command, "--model", "ae", "--data", data, "--exclude", "label",
                   "--epochs", str(epochs), "--output", str(tmp / f"tiny-{command}-{i}")]
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            wall = time.perf_counter() - t0
            if r.returncode:
                raise RuntimeError(f"unusual {command} failed:\n{r.stderr[-3000:]}")
            out[command]["runs"].append(round(wall, 2))
            out[command]["lines"] = len((r.stdout + r.stderr).splitlines())
            out[command]["command"] = " ".join(["unusual", *cmd[3:]])
    for command in ("fit", "train"):
        out[command]["wall_seconds"] = float(np.median(out[command]["runs"]))
    out["train_minus_fit_seconds"] = round(out["train"]["wall_seconds"] - out["fit"]["wall_seconds"], 2)
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s, with every run's figure beside it."""
    order = sorted(runs, key=lambda r: r["samples_per_s"])
    med = dict(order[(len(order) - 1) // 2])
    med["samples_per_s_runs"] = [round(r["samples_per_s"]) for r in runs]
    med["samples_per_s"] = float(np.median([r["samples_per_s"] for r in runs]))
    med["samples_per_s_after_epoch_1"] = float(np.median([r["samples_per_s_after_epoch_1"] for r in runs]))
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs of each runner; medians are reported")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = p.parse_args()

    import ray

    params = {"epochs": args.epochs, "batch_size": args.batch_size, "patience": args.epochs, "seed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = fixed_cost(Path(tmp), epochs=5, repeat=args.repeat)
        data = Path(tmp) / "data"
        make_data(data, args.rows, args.features, args.shards)
        from unusual.runtime import ensure_ray

        # The local Ray `unusual train` starts for itself, with its settings; it idles during the plain
        # loop's runs, which alternate with the Ray runs (this machine's speed drifts by tens of percent).
        ensure_ray()
        runs: dict[str, list] = {"plain": [], 1: [], 2: []}
        try:
            for rep in range(args.repeat):
                runs["plain"].append(plain_loop(data, params))
                for workers in (1, 2):
                    runs[workers].append(ray_run(data, params, workers, Path(tmp) / f"model-{workers}-{rep}"))
        finally:
            ray.shutdown()
        results = [_median_run(runs[k]) for k in ("plain", 1, 2)]
    base = results[0]["samples_per_s"]
    for r in results:
        r["ratio_to_plain"] = round(r["samples_per_s"] / base, 3)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    model_cfg, _, train_cfg, _ = split_params("ae", params)
    record = {
        "benchmark": "train_throughput",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__},
        "data": {"rows": args.rows, "features": args.features, "shards": args.shards},
        "repeat": args.repeat,
        "model": {"kind": "ae", **asdict(model_cfg)},
        "train": asdict(train_cfg),
        "results": results,
        "fixed_cost_tiny_run": tiny,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1))
    steady = results[0]["samples_per_s_after_epoch_1"]
    for r in results:
        r["ratio_to_plain_after_epoch_1"] = round(r["samples_per_s_after_epoch_1"] / steady, 3)
    print(f"{'runner':32} {'samples/s':>12} {'ratio':>7} {'after ep1':>10} {'val_loss':>9} {'wall_s':>8}")
    for r in results:
        print(f"{r['runner']:32} {r['samples_per_s']:12,.0f} {r['ratio_to_plain']:7.3f} "
              f"{r['ratio_to_plain_after_epoch_1']:10.3f} {r['val_loss']:9.4f} {r['wall_seconds']:8.1f}")
    print(f"tiny run (cardio, 1,831 rows, 5 epochs, median of {args.repeat}): "
          f"unusual fit {tiny['fit']['wall_seconds']:.1f} s "
          f"({tiny['fit']['lines']} lines), unusual train {tiny['train']['wall_seconds']:.1f} s "
          f"({tiny['train']['lines']} lines)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
