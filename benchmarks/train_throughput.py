"""Training throughput: Ray Train (the code of ``unusual train``) with 1 and 2 workers beside a plain single-process
loop, on the same Parquet shards, model, batch size, epochs, seed and cores; first, a new user's tiny run as commands,
cold. What is measured, and the results: benchmarks/README.md, "Training throughput benchmark".

    python benchmarks/train_throughput.py [--rows 1000000] [--features 32] [--epochs 3] [--repeat 3]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from harness import RESULTS, ROOT, make_data, options, provenance, write_result
from unusual.models.detector import split_params
from unusual.models.features import FeatureSchema
from unusual.models.registry import family
from unusual.models.training import EarlyStopping, Objective, eval_loss, make_optimizer, train_step


def rates(runner: str, t0: float, samples: int, epoch_s: list, val_losses: list, samples_per_s=None, **more) -> dict:
    """Samples/s of the training epochs (from the per-epoch timings; also after the first epoch) and the loss."""
    return {"runner": runner, "samples_per_s": samples_per_s or samples * len(epoch_s) / sum(epoch_s),
            "val_loss": min(val_losses), "val_loss_per_epoch": val_losses, "epoch_seconds": epoch_s,
            "samples_per_s_after_epoch_1": samples * (len(epoch_s) - 1) / max(sum(epoch_s[1:]), 1e-9),
            "wall_seconds": time.perf_counter() - t0, "train_samples_per_epoch": int(samples), **more}


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
    objective, opt = Objective(module), make_optimizer(module, train_cfg)
    stopper, rng = EarlyStopping(train_cfg.patience), np.random.default_rng(train_cfg.seed)
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
    return rates("plain single-process loop", t0, len(xt), epoch_s, val_losses)


def ray_run(data: Path, params: dict, workers: int, out: Path, runner: str | None = None, **job) -> dict:
    """One ``unusual.ray_jobs.train`` job (``job``: more TrainJob fields, e.g. use_gpu) and its manifest's figures."""
    from unusual.ray_jobs.train import TrainJob, run
    t0 = time.perf_counter()
    manifest = run(TrainJob(data=str(data), output=str(out), model="ae", params=params, num_workers=workers,
                            overwrite=True, **job))
    t = manifest.training
    return rates(runner or f"ray train, {workers} worker(s)", t0, t.train_samples, t.epoch_seconds,
                 t.val_loss, t.samples_per_s, resources_per_worker=t.resources_per_worker,
                 data=t.data, cached=t.cached, model_version=manifest.model_version)


def fixed_cost(tmp: Path, epochs: int, repeat: int) -> dict:
    """A new user's tiny run, cold, as commands: ``unusual fit`` and ``unusual train`` (its own local Ray) on the
    shipped cardio sample (1,831 rows), interleaved ``repeat`` times: wall seconds and lines printed."""
    from unusual.ray_jobs import sample_data
    data = str(Path(sample_data.__file__).parent / "cardio.parquet")
    out: dict = {"fit": {"runs": []}, "train": {"runs": []}}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for i in range(repeat):
        for command in ("fit", "train"):
            cmd = [sys.executable, "-m", "unusual", command, "--model", "ae", "--data", data, "--exclude", "label",
                   "--epochs", str(epochs), "--output", str(tmp / f"tiny-{command}-{i}")]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if r.returncode:
                raise RuntimeError(f"unusual {command} failed:\n{r.stderr[-3000:]}")
            out[command]["runs"].append(round(time.perf_counter() - t0, 2))
            out[command].update(lines=len((r.stdout + r.stderr).splitlines()), command=" ".join(["unusual", *cmd[3:]]))
    for command in ("fit", "train"):
        out[command]["wall_seconds"] = float(np.median(out[command]["runs"]))
    out["train_minus_fit_seconds"] = round(out["train"]["wall_seconds"] - out["fit"]["wall_seconds"], 2)
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s, with every run's figure beside it."""
    med = dict(sorted(runs, key=lambda r: r["samples_per_s"])[(len(runs) - 1) // 2])
    med.update(samples_per_s_runs=[round(r["samples_per_s"]) for r in runs],
               **{k: float(np.median([r[k] for r in runs])) for k in ("samples_per_s", "samples_per_s_after_epoch_1")})
    return med


def main() -> int:
    args = options(__doc__, rows=1_000_000, features=32, shards=8, epochs=3, batch_size=4096, repeat=3,
                   output=RESULTS / "train_throughput.json")  # repeat: interleaved runs of each; medians reported
    import ray

    from unusual.runtime import ensure_ray
    params = {"epochs": args.epochs, "batch_size": args.batch_size, "patience": args.epochs, "seed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = fixed_cost(Path(tmp), epochs=5, repeat=args.repeat)
        make_data(Path(tmp) / "data", args.rows, args.features, args.shards)
        # The local Ray `unusual train` starts for itself, with its settings; it idles during the plain
        # loop's runs, which alternate with the Ray runs (this machine's speed drifts by tens of percent).
        ensure_ray()
        runs: dict = {"plain": [], 1: [], 2: []}
        try:
            for rep in range(args.repeat):
                runs["plain"].append(plain_loop(Path(tmp) / "data", params))
                for w in (1, 2):
                    runs[w].append(ray_run(Path(tmp) / "data", params, w, Path(tmp) / f"model-{w}-{rep}"))
        finally:
            ray.shutdown()
    results = [median_run(runs[k]) for k in ("plain", 1, 2)]
    for r in results:
        for k in ("", "_after_epoch_1"):
            r[f"ratio_to_plain{k}"] = round(r[f"samples_per_s{k}"] / results[0][f"samples_per_s{k}"], 3)
    model_cfg, _, train_cfg, _ = split_params("ae", params)
    write_result(args.output, {**provenance("train_throughput", ("models", "torch", "ray")),
                               "data": {"rows": args.rows, "features": args.features, "shards": args.shards},
                               "repeat": args.repeat, "model": {"kind": "ae", **asdict(model_cfg)},
                               "train": asdict(train_cfg), "results": results, "fixed_cost_tiny_run": tiny})
    print(f"{'runner':32} {'samples/s':>12} {'ratio':>7} {'after ep1':>10} {'val_loss':>9} {'wall_s':>8}")
    for r in results:
        print(f"{r['runner']:32} {r['samples_per_s']:12,.0f} {r['ratio_to_plain']:7.3f} "
              f"{r['ratio_to_plain_after_epoch_1']:10.3f} {r['val_loss']:9.4f} {r['wall_seconds']:8.1f}")
    print(f"tiny run (cardio, 1,831 rows, 5 epochs, median of {args.repeat}): unusual fit "
          f"{tiny['fit']['wall_seconds']:.1f} s ({tiny['fit']['lines']} lines), unusual train "
          f"{tiny['train']['wall_seconds']:.1f} s ({tiny['train']['lines']} lines)\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
