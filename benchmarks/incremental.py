"""``unusual score --incremental`` on a partitioned root of many partitions, a few of them new, against the plain
alternative at its best: ``unusual score`` on the new partitions' files alone, under a root of their own, so that it
lists and plans nothing else. Both run as a user runs them, alternating, each command starting its own local Ray.
What is measured, and the results: benchmarks/README.md.

    python benchmarks/incremental.py [--partitions 2000] [--new 10] [--new-rows 10000,1000000] [--repeat 3] [--s3]
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import harness
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from harness import cached, csv_ints, loadavg, options, provenance, write_result
from unusual.ray_jobs.incremental import Ledger, Partition, list_partitions
from unusual.ray_jobs.local_io import filesystem
from unusual.ray_jobs.storage import Output

FEATURES, TRAIN_ROWS, EPOCHS, SEED, ROW_GROUP, TIMEOUT = 16, 100_000, 3, 0, 131_072, 3600
GENERATOR = "incremental-v1"  # bump when table() or the layout changes, so cached data is regenerated
UNUSUAL = str(Path(sys.executable).with_name("unusual"))
# The progress lines (after "[unusual] ") that end each phase, in order: the listing of the root and the ledger and
# what is pending; the plan of the files to score (their footers); Ray started. The rest: from the files written.
PHASES = {"incremental": {"listed": " partition(s) at ", "planned": "scoring ", "ray": " unit(s) to do"},
          "plain": {"planned": "scoring ", "ray": " unit(s) to do"}}
RUNNERS = tuple(PHASES)


def table(n: int, seed: int, first_id: int) -> pa.Table:
    """``FEATURES`` correlated float32 Gaussians (4 factors, the same in every call, plus noise) and an int64 id."""
    basis = np.random.default_rng(SEED).normal(size=(4, FEATURES)).astype(np.float32)
    rng = np.random.default_rng([SEED, seed])
    x = rng.standard_normal((n, 4), dtype=np.float32) @ basis + 0.1 * rng.standard_normal((n, FEATURES), np.float32)
    return pa.table({"id": np.arange(first_id, first_id + n), **{f"f{j:02d}": x[:, j] for j in range(FEATURES)}})


def ensure_bundle(workdir: Path) -> tuple[Path, dict]:
    """An AE bundle trained once with the in-memory API on rows of the same distribution."""
    def build(path: Path) -> dict:
        from unusual.models import Detector
        det = Detector("ae", exclude=["id"], epochs=EPOCHS, seed=SEED).fit(table(TRAIN_ROWS, 10**6, 0))
        return {"model_version": det.save(str(path), overwrite=True)}

    path = workdir / "bundle-ae"
    cached(path, {"generator": GENERATOR, "train_rows": TRAIN_ROWS, "epochs": EPOCHS, "features": FEATURES}, build)
    return path, json.loads(path.with_name("bundle-ae.json").read_text())


def write(root: str, names: list[str], first: int, rows: int) -> None:
    """One file of ``rows`` rows in each partition folder ``names[i]`` under ``root`` (partition ``first + i``'s)."""
    pafs, path, fs = filesystem(root)

    def put(i: int) -> None:
        fs.makedirs(f"{path}/{names[i]}", exist_ok=True)
        pq.write_table(table(rows, first + i, (first + i) * rows), f"{path}/{names[i]}/part-00000.parquet",
                       filesystem=pafs, row_group_size=ROW_GROUP)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, range(len(names))))


def rm(*uris: str) -> None:
    for uri in uris:
        _, path, fs = filesystem(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def forget(out: str, version: str, names: list[str]) -> None:
    """Make the partitions ``names`` new again: remove their records, scored outputs and any unfinished run."""
    _, path, fs = filesystem(out)
    keys, ledger = {Partition(name=n, files=[]).key for n in names}, f"{path}/_unusual/ledger/{version}"
    fs.invalidate_cache()
    records = [p for p in (fs.find(ledger) if fs.exists(ledger) else []) if p.rsplit("/", 1)[-1][:20] in keys]
    rm(*(f"{out}/{p}" for p in [f"model_version={version}/{n}" for n in names] + [f"_unusual/runs/{version}"]))
    if records:
        fs.rm(records)


def run(cmd: list[str], env: dict) -> dict:
    """``cmd`` in a new session: seconds to its exit, its summary (stdout) and its stderr lines, each with the second
    it came. Ray's processes outlive the driver a moment: any left in the session after 10 s are ended."""
    lines, t0, started, ps = [], time.perf_counter(), time.time(), harness.psutil_module()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=harness.ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        stamp = threading.Thread(target=lambda: lines.extend((round(time.perf_counter() - t0, 3), ln.rstrip())
                                                             for ln in proc.stderr), daemon=True)
        stamp.start()
        try:
            rc = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        wall = time.perf_counter() - t0
        for _ in range(20):
            if not [p for p in harness._members(ps, proc.pid) if p.pid != proc.pid]:
                break
            time.sleep(0.5)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        stamp.join(5)
        out.seek(0)
        stdout = out.read()
    start = 0 if stdout.startswith("{") else stdout.find("\n{") + 1  # the summary is printed last
    summary = json.JSONDecoder().raw_decode(stdout[start:])[0] if "{" in stdout else {}
    return {"returncode": rc, "wall_seconds": round(wall, 3), "started": started, "summary": summary, "stderr": lines}


def written_at(uri: str, started: float, marker: str = "") -> float | None:
    """Seconds from ``started`` to the last write of a file under ``uri`` whose path holds ``marker``."""
    _, path, fs = filesystem(uri)
    fs.invalidate_cache()
    found = fs.find(path, detail=True).items() if fs.exists(path) else []
    times = [i["mtime"] if "mtime" in i else i["LastModified"].timestamp() for p, i in found if marker in p]
    return round(max(times) - started, 3) if times else None


def measure(runner: str, args, env: dict, data: str, out: str, rows: int) -> dict:
    """One run of ``runner`` into a fresh ``out`` (or with the new partitions made new again), with the seconds at
    which each phase ended, its checks and (incremental) its two listings timed in-process just before."""
    if runner == "incremental":
        forget(out, args.version, args.new_names)
        listings = planning_in_process(data, out, args.version)
    else:
        rm(out)
    r = run([UNUSUAL, "score", "--checkpoint", args.bundle, "--data", data, "--output", out, "--keep-columns", "id",
             *(["--incremental"] if runner == "incremental" else [])], env)
    stamps, after = {}, 0.0
    for phase, marker in PHASES[runner].items():  # the first line with each marker, after the previous one's
        stamps[phase] = after = next((t for t, ln in r["stderr"] if t >= after and (
            marker in ln if marker[0] == " " else ln.startswith("[unusual] " + marker))), after)
    scores, ledger = f"{out}/model_version={args.version}", f"{out}/_unusual/ledger/{args.version}"
    stamps["last part"] = written_at(scores if runner == "incremental" else out, r["started"], "/part-")
    if runner == "incremental":  # the records, then metrics.prom; the plain job's summary.json
        stamps["committed"] = written_at(ledger, r["started"])
    stamps["summary"] = written_at(f"{out}/_unusual", r["started"], ".prom" if runner == "incremental" else "summ")
    s, n = r["summary"], args.new * rows
    checks = {"exit 0": r["returncode"] == 0, "rows_in": s.get("rows_in") == n, "rows_scored": s.get("rows_scored")
              == n}  # fmt: skip
    if runner == "incremental":
        counts = [s.get(f"partitions_{k}") for k in ("listed", "scored", "already_scored")]
        checks["partitions listed, scored, skipped"] = counts == [args.partitions, args.new, args.partitions - args.new]
    keep = ("rows_in", "rows_scored", "partitions_listed", "partitions_scored", "seconds", "phase_seconds", "units")
    r.update(listings=listings if runner == "incremental" else None, stamps=stamps, checks=checks,
             ok=all(checks.values()), own=s.get("seconds") or float("nan"), summary={k: s[k] for k in keep if k in s})
    print(f"  {runner:11s} wall {r['wall_seconds']:6.1f} s, own {s.get('seconds')} s, phases ended at "
          f"{ {k: v and round(v, 1) for k, v in stamps.items()} }, checks ok {r['ok']}", flush=True)
    if not r["ok"]:
        print(f"!! {runner} failed {checks}\n" + "\n".join(f"{t:7.2f} {ln}" for t, ln in r["stderr"][-30:]))
    return r


def planning_in_process(root: str, out: str, version: str) -> dict:
    """The incremental run's two listings, of the root and of the ledger, timed here with the library's functions."""
    t0 = time.perf_counter()
    parts = list_partitions(root, [])
    t1 = time.perf_counter()
    ledger = Ledger(Output(out), version)
    return {"list_partitions_seconds": round(t1 - t0, 3), "ledger_listing_seconds": round(time.perf_counter() - t1, 3),
            "partitions": len(parts), "ledger_records": sum(map(len, ledger.entries.values()))}


def summarize(runs: list[dict], rows: int) -> dict:
    ok = [r for r in runs if r["ok"]] or runs
    wall, own = (statistics.median(r[k] for r in ok) for k in ("wall_seconds", "own"))
    return {"runs_ok": sum(r["ok"] for r in runs), "wall_seconds": round(wall, 3), "walls": [r["wall_seconds"] for r
            in runs], "rows_per_s": round(rows / wall, 1), "own_seconds": own, "rows_per_s_own": round(rows / own, 1),
            "phases_ended_at": {k: round(statistics.median(v), 3) for k in ok[0]["stamps"]
                                if (v := [r["stamps"][k] for r in ok if r["stamps"][k] is not None])}}


def markdown(block: dict) -> str:
    cols = ("listed", "planned", "ray", "last part", "committed", "summary")
    lines = ["| rows per new partition | runner | wall s (median) | walls | rows/s (wall) | " + " | ".join(cols) + " |",
             "|---:|---|---:|---|---:|" + "---:|" * len(cols)]
    for s in block["sizes"]:
        for n in RUNNERS:
            r, at, walls = s[n], s[n]["phases_ended_at"], " / ".join(f"{w:.1f}" for w in s[n]["walls"])
            lines.append(f"| {s['rows_per_partition']:,} | {n} | {r['wall_seconds']:.1f} | {walls} | "
                         f"{r['rows_per_s']:,.0f} | " + " | ".join(f"{at[k]:.1f}" if k in at else "" for k in cols)
                         + " |")
    lines += [f"\n{s['rows_per_partition']:,} rows each: incremental ÷ plain wall {s['ratio_wall']}, rows/s "
              f"{s['ratio_rows_per_s']}; listings in-process: {s['planning_in_process']}" for s in block["sizes"]]
    return "\n".join(lines + ["\nPhase columns: seconds from the command's start (medians)."])


def main() -> int:
    args = options(__doc__, partitions=2000, new=10, old_rows=100, new_rows=(csv_ints, None), repeat=3, s3=False,
                   workdir=harness.ROOT / "artifacts" / "bench_incremental", out=harness.RESULTS / "incremental.json")
    sizes, storage = args.new_rows or ([10_000] if args.s3 else [10_000, 1_000_000]), "s3" if args.s3 else "local"
    block = {**provenance("incremental", ("unusual", "pyarrow", "ray")), "settings": {
        **vars(args), "sizes": sizes, "features": FEATURES, "storage": storage}, "sizes": []}
    hours = [datetime(2026, 1, 1) + timedelta(hours=i) for i in range(args.partitions)]  # the last ones are new
    names = [h.strftime("dt=%Y-%m-%d/hour=%H") for h in hours]
    old, new = names[: -args.new], names[-args.new:]
    args.new_names = new
    args.workdir = Path(args.workdir).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle, block["bundle"] = ensure_bundle(args.workdir)
    args.bundle, args.version, raw = str(bundle), block["bundle"]["model_version"], []
    from unusual.ray_jobs.local_s3 import local_s3
    base = "s3://bench/incremental" if args.s3 else f"{args.workdir}/local-{args.partitions}-{args.new}-{args.old_rows}"
    with local_s3(bucket="bench") if args.s3 else contextlib.nullcontext():
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        root, out, plain_out = f"{base}/state/root", f"{base}/state/out", f"{base}/plain-out"

        def build_state(_=None) -> dict:  # the old partitions, scored by a first incremental run
            print(f"writing {len(old):,} partitions of {args.old_rows:,} rows at {root}, scoring them ...", flush=True)
            write(root, old, 0, args.old_rows)
            r = run([UNUSUAL, "score", "--incremental", "--checkpoint", args.bundle, "--data", root, "--output", out,
                     "--keep-columns", "id"], env)
            if r["summary"].get("partitions_scored") != len(old):
                sys.exit("the first incremental run failed:\n" + "\n".join(ln for _, ln in r["stderr"][-30:]))
            return {"first_run_wall_seconds": r["wall_seconds"], "first_run_own_seconds": r["summary"]["seconds"]}
        meta = {"generator": GENERATOR, "model_version": args.version, "partitions": len(old), "rows": args.old_rows}
        if args.s3:  # moto keeps nothing: built every time
            block["setup"] = build_state()
        else:
            reused = cached(Path(base, "state"), meta, build_state)
            block["setup"] = {**json.loads(Path(base, "state.json").read_text()), "cached": reused}
        for rows in sizes:
            plain_root, fs, dst = f"{base}/new-{rows}", filesystem(base)[2], filesystem(root)[1]
            if args.s3:
                write(plain_root, new, len(old), rows)
            else:
                cached(Path(plain_root), {"generator": GENERATOR, "names": new, "rows": rows},
                       lambda p, rows=rows: write(str(p), new, len(old), rows))
            forget(out, args.version, new)
            rm(*(f"{root}/{n}" for n in new))
            for n in new:  # the same files in the partitioned root
                fs.makedirs(f"{dst}/{n}", exist_ok=True)
                fs.copy(f"{filesystem(plain_root)[1]}/{n}/part-00000.parquet", f"{dst}/{n}/part-00000.parquet")
            os.sync()  # the copies on disk, not written back during the runs
            print("warm-up: each runner once, not recorded (both copies read once)", flush=True)
            where = {"incremental": (root, out), "plain": (plain_root, plain_out)}  # data and output
            for runner in RUNNERS:
                measure(runner, args, env, *where[runner], rows)
            print(f"{args.new} new partitions of {rows:,} rows beside {len(old):,} scored ({storage})", flush=True)
            runs = {n: [] for n in RUNNERS}
            for rep in range(args.repeat):
                for runner in RUNNERS if rep % 2 == 0 else RUNNERS[::-1]:
                    runs[runner].append(measure(runner, args, env, *where[runner], rows))
            forget(out, args.version, new)  # the state as cached: the old partitions, all scored
            rm(*(f"{root}/{n}" for n in new))
            s = {"rows_per_partition": rows, "rows": rows * args.new,
                 **{n: summarize(runs[n], rows * args.new) for n in RUNNERS}}
            s["ratio_wall"] = round(s["incremental"]["wall_seconds"] / s["plain"]["wall_seconds"], 3)
            s["ratio_rows_per_s"] = round(s["plain"]["wall_seconds"] / s["incremental"]["wall_seconds"], 3)
            listings = [r["listings"] for r in runs["incremental"]]  # seconds: medians; counts: the first run's
            s["planning_in_process"] = {k: round(statistics.median(x[k] for x in listings), 3) if "sec" in k else v
                                        for k, v in listings[0].items()}
            block["sizes"].append(s)
            raw.append({"rows_per_partition": rows, "runs": runs})
    first, last = block["sizes"][0], block["sizes"][-1]
    block["targets"] = {"planning_wall_ratio_max": 1.5, "planning_met": first["ratio_wall"] <= 1.5, **(
        {"throughput_rows_per_s_ratio_min": 0.9, "throughput_met": last["ratio_rows_per_s"] >= 0.9} if len(sizes) > 1
        else {})}
    bad = [f"{s['rows_per_partition']}: {n}" for s in block["sizes"] for n in RUNNERS if s[n]["runs_ok"] < args.repeat]
    block.update(load_average_end=loadavg(), failed=bad)
    record = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    record[storage] = block  # a run replaces its storage's block and keeps the other's
    write_result(args.out, record, "\n\n".join(f"### {k}\n\n{markdown(b)}" for k, b in record.items()) + "\n")
    write_result(harness.raw_path(Path(args.out).with_stem(f"{Path(args.out).stem}-{storage}")), {**block, "runs": raw},
                 depth=4)
    print(f"\n{markdown(block)}\n\n{block['targets']}\nwrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
