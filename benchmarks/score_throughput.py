"""Batch scoring throughput and peak memory: ``unusual score`` vs a plain pyarrow + PyTorch loop.

    python benchmarks/score_throughput.py [--rows 1000000,10000000] [--rows-per-file 1000000] [--repeat 1]

For each size, the same Parquet shards (N rows x 32 float32 features + an int64
``id``) are scored with the same AE bundle on the same cores by

- **plain**: one Python process; for each file ``ParquetFile.iter_batches`` ->
  ``models.Scorer.score_table`` -> ``id`` appended -> one ``ParquetWriter`` per
  input file, with ``models.tables.parquet_options`` as ``unusual score`` writes its parts
  (``--plain-writer default``: pyarrow's defaults); torch uses every core (``--plain-threads``,
  default ``os.cpu_count()``);
- **minimal**: the floor of the plain loop, what it would cost to score only: the feature
  columns read, scaled into one float32 matrix, the model's scores written as the only
  column (no transform checks, top features, version nor id); same batch size and threads;
- **unusual**: ``unusual score --checkpoint B --data D --output O --keep-columns id``,
  which starts its own local Ray (``RAY_ADDRESS`` is removed from its environment);
- **warm**: the same job on a Ray that is already running (``--skip-warm`` leaves it out).

Each runs in a subprocess, one after the other (plain, minimal, unusual, warm), so they are
measured side by side in one run. While it runs, the summed PSS (proportional set size: shared pages such
as Ray's object store counted once) of the subprocess, all its descendants and
everything in its session (Ray's GCS, raylet and workers) is sampled every
``--sample-interval`` seconds (less often when a sample would take over 5 % of a core);
the peak of the whole tree and of the driver process
alone are recorded. Both outputs are checked: rows out == rows in (Parquet
metadata only), and the scores of ~10k sampled ids are compared with each other
and with an in-process ``Scorer`` on the same input rows (the minimal loop, which writes
no ids, compares its first batch with ``Scorer`` itself).

Before the measured runs each runner scores one shard once, unrecorded (``--no-warmup``
skips it): the first start of Ray and of torch otherwise pays for cold caches.
Data and the bundle are generated once and cached under ``--workdir``. Written to
``benchmarks/results/score_throughput.json`` (after every size, so a partial run
keeps its results); a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import MIB, environment, loadavg, psutil_module  # noqa: E402

FEATURES = 32
ROW_GROUP = 131_072
GENERATOR = "score-v1"  # bump when make_rows changes, so cached data is regenerated
TRAIN_ROWS = 100_000
CPU_SHARE = 0.05  # of one core, at most, for the memory sampler
# plain: the baseline loop; minimal: the least a loop can do (score only), the floor of plain;
# unusual: the `unusual score` command (starts its own Ray);
# warm: the same job on a Ray that is already running (its own seconds exclude starting Ray).
RUNNERS = ("plain", "minimal", "unusual", "warm")
JOBS = ("unusual", "warm")


# =========================================================================== data


def _distribution(seed: int) -> dict:
    """Fixed parameters of the feature distribution (shared by every shard and the training set)."""
    rng = np.random.default_rng(seed)
    return {
        "basis": rng.normal(size=(6, 26)).astype(np.float32),  # 6 latent factors -> 26 correlated gaussians
        "mean": rng.normal(0, 5, size=26).astype(np.float32),
        "scale": np.exp(rng.normal(0, 1, size=26)).astype(np.float32),
    }


def make_rows(rng: np.random.Generator, n: int, first_id: int, dist: dict) -> pa.Table:
    """Telemetry-like rows: 26 correlated gaussians (low rank + noise, varied scales), 2 lognormal
    columns driven by the first factor, 2 Student-t (df 3) and 2 Pareto (a 2.5) heavy-tailed
    columns; 0.1 % of rows get a large spike in one column."""
    z = rng.standard_normal((n, 6), dtype=np.float32)
    x = np.empty((n, FEATURES), dtype=np.float32)
    x[:, :26] = z @ dist["basis"] + 0.3 * rng.standard_normal((n, 26), dtype=np.float32)
    x[:, :26] = x[:, :26] * dist["scale"] + dist["mean"]
    x[:, 26] = np.exp(0.5 * z[:, 0] + 0.5 * rng.standard_normal(n, dtype=np.float32))
    x[:, 27] = np.exp(1.0 + 0.3 * z[:, 0] + 0.8 * rng.standard_normal(n, dtype=np.float32))
    x[:, 28:30] = rng.standard_t(3, size=(n, 2))
    x[:, 30:32] = rng.pareto(2.5, size=(n, 2))
    spikes = np.flatnonzero(rng.random(n) < 0.001)
    cols = rng.integers(0, FEATURES, size=spikes.size)
    x[spikes, cols] += 20 * (x.std(axis=0)[cols] + 1)
    data = {"id": np.arange(first_id, first_id + n, dtype=np.int64)}
    data.update({f"f{j:02d}": x[:, j] for j in range(FEATURES)})
    return pa.table(data)


def parquet_rows(files) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def ensure_data(workdir: Path, rows: int, rows_per_file: int, seed: int) -> tuple[Path, list[Path], bool]:
    """The shards for ``rows`` rows, generated once. Shard i is the same for every size (its own
    seeded stream, ids from i * rows_per_file), so sizes differ only in how many shards they have."""
    name = f"rows-{rows}_per-file-{rows_per_file}_seed-{seed}"
    path, meta_path = workdir / "data" / name, workdir / "data" / f"{name}.json"
    n_files = -(-rows // rows_per_file)
    expected = [path / f"part-{i:05d}.parquet" for i in range(n_files)]
    meta = {"generator": GENERATOR, "rows": rows, "rows_per_file": rows_per_file, "seed": seed, "files": n_files,
            "features": FEATURES, "row_group_rows": ROW_GROUP}
    if meta_path.exists() and path.is_dir():
        try:
            ok = (json.loads(meta_path.read_text()) == meta and sorted(path.glob("*.parquet")) == expected
                  and parquet_rows(expected) == rows)
        except Exception:  # noqa: BLE001  (unreadable cache: regenerate)
            ok = False
        if ok:
            return path, expected, True
    shutil.rmtree(path, ignore_errors=True)
    meta_path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dist = _distribution(seed)
    for i in range(n_files):
        n = min(rows_per_file, rows - i * rows_per_file)
        table = make_rows(np.random.default_rng([seed, i]), n, i * rows_per_file, dist)
        pq.write_table(table, tmp / expected[i].name, row_group_size=ROW_GROUP)
    tmp.rename(path)
    meta_path.write_text(json.dumps(meta, indent=1))
    return path, expected, False


def ensure_bundle(workdir: Path, seed: int, epochs: int) -> tuple[Path, dict]:
    """A small AE bundle trained in-process on 100k rows of the same distribution (a separate stream)."""
    path, meta_path = workdir / "bundle-ae", workdir / "bundle-ae.json"
    meta = {"generator": GENERATOR, "kind": "ae", "train_rows": TRAIN_ROWS, "epochs": epochs, "seed": seed,
            "params": {"exclude": ["id"], "epochs": epochs}}
    if meta_path.exists() and (path / "manifest.json").exists():
        cached = json.loads(meta_path.read_text())
        if {k: cached.get(k) for k in meta} == meta:
            return path, {**cached, "cached": True}
    import torch
    from unusual.models import Detector

    torch.set_num_threads(1)  # training is not measured; one thread behaves best on a shared 2-core machine
    table = make_rows(np.random.default_rng([seed, 10**9]), TRAIN_ROWS, 10**12, _distribution(seed))
    t0 = time.perf_counter()
    det = Detector("ae", **meta["params"]).fit(table)
    version = det.save(str(path), overwrite=True)
    meta.update(model_version=version, fit_seconds=round(time.perf_counter() - t0, 2),
                epochs_run=len(det.history_.get("train_loss", []) or []), threshold=det.threshold_)
    meta_path.write_text(json.dumps(meta, indent=1, default=float))
    return path, {**meta, "cached": False}


# =========================================================================== the plain runner (subprocess)


def plain_worker(argv: list[str]) -> int:
    """``score_throughput.py _plain ...``: the baseline, run in its own process. Prints a JSON summary."""
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(prog="score_throughput.py _plain")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--errors", default="raise", choices=["raise", "mask"])
    p.add_argument("--writer", default="recommended", choices=["recommended", "default"])
    a = p.parse_args(argv)

    import torch
    from unusual.models import Scorer
    from unusual.models.tables import parquet_options

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    scorer = Scorer(a.bundle, errors=a.errors)
    load_s = time.perf_counter() - t0
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows_in = rows_out = batches = 0
    files = [Path(a.data)] if Path(a.data).is_file() else sorted(Path(a.data).glob("*.parquet"))
    for f in files:
        writer = None
        try:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=a.batch_size):
                table = pa.Table.from_batches([batch])
                scored = scorer.score_table(table).append_column("id", table.column("id"))
                if writer is None:
                    opts = parquet_options(scored.schema) if a.writer == "recommended" else {}
                    writer = pq.ParquetWriter(out / f.name, scored.schema, **opts)
                writer.write_table(scored)
                rows_in += table.num_rows
                rows_out += scored.num_rows
                batches += 1
        finally:
            if writer is not None:
                writer.close()
    print(json.dumps({
        "rows_in": rows_in, "rows_out": rows_out, "files": len(files), "batches": batches,
        "seconds": time.perf_counter() - t0, "bundle_load_seconds": load_s,
        "import_seconds": t0 - t_start,  # argparse, torch and models
        "torch_threads": torch.get_num_threads(), "batch_size": a.batch_size, "errors": a.errors, "writer": a.writer,
    }))
    return 0


def minimal_worker(argv: list[str]) -> int:
    """``score_throughput.py _minimal ...``: the least a scoring loop can do, as a floor for the plain one:
    ``iter_batches`` of the feature columns -> one float32 matrix scaled with the bundle's centers and
    scales -> the model's ``score_terms`` in the Scorer's chunks -> only ``anomaly_score`` written (no
    top features, version, id, checks). Prints a JSON summary, with the largest difference of its scores
    from ``Scorer``'s on the first batch."""
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(prog="score_throughput.py _minimal")
    for flag in ("--bundle", "--data", "--output"):
        p.add_argument(flag, required=True)
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)

    import torch
    from unusual.models import Scorer
    from unusual.models.bundle import load_bundle

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    bundle = load_bundle(a.bundle)
    load_s = time.perf_counter() - t0
    module, cols = bundle.module, bundle.schema.columns
    names = [c.name for c in cols]
    center = np.array([c.center for c in cols], np.float32)
    scale = np.array([c.scale for c in cols], np.float32)
    chunk = inspect.signature(Scorer).parameters["chunk_rows"].default  # the model does the Scorer's work
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = batches = 0
    max_diff, check_s = None, 0.0
    files = [Path(a.data)] if Path(a.data).is_file() else sorted(Path(a.data).glob("*.parquet"))
    with torch.inference_mode():
        for f in files:
            writer = None
            try:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=a.batch_size, columns=names):
                    x = np.stack([c.to_numpy() for c in batch.columns], axis=1)
                    x = (x - center) / scale
                    score = np.concatenate([module.score_terms(torch.from_numpy(x[i:i + chunk]))[0].double().numpy()
                                            for i in range(0, len(x), chunk)])
                    if max_diff is None:  # not counted in its seconds
                        c0 = time.perf_counter()
                        ref = Scorer(bundle).scores(pa.Table.from_batches([batch]))
                        max_diff = float(np.max(np.abs(score - ref)))
                        check_s = time.perf_counter() - c0
                    table = pa.table({"anomaly_score": score})
                    if writer is None:
                        writer = pq.ParquetWriter(out / f.name, table.schema)
                    writer.write_table(table)
                    rows += len(score)
                    batches += 1
            finally:
                if writer is not None:
                    writer.close()
    print(json.dumps({
        "rows_in": rows, "rows_out": rows, "files": len(files), "batches": batches,
        "seconds": time.perf_counter() - t0 - check_s, "bundle_load_seconds": load_s,
        "import_seconds": t0 - t_start, "check_seconds": check_s,
        "torch_threads": torch.get_num_threads(), "batch_size": a.batch_size, "chunk_rows": chunk,
        "max_abs_diff_vs_scorer_first_batch": max_diff,
    }))
    return 0


def warm_worker(argv: list[str]) -> int:
    """``score_throughput.py _warm ...``: the scoring job on a Ray that is already up (as on a cluster
    that serves many jobs). Starts a local Ray, runs one unrecorded job on ``--warmup-data``, then the
    measured job; prints the measured job's summary (its ``seconds`` exclude starting Ray)."""
    p = argparse.ArgumentParser(prog="score_throughput.py _warm")
    for flag in ("--bundle", "--data", "--output", "--warmup-data"):
        p.add_argument(flag, required=True)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--concurrency", type=int)
    a = p.parse_args(argv)

    import ray
    from unusual.ray_jobs.score import ScoreJob, run

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run(ScoreJob(checkpoint=a.bundle, data=a.warmup_data, output=f"{tmp}/warmup", keep_columns=["id"]))
        opts = {"batch_size": a.batch_size, "concurrency": a.concurrency}
        summary = run(ScoreJob(checkpoint=a.bundle, data=a.data, output=a.output, keep_columns=["id"], **opts))
    finally:
        ray.shutdown()
    print(json.dumps(summary))
    return 0


# =========================================================================== process-tree memory sampling


class TreeSampler(threading.Thread):
    """Samples the summed PSS (RSS where PSS is unreadable) of a process, its descendants and every
    process in its session; keeps the peaks, a per-process breakdown at the peak, CPU seconds and a
    coarse timeline."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.psutil = psutil_module()
        self.pid, self.interval = pid, interval
        try:
            self.sid = os.getsid(pid)
        except OSError:  # already gone
            self.sid = -1
        self.stop_event = threading.Event()
        self.peak = self.peak_driver = 0
        self.peak_processes = 0
        self.at_peak: list = []
        self.samples = 0
        self.rss_fallbacks = 0
        self.timeline: list[tuple[float, float]] = []
        self.cpu_s = 0.0
        self.cpu: dict[tuple[int, float], float] = {}
        self.seen: dict[tuple[int, float], str] = {}
        self.t0 = time.perf_counter()

    def members(self) -> list:
        procs, kids = {}, defaultdict(list)
        for p in self.psutil.process_iter(["ppid"]):
            procs[p.pid] = p
            kids[p.info["ppid"]].append(p.pid)
        tree, stack = set(), [self.pid]
        while stack:
            pid = stack.pop()
            if pid in procs and pid not in tree:
                tree.add(pid)
                stack.extend(kids[pid])
        for pid in procs:
            try:
                if pid not in tree and os.getsid(pid) == self.sid:
                    tree.add(pid)
            except OSError:
                pass
        return [procs[pid] for pid in tree]

    def sample(self) -> None:
        ps = self.psutil
        total = driver = 0
        per = []
        for p in self.members():
            try:
                try:
                    mem = p.memory_full_info().pss
                except ps.AccessDenied:
                    mem = p.memory_info().rss
                    self.rss_fallbacks += 1
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                self.cpu[key] = t.user + t.system
                if key not in self.seen:
                    self.seen[key] = p.name()
            except (ps.NoSuchProcess, ps.ZombieProcess, ps.AccessDenied):
                continue
            total += mem
            per.append((p, mem))
            if p.pid == self.pid:
                driver = mem
        self.samples += 1
        self.timeline.append((round(time.perf_counter() - self.t0, 2), round(total / MIB, 1)))
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_processes = max(self.peak_processes, len(per))
        if total > self.peak:
            self.peak = total
            at = []
            for p, mem in sorted(per, key=lambda x: -x[1]):
                try:
                    name = p.name()
                except ps.Error:
                    name = "?"
                at.append({"pid": p.pid, "name": name, "pss_mib": round(mem / MIB, 1)})
            self.at_peak = at

    def run(self) -> None:
        while not self.stop_event.is_set():
            t, c = time.perf_counter(), time.thread_time()
            try:
                self.sample()
            except Exception:  # noqa: BLE001  (a process vanishing mid-walk must not end sampling)
                pass
            cost = time.thread_time() - c
            self.cpu_s += cost
            # Reading PSS walks each process's page tables (~10 ms for a process holding torch): the
            # sampler takes at most CPU_SHARE of one core, so it slows the measured run by little
            # (at 0.2 s it took a fifth of a core from Ray's dozen processes, none from a lone loop).
            self.stop_event.wait(max(0.0, max(self.interval, cost / CPU_SHARE) - (time.perf_counter() - t)))

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def leftovers(self) -> list:
        """Members of the session still alive (e.g. Ray processes outliving the driver)."""
        return [p for p in self.members() if p.pid != self.pid]

    def record(self) -> dict:
        names = sorted({n for n in self.seen.values()})
        step = max(1, len(self.timeline) // 120)
        return {
            "peak_pss_mib": round(self.peak / MIB, 1),
            "peak_driver_pss_mib": round(self.peak_driver / MIB, 1),
            "peak_processes": self.peak_processes,
            "processes_seen": len(self.seen),
            "process_names": names,
            "ray_local": any(n.startswith("raylet") for n in names),
            "cpu_seconds": round(sum(self.cpu.values()), 1),
            "samples": self.samples,
            "sampler_cpu_seconds": round(self.cpu_s, 2),
            "rss_fallbacks": self.rss_fallbacks,
            "at_peak": self.at_peak[:15],
            "timeline_s_mib": self.timeline[::step],
        }


def run_measured(cmd: list[str], env: dict, interval: float, timeout: float, label: str) -> dict:
    """Run ``cmd`` in a new session, sampling its memory; returns wall time, exit status, output and memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
        # Ray's processes shut down after the driver exits; give them a moment, then end any left in the session.
        left = []
        for _ in range(20):
            left = sampler.leftovers()
            if not left:
                break
            time.sleep(0.5)
        if left:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    rec = {"cmd": cmd, "returncode": rc, "timed_out": timed_out, "wall_seconds": round(wall, 3),
           "memory": sampler.record(), "leftover_processes_after_10s": [_describe(p) for p in left],
           "stderr_tail": _tail(stderr, 40) if rc != 0 else _tail(stderr, 5)}
    # Ray Data logs how long the dataset itself ran; the rest of the wall time is start-up, planning, shut-down.
    ray_data = [float(x) for x in re.findall(r"execution finished in ([0-9.]+) seconds", stderr)]
    rec["ray_data_execution_seconds"] = round(sum(ray_data), 3) if ray_data else None
    rec["stdout"] = stdout
    if rc != 0:
        print(f"\n!! {label} failed (exit {rc}{', timed out' if timed_out else ''}): {' '.join(cmd)}\n"
              f"--- stderr (last 40 lines) ---\n{_tail(stderr, 40)}\n---", file=sys.stderr)
    return rec


def _describe(p) -> str:
    try:
        return f"{p.pid} {p.name()}"
    except Exception:  # noqa: BLE001
        return str(p.pid)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _last_json(text: str):
    """The last JSON object printed on stdout (pretty-printed or on one line)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                try:
                    return json.loads(lines[i])
                except json.JSONDecodeError:
                    continue
    return None


# =========================================================================== checks


def output_files(out: Path) -> list[Path]:
    """Parquet files of a scoring output, leaving out bookkeeping folders (``_unusual/`` and the like)."""
    return sorted(f for f in out.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in f.relative_to(out).parts))


def count_output(out: Path) -> dict:
    files = output_files(out)
    by_dir: dict[str, int] = defaultdict(int)
    for f in files:
        by_dir[str(f.parent.relative_to(out)) or "."] += pq.ParquetFile(f).metadata.num_rows
    kept = set(files)
    others = sorted(str(f.relative_to(out)) for f in out.rglob("*.parquet") if f not in kept)
    return {"files": len(files), "rows_out": sum(by_dir.values()), "rows_by_dir": dict(by_dir),
            "other_parquet_files": others[:20],
            "bytes": sum(f.stat().st_size for f in files)}


def _scores_for(files: list[Path], ids: np.ndarray) -> dict[int, float]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    t = ds.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["id", "anomaly_score"], filter=pc.field("id").isin(pa.array(ids)))
    return dict(zip(t.column("id").to_numpy().tolist(), t.column("anomaly_score").to_pylist()))


def score_check(data_files: list[Path], rows: int, bundle: Path, outputs: dict[str, Path], n: int, seed: int) -> dict:
    """Compare the scores of ``n`` sampled ids across the outputs and an in-process Scorer."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from unusual.models import Scorer

    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(rows, size=min(n, rows), replace=False)).astype(np.int64)
    inp = ds.dataset([str(f) for f in data_files], format="parquet").to_table(filter=pc.field("id").isin(pa.array(ids)))
    ref = dict(zip(inp.column("id").to_numpy().tolist(), Scorer(str(bundle)).scores(inp).tolist()))
    got = {"reference": ref, **{k: _scores_for(output_files(v), ids) for k, v in outputs.items()}}
    res: dict = {"sampled_ids": int(ids.size)}
    names = list(got)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = [k for k in got[a] if k in got[b] and got[a][k] is not None and got[b][k] is not None]
            diff = np.array([abs(got[a][k] - got[b][k]) for k in common]) if common else np.zeros(0)
            res[f"{b}_vs_{a}"] = {
                "matched": len(common),
                "missing_in_" + b: int(sum(k not in got[b] for k in got[a])),
                "null_in_either": int(sum(1 for k in got[a] if k in got[b] and None in (got[a][k], got[b][k]))),
                "max_abs_diff": float(diff.max()) if diff.size else None,
            }
    return res


# =========================================================================== environment, CLI


def _csv_ints(s: str) -> list[int]:
    return [int(x.replace("_", "")) for x in s.split(",") if x.strip()]


def unusual_command() -> list[str]:
    exe = Path(sys.executable).with_name("unusual")
    return [str(exe), "score"] if exe.exists() else [sys.executable, "-m", "unusual.ray_jobs.score"]


def measure(runner: str, args, ucmd: list[str], env: dict, bundle: Path, data: Path, out: Path, rows: int) -> dict:
    """One measured run of ``runner`` over ``data`` (a folder or one file) into a fresh ``out``, with its checks."""
    shutil.rmtree(out, ignore_errors=True)
    if runner == "plain":
        cmd = [sys.executable, str(Path(__file__).resolve()), "_plain", "--bundle", str(bundle),
               "--data", str(data), "--output", str(out), "--batch-size", str(args.plain_batch_size),
               "--threads", str(args.plain_threads), "--errors", args.plain_errors, "--writer", args.plain_writer]
    elif runner == "minimal":
        cmd = [sys.executable, str(Path(__file__).resolve()), "_minimal", "--bundle", str(bundle),
               "--data", str(data), "--output", str(out), "--batch-size", str(args.plain_batch_size),
               "--threads", str(args.plain_threads)]
    elif runner == "warm":
        first = data if data.is_file() else sorted(data.glob("*.parquet"))[0]
        cmd = [sys.executable, str(Path(__file__).resolve()), "_warm", "--bundle", str(bundle),
               "--data", str(data), "--output", str(out), "--warmup-data", str(first)]
        for flag, v in (("--batch-size", args.batch_size), ("--concurrency", args.concurrency)):
            if v:
                cmd += [flag, str(v)]
    else:
        cmd = [*ucmd, "--checkpoint", str(bundle), "--data", str(data), "--output", str(out), "--keep-columns", "id"]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        if args.concurrency:
            cmd += ["--concurrency", str(args.concurrency)]
    run = run_measured(cmd, env, args.sample_interval, args.timeout, f"{runner} ({rows:,} rows)")
    run["load_average_after"] = loadavg()
    summary = None
    if runner in JOBS and (out / "_unusual" / "summary.json").exists():
        summary = json.loads((out / "_unusual" / "summary.json").read_text())
    printed = _last_json(run.pop("stdout"))
    run["summary"] = summary if summary is not None else printed
    if runner in JOBS:
        run["printed_summary_matches_file"] = None if summary is None else printed == summary
    s = run["summary"] or {}
    run["own_seconds"] = s.get("seconds")
    run["rows_ok"] = False
    if run["returncode"] == 0:
        counts = count_output(out)
        run["output"] = counts
        checks = {"rows_out == rows_in": counts["rows_out"] == rows}
        if runner in JOBS:
            checks["summary rows_in == rows_in"] = s.get("rows_in") == rows
            checks["summary rows_scored + rows_quarantined == rows_in"] = (
                (s.get("rows_scored") or 0) + (s.get("rows_quarantined") or 0) == rows)
        else:
            checks["worker rows_out == rows_in"] = s.get("rows_out") == rows
        if runner == "minimal":
            diff = s.get("max_abs_diff_vs_scorer_first_batch")
            checks["scores within 1e-3 of Scorer's (first batch)"] = diff is not None and diff <= 1e-3
        run["checks"] = checks
        run["rows_ok"] = all(checks.values())
        if not run["rows_ok"]:
            run["error"] = f"row count check failed: {checks}"
    else:
        last = run["stderr_tail"].splitlines()[-1:] or [""]
        run["error"] = f"exit {run['returncode']}{' (timed out)' if run['timed_out'] else ''}: {last[0][:300]}"
    m = run["memory"]
    if runner in JOBS and run["returncode"] == 0 and not m["ray_local"]:
        run["warning"] = ("no raylet among the command's processes: it joined a Ray cluster it did not start, "
                          "so the memory figures miss that cluster's processes")
        print(f"\n!! {run['warning']}", file=sys.stderr)
    own = _fmt(run["own_seconds"], ".1f") or "-"
    print(f"exit {run['returncode']}, {run['wall_seconds']:.1f} s wall, own {own} s, "
          f"peak PSS {m['peak_pss_mib']:,.0f} MiB (driver {m['peak_driver_pss_mib']:,.0f}, "
          f"{m['peak_processes']} processes), rows ok {run['rows_ok']}", flush=True)
    return run


def _fmt(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def summarize(runs: list[dict], rows: int) -> dict | None:
    ok = [r for r in runs if r["returncode"] == 0 and r.get("rows_ok")]
    if not ok:
        return None
    wall = statistics.median(r["wall_seconds"] for r in ok)
    own = [r["own_seconds"] for r in ok if r.get("own_seconds")]
    own_s = statistics.median(own) if own else None
    return {
        "runs_ok": len(ok),
        "wall_seconds": round(wall, 3),
        "own_seconds": round(own_s, 3) if own_s else None,
        "rows_per_s_wall": round(rows / wall, 1),
        "rows_per_s_own": round(rows / own_s, 1) if own_s else None,
        "peak_pss_mib": max(r["memory"]["peak_pss_mib"] for r in ok),
        "peak_driver_pss_mib": max(r["memory"]["peak_driver_pss_mib"] for r in ok),
        "cpu_seconds": statistics.median(r["memory"]["cpu_seconds"] for r in ok),
    }


def markdown(record: dict) -> str:
    lines = ["| rows | files | runner | wall s | own s | rows/s (wall) | rows/s (own) | peak PSS MiB | "
             "driver MiB | CPU s | ratio (wall / own) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    for s in record["sizes"]:
        for runner in RUNNERS:
            r = s.get(runner)
            if r is None:
                if runner in s.get("errors", {}):
                    lines.append(f"| {s['rows']:,} | {s['files']} | {runner} | failed: {s['errors'][runner][:60]} |"
                                 " | | | | | | |")
                continue
            ratio = ""
            if runner == "minimal" and s.get("ratio_plain_vs_minimal_wall") is not None:
                ratio = (f"plain ÷ minimal {s['ratio_plain_vs_minimal_wall']:.3f} / "
                         f"{_fmt(s.get('ratio_plain_vs_minimal_own'), '.3f')}")
            if runner == "unusual" and s.get("ratio_wall") is not None:
                ratio = f"unusual ÷ plain {s['ratio_wall']:.3f} / {_fmt(s.get('ratio_own'), '.3f')}"
            if runner == "warm" and s.get("ratio_warm_own") is not None:
                ratio = f"warm ÷ plain - / {s['ratio_warm_own']:.3f}"
            lines.append(
                f"| {s['rows']:,} | {s['files']} | {runner} | {r['wall_seconds']:.1f} | "
                f"{_fmt(r['own_seconds'], '.1f')} | "
                f"{r['rows_per_s_wall']:,.0f} | {_fmt(r['rows_per_s_own'], ',.0f')} | {r['peak_pss_mib']:,.0f} | "
                f"{r['peak_driver_pss_mib']:,.0f} | {r['cpu_seconds']:.0f} | {ratio} |")
    for runner, g in record.get("memory_growth", {}).items():
        lines.append(f"\n{runner}: peak PSS {g['peak_pss_mib_smallest']:,.0f} MiB at {g['rows_smallest']:,} rows -> "
                     f"{g['peak_pss_mib_largest']:,.0f} MiB at {g['rows_largest']:,} rows "
                     f"(x{g['ratio']:.2f}, +{g['growth_mib']:,.0f} MiB)")
    for s in record["sizes"]:
        for k, v in s.get("score_check", {}).items():
            if isinstance(v, dict):
                lines.append(f"\n{s['rows']:,} rows, {k}: {v['matched']} ids matched, max |diff| {v['max_abs_diff']}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        return plain_worker(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_minimal":
        return minimal_worker(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_warm":
        return warm_worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=_csv_ints, default=[1_000_000, 10_000_000], help="comma list of sizes")
    p.add_argument("--rows-per-file", type=int, default=1_000_000)
    p.add_argument("--workdir", default=str(ROOT / "artifacts" / "bench_score"), help="cached data, bundle, outputs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "score_throughput.json"))
    p.add_argument("--repeat", type=int, default=1, help="runs of each runner per size (median time, max memory)")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--skip-minimal", action="store_true", help="skip the minimal score-only loop")
    p.add_argument("--skip-unusual", action="store_true", help="skip the `unusual score` command runner")
    p.add_argument("--skip-warm", action="store_true", help="skip the job on an already running Ray")
    p.add_argument("--batch-size", type=int, help="passed to unusual score --batch-size when given")
    p.add_argument("--concurrency", type=int, help="passed to unusual score --concurrency when given")
    p.add_argument("--plain-batch-size", type=int, default=65536, help="iter_batches size of the plain loop")
    p.add_argument("--plain-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the plain loop")
    p.add_argument("--plain-errors", choices=["raise", "mask"], default="raise",
                   help="Scorer errors= of the plain loop")
    p.add_argument("--plain-writer", choices=["recommended", "default"], default="recommended",
                   help="the plain loop's ParquetWriter options: models.tables.parquet_options (as unusual score "
                        "writes its parts) or pyarrow's defaults")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the benchmark bundle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-ids", type=int, default=10_000, help="sampled ids whose scores are compared")
    p.add_argument("--sample-interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per scoring run")
    p.add_argument("--keep-outputs", action="store_true", help="keep the scored Parquet under WORKDIR/out")
    p.add_argument("--no-warmup", action="store_true", help="skip the unrecorded warm-up run of each runner")
    args = p.parse_args()
    if args.skip_plain and args.skip_unusual:
        p.error("nothing to run: both --skip-plain and --skip-unusual")

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(args.rows))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ucmd = unusual_command()
    record = {
        "benchmark": "score_throughput",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        **environment(
            ("models", "numpy", "torch", "pyarrow", "ray", "psutil"),
            memory_total_mib=round(psutil_module().virtual_memory().total / MIB),
            plain_torch_threads=args.plain_threads,
        ),
        "load_average_start": loadavg(),
        "settings": {
            "rows": sizes, "rows_per_file": args.rows_per_file, "features": FEATURES, "row_group_rows": ROW_GROUP,
            "repeat": args.repeat, "plain_batch_size": args.plain_batch_size, "plain_threads": args.plain_threads,
            "plain_errors": args.plain_errors, "plain_writer": args.plain_writer, "unusual_command": ucmd,
            "unusual_batch_size": args.batch_size,
            "unusual_concurrency": args.concurrency, "sample_interval_s": args.sample_interval,
            "ray_address_in_env": os.environ.get("RAY_ADDRESS"), "check_ids": args.check_ids,
        },
        "sizes": [],
    }
    failed = False

    if not args.skip_unusual:
        help_run = subprocess.run([*ucmd, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
        if help_run.returncode != 0:
            print(f"!! `{' '.join(ucmd)} --help` failed (exit {help_run.returncode}); the unusual runs will fail:\n"
                  f"{_tail(help_run.stderr, 20)}", file=sys.stderr)

    print(f"bundle: training or reusing under {workdir} ...", flush=True)
    bundle, bundle_meta = ensure_bundle(workdir, args.seed, args.epochs)
    record["bundle"] = {"path": str(bundle), **bundle_meta}

    runners = [r for r in RUNNERS if not getattr(args, f"skip_{r}")]
    record["warmup"] = {}
    if not args.no_warmup:
        # Unrecorded runs on one shard: the first start of Ray and of torch pays for cold caches.
        _, wfiles, _ = ensure_data(workdir, sizes[0], args.rows_per_file, args.seed)
        wrows = pq.ParquetFile(wfiles[0]).metadata.num_rows
        print(f"warm-up: each runner once on {wfiles[0].name} ({wrows:,} rows), not recorded", flush=True)
        for runner in runners:
            print(f"  {runner} warm-up ...", end=" ", flush=True)
            out = workdir / "out" / f"warmup-{runner}"
            w = measure(runner, args, ucmd, env, bundle, wfiles[0], out, wrows)
            record["warmup"][runner] = {k: w.get(k) for k in ("wall_seconds", "own_seconds", "returncode", "error")}
            record["warmup"][runner]["peak_pss_mib"] = w["memory"]["peak_pss_mib"]
            shutil.rmtree(out, ignore_errors=True)

    for rows in sizes:
        t0 = time.perf_counter()
        data, files, cached = ensure_data(workdir, rows, args.rows_per_file, args.seed)
        size = {"rows": rows, "files": len(files), "data": str(data), "data_cached": cached,
                "data_bytes": sum(f.stat().st_size for f in files),
                "prepare_seconds": round(time.perf_counter() - t0, 1),
                "runs": {r: [] for r in RUNNERS}, "errors": {}}
        print(f"{rows:,} rows in {len(files)} file(s) ({'cached' if cached else 'generated'}) at {data}", flush=True)
        outputs: dict[str, Path] = {}
        for rep in range(args.repeat):
            for runner in runners:
                out = workdir / "out" / f"{runner}-{rows}"
                print(f"  {runner} run {rep + 1}/{args.repeat} ...", end=" ", flush=True)
                run = measure(runner, args, ucmd, env, bundle, data, out, rows)
                size["runs"][runner].append(run)
                if run.get("rows_ok"):
                    outputs[runner] = out
                else:
                    outputs.pop(runner, None)  # an earlier repeat's output was replaced by this one
                    failed = True
                    size["errors"][runner] = run["error"]
        with_ids = {k: v for k, v in outputs.items() if k != "minimal"}  # minimal writes the score only
        if with_ids:
            try:
                size["score_check"] = score_check(files, rows, bundle, with_ids, args.check_ids, args.seed)
                bad = [k for k, v in size["score_check"].items() if isinstance(v, dict)
                       and (v["matched"] < size["score_check"]["sampled_ids"] or (v["max_abs_diff"] or 0) > 1e-3)]
                if bad:
                    failed = True
                    size["errors"]["score_check"] = f"disagreement: {bad}"
            except Exception as e:  # noqa: BLE001
                failed = True
                size["errors"]["score_check"] = f"{type(e).__name__}: {e}"
        for runner in RUNNERS:
            size[runner] = summarize(size["runs"][runner], rows)
        if size["plain"] and size["minimal"]:
            size["ratio_plain_vs_minimal_wall"] = round(
                size["plain"]["rows_per_s_wall"] / size["minimal"]["rows_per_s_wall"], 3)
            if size["plain"]["rows_per_s_own"] and size["minimal"]["rows_per_s_own"]:
                size["ratio_plain_vs_minimal_own"] = round(
                    size["plain"]["rows_per_s_own"] / size["minimal"]["rows_per_s_own"], 3)
        if size["plain"] and size["warm"] and size["warm"]["rows_per_s_own"] and size["plain"]["rows_per_s_own"]:
            size["ratio_warm_own"] = round(size["warm"]["rows_per_s_own"] / size["plain"]["rows_per_s_own"], 3)
        if size["plain"] and size["unusual"]:
            size["ratio_wall"] = round(size["unusual"]["rows_per_s_wall"] / size["plain"]["rows_per_s_wall"], 3)
            if size["unusual"]["rows_per_s_own"] and size["plain"]["rows_per_s_own"]:
                size["ratio_own"] = round(size["unusual"]["rows_per_s_own"] / size["plain"]["rows_per_s_own"], 3)
        if not args.keep_outputs:
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
        record["sizes"].append(size)
        _write(record, args.out, complete=False)

    growth = {}
    for runner in RUNNERS:
        ok = [s for s in record["sizes"] if s.get(runner)]
        if len(ok) >= 2:
            a, b = ok[0], ok[-1]
            growth[runner] = {
                "rows_smallest": a["rows"], "rows_largest": b["rows"],
                "peak_pss_mib_smallest": a[runner]["peak_pss_mib"], "peak_pss_mib_largest": b[runner]["peak_pss_mib"],
                "growth_mib": round(b[runner]["peak_pss_mib"] - a[runner]["peak_pss_mib"], 1),
                "ratio": round(b[runner]["peak_pss_mib"] / a[runner]["peak_pss_mib"], 3),
                "driver_growth_mib": round(b[runner]["peak_driver_pss_mib"] - a[runner]["peak_driver_pss_mib"], 1),
            }
    record["memory_growth"] = growth
    record["load_average_end"] = loadavg()
    _write(record, args.out, complete=True)
    print()
    print(markdown(record))
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


def _write(record: dict, path: str, complete: bool) -> None:
    record["complete"] = complete
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
