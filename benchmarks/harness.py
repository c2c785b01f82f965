"""What the benchmark scripts share (they import it as ``harness``; their folder is on sys.path): where a run
ran, result writing, cached artefacts, synthetic Parquet, and wall time / peak memory of a subprocess tree."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # committed: markdown and compact JSON
RAW = ROOT / "artifacts" / "benchmarks"  # git-ignored: every run's details
MIB = 1024 * 1024
CPU_SHARE = 0.05  # of one core, at most, for the memory sampler


def psutil_module():
    try:
        import psutil
    except ImportError:  # Ray vendors psutil under ray/thirdparty_files and puts that on sys.path on import
        import ray  # noqa: F401
        psutil = importlib.import_module("psutil")
    return psutil


def environment(modules: tuple[str, ...], **machine) -> dict:
    """Commit, uncommitted files, versions of ``modules`` ("models" is reported as "unusual") and the machine."""
    versions = {"python": platform.python_version()}
    for mod in modules:
        try:
            versions["unusual" if mod == "models" else mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    git = [subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout if shutil.which("git") else ""
           for a in (("rev-parse", "HEAD"), ("status", "--porcelain"))]
    return {"git_commit": git[0].strip() or None, "git_dirty_files": git[1].splitlines(), "versions": versions,
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), **machine}}


def loadavg():
    """1/5/15-minute load averages: other processes on the machine skew the timings."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def provenance(benchmark: str, modules: tuple[str, ...], **machine) -> dict:
    return {"benchmark": benchmark, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["python", *sys.argv]), **environment(modules, **machine),
            "load_average_start": loadavg()}


def names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def csv_ints(s: str) -> list[int]:
    return [int(x.replace("_", "")) for x in names(s)]


def options(doc: str, argv=None, **defaults) -> argparse.Namespace:
    """An option ``--name`` per keyword, typed by its default: a list of ints or of names takes a comma list, a
    dict JSON, a bool is a switch, a (type, default) pair names its type. What they mean: benchmarks/README.md."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="Options: benchmarks/README.md.")
    for name, default in defaults.items():
        kind, default = default if isinstance(default, tuple) else (type(default), default)
        if kind in (list, dict):
            kind = json.loads if kind is dict else csv_ints if default and isinstance(default[0], int) else names
        kw = {"action": "store_true"} if kind is bool else {"type": kind, "default": default, "help": "%(default)s"}
        p.add_argument("--" + name.replace("_", "-"), **kw)
    return p.parse_args(argv)


def _plain(o):
    return o.item() if isinstance(o, np.generic) else o.tolist() if isinstance(o, np.ndarray) else str(o)


def dumps(o, depth: int = 3, pad: str = "") -> str:
    """JSON with the outer ``depth`` levels of objects one key a line and everything deeper on that line."""
    if depth and isinstance(o, dict) and o:
        inner = pad + " "
        items = (f"{json.dumps(str(k))}: {dumps(v, depth - 1, inner)}" for k, v in o.items())
        return "{\n" + inner + (",\n" + inner).join(items) + "\n" + pad + "}"
    return json.dumps(o, separators=(",", ":"), default=_plain)


def write_result(path, record: dict, markdown: str | None = None, depth: int = 3) -> None:
    """The compact JSON ``record`` at ``path`` (atomically) and ``markdown``, where given, beside it as .md."""
    (tmp := Path(f"{path}.tmp")).parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(dumps(record, depth) + "\n")
    tmp.replace(path)
    if markdown is not None:
        Path(path).with_suffix(".md").write_text(markdown)


def raw_path(out) -> Path:
    """Where a run's every record goes: artifacts/benchmarks/NAME for results/NAME, else beside OUT."""
    out = Path(out)
    return RAW / out.name if out.parent.resolve() == RESULTS else out.with_suffix(".runs.json")


def cached(path: Path, meta: dict, build) -> bool:
    """``build(path)`` unless ``path`` was built with ``meta``, which is written beside it as PATH.json once built
    (with what ``build`` returns); True where it is reused."""
    meta_path = path.with_name(path.name + ".json")
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(meta_path.read_text())
        if path.exists() and {k: old.get(k) for k in meta} == meta:
            return True
    meta_path.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    meta_path.write_text(json.dumps({**meta, **(build(path) or {})}, indent=1, default=_plain))
    return False


def make_data(path: Path, rows: int, features: int, shards: int, seed: int = 0) -> None:
    """Correlated Gaussian features (a low-rank signal plus noise), like telemetry."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, features))
    path.mkdir(parents=True, exist_ok=True)
    per = rows // shards
    for i in range(shards):
        x = rng.normal(size=(per, 4)) @ basis + 0.1 * rng.normal(size=(per, features))
        pq.write_table(pa.table({f"f{j:02d}": x[:, j] for j in range(features)}), path / f"part-{i:03d}.parquet")


def _members(ps, pid: int) -> list:
    """A session leader, its descendants and every process in its session (Ray's GCS, raylet, workers)."""
    try:
        tree = {pid, *(c.pid for c in ps.Process(pid).children(recursive=True))}
    except ps.Error:
        tree = set()
    out = []
    for p in ps.process_iter():
        with contextlib.suppress(OSError):
            if p.pid in tree or os.getsid(p.pid) == pid:
                out.append(p)
    return out


def run_measured(cmd: list[str], env: dict, interval: float, timeout: float) -> dict:
    """``cmd`` in a new session, with the summed PSS (RSS where PSS is unreadable) of it, its descendants and its
    session sampled every ``interval`` s, or less often so as to take at most CPU_SHARE of a core (reading PSS walks
    page tables: ~10 ms for a process holding torch): exit status, wall seconds, peaks, the processes' CPU seconds,
    stdout and stderr. Ray's processes outlive the driver a moment: any left in the session after 10 s are ended."""
    ps, stop, cpu, seen = psutil_module(), threading.Event(), {}, set()
    mem = {"peak_pss_mib": 0.0, "peak_driver_pss_mib": 0.0, "peak_processes": 0, "samples": 0}

    def sample() -> None:
        while not stop.is_set():
            t, c, total, driver, n = time.perf_counter(), time.thread_time(), 0, 0, 0
            for p in _members(ps, proc.pid):
                try:
                    try:
                        pss = p.memory_full_info().pss
                    except ps.AccessDenied:
                        pss = p.memory_info().rss
                    key, times = (p.pid, p.create_time()), p.cpu_times()
                    if key not in cpu:
                        seen.add(p.name())
                    cpu[key] = times.user + times.system
                except ps.Error:  # gone mid-walk
                    continue
                total, n, driver = total + pss, n + 1, pss if p.pid == proc.pid else driver
            for k, v in (("peak_pss_mib", total / MIB), ("peak_driver_pss_mib", driver / MIB), ("peak_processes", n)):
                mem[k] = max(mem[k], round(v, 1))
            mem["samples"] += 1
            stop.wait(max(0.0, max(interval, (time.thread_time() - c) / CPU_SHARE) - (time.perf_counter() - t)))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        for _ in range(20):
            if not (left := [p.pid for p in _members(ps, proc.pid) if p.pid != proc.pid]):
                break
            time.sleep(0.5)
        if left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        out.seek(0)
        err.seek(0)
        mem.update(processes_seen=len(cpu), ray_local=any(n.startswith("raylet") for n in seen),
                   cpu_seconds=round(sum(cpu.values()), 1), process_names=sorted(seen))
        return {"cmd": cmd, "returncode": rc, "timed_out": timed_out, "wall_seconds": round(wall, 3), "memory": mem,
                "leftover_processes_after_10s": left, "stdout": out.read(), "stderr": err.read()}
