"""Streaming scoring next to the stateless routes, on one endpoint in one run (benchmarks/README.md).

    python benchmarks/stream_latency.py [--entities 1000,100000] [--concurrency 1,8,32] [--seconds 8]
        [--out benchmarks/results/stream_latency.json]

One ``unusual serve`` (fast path where HAProxy exists; one replica per deployment, no autoscaling) serves an
LSTM (SMD machine-1-2: 38 metrics, window 16, causal) and an AE (cardio). For each entity count, the
entities are warmed with a window of history each (the stream replica's RSS before and after: memory per
entity, next to the bytes of its window), then wrk (``stream_load.lua``) sends one reading per request,
the entities in turn, at each concurrency; beside it, at the same concurrency, the stateless routes:
one cardio row to the AE (``serve_load.lua``, the tabular route), and the LSTM's stateless alternative,
the entity's last window sent with every request to ``/score``. Target: streaming req/s >= 0.5 x the
tabular route's.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import MIB, csv_ints, provenance, psutil_module, write_result  # noqa: E402

SMD = ROOT.parent / "shared" / "data" / "timeseries" / "smd" / "machine-1-2.npz"
WINDOW, WRK_TIMEOUT_S, WARM_CHUNK = 16, 30, 500
TARGET = 0.5  # streaming req/s vs the tabular route's, at each concurrency


def smd_table(rows: np.ndarray, host: str = "m", t0: int = 0) -> pa.Table:
    cols = {f"m{j}": rows[:, j].astype(float) for j in range(rows.shape[1])}
    return pa.table({"host": [host] * len(rows), "t": np.arange(t0, t0 + len(rows)), **cols})


def bundles(folder: Path) -> tuple[dict, int, int]:
    """The two bundles (LSTM, AE), the LSTM's rows per window (``need``) and its feature width."""
    from unusual.models import Detector
    from unusual.ray_jobs import sample_data

    train = np.load(SMD)["train"][:3000]
    lstm = Detector("lstm", entity_column="host", time_column="t", window=WINDOW, epochs=1, score_lookahead=0,
                    seed=0, verbose=False).fit(smd_table(train))
    ae = Detector("ae", epochs=2, seed=0, verbose=False).fit(sample_data.load("cardio").drop_columns(["label"]))
    paths = {"lstm": str(folder / "lstm"), "ae": str(folder / "ae")}
    lstm.save(paths["lstm"])
    ae.save(paths["ae"])
    return paths, int(lstm.scorer_.bundle.module.context_length), train.shape[1]


def replica_rss(title: str) -> int:
    """RSS of the one process whose Ray title ends with ``title`` (a Serve replica)."""
    psutil = psutil_module()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith(title):
            return p.memory_info().rss
    raise RuntimeError(f"no process {title}")


def warm(url: str, prefix: str, n: int, history: np.ndarray) -> float:
    """Every entity ``<prefix><i>`` given ``history`` (need - 1 rows, times 0..) in requests of WARM_CHUNK
    entities; seconds taken. Each answer must have kept every row."""
    base = smd_table(history).drop_columns(["host"]).to_pylist()

    def chunk(start: int):
        rows = [{"host": f"{prefix}{e}", **r} for e in range(start, min(n, start + WARM_CHUNK)) for r in base]
        r = requests.post(f"{url}/v1/models/lstm/stream", json={"history": rows}, timeout=600)
        assert r.status_code == 200 and r.json()["history"]["kept"] == len(rows), r.text[:300]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(chunk, range(0, n, WARM_CHUNK)))
    return time.perf_counter() - t0


def wrk(url: str, script: str, conc: int, seconds: float, env: dict) -> dict:
    cmd = ["wrk", "-t1", f"-c{conc}", f"-d{max(1, math.ceil(seconds))}s", "--latency", "--timeout",
           f"{WRK_TIMEOUT_S}s", "-s", str(Path(__file__).with_name(script)), url]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=seconds + 120)
    done = [json.loads(x[8:]) for x in out.stdout.splitlines() if x.startswith("WRKJSON ")]
    if out.returncode != 0 or not done:
        raise RuntimeError(f"wrk exit {out.returncode}: {out.stdout[-1500:]} {out.stderr[-500:]}")
    d = done[0]
    d["req_per_s"] = round(d["requests"] / (d["duration_us"] / 1e6), 1)
    return d


def stateless(url: str, path: str, body: dict, rows: int, conc: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", prefix="stream-latency-body-", suffix=".json") as f:
        json.dump(body, f)
        f.flush()
        env = {"WRK_BODY": f.name, "WRK_CTYPE": "application/json", "WRK_KIND": "single", "WRK_ROWS": str(rows)}
        wrk(url + path, "serve_load.lua", conc, 1, env)  # warm-up
        return wrk(url + path, "serve_load.lua", conc, seconds, env)


def run(args) -> dict:
    from unusual.ray_jobs import sample_data
    from unusual.serving import fastpath
    from unusual.serving.app import start

    from unusual.config import ServeConfig
    from unusual.runtime import ensure_ray, free_port

    fast, why = fastpath.configure()
    ensure_ray(num_cpus=os.cpu_count())
    folder = Path(tempfile.mkdtemp(prefix="stream-latency-"))
    paths, need, width = bundles(folder)
    config = ServeConfig(models=paths, min_replicas=1, max_replicas=1, max_body_bytes=256 * MIB,
                         max_rows=2_000_000, stream_entities=max(args.entities) + 1)
    url = start(config, port=free_port(), name="sl", ready_timeout=300)
    test = np.load(SMD)["test"]
    features = ",".join(f'"m{j}":{float(v)!r}' for j, v in enumerate(test[500]))
    window = smd_table(test[400 : 400 + need])
    cardio_row = sample_data.load("cardio").drop_columns(["label"]).slice(7, 1).to_pylist()
    title = "ServeReplica:sl-lstm:stream-lstm"
    out = {"fast_path": fast, "proxy": why, "need": need, "width": width,
           "window_bytes": (need - 1) * width * 4, "scenarios": []}
    warm(url, "boot-", 1, test[: need - 1])  # the stream replica loads the bundle: not the entities' memory
    for n in args.entities:
        prefix = f"n{n}-"
        rss0 = replica_rss(title)
        took = warm(url, prefix, n, test[: need - 1])
        rss1 = replica_rss(title)
        per = {"entities": n, "warm_s": round(took, 1), "rss_before_mib": round(rss0 / MIB, 1),
               "rss_after_mib": round(rss1 / MIB, 1), "bytes_per_entity": round((rss1 - rss0) / n),
               "runs": []}
        t0 = need - 1
        for conc in args.concurrency:
            env = {"WRK_ENTITIES": str(n), "WRK_PREFIX": prefix, "WRK_FEATURES": features, "WRK_T0": str(t0)}
            s = wrk(url + "/v1/models/lstm/stream", "stream_load.lua", conc, args.seconds, env)
            t0 += s["requests"] // n + 2
            tab = stateless(url, "/v1/models/ae/score", {"rows": cardio_row}, 1, conc, args.seconds)
            seq = stateless(url, "/v1/models/lstm/score", {"rows": window.to_pylist()}, need, conc, args.seconds)
            per["runs"].append({
                "concurrency": conc, "stream": s, "tabular_route": tab, "window_resent": seq,
                "stream_vs_tabular_req_per_s": round(s["req_per_s"] / tab["req_per_s"], 3),
                "stream_vs_window_resent_req_per_s": round(s["req_per_s"] / seq["req_per_s"], 3),
            })
            print(f"{n:>7} entities c={conc:<3} stream {s['req_per_s']:>7} req/s p50 {s['latency_us']['p50']/1e3:.1f} "
                  f"ms p99 {s['latency_us']['p99']/1e3:.1f} ms (scored {s['scored']}, warming {s['warming']}, "
                  f"other {s['other']}) | tabular {tab['req_per_s']} | window resent {seq['req_per_s']}", flush=True)
        out["scenarios"].append(per)
    return out


def markdown(record: dict) -> str:
    r = record["result"]
    lines = ["# Streaming scoring vs the stateless routes", "",
             f"`{record['command']}` at {record['git_commit']}; {r['proxy']}.", "",
             f"LSTM on SMD machine-1-2: {r['width']} metrics, a window of {r['need']} rows (the reading and "
             f"{r['need'] - 1} kept: {r['window_bytes']:,} bytes of float32 per entity).", "",
             "| entities | c | stream req/s | p50 ms | p99 ms | tabular req/s | ratio | window resent req/s | "
             "ratio | bytes per entity (RSS) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sc in r["scenarios"]:
        for run_ in sc["runs"]:
            s = run_["stream"]
            lines.append(f"| {sc['entities']:,} | {run_['concurrency']} | {s['req_per_s']} | "
                         f"{s['latency_us']['p50'] / 1e3:.1f} | {s['latency_us']['p99'] / 1e3:.1f} | "
                         f"{run_['tabular_route']['req_per_s']} | {run_['stream_vs_tabular_req_per_s']} | "
                         f"{run_['window_resent']['req_per_s']} | {run_['stream_vs_window_resent_req_per_s']} | "
                         f"{sc['bytes_per_entity']:,} |")
    lines += ["", f"Target: streaming req/s >= {TARGET} x the tabular route's at every concurrency: "
                  f"{'met' if record['target_met'] else 'NOT met'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entities", type=csv_ints, default=[1000, 100_000])
    p.add_argument("--concurrency", type=csv_ints, default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_latency.json"))
    args = p.parse_args(argv)
    record = provenance("stream_latency", ("ray", "torch", "models"))
    try:
        record["result"] = run(args)
    finally:
        from ray import serve

        serve.shutdown()
    ratios = [x["stream_vs_tabular_req_per_s"] for sc in record["result"]["scenarios"] for x in sc["runs"]]
    record["target_met"] = min(ratios) >= TARGET
    write_result(args.out, record, markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
