"""Batch scoring throughput and peak memory of ``unusual score`` beside a plain pyarrow + PyTorch loop, the least
such a loop can do ("minimal") and the job on a Ray already running ("warm"), each in its own subprocess on the
same Parquet, bundle and cores. What each does, and the results: benchmarks/README.md.

    python benchmarks/score_throughput.py [--rows 1000000,10000000] [--rows-per-file 1000000] [--repeat 1]
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from harness import cached, loadavg, options, provenance, run_measured, write_result

FEATURES, ROW_GROUP, TRAIN_ROWS, SEED, EPOCHS = 32, 131_072, 100_000, 0, 5
GENERATOR = "score-v1"  # bump when make_rows changes, so cached data is regenerated
PLAIN_BATCH, CHECK_IDS, INTERVAL, TIMEOUT = 65_536, 10_000, 0.2, 7200  # memory sampled every INTERVAL s at most
# unusual-tasks: the same job with --read tasks (Ray Data read tasks feed an actor pool, the GPU path) beside
# the CPU default, actors that read their own units: the number that keeps both (ray_jobs/score.py)
RUNNERS, JOBS = ("plain", "minimal", "unusual", "unusual-tasks", "warm"), ("unusual", "unusual-tasks", "warm")
RATIOS = {  # rows/s of one runner ÷ another's
    "ratio_plain_vs_minimal_wall": ("plain", "minimal", "wall"),
    "ratio_plain_vs_minimal_own": ("plain", "minimal", "own"),
    "ratio_warm_own": ("warm", "plain", "own"), "ratio_wall": ("unusual", "plain", "wall"),
    "ratio_own": ("unusual", "plain", "own"), "ratio_actors_vs_tasks_own": ("unusual", "unusual-tasks", "own")}


def make_rows(rng: np.random.Generator, n: int, first_id: int) -> pa.Table:
    """Telemetry-like rows: 26 correlated gaussians (6 factors + noise, varied scales), 2 lognormal columns driven
    by the first factor, 2 Student-t (df 3), 2 Pareto (a 2.5); 0.1 % of rows get a large spike in one column."""
    d = np.random.default_rng(SEED)  # the distribution's fixed parameters, alike in every shard
    basis, mean = d.normal(size=(6, 26)).astype(np.float32), d.normal(0, 5, size=26).astype(np.float32)
    scale = np.exp(d.normal(0, 1, size=26)).astype(np.float32)
    z = rng.standard_normal((n, 6), dtype=np.float32)
    x = np.empty((n, FEATURES), dtype=np.float32)
    x[:, :26] = z @ basis + 0.3 * rng.standard_normal((n, 26), dtype=np.float32)
    x[:, :26] = x[:, :26] * scale + mean
    x[:, 26] = np.exp(0.5 * z[:, 0] + 0.5 * rng.standard_normal(n, dtype=np.float32))
    x[:, 27] = np.exp(1.0 + 0.3 * z[:, 0] + 0.8 * rng.standard_normal(n, dtype=np.float32))
    x[:, 28:30] = rng.standard_t(3, size=(n, 2))
    x[:, 30:32] = rng.pareto(2.5, size=(n, 2))
    spikes = np.flatnonzero(rng.random(n) < 0.001)
    cols = rng.integers(0, FEATURES, size=spikes.size)
    x[spikes, cols] += 20 * (x.std(axis=0)[cols] + 1)
    return pa.table({"id": np.arange(first_id, first_id + n, dtype=np.int64), **{f"f{j:02d}": x[:, j] for j in
                                                                                   range(FEATURES)}})


def ensure_data(workdir: Path, rows: int, per_file: int) -> tuple[Path, list[Path], bool]:
    """The shards of ``rows`` rows, made once; shard i is alike in every size (own stream, ids from i * per_file)."""
    path, n = workdir / "data" / f"rows-{rows}_per-file-{per_file}_seed-{SEED}", -(-rows // per_file)

    def build(path: Path) -> None:
        path.mkdir(parents=True)
        for i in range(n):
            table = make_rows(np.random.default_rng([SEED, i]), min(per_file, rows - i * per_file), i * per_file)
            pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP)

    reused = cached(path, {"generator": GENERATOR, "rows": rows, "rows_per_file": per_file, "seed": SEED, "files": n,
                           "features": FEATURES, "row_group_rows": ROW_GROUP}, build)
    return path, sorted(path.glob("*.parquet")), reused


def ensure_bundle(workdir: Path) -> tuple[Path, dict]:
    """An AE bundle trained once, in-process, on 100k rows of the same distribution (a stream of its own)."""
    params = {"exclude": ["id"], "epochs": EPOCHS}

    def build(path: Path) -> dict:
        import torch
        from unusual.models import Detector
        torch.set_num_threads(1)  # training is not measured
        t0 = time.perf_counter()
        det = Detector("ae", **params).fit(make_rows(np.random.default_rng([SEED, 10**9]), TRAIN_ROWS, 10**12))
        return {"model_version": det.save(str(path), overwrite=True), "fit_seconds": round(time.perf_counter() - t0, 2),
                "epochs_run": len(det.history_.train_loss), "threshold": det.threshold_}

    path = workdir / "bundle-ae"
    reused = cached(path, {"generator": GENERATOR, "kind": "ae", "train_rows": TRAIN_ROWS, "epochs": EPOCHS,
                           "seed": SEED, "params": params}, build)
    return path, {**json.loads(path.with_name("bundle-ae.json").read_text()), "cached": reused}


def warm_worker(a: dict) -> dict:
    """The job on a Ray already up: one unrecorded job, then the measured one (its seconds exclude Ray's start)."""
    import ray
    from unusual.ray_jobs.score import ScoreJob, run
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run(ScoreJob(checkpoint=a["bundle"], data=a["warmup_data"], output=f"{tmp}/warmup", keep_columns=["id"]))
        return run(ScoreJob(checkpoint=a["bundle"], data=a["data"], output=a["output"], keep_columns=["id"],
                            batch_size=a["batch_size"], concurrency=a["concurrency"]))
    finally:
        ray.shutdown()


def loop_worker(runner: str, a: dict, t_start: float) -> dict:
    """The plain loop or the minimal one (benchmarks/README.md, "Runners"); minimal's first batch is checked against
    the Scorer's scores, uncounted."""
    import torch
    from unusual.models import Scorer
    from unusual.models.bundle import load_bundle
    from unusual.models.tables import parquet_options
    torch.set_num_threads(a["threads"])
    t0, plain = time.perf_counter(), runner == "plain"
    if plain:
        scorer = Scorer(a["bundle"], errors="raise")
    else:
        bundle = load_bundle(a["bundle"])
    load_s, data, out = time.perf_counter() - t0, Path(a["data"]), Path(a["output"])
    if not plain:
        module, cols = bundle.module, bundle.schema.columns
        center, scale = (np.array([getattr(c, k) for c in cols], np.float32) for k in ("center", "scale"))
        chunk = inspect.signature(Scorer).parameters["chunk_rows"].default  # the model does the Scorer's work
    out.mkdir(parents=True, exist_ok=True)
    files, rows_in, rows_out, batches, max_diff, check_s = sorted(data.glob("*.parquet")) or [data], 0, 0, 0, None, 0.0
    with contextlib.nullcontext() if plain else torch.inference_mode():
        for f in files:
            with contextlib.ExitStack() as stack:
                writer = None
                for batch in pq.ParquetFile(f).iter_batches(a["batch_size"], columns=None if plain else [c.name for c
                                                                                                         in cols]):
                    if plain:
                        table = pa.Table.from_batches([batch])
                        scored = scorer.score_table(table).append_column("id", table.column("id"))
                    else:
                        x = (np.stack([c.to_numpy() for c in batch.columns], axis=1) - center) / scale
                        score = np.concatenate([module.score_terms(torch.from_numpy(x[i:i + chunk]))[0].double().numpy()
                                                for i in range(0, len(x), chunk)])
                        if max_diff is None:
                            c0, ref = time.perf_counter(), Scorer(bundle).scores(pa.Table.from_batches([batch]))
                            max_diff, check_s = float(np.max(np.abs(score - ref))), time.perf_counter() - c0
                        scored = pa.table({"anomaly_score": score})
                    if writer is None:
                        opts = parquet_options(scored.schema) if plain and a["writer"] == "recommended" else {}
                        writer = stack.enter_context(pq.ParquetWriter(out / f.name, scored.schema, **opts))
                    writer.write_table(scored)
                    rows_in, rows_out, batches = rows_in + batch.num_rows, rows_out + scored.num_rows, batches + 1
    return {"rows_in": rows_in, "rows_out": rows_out, "files": len(files), "batches": batches, "import_seconds":
            t0 - t_start, "seconds": time.perf_counter() - t0 - check_s, "bundle_load_seconds": load_s, "torch_threads":
            torch.get_num_threads(), "batch_size": a["batch_size"], **({"writer": a["writer"]} if plain else {
                "check_seconds": check_s, "chunk_rows": chunk, "max_abs_diff_vs_scorer_first_batch": max_diff})}


def output_files(out: Path) -> list[Path]:
    """Parquet files of a scoring output, leaving out bookkeeping folders (``_unusual/`` and the like)."""
    return sorted(f for f in out.rglob("*.parquet") if not any(p[0] in "_." for p in f.relative_to(out).parts))


def measure(runner: str, args, env: dict, bundle: Path, data: Path, out: Path, rows: int) -> dict:
    """One run of ``runner`` over ``data`` (a folder or one file) into a fresh ``out``, with its checks."""
    shutil.rmtree(out, ignore_errors=True)
    if runner in ("unusual", "unusual-tasks"):  # the command starts its own local Ray (RAY_ADDRESS is not in env)
        exe = Path(sys.executable).with_name("unusual")
        cmd = [str(exe), "score"] if exe.exists() else [sys.executable, "-m", "unusual.ray_jobs.score"]
        cmd += ["--checkpoint", str(bundle), "--data", str(data), "--output", str(out), "--keep-columns", "id"]
        cmd += ["--read", "tasks"] if runner == "unusual-tasks" else []
        for flag, v in (("--batch-size", args.batch_size), ("--concurrency", args.concurrency)):
            cmd += [flag, str(v)] if v else []
    else:
        spec = {"bundle": str(bundle), "data": str(data), "output": str(out), "concurrency": args.concurrency,
                "warmup_data": str(data if data.is_file() else sorted(data.glob("*.parquet"))[0]),
                "batch_size": args.batch_size if runner == "warm" else PLAIN_BATCH, "threads": args.plain_threads,
                "writer": args.plain_writer}
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", runner, json.dumps(spec)]
    run = run_measured(cmd, env, INTERVAL, TIMEOUT)
    stdout, stderr, rc, m = run.pop("stdout"), run.pop("stderr"), run["returncode"], run["memory"]
    ray_data = re.findall(r"execution finished in ([0-9.]+) seconds", stderr)  # Ray Data's own time, where it ran
    run.update(stderr_tail="\n".join(stderr.rstrip().splitlines()[-(40 if rc else 5):]), load_average_after=loadavg(),
               ray_data_execution_seconds=round(sum(map(float, ray_data)), 3) if ray_data else None, rows_ok=False)
    summary = out / "_unusual" / "summary.json"  # a job's; a worker prints its summary last
    s = json.loads(summary.read_text()) if summary.exists() else {}
    with contextlib.suppress(ValueError, IndexError):
        s = s or json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
    run.update(summary=s, own_seconds=s.get("seconds"))
    if rc == 0:
        files = output_files(out)
        run["output"] = {"files": len(files), "rows_out": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}
        checks = {"rows_out == rows_in": run["output"]["rows_out"] == rows}
        if runner in JOBS:
            checks.update({"summary rows_in == rows_in": s.get("rows_in") == rows,
                           "summary rows_scored + rows_quarantined == rows_in":
                               (s.get("rows_scored") or 0) + (s.get("rows_quarantined") or 0) == rows})
        else:
            checks["worker rows_out == rows_in"] = s.get("rows_out") == rows
        if runner == "minimal":
            diff = s.get("max_abs_diff_vs_scorer_first_batch")
            checks["scores within 1e-3 of Scorer's (first batch)"] = diff is not None and diff <= 1e-3
        run.update(checks=checks, rows_ok=all(checks.values()))
        if not run["rows_ok"]:
            run["error"] = f"row count check failed: {checks}"
    else:
        last = (run["stderr_tail"].splitlines() or [""])[-1][:300]
        run["error"] = f"exit {rc}{' (timed out)' if run['timed_out'] else ''}: {last}"
        print(f"\n!! {runner} failed: {' '.join(cmd)}\n--- stderr ---\n{run['stderr_tail']}\n---", file=sys.stderr)
    if runner in JOBS and rc == 0 and not m["ray_local"]:
        run["warning"] = "no raylet among its processes: it joined a Ray cluster it did not start (memory missed)"
        print(f"\n!! {run['warning']}", file=sys.stderr)
    print(f"exit {rc}, {run['wall_seconds']:.1f} s wall, own {fmt(run['own_seconds'], '.1f') or '-'} s, peak PSS "
          f"{m['peak_pss_mib']:,.0f} MiB (driver {m['peak_driver_pss_mib']:,.0f}, {m['peak_processes']} processes), "
          f"rows ok {run['rows_ok']}", flush=True)
    return run


def score_check(data_files: list[Path], rows: int, bundle: Path, outputs: dict[str, Path]) -> dict:
    """The scores of CHECK_IDS sampled ids in each output against an in-process Scorer's on the same rows."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from unusual.models import Scorer
    ids = np.sort(np.random.default_rng(SEED).choice(rows, size=min(CHECK_IDS, rows), replace=False)).astype(np.int64)
    read = lambda files, columns=None: ds.dataset([str(f) for f in files], format="parquet").to_table(  # noqa: E731
        columns=columns, filter=pc.field("id").isin(pa.array(ids)))
    inp = read(data_files)
    ref, res = dict(zip(inp.column("id").to_numpy().tolist(), Scorer(str(bundle)).scores(inp).tolist())), {}
    for name, out in outputs.items():
        t = read(output_files(out), ["id", "anomaly_score"])
        got = dict(zip(t.column("id").to_numpy().tolist(), t.column("anomaly_score").to_pylist()))
        diff = [abs(got[k] - v) for k, v in ref.items() if got.get(k) is not None]
        res[f"{name}_vs_reference"] = {"matched": len(diff), f"missing_in_{name}": sum(k not in got for k in ref),
                                       "null_in_either": sum(k in got and got[k] is None for k in ref),
                                       "max_abs_diff": max(diff) if diff else None}
    return {"sampled_ids": int(ids.size), **res}


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def summarize(runs: list[dict], rows: int) -> dict | None:
    """Median seconds and rows/s, largest peak memory, of the runs that passed their checks."""
    if not (ok := [r for r in runs if r["rows_ok"]]):
        return None
    wall = statistics.median(r["wall_seconds"] for r in ok)
    own = statistics.median(o) if (o := [r["own_seconds"] for r in ok if r.get("own_seconds")]) else None
    return {"runs_ok": len(ok), "wall_seconds": round(wall, 3), "own_seconds": round(own, 3) if own else None,
            "rows_per_s_wall": round(rows / wall, 1), "rows_per_s_own": round(rows / own, 1) if own else None,
            **{k: max(r["memory"][k] for r in ok) for k in ("peak_pss_mib", "peak_driver_pss_mib")},
            "cpu_seconds": statistics.median(r["memory"]["cpu_seconds"] for r in ok),
            **({"phase_seconds": [r["summary"]["phase_seconds"] for r in ok],  # each run's, for the jobs
                "ray_data_execution_seconds": [r["ray_data_execution_seconds"] for r in ok]}
               if "phase_seconds" in ok[0]["summary"] else {})}


def markdown(record: dict) -> str:
    cols = {"wall s": ("wall_seconds", ".1f"), "own s": ("own_seconds", ".1f"), "rows/s (wall)": ("rows_per_s_wall",
            ",.0f"), "rows/s (own)": ("rows_per_s_own", ",.0f"), "peak PSS MiB": ("peak_pss_mib", ",.0f"),
            "driver MiB": ("peak_driver_pss_mib", ",.0f"), "CPU s": ("cpu_seconds", ".0f")}
    lines = ["| rows | runner | " + " | ".join(cols) + " |", "|---:|---|" + "---:|" * len(cols)]
    for s in record["sizes"]:
        lines += [f"| {s['rows']:,} | {n} | " + (" | ".join(fmt(s[n][k], f) for k, f in cols.values()) if s[n] else
                                                 f"failed: {s['errors'].get(n, '')[:80]}") + " |"
                  for n in RUNNERS if s[n] or n in s["errors"]]
    lines += [f"\n{s['rows']:,} rows: " + ", ".join(f"{k} {s[k]}" for k in RATIOS if s[k] is not None) +
              f"; score check {s.get('score_check')}" for s in record["sizes"]]
    return "\n".join(lines + [f"\n{r} peak PSS growth: {g}" for r, g in record["memory_growth"].items()])


def main() -> int:
    if sys.argv[1:2] == ["_worker"]:  # a runner in this process: its JSON summary on stdout
        spec, t_start = json.loads(sys.argv[3]), time.perf_counter()
        print(json.dumps(warm_worker(spec) if sys.argv[2] == "warm" else loop_worker(sys.argv[2], spec, t_start)))
        return 0
    args = options(__doc__, rows=[1_000_000, 10_000_000], rows_per_file=1_000_000, repeat=1, runners=list(RUNNERS),
                   batch_size=(int, None), concurrency=(int, None), plain_threads=os.cpu_count() or 1,
                   plain_writer="recommended", workdir=harness.ROOT / "artifacts" / "bench_score",
                   out=harness.RESULTS / "score_throughput.json")
    runners, sizes = [r for r in RUNNERS if r in args.runners], sorted(set(args.rows))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    record = {**provenance("score_throughput", ("models", "numpy", "torch", "pyarrow", "ray", "psutil"),
                           memory_total_mib=round(harness.psutil_module().virtual_memory().total / harness.MIB),
                           plain_torch_threads=args.plain_threads),
              "settings": {**vars(args), "features": FEATURES, "row_group_rows": ROW_GROUP, "check_ids": CHECK_IDS,
                           "plain_batch_size": PLAIN_BATCH, "sample_interval_s": INTERVAL,
                           "ray_address_in_env": os.environ.get("RAY_ADDRESS")}, "warmup": {}, "sizes": []}
    print(f"bundle: training or reusing under {args.workdir} ...", flush=True)
    bundle, meta = ensure_bundle(args.workdir)
    record["bundle"], raw = {"path": str(bundle), **meta}, []
    # Unrecorded runs on one shard first: the first start of Ray and of torch pays for cold caches.
    first = ensure_data(args.workdir, sizes[0], args.rows_per_file)[1][0]
    rows = pq.ParquetFile(first).metadata.num_rows
    print(f"warm-up: each runner once on {first.name} ({rows:,} rows), not recorded", flush=True)
    for runner in runners:
        print(f"  {runner} warm-up ...", end=" ", flush=True)
        w = measure(runner, args, env, bundle, first, args.workdir / "out" / f"warmup-{runner}", rows)
        record["warmup"][runner] = {k: w.get(k) for k in ("wall_seconds", "own_seconds", "returncode", "error")}
        record["warmup"][runner]["peak_pss_mib"] = w["memory"]["peak_pss_mib"]
        shutil.rmtree(args.workdir / "out" / f"warmup-{runner}", ignore_errors=True)
    for rows in sizes:
        t0 = time.perf_counter()
        data, files, reused = ensure_data(args.workdir, rows, args.rows_per_file)
        size = {"rows": rows, "files": len(files), "data": str(data), "data_cached": reused, "errors": {}, "data_bytes":
                sum(f.stat().st_size for f in files), "prepare_seconds": round(time.perf_counter() - t0, 1)}
        runs, outputs = {r: [] for r in RUNNERS}, {r: args.workdir / "out" / f"{r}-{rows}" for r in runners}
        print(f"{rows:,} rows in {len(files)} file(s) ({'cached' if reused else 'generated'}) at {data}", flush=True)
        for rep in range(args.repeat):
            for runner in runners:
                print(f"  {runner} run {rep + 1}/{args.repeat} ...", end=" ", flush=True)
                runs[runner].append(measure(runner, args, env, bundle, data, outputs[runner], rows))
                if "error" in runs[runner][-1]:
                    size["errors"][runner] = runs[runner][-1]["error"]
        checked = {k: v for k, v in outputs.items() if k != "minimal" and k not in size["errors"]}  # minimal: no ids
        try:
            size["score_check"] = sc = score_check(files, rows, bundle, checked) if checked else {}
            if bad := [k for k, v in sc.items() if isinstance(v, dict) and (
                    v["matched"] < sc["sampled_ids"] or (v["max_abs_diff"] or 0) > 1e-3)]:
                size["errors"]["score_check"] = f"disagreement: {bad}"
        except Exception as e:  # noqa: BLE001
            size["errors"]["score_check"] = f"{type(e).__name__}: {e}"
        size.update({r: summarize(runs[r], rows) for r in RUNNERS})
        for key, (a, b, kind) in RATIOS.items():
            x, y = (size[r] and size[r][f"rows_per_s_{kind}"] for r in (a, b))
            size[key] = round(x / y, 3) if x and y else None
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
        record["sizes"].append(size)
        raw.append({"rows": rows, "runs": runs})
        write_result(args.out, {**record, "complete": False})  # after every size: a partial run keeps its results
        write_result(harness.raw_path(args.out), {**record, "runs": raw}, depth=4)
    record["memory_growth"] = {}  # a streaming job's peak should not grow with the data
    for r in RUNNERS:
        if len(ok := [s for s in record["sizes"] if s[r]]) >= 2:
            (a, b), pss, drv = (ok[0][r], ok[-1][r]), "peak_pss_mib", "peak_driver_pss_mib"
            record["memory_growth"][r] = {
                "rows_smallest": ok[0]["rows"], "rows_largest": ok[-1]["rows"], "peak_pss_mib_smallest": a[pss],
                "peak_pss_mib_largest": b[pss], "growth_mib": round(b[pss] - a[pss], 1),
                "ratio": round(b[pss] / a[pss], 3), "driver_growth_mib": round(b[drv] - a[drv], 1)}
    write_result(args.out, {**record, "load_average_end": loadavg(), "complete": True})
    print(f"\n{markdown(record)}\n\nwrote {args.out}")
    return 1 if any(s["errors"] for s in record["sizes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
