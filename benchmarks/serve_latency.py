"""Online scoring latency: the project's Serve application next to a minimal FastAPI app, Serve's own HTTP floor
and the plain in-process ``Scorer`` loop, on one machine in one invocation (benchmarks/README.md says how).

    python benchmarks/serve_latency.py [--servers minimal,same-work,unusual-fast,config-fast,serve-floor]
        [--seconds 8] [--concurrency 1,8,32] [--bulk-rows 1000,100000] [--skip-batch-job] [--out PATH]

Each server runs in a subprocess of its own session (``serve_latency.py _run ROLE ...``, ended with SIGTERM);
its answers are compared with an in-process ``Scorer``, then wrk (``serve_load.lua``) loads it scenario by scenario.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' `request: Request` at runtime.
import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import MIB, environment, loadavg, psutil_module  # noqa: E402

MODEL, ROUTE = "ae", "/v1/models/ae/score"
JSON, ARROW = "application/json", "application/vnd.apache.arrow.stream"
# name -> (the role its subprocess plays, Serve's fast path; None: a bare uvicorn app, no Ray)
SERVERS = {"minimal": ("minimal", None), "same-work": ("same-work", None), "unusual": ("unusual", False),
           "unusual-fast": ("unusual", True), "config": ("config", False), "config-fast": ("config", True),
           "serve-floor": ("serve-floor", True)}
SCORES_ONLY = ("minimal", "serve-floor")  # the roles that answer only the scores
TARGET_SERVERS = ("unusual-fast", "config-fast")
TARGETS = {"single_req_per_s_vs_minimal_min": 0.5, "single_p99_vs_minimal_max": 3.0,
           "bulk_arrow_rows_per_s_vs_scorer_loop_min": 0.3}
BULK_TOL, SINGLE_REL_TOL = 1e-6, 1e-5  # single rows go through other matrix shapes: float32 rounding
WRK_TIMEOUT_S, WARMUP_S, READY_S, LOOP_REPEATS = 60, 3, 180, 3


def cardio() -> pa.Table:
    from unusual.ray_jobs import sample_data
    return sample_data.load("cardio").drop_columns(["label"])


def bulk_tables(rows: int) -> list[pa.Table]:
    """8 (above 10,000 rows: 2) random subsets of cardio, or shuffled copies tiled; wrk posts the first."""
    table, rng, out = cardio(), np.random.default_rng(0), []
    for _ in range(8 if rows <= 10_000 else 2):
        n = table.num_rows
        idx = rng.choice(n, size=rows, replace=False) if rows <= n else \
            np.concatenate([rng.permutation(n) for _ in range(math.ceil(rows / n))])[:rows]
        out.append(table.take(pa.array(idx)))
    return out


def arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def ensure_bundle(workdir: Path) -> tuple[Path, dict]:
    """``Detector("ae", epochs=10, seed=0)`` fitted on cardio, cached (retrained when ``meta`` changes)."""
    path, meta_path = workdir / "bundle-ae", workdir / "bundle-ae.json"
    meta = {"generator": "serve-v1", "kind": "ae", "data": "cardio (label dropped)", "epochs": 10, "seed": 0}
    cached = json.loads(meta_path.read_text()) if meta_path.exists() and (path / "manifest.json").exists() else {}
    if {k: cached.get(k) for k in meta} == meta:
        return path, {**cached, "cached": True}
    from unusual.models import Detector
    table, t0 = cardio(), time.perf_counter()
    det = Detector("ae", epochs=10, seed=0).fit(table)
    meta.update(rows=table.num_rows, features=table.num_columns, model_version=det.save(str(path), overwrite=True),
                fit_seconds=round(time.perf_counter() - t0, 2), threshold=det.threshold_)
    meta_path.write_text(json.dumps(meta, indent=1, default=float))
    return path, {**meta, "cached": False}


class MinimalScorer:
    """minimal's and serve-floor's work: the body's numbers in the bundle's column order, its scaling, ``score_terms``
    under ``torch.inference_mode()`` (1 thread), only the scores back (JSON, or Arrow for an Arrow body)."""

    def __init__(self, bundle: str):
        import torch
        from unusual.models import Scorer
        torch.set_num_threads(1)
        b = Scorer(bundle, stream=False).bundle  # its module (in eval mode) and schema
        assert b.schema.numeric, "the minimal handler scores numeric features (cardio's) only"
        self.torch, self.module, self.schema, self.names = torch, b.module, b.schema, b.schema.names

    async def respond(self, name: str, request):
        from fastapi import Response
        if name != MODEL:
            return Response(b'{"error":"no such model"}', 404, media_type=JSON)
        body, arrow = await request.body(), request.headers.get("content-type", "").startswith(ARROW)
        try:
            if arrow:
                table = ipc.open_stream(body).read_all()
                raw = np.column_stack([table.column(n).to_numpy() for n in self.names]).astype(np.float64, copy=False)
            else:
                raw = np.array([[r[n] for n in self.names] for r in json.loads(body)["rows"]], dtype=np.float64)
            with self.torch.inference_mode():
                scores = self.module.score_terms(self.torch.from_numpy(self.schema.numeric_matrix(raw)))[0]
        except (KeyError, TypeError, ValueError, pa.ArrowException) as e:  # no other checks
            return Response(json.dumps({"error": repr(e)}).encode(), 422, media_type=JSON)
        if arrow:
            return Response(arrow_bytes(pa.table({"anomaly_score": scores.double().numpy()})), media_type=ARROW)
        return Response(json.dumps({"scores": scores.tolist()}, separators=(",", ":")).encode(), media_type=JSON)


def bare_app(role: str, bundle: str):
    """minimal, or same-work: the replica's parsing / encoding (``handling``, ``codec``), ``Scorer.score_table``."""
    import torch
    from fastapi import FastAPI, Request, Response
    from unusual.models import Scorer
    from unusual.serving import handling
    app = FastAPI()
    app.get("/readyz")(lambda: {"status": "ready"})
    if role == "minimal":
        minimal = MinimalScorer(bundle)

        @app.post("/v1/models/{name}/score")
        async def score_minimal(name: str, request: Request):
            return await minimal.respond(name, request)
        return app
    torch.set_num_threads(1)
    scorer = Scorer(bundle, top_k=3, stream=False)  # as the model replica loads it

    async def score(table: pa.Table) -> dict:
        try:
            out = scorer.score_table(table)
        except Exception as e:  # noqa: BLE001 - the client's fault (422) or ours (500), as the replica says
            return {"error": handling.rejection(MODEL, e)}
        return {"table": out, "model_version": scorer.version, "threshold": scorer.threshold}

    @app.post("/v1/models/{name}/score")
    async def score_same_work(name: str, request: Request):
        body, ctype = await request.body(), request.headers.get("content-type", JSON)
        a = handling.error_answer(404, f"no model {name!r}") if name != MODEL else \
            await handling.score_request(body, ctype, name=MODEL, max_rows=10**6, score=score)
        return Response(a.body, a.status, a.headers, a.media_type)
    return app


def floor_app(bundle: str):
    """serve-floor: :class:`MinimalScorer` in one Serve deployment, a FastAPI ingress of 1 replica of 0.25 CPU."""
    from fastapi import FastAPI, Request
    from ray import serve
    app = FastAPI()

    @serve.deployment(name="floor", num_replicas=1, ray_actor_options={"num_cpus": 0.25},
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    @serve.ingress(app)
    class Floor:
        def __init__(self, bundle: str):
            self.minimal = MinimalScorer(bundle)

        @app.get("/readyz")
        def readyz(self):
            return {"status": "ready"}

        @app.post("/v1/models/{name}/score")
        async def score(self, name: str, request: Request):
            return await self.minimal.respond(name, request)
    return Floor.bind(bundle)


def serve_role(role: str, bundle: str, port: int, fast: bool) -> None:
    """unusual, config or serve-floor on a Ray of its own, the fast path switched before it starts, until SIGTERM."""
    from unusual.serving import fastpath
    on, line = fastpath.configure(fast)  # in this process's environment, which every Ray process inherits
    import ray
    import yaml
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from unusual.serving.app import start
    from unusual.serving.configfile import config_file, dump

    from unusual.config import ServeConfig
    from unusual.runtime import free_port
    # address="local": a Ray of its own (ray.init() joins the latest on the machine); the replicas' logs stay there
    dash = {"dashboard_host": "127.0.0.1", "dashboard_port": free_port()} if role == "config" else {}
    ctx = ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=bool(dash), **dash)
    stop = threading.Event()  # after ray.init, whose SIGTERM handler would abort without shutting Serve down
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = ServeConfig(models={MODEL: bundle})  # the config's defaults
    info = {"fast_path": on, "fast_path_line": line, "fast_path_env": {k: os.environ.get(k) for k in fastpath.SWITCHES}}
    try:
        if role == "unusual":
            start(settings, port=port, ready_timeout=None)  # the harness waits for /readyz
        elif role == "config":  # `unusual serve --print-config --checkpoint ae=B --port P`, bound to the loopback
            text = dump(config_file(settings, host="127.0.0.1", port=port))
            ServeSubmissionClient("http://" + ctx.dashboard_url).deploy_applications(yaml.safe_load(text))
        else:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(floor_app(bundle), name="floor", route_prefix="/", blocking=False)
        info.update({"serve_config": settings.model_dump()} if role != "serve-floor" else {})
        print("READY " + json.dumps(info, default=str), flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            fastpath.cleanup()


def loop_role(bundle: str, rows_csv: str) -> dict:
    """``Scorer(bundle).score_table`` over the bulk tables, at torch's default threads and at 1: rows/s per repeat."""
    import torch
    from unusual.models import Scorer
    default, scorer = torch.get_num_threads(), Scorer(bundle)
    out: dict = {"torch_default_threads": default, "runs": []}
    for rows in map(int, rows_csv.split(",")):
        tables = bulk_tables(rows)
        for setting, threads in (("default", default), ("1", 1)):
            torch.set_num_threads(threads)
            scorer.score_table(tables[0])  # warm
            rates = []
            for _ in range(LOOP_REPEATS):  # of 1 s, at least 2 calls
                n, t0 = 0, time.perf_counter()
                while n < 2 or time.perf_counter() - t0 < 1.0:
                    scorer.score_table(tables[n % len(tables)])
                    n += 1
                rates.append(n * rows / (time.perf_counter() - t0))
            out["runs"].append({"rows": rows, "threads": setting, "rates": rates})
    return out


def batch_role(bundle: str, data: str, output: str) -> dict:  # unusual.ray_jobs.score.run on a Ray of its own
    import ray
    from unusual.ray_jobs.score import ScoreJob, run
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        return run(ScoreJob(checkpoint=bundle, data=data, output=output, keep_columns=["id"], overwrite=True))
    finally:
        ray.shutdown()


def run_role(role: str, *argv: str) -> int:
    """``serve_latency.py _run ROLE ARGS``: a server until SIGTERM, or the Scorer loop / batch job (RESULT line)."""
    if role in ("minimal", "same-work"):
        import uvicorn
        quiet = {"access_log": False, "log_level": "warning"} if role == "minimal" else {}  # same-work: defaults
        uvicorn.run(bare_app(role, argv[0]), host="127.0.0.1", port=int(argv[1]), workers=1, **quiet)
    elif role in ("unusual", "config", "serve-floor"):
        serve_role(role, argv[0], int(argv[1]), argv[2] == "1")
    else:
        print("RESULT " + json.dumps({"loop": loop_role, "batch": batch_role}[role](*argv), default=str), flush=True)
    return 0


class Proc:
    """``serve_latency.py _run ARGS`` in a new session, which Ray's processes join; its output in a file."""

    def __init__(self, args: list, env: dict):
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "_run", *map(str, args)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, tail: int = 0) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().splitlines()[-tail:])

    def members(self) -> list:
        def sid(pid: int) -> int:
            with contextlib.suppress(OSError):
                return os.getsid(pid)
        return [p for p in psutil_module().process_iter() if sid(p.pid) == self.proc.pid]

    def cpu(self) -> dict:
        """(pid, start) -> (kind: a Ray title, else the script a Python runs or the program; CPU seconds so far)."""
        ps, out = psutil_module(), {}
        for p in self.members():
            with contextlib.suppress(ps.Error):
                cmd, t = p.cmdline() or [p.name()], p.cpu_times()
                exe = os.path.basename(cmd[0])
                script = next((c for c in cmd[1:] if c.endswith(".py")), exe) if exe.startswith("python") else exe
                kind = cmd[0].split()[0].split(".")[0] if cmd[0].startswith("ray::") else os.path.basename(script)
                out[(p.pid, p.create_time())] = (kind, t.user + t.system)
        return out

    def stop(self, grace: float) -> dict:
        """SIGTERM, SIGKILL to what is left; temporary folders left by its processes (``unusual-*-<pid>-*``) go."""
        pids = {str(p.pid) for p in self.members()} | {str(self.proc.pid)}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for _ in range(10):  # Ray's processes end shortly after the driver
            if self.members():
                time.sleep(0.5)
        left = self.members()
        tmp = [d for d in Path(tempfile.gettempdir()).glob("unusual-*-*-*") if d.name.split("-")[2] in pids]
        for p in left:
            with contextlib.suppress(psutil_module().Error):
                p.kill()
        for d in tmp:
            shutil.rmtree(d, ignore_errors=True)
        return {"returncode": self.proc.returncode, "forced": self.proc.returncode == -signal.SIGKILL,
                "leftovers_killed": [p.pid for p in left], "tmp_folders_removed": list(map(str, tmp))}


def run_once(args: list, env: dict, timeout: float) -> dict:
    """The RESULT of a ``loop`` or ``batch`` subprocess (ended after ``timeout`` s), or an error."""
    p = Proc(args, env)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.proc.wait(timeout=timeout)
    p.stop(grace=1)
    result = [x for x in p.output().splitlines() if x.startswith("RESULT ")]
    return json.loads(result[-1][7:]) if result else {"error": f"exit {p.proc.returncode}: {p.output(20)}"}


class Server(Proc):
    def __init__(self, name: str, bundle: Path, env: dict):
        from unusual.runtime import free_port
        (self.role, self.fast), port = SERVERS[name], free_port()
        self.url = f"http://127.0.0.1:{port}"
        super().__init__([self.role, bundle, port, int(bool(self.fast))], env)

    def wait_ready(self) -> dict:
        """Until /readyz answers 200 (a Serve server: after its READY line, whose JSON it returns)."""
        for _ in range(2 * READY_S):
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.output(30)}")
            ready = [json.loads(x[6:]) for x in self.output().splitlines() if x.startswith("READY ")]
            if (ready or self.fast is None) and http(self.url + "/readyz")[0] == 200:
                return ready[0] if ready else {}
            time.sleep(0.5)
        raise RuntimeError(f"not ready in {READY_S} s:\n{self.output(30)}")


def http(url: str, body: bytes | None = None, ctype: str = JSON) -> tuple[int, bytes]:  # GET, or POST body
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": ctype}), timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, repr(e).encode()


def wrk(url: str, conc: int, seconds: float, env: dict, warmup: int = 0) -> dict:
    """done()'s JSON of ``wrk -t1 -c<conc> -d<seconds>s``; a warm-up gets SIGINT after ``warmup`` answers."""
    cmd = ["wrk", "-t1", f"-c{conc}", f"-d{max(1, math.ceil(seconds))}s", "--latency", "--timeout",
           f"{WRK_TIMEOUT_S}s", "-s", str(Path(__file__).with_name("serve_load.lua")), url]
    proc = subprocess.Popen(cmd, env={**env, "WRK_WARMUP": str(warmup)}, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("WRKWARMED") and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # its main thread would otherwise sleep out -d
    done = [json.loads(x[8:]) for x in lines if x.startswith("WRKJSON ")]
    if proc.wait() != 0 or not done:
        raise RuntimeError(f"wrk exit {proc.returncode}: {''.join(lines)[-1500:]}")
    return done[0]


def run_scenario(server: Server, kind: str, conc: int, rows: int, seconds: float) -> dict:
    """One body; a warm-up (100 single-row answers, >= 2 x conc, or 3 bulk ones; <= 3 s); ``seconds`` measured."""
    table = bulk_tables(rows)[0] if kind != "single" else cardio()
    table = table.take([np.random.default_rng(0).permutation(table.num_rows)[0]]) if kind == "single" else table
    with tempfile.NamedTemporaryFile(prefix="serve-latency-body-") as f:
        f.write(arrow_bytes(table) if kind == "bulk-arrow" else json.dumps({"rows": table.to_pylist()}).encode())
        f.flush()
        env = {**os.environ, "WRK_BODY": f.name, "WRK_CTYPE": ARROW if kind == "bulk-arrow" else JSON,
               "WRK_KIND": kind, "WRK_ROWS": str(rows), "WRK_SCORES_ONLY": str(int(server.role in SCORES_ONLY))}
        warm = wrk(server.url + ROUTE, conc, WARMUP_S, env, warmup=3 if kind != "single" else max(100, 2 * conc))
        cpu0 = server.cpu()
        done = wrk(server.url + ROUTE, conc, seconds, env)
        cpu1 = server.cpu()
    per: Counter = Counter()  # CPU seconds in between per kind of process (one started in between: all of it)
    for k, (name, v) in cpu1.items():
        per[name] += v - cpu0.get(k, ("", 0.0))[1]
    e, secs = done["errors"], max(done["duration_us"] / 1e6, 1e-9)
    ok = done["requests"] - e["status"]
    res = {"kind": kind, "rows": rows, "concurrency": conc, "n": done["requests"], "non_200": sum(e.values()),
           "seconds": round(secs, 3), "req_per_s": round(ok / secs, 2), "rows_per_s": round(ok * rows / secs, 1),
           **{f"{k}_ms": round(done["latency_us"][k] / 1000, 3) for k in ("p50", "p90", "p99", "mean", "max")},
           "server_cpu_ms_per_request": round(1000 * sum(per.values()) / max(ok, 1), 2),
           "server_cpu_seconds_by_process": {k: round(v, 2) for k, v in per.most_common() if round(v, 2)},
           "warmup": {"n": warm["requests"], "non_200": sum(warm["errors"].values()),
                      "answers_checked": warm["checked"], "bad_answers": warm["bad"]}}
    if server.fast is not None:  # the model replicas running at the end (ray::ServeReplica:APP:DEPLOYMENT)
        res["replicas"] = sum("ServeReplica" in k and not k.endswith(":gateway") for k, _ in cpu1.values())
    return res


def compare(answered: list[dict], ref: pa.Table, scores_only: bool, single: bool = False) -> dict:
    """vs ``ref``: scores (|diff| < 1e-6; single rows: relative < 1e-5), flags, top features; ``ok``: all hold."""
    exp = ref.column("anomaly_score").to_numpy()
    diff = np.abs(np.array([r["anomaly_score"] for r in answered], dtype=np.float64) - exp)
    out = {"rows": len(diff), "max_abs_diff": float(diff.max()),
           "max_rel_diff": float((diff / np.maximum(np.abs(exp), 1e-12)).max())}
    if not scores_only:
        out["is_anomaly_equal"] = [r["is_anomaly"] for r in answered] == ref.column("is_anomaly").to_pylist()
        out["top_features_equal"] = [[f["feature"] for f in r["top_features"]] for r in answered] == \
            [[f["feature"] for f in r] for r in ref.column("top_features").to_pylist()]
    ok = out["max_rel_diff"] < SINGLE_REL_TOL if single else out["max_abs_diff"] < BULK_TOL
    return {**out, "ok": ok and False not in (out.get("is_anomaly_equal"), out.get("top_features_equal"))}


def score_check(url: str, ref: pa.Table, rows: pa.Table, scores_only: bool) -> dict:
    """Answers to ``rows`` in one Arrow and one JSON request, and to 200 single rows 8 at a time (batched)."""
    def answered(status: int, data: bytes) -> list[dict]:
        if status != 200:
            raise RuntimeError(f"score check: {status}: {data[:300]!r}")
        if data.startswith(b"\xff\xff\xff\xff"):  # an Arrow IPC stream
            return ipc.open_stream(data).read_all().to_pylist()
        doc = json.loads(data)
        return [{"anomaly_score": s} for s in doc["scores"]] if scores_only else doc["rows"]

    bodies = [json.dumps({"rows": [r]}).encode() for r in rows.slice(0, 200).to_pylist()]
    with ThreadPoolExecutor(8) as pool:
        singles = list(pool.map(lambda b: http(url + ROUTE, b), bodies))
    return {"bulk_arrow": compare(answered(*http(url + ROUTE, arrow_bytes(rows), ARROW)), ref, scores_only),
            "bulk_json": compare(answered(*http(url + ROUTE, json.dumps({"rows": rows.to_pylist()}).encode())), ref,
                                 scores_only),
            "single_rows": compare([answered(*a)[0] for a in singles], ref.slice(0, 200), scores_only, single=True)}


def batch_job_check(bundle: Path, rows: pa.Table, ref: pa.Table, workdir: Path, env: dict) -> dict:
    """``unusual.ray_jobs.score`` on a Parquet file of the same rows (plus an ``id``), in a subprocess."""
    import pyarrow.parquet as pq
    data, out = workdir / "batch_check" / "rows.parquet", workdir / "batch_check" / "out"
    data.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows.append_column("id", pa.array(np.arange(rows.num_rows, dtype=np.int64))), data)
    t0 = time.perf_counter()
    summary = run_once(["batch", bundle, data, out], env, timeout=120)
    if "error" in summary:
        return {**summary, "ok": False}
    got = pq.read_table(out).sort_by("id")  # its part files (not _unusual/)
    res = {"wall_seconds": round(time.perf_counter() - t0, 1), **compare(got.to_pylist(), ref, False),
           "ids_match": got.column("id").to_pylist() == list(range(rows.num_rows))}
    return {**res, "ok": res["ok"] and res["ids_match"]}


def loop_summary(runs: list[dict]) -> dict:
    """Per size, the median of all repeats at torch's default threads and at 1; the faster is the denominator."""
    rates: dict = {}
    for r in (r for run in runs for r in run["runs"]):
        rates.setdefault(r["threads"], {}).setdefault(str(r["rows"]), []).extend(r["rates"])
    med = {t: {n: round(float(np.median(v)), 1) for n, v in by_rows.items()} for t, by_rows in rates.items()}
    return {"torch_default_threads": runs[0]["torch_default_threads"], "rows_per_s_default_threads": med["default"],
            "rows_per_s_1_thread": med["1"], "rows_per_s": {n: max(v, med["1"][n]) for n, v in med["default"].items()},
            "runs": [{f"{r['rows']}@{r['threads']}": round(float(np.median(r["rates"])), 1) for r in run["runs"]}
                     for run in runs]}


def add_ratios(record: dict) -> None:
    """Each scenario's ratios and target (single rows: the target servers; bulk Arrow: all); ``targets_met``."""
    def div(a, b):
        return round(a / b, 3) if a is not None and b else None

    key = ("kind", "rows", "concurrency")
    ref = {tuple(s[k] for k in key): s for s in record["servers"].get("minimal", {}).get("scenarios", [])}
    loop = record.get("scorer_loop", {}).get("rows_per_s", {})
    for name, srv in record["servers"].items():
        for s in srv["scenarios"]:
            f = ref.get(tuple(s[k] for k in key), {})
            r = {f"{k}_vs_minimal": div(s[m], f.get(m)) for k, m in
                 (("req_per_s", "req_per_s"), ("p50", "p50_ms"), ("p99", "p99_ms"))}
            meets = None
            if s["kind"] == "single" and name in TARGET_SERVERS and None not in r.values():
                meets = r["req_per_s_vs_minimal"] >= TARGETS["single_req_per_s_vs_minimal_min"] and \
                    r["p99_vs_minimal"] <= TARGETS["single_p99_vs_minimal_max"]
            elif s["kind"] != "single":
                r["rows_per_s_vs_scorer_loop"] = div(s["rows_per_s"], loop.get(str(s["rows"])))
                if s["kind"] == "bulk-arrow" and r["rows_per_s_vs_scorer_loop"] is not None:
                    meets = r["rows_per_s_vs_scorer_loop"] >= TARGETS["bulk_arrow_rows_per_s_vs_scorer_loop_min"]
            s["ratios"] = {**r, "meets_target": meets}
    record["targets_met"] = {}
    for name in (n for n in TARGET_SERVERS if n in record["servers"]):
        for kind, key in (("single", "single_rows_met"), ("bulk-arrow", "bulk_arrow_met")):
            met = [s["ratios"]["meets_target"] for s in record["servers"][name]["scenarios"] if s["kind"] == kind]
            record["targets_met"].setdefault(name, {})[key] = None if not met or None in met else all(met)


def markdown(record: dict) -> str:
    def f(v, spec: str) -> str:
        return "" if v is None else format(v, spec)

    t, yes = TARGETS, {True: "yes", False: "**no**", None: ""}
    what = {"single": "single row JSON", "bulk-arrow": "{:,} rows Arrow", "bulk-json": "{:,} rows JSON"}
    lines = [f"| server | fast path | requests | conc | n | non-200 | req/s | rows/s | p50 ms | p99 ms | server CPU "
             f"ms/req | req/s ÷ minimal (≥ {t['single_req_per_s_vs_minimal_min']}) | p99 ÷ minimal (≤ "
             f"{t['single_p99_vs_minimal_max']}) | rows/s ÷ Scorer loop (≥ "
             f"{t['bulk_arrow_rows_per_s_vs_scorer_loop_min']}) | target |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, srv in record["servers"].items():
        fast = {None: "", True: "on", False: "off"}[srv.get("fast_path")]
        for s in srv["scenarios"]:
            r, one = s["ratios"], s["kind"] == "single"
            lines.append(f"| {name} | {fast} | {what[s['kind']].format(s['rows'])} | {s['concurrency']} | {s['n']} | "
                         f"{s['non_200']} | {s['req_per_s']:,.1f} | {s['rows_per_s']:,.0f} | {s['p50_ms']:.1f} | "
                         f"{s['p99_ms']:.1f} | {s['server_cpu_ms_per_request']:.1f} | "
                         f"{f(r['req_per_s_vs_minimal'] if one else None, '.2f')} | "
                         f"{f(r['p99_vs_minimal'] if one else None, '.2f')} | "
                         f"{f(r.get('rows_per_s_vs_scorer_loop'), '.2f')} | {yes[r['meets_target']]} |")
    loop = record.get("scorer_loop") or {}
    lines += ["", "- plain Scorer loop, rows/s (torch default threads / 1 thread; the faster is the denominator): "
              + ", ".join(f"{int(n):,} rows {v:,.0f} / {loop['rows_per_s_1_thread'][n]:,.0f}"
                          for n, v in loop.get("rows_per_s_default_threads", {}).items())]
    lines += [f"- targets of {n}: single rows {yes[v['single_rows_met']] or '-'}, bulk Arrow "
              f"{yes[v['bulk_arrow_met']] or '-'}" for n, v in record["targets_met"].items()]
    lines.append(f"- problems: {record['problems'] or 'none'}; load average {record['load_average_start']} -> "
                 f"{record['load_average_end']}; {record['wall_seconds']} s in all")
    return "\n".join(lines)


def measure(name: str, bundle: Path, args, scenarios: list, ref: pa.Table, rows: pa.Table, env: dict) -> dict:
    """One server: started, its answers checked, every scenario run, stopped; what went wrong in ``problems``."""
    server = Server(name, bundle, env)
    rec: dict = {"role": server.role, "fast_path_requested": server.fast, "scenarios": [], "problems": []}
    try:
        t0 = time.perf_counter()
        rec.update(server.wait_ready(), start_seconds=round(time.perf_counter() - t0, 2),
                   processes=dict(sorted(Counter(kind for kind, _ in server.cpu().values()).items())))
        print(f"{name}: ready in {rec['start_seconds']} s; {rec.get('fast_path_line', 'no Ray')}", flush=True)
        rec["score_check"] = score_check(server.url, ref, rows, server.role in SCORES_ONLY)
        rec["problems"] += [f"{name} {k}: {v}" for k, v in rec["score_check"].items() if not v["ok"]]
        for kind, conc, n in scenarios:
            s = run_scenario(server, kind, conc, n, args.seconds)
            rec["scenarios"].append(s)
            print(f"  {kind} {n:,} rows at {conc}: {s['req_per_s']:,.1f} req/s, {s['rows_per_s']:,.0f} rows/s, p50 "
                  f"{s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, {s['non_200']} non-200", flush=True)
            if s["non_200"] or s["warmup"]["non_200"] or s["warmup"]["bad_answers"]:
                rec["problems"].append(f"{name} {kind} {n} rows at {conc}: {s['non_200']} non-200; {s['warmup']}")
    except Exception as e:  # noqa: BLE001 - recorded; the other servers still run
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["problems"].append(f"{name}: {rec['error'][:300]}")
        print(f"\n!! {name}: {rec['error']}", file=sys.stderr, flush=True)
    finally:
        rec["stop"] = server.stop(grace=15 if server.fast is None else 60)
    if rec["stop"]["forced"] or rec["stop"]["tmp_folders_removed"]:  # leftovers killed are only recorded
        rec["problems"].append(f"{name}: no clean stop: {rec['stop']}; {server.output(10)}")
    return rec


def main() -> int:
    if sys.argv[1:2] == ["_run"]:
        return run_role(*sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="minimal,same-work,unusual-fast,config-fast,serve-floor",
                   help=f"comma list of {', '.join(SERVERS)}, measured in this order")
    p.add_argument("--seconds", type=float, default=8, help="measured seconds per scenario (whole seconds)")
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32], help="single-row requests in flight")
    p.add_argument("--bulk-rows", type=ints, default=[1000, 100_000], help="rows per bulk request ('': none)")
    p.add_argument("--skip-batch-job", action="store_true", help="no comparison with the batch job")
    p.add_argument("--workdir", default=str(ROOT / "artifacts" / "bench_serve"), help="the cached bundle")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_latency.json"))
    args = p.parse_args()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or set(servers) - set(SERVERS):
        p.error(f"--servers: use {', '.join(SERVERS)}")
    # single rows at each concurrency; per bulk size, Arrow at 1 and 4 in flight (1 above 10,000 rows), JSON at 1
    scenarios = [("single", c, 1) for c in args.concurrency]
    for n in args.bulk_rows:
        scenarios += [("bulk-arrow", 1, n), ("bulk-arrow", 4, n), ("bulk-json", 1, n)] if n <= 10_000 else \
            [("bulk-arrow", 1, n)]
    t_start, workdir, out = time.perf_counter(), Path(args.workdir), Path(args.out)
    for d in (workdir, out.parent):
        d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each Ray here is a local one of its own
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0]
    record: dict = {
        "benchmark": "serve_latency", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv), "complete": False,
        **environment(("models", "numpy", "torch", "pyarrow", "ray", "fastapi", "starlette", "uvicorn", "psutil"),
                      memory_total_mib=round(psutil_module().virtual_memory().total / MIB)),
        "load_average_start": loadavg(), "targets": TARGETS,
        "settings": {"servers": servers, "scenarios": scenarios, "seconds": args.seconds, "batch_job": not
                     args.skip_batch_job, "load_generator": f"{wrk_version} -t1 -c<concurrency> --timeout "
                     f"{WRK_TIMEOUT_S}s, one body per scenario; warm-up: 100 single-row answers (>= 2 x concurrency) "
                     f"or 3 bulk ones, <= {WARMUP_S} s"}, "servers": {}, "problems": []}
    print(f"bundle: training or reusing under {workdir} ...", flush=True)
    bundle, record["bundle"] = ensure_bundle(workdir)
    from unusual.models import Scorer
    rows = cardio().slice(0, 1000)
    ref, loop_runs = Scorer(str(bundle)).score_table(rows), []

    def scorer_loop(when: str) -> None:
        print(f"plain Scorer loop ({when}) ...", flush=True)
        run = run_once(["loop", bundle, ",".join(map(str, args.bulk_rows))], env, timeout=600)
        record["problems"] += [f"Scorer loop ({when}): {run['error']}"] if "error" in run else []
        loop_runs.extend([] if "error" in run else [run])
        record["scorer_loop"] = loop_summary(loop_runs) if loop_runs else {}

    if args.bulk_rows:
        scorer_loop("before")
    for name in servers:
        record["servers"][name] = measure(name, bundle, args, scenarios, ref, rows, env)
        record["problems"] += record["servers"][name].pop("problems")
        out.write_text(json.dumps(record, indent=1) + "\n")
    if args.bulk_rows:
        scorer_loop("after")
    if not args.skip_batch_job:
        print("batch job on the same rows ...", flush=True)
        record["batch_job_check"] = batch_job_check(bundle, rows, ref, workdir, env)
        record["problems"] += [] if record["batch_job_check"]["ok"] else [f"batch job: {record['batch_job_check']}"]
    add_ratios(record)
    record.update(load_average_end=loadavg(), wall_seconds=round(time.perf_counter() - t_start, 1), complete=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print("\n" + markdown(record) + f"\n\nwrote {out}")
    return 1 if record["problems"] else 0

if __name__ == "__main__":
    sys.exit(main())
