"""Online scoring as production deploys it, next to the plain alternative at its best: a minimal FastAPI
app, the same app doing the Serve application's work, the project's Serve application started by
``unusual.serving.app.start`` and deployed from its Serve config file, and the plain in-process ``Scorer``
loop, in one invocation on one machine.

    python benchmarks/serve_latency.py [--servers minimal,same-work,unusual-fast,config-fast] [--seconds 8]
                                       [--concurrency 1,8,32] [--bulk-rows 1000,100000]

The same AE bundle (trained once on the shipped ``cardio`` data and cached under ``--workdir``) is
served by, one after the other in the order of ``--servers``, each in a subprocess of its own:

- **minimal** (the reference): one uvicorn worker (uvloop and httptools; access log off) serving a minimal
  FastAPI app that scores in its event loop and answers only the scores: ``json.loads`` of the body
  ``{"rows": [{column: value, ...}]}``, a float32 matrix in the bundle's feature order with the bundle's
  own scaling (each column's ``(x - center) / scale`` in float64, clipped to ``±Z_LIMIT``, as
  ``FeatureSchema.transform`` computes it; numpy, no pyarrow), one ``module.score_terms(x)[0]`` under
  ``torch.inference_mode()`` on one torch thread, answered as ``{"scores": [...]}`` (stdlib json). A bulk
  Arrow IPC body is answered with an Arrow stream of one ``anomaly_score`` column;
- **same-work**: one uvicorn worker serving a bare FastAPI app that does the Serve application's
  per-request work: the request parsing / response encoding of ``unusual.serving.codec`` and one
  ``Scorer.score_table`` per request, in the event loop (``--same-work-scoring threadpool``: in
  Starlette's threadpool), the full answer (scores, flags, top features, model version);
- **unusual-fast** (and **unusual**, fast path off): the project's application,
  ``unusual.serving.app.start(ServeConfig(models={"ae": B}, ...))`` on a local Ray started for it (the
  config's defaults except ``--max-batch-size`` / ``--max-replicas``);
- **config-fast** (and **config**, fast path off): the config-file deployment: the Serve config that
  ``unusual serve --print-config --checkpoint ae=B --port P`` prints (``unusual.serving.configfile.
  config_file`` + ``dump``, the same settings as unusual's, bound to 127.0.0.1), deployed through the
  dashboard's REST API (``ServeSubmissionClient.deploy_applications``, what ``serve deploy`` and KubeRay
  do) on a local Ray started for it with its dashboard; one application per model at ``/v1/models/ae``
  (``unusual-ae``) and the gateway at ``/`` (``/readyz``);
- **serve-minimal** / **serve-minimal-fast** (not in the default list): same-work's handler moved into one
  Ray Serve deployment (``@serve.ingress`` of a FastAPI app, 1 replica of 0.25 CPU, no batching, access
  log off), ``serve.run(..., route_prefix="/")`` on a local Ray started for it.

The ``-fast`` servers switch on Serve's fast path (HAProxy in front of the replicas' own HTTP servers,
throughput-optimized Serve) with ``unusual.serving.fastpath.configure(True)`` in the server process
before ``ray.init``, so every Ray process inherits it; the other Serve servers call ``configure(False)``.
Ray's worker logs are not forwarded to the server process (``log_to_driver=False``).

The load is generated per scenario by ``--client``: ``wrk`` (the default where it is on PATH: C, one
thread, ``wrk -t1 -c<C> -d<seconds>s --latency -s <lua> <url>``, one body per scenario read from a file by
its Lua script, whose ``done()`` prints the counts and percentiles as JSON) or ``aiohttp`` (a Python
subprocess, one event loop; it burns a large share of a core, which on 2 cores competes with the server):
single-row JSON requests to ``POST /v1/models/ae/score`` at each ``--concurrency``, then bulk Arrow IPC
requests of each ``--bulk-rows`` rows (cardio rows tiled beyond its 1,831) and bulk JSON of
``--bulk-json-rows``. Each scenario is a warm-up (``--warmup`` answers, at most ``--warmup-seconds``) and a
measured phase of ``--seconds``. Recorded per scenario: p50 / p90 / p99 / mean latency, requests/s, rows/s,
non-200 answers (wrk: non-2xx/3xx and socket errors), the client's CPU seconds and the CPU seconds of the
server's processes (per kind of process; for the Serve servers also the model replicas running). The plain
``Scorer(bundle).score_table`` loop over the same bulk tables runs in a subprocess before and after the
servers: the denominator of the bulk ratios.

Ratios (JSON ``ratios`` and ``targets_met``, and the table): single rows, req/s and p99 ÷ the **minimal**
app's at the same concurrency, with the issue's targets for ``unusual-fast`` and ``config-fast``: req/s
ratio >= 0.5 and p99 ratio <= 3.0 at every concurrency; bulk Arrow, rows/s ÷ the Scorer loop's at the same
rows (target >= 0.3).

Before the load, 1,000 cardio rows are scored through each endpoint (bulk Arrow and JSON, and 200
of them as concurrent single-row requests) and compared with an in-process ``Scorer`` on the same
rows (scores, flags and top features; for minimal, which answers only the scores, the scores); the
batch job (``unusual.ray_jobs.score``) scores the same rows once more (``--skip-batch-job``).
Written to ``benchmarks/results/serve_latency.json`` (``--out``); a markdown table is printed at the end.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' signatures (``request: Request``)
# of the bare server and the minimal Serve app at runtime; that Request is imported inside their functions.
import argparse
import glob
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import MIB, environment, loadavg, psutil_module  # noqa: E402

MODEL = "ae"
ROUTE = f"/v1/models/{MODEL}/score"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
# name -> (what serves, fast path). A bare uvicorn process ("minimal", "same-work"; fast path None) or a
# Serve application on a local Ray started for it ("serve-minimal", "unusual", "config") with the fast path
# off / on.
SERVERS = {
    "minimal": ("minimal", None),
    "same-work": ("same-work", None),
    "serve-minimal": ("serve-minimal", False),
    "serve-minimal-fast": ("serve-minimal", True),
    "unusual": ("unusual", False),
    "unusual-fast": ("unusual", True),
    "config": ("config", False),
    "config-fast": ("config", True),
}
BARE = ("minimal", "same-work")  # no Ray: a uvicorn process
SERVE_APPS = ("serve-minimal", "unusual", "config")
DEFAULT_SERVERS = ("minimal", "same-work", "unusual-fast", "config-fast")
ALIASES = {"fastapi": "same-work"}  # the earlier name of same-work
REFERENCE = "minimal"  # the single-row ratios' denominator
TARGET_SERVERS = ("unusual-fast", "config-fast")  # the servers the single-row targets are for
KINDS = ("single", "bulk-json", "bulk-arrow")
MINIMAL_APP, MINIMAL_DEPLOYMENT = "minimal", "score"
# The Serve application a config file (unusual.serving.configfile.config_file, name "unusual") and
# unusual.serving.app.start give the model: "<name>-<model>", its deployment "model-<model>".
MODEL_APP = f"unusual-{MODEL}"
# A model replica's process title holds all of these (``ray::ServeReplica:<app>:<deployment>``).
REPLICA_MATCH = {"serve-minimal": ("ServeReplica:", f"{MINIMAL_APP}:{MINIMAL_DEPLOYMENT}"),
                 "unusual": ("ServeReplica:", f"{MODEL_APP}:model-{MODEL}"),
                 "config": ("ServeReplica:", f"{MODEL_APP}:model-{MODEL}")}
TARGETS = {  # the issue's targets
    "single_req_per_s_vs_minimal_min": 0.5,
    "single_p99_vs_minimal_max": 3.0,
    "bulk_arrow_rows_per_s_vs_scorer_loop_min": 0.3,
}
GENERATOR = "serve-v1"  # bump when the bundle recipe changes, so the cached bundle is retrained
BULK_TOLERANCE = 1e-6  # max |diff| of a bulk request's scores vs the in-process Scorer on the same 1,000 rows
SINGLE_REL_TOLERANCE = 1e-5  # single rows go through other matrix shapes (batches of 1..64): float32 rounding
TMP_PREFIX = "unusual-"  # unusual.runtime.temp_dir's folders (fastpath's HAProxy files): unusual-<kind>-<pid>-...


def _cardio() -> pa.Table:
    from unusual.ray_jobs import sample_data

    return sample_data.load("cardio").drop_columns(["label"])


def bulk_tables(table: pa.Table, rows: int, count: int, seed: int) -> list[pa.Table]:
    """``count`` bulk tables of ``rows`` rows of ``table``: random subsets without replacement where it
    has enough rows, else random permutations of all of it tiled to ``rows``. The load generator sends
    these and the Scorer loop scores them (same seed, same tables)."""
    rng = np.random.default_rng(seed)
    n = table.num_rows
    out = []
    for _ in range(count):
        if rows <= n:
            idx = rng.choice(n, size=rows, replace=False)
        else:
            idx = np.concatenate([rng.permutation(n) for _ in range(math.ceil(rows / n))])[:rows]
        out.append(table.take(pa.array(idx)))
    return out


def bulk_count(rows: int) -> int:
    """Distinct bodies per bulk size: 8 up to 10,000 rows, 2 above (a 100,000-row body is ~17 MB)."""
    return 8 if rows <= 10_000 else 2


# =========================================================================== bundle


def ensure_bundle(workdir: Path, epochs: int, seed: int) -> tuple[Path, dict]:
    """``Detector("ae", epochs=...)`` fitted on cardio (label dropped), trained once and cached."""
    path, meta_path = workdir / "bundle-ae", workdir / "bundle-ae.json"
    meta = {"generator": GENERATOR, "kind": "ae", "data": "cardio (label dropped)", "epochs": epochs, "seed": seed}
    if meta_path.exists() and (path / "manifest.json").exists():
        cached = json.loads(meta_path.read_text())
        if {k: cached.get(k) for k in meta} == meta:
            return path, {**cached, "cached": True}
    import torch
    from unusual.models import Detector

    torch.set_num_threads(1)  # training is not measured; one thread behaves best on a shared 2-core machine
    table = _cardio()
    t0 = time.perf_counter()
    det = Detector("ae", epochs=epochs, seed=seed).fit(table)
    version = det.save(str(path), overwrite=True)
    meta.update(rows=table.num_rows, features=table.num_columns, model_version=version,
                fit_seconds=round(time.perf_counter() - t0, 2), threshold=det.threshold_)
    meta_path.write_text(json.dumps(meta, indent=1, default=float))
    return path, {**meta, "cached": False}


# =========================================================================== server workers (subprocesses)


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _finite(obj):
    """JSON cannot carry NaN / inf: they become null (as ``unusual.serving`` answers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


async def score_request(scorer, name: str, request, inline: bool = False):
    """The bare app's whole per-request work, shared by the bare FastAPI process and the minimal Serve
    replica: parse the body (``unusual.serving.codec``), one ``Scorer.score_table`` (in Starlette's
    threadpool unless ``inline``), encode the answer in the request's format."""
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from unusual.serving.codec import RequestError, body_to_table, scored_rows, table_to_body

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    if name != MODEL:
        return error(404, f"no model named {name!r}; models: {[MODEL]}")
    t0 = time.perf_counter()
    try:
        body = await request.body()
        if not body:
            raise RequestError(422, 'empty body: send {"rows": [...]} or an Arrow / Parquet table')
        table, fmt = body_to_table(body, request.headers.get("content-type", "application/json"))
    except RequestError as e:
        return error(e.status, e.message)
    try:
        out = scorer.score_table(table) if inline else await run_in_threadpool(scorer.score_table, table)
    except Exception as e:  # noqa: BLE001 - a bad request, as the ModelServer reports it
        return error(422, str(e))
    headers = {"X-Model-Version": scorer.version, "X-Threshold": repr(float(scorer.threshold))}
    if fmt == "json":
        payload = {"model": name, "model_version": scorer.version, "threshold": scorer.threshold,
                   "rows": scored_rows(out), "seconds": round(time.perf_counter() - t0, 6)}
        return JSONResponse(_finite(payload), headers=headers)
    media = ARROW_STREAM if fmt == "arrow" else "application/vnd.apache.parquet"
    return Response(table_to_body(out, fmt), media_type=media, headers=headers)


MINIMAL_OPTIONS = {  # the minimal deployment's options, recorded in the JSON
    "name": MINIMAL_DEPLOYMENT, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25},
    "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
}


def minimal_app(bundle: str, threads: int):
    """One Serve deployment whose FastAPI ingress does exactly the bare app's per-request work
    (:func:`score_request`, no batching): the least Serve can add to the bare process."""
    from fastapi import FastAPI, Request
    from ray import serve

    app = FastAPI(title="unusual-serve-minimal")

    @serve.deployment(**MINIMAL_OPTIONS)
    @serve.ingress(app)
    class Minimal:
        def __init__(self, bundle: str, threads: int):
            import torch
            from unusual.models import Scorer

            torch.set_num_threads(threads)
            self.scorer = Scorer(bundle, top_k=3, stream=False)  # as the bare app loads it

        @app.get("/healthz")
        def healthz(self):
            return {"status": "ok"}

        @app.get("/readyz")
        def readyz(self):
            return {"status": "ready", "models": [MODEL]}

        @app.post("/v1/score")
        async def score_default(self, request: Request):
            return await score_request(self.scorer, MODEL, request)

        @app.post("/v1/models/{name}/score")
        async def score_model(self, name: str, request: Request):
            return await score_request(self.scorer, name, request)

    return Minimal.bind(bundle, threads)


def serve_worker(argv: list[str]) -> int:
    """``serve_latency.py _serve --app unusual|config|serve-minimal --fast 0|1 --bundle B --port P``: a Serve
    application on a local Ray, until SIGTERM. ``unusual``: ``unusual.serving.app.start``; ``config``: the
    Serve config file of ``unusual serve --print-config`` (``unusual.serving.configfile``) deployed through the
    dashboard's REST API, as ``serve deploy`` and KubeRay deploy it; ``serve-minimal``: :func:`minimal_app`."""
    p = argparse.ArgumentParser(prog="serve_latency.py _serve")
    p.add_argument("--app", choices=SERVE_APPS, required=True)
    p.add_argument("--fast", type=int, choices=(0, 1), required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the minimal app's replica")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--ready-timeout", type=float, default=120)
    p.add_argument("--config-out", help="config: where to write the Serve config file (default: a temporary one)")
    a = p.parse_args(argv)

    # The fast path's variables must be in this process's environment before Ray starts: every Ray
    # process (controller, proxy, replicas) reads them when it starts.
    from unusual.serving import fastpath

    fast_on, fast_line = fastpath.configure(bool(a.fast))
    print(f"fast path: {fast_on}: {fast_line}", file=sys.stderr, flush=True)

    import ray
    from ray import serve

    from unusual.config import ServeConfig
    from unusual.runtime import free_port

    # address="local": a Ray of its own even when another one runs on this machine (a bare ray.init()
    # joins the latest cluster started here, and serve.shutdown() would then end someone else's apps).
    # log_to_driver=False: replica logs stay in Ray's log files (as in a deployed cluster) instead of being
    # forwarded to this process's stderr, which would cost CPU in this driver on a 2-core machine.
    # The config file is deployed through the dashboard (its REST API: `serve deploy`, KubeRay); the other
    # applications run without one.
    dashboard = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()} \
        if a.app == "config" else {"include_dashboard": False}
    ctx = ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, **dashboard)
    # After ray.init: its core worker installs a SIGTERM handler of its own that aborts the process
    # (exit -6) without shutting Serve down and leaves Ray's agents running.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    info = {"app": a.app, "fast_path_requested": bool(a.fast), "fast_path": fast_on, "fast_path_line": fast_line,
            "fast_path_env": {k: os.environ.get(k) for k in fastpath.SWITCHES},
            "ray": ray.__version__, "num_cpus": os.cpu_count(), "log_to_driver": False,
            "dashboard": a.app == "config"}
    overrides = {k: v for k, v in (("max_batch_size", a.max_batch_size), ("max_replicas", a.max_replicas)) if v}
    try:
        if a.app == "config":
            import yaml
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
            from unusual.serving.configfile import config_file, dump

            settings = ServeConfig(models={MODEL: a.bundle}, **overrides)
            info["settings"] = settings.model_dump()
            # `unusual serve --print-config --checkpoint ae=B --port P` (the same settings as unusual), bound to
            # the loopback here instead of its 0.0.0.0.
            text = dump(config_file(settings, host="127.0.0.1", port=a.port))
            dashboard_url = "http://" + ctx.dashboard_url
            info.update(config_file=a.config_out, config_yaml=text, dashboard_url=dashboard_url,
                        deployed_with="ServeSubmissionClient(dashboard).deploy_applications (as `serve deploy`)")
            if a.config_out:
                Path(a.config_out).write_text(text)
            ServeSubmissionClient(dashboard_url).deploy_applications(yaml.safe_load(text))
            if not _wait_http(f"http://127.0.0.1:{a.port}/readyz", a.ready_timeout):
                print(f"/readyz did not answer 200 within {a.ready_timeout:.0f} s", file=sys.stderr, flush=True)
                return 1
        elif a.app == "unusual":
            from unusual.serving.app import start

            settings = ServeConfig(models={MODEL: a.bundle}, **overrides)
            info["settings"] = settings.model_dump()
            t0 = time.time()
            try:
                start(settings, port=a.port, ready_timeout=a.ready_timeout)
            except TimeoutError:
                print(f"/readyz did not answer 200 within {a.ready_timeout:.0f} s", file=sys.stderr, flush=True)
                return 1
            except Exception as e:  # noqa: BLE001 - e.g. a /readyz read timing out while the replicas start
                if type(e).__module__.split(".")[0] not in ("requests", "urllib3"):
                    raise
                info["ready_wait_error"] = f"{type(e).__name__}: {e}"  # recorded; the wait goes on here
                print(f"start()'s readiness wait raised {info['ready_wait_error']}; waiting for /readyz here",
                      file=sys.stderr, flush=True)
                left = max(1.0, a.ready_timeout - (time.time() - t0))
                if not _wait_http(f"http://127.0.0.1:{a.port}/readyz", left):
                    print(f"/readyz did not answer 200 within {a.ready_timeout:.0f} s", file=sys.stderr, flush=True)
                    return 1
        else:
            serve.start(http_options={"host": "127.0.0.1", "port": a.port})
            serve.run(minimal_app(a.bundle, a.threads), name=MINIMAL_APP, route_prefix="/", blocking=False)
            if not _wait_http(f"http://127.0.0.1:{a.port}/readyz", a.ready_timeout):
                print(f"/readyz did not answer 200 within {a.ready_timeout:.0f} s", file=sys.stderr, flush=True)
                return 1
            info["deployment"] = {**MINIMAL_OPTIONS, "application": MINIMAL_APP, "route_prefix": "/",
                                  "torch_threads": a.threads, "batching": False}
        print("READY " + json.dumps(info, default=str), flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001
            print(f"serve.shutdown failed: {e!r}", file=sys.stderr, flush=True)
        ray.shutdown()
        fastpath.cleanup()
    return 0


def same_work_worker(argv: list[str]) -> int:
    """``serve_latency.py _same_work --bundle B --port P``: a bare FastAPI app in one uvicorn worker doing the
    Serve application's per-request work (:func:`score_request`)."""
    p = argparse.ArgumentParser(prog="serve_latency.py _same_work")
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--threadpool", action="store_true", help="score in Starlette's threadpool, not the event loop")
    a = p.parse_args(argv)
    inline = not a.threadpool

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from unusual.models import Scorer

    torch.set_num_threads(a.threads)
    scorer = Scorer(a.bundle, top_k=3, stream=False)  # as ModelServer.reconfigure loads it
    app = FastAPI(title="unusual-bare")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        return {"status": "ready", "models": [MODEL]}

    # The same parsing and encoding as the Serve application (unusual.serving.codec), so that only the
    # serving machinery differs.
    @app.post("/v1/score")
    async def score_default(request: Request):
        return await score_request(scorer, MODEL, request, inline)

    @app.post("/v1/models/{name}/score")
    async def score_model(name: str, request: Request):
        return await score_request(scorer, name, request, inline)

    info = {"torch_threads": torch.get_num_threads(), "scoring": "inline" if inline else "threadpool",
            "uvicorn": uvicorn.__version__, "workers": 1, "access_log": True}
    print("INFO " + json.dumps(info), flush=True)
    # uvicorn's defaults (access log on); it handles SIGTERM itself.
    uvicorn.run(app, host="127.0.0.1", port=a.port, workers=1)
    return 0


def minimal_worker(argv: list[str]) -> int:
    """``serve_latency.py _minimal --bundle B --port P``: the plain alternative at its best, a minimal FastAPI
    app in one uvicorn worker that scores in its event loop and answers only the scores.

    JSON (``{"rows": [{column: value, ...}, ...]}``): ``json.loads`` the body, a float64 matrix of the rows in
    the bundle's feature order, the bundle's own scaling (``(x - center) / scale`` of each column, clipped to
    ``±Z_LIMIT``, as ``FeatureSchema.transform`` computes it) stored as float32, one
    ``module.score_terms(x)[0]`` under ``torch.inference_mode()``; answers ``{"scores": [...]}`` (stdlib json).
    An Arrow IPC stream body: the same from its columns, answering an Arrow stream of one ``anomaly_score``
    column. A bundle with categorical columns is encoded by ``scorer.schema.transform`` instead (cardio has
    none). No checks beyond what a KeyError or ValueError gives (422)."""
    p = argparse.ArgumentParser(prog="serve_latency.py _minimal")
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--access-log", action="store_true", help="uvicorn's access log (off: the least work)")
    a = p.parse_args(argv)

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from unusual.models import Scorer
    from unusual.models.features import Z_LIMIT

    torch.set_num_threads(a.threads)
    bundle = Scorer(a.bundle, stream=False).bundle  # loads the bundle: its module (in eval mode) and schema
    module, schema = bundle.module, bundle.schema
    names = [c.name for c in schema.columns]
    numeric = all(c.kind == "numeric" for c in schema.columns)
    center = np.array([c.center for c in schema.columns], dtype=np.float64)
    scale = np.array([c.scale for c in schema.columns], dtype=np.float64)

    def scaled(x: np.ndarray) -> np.ndarray:  # float64 (rows, columns) -> the model's float32 input
        np.subtract(x, center, out=x)
        np.divide(x, scale, out=x)
        return np.clip(x, -Z_LIMIT, Z_LIMIT, out=x).astype(np.float32)

    def from_rows(rows: list) -> np.ndarray:
        if not numeric:
            return schema.transform(pa.Table.from_pylist(rows))[0]
        return scaled(np.array([[r[n] for n in names] for r in rows], dtype=np.float64))

    def from_arrow(body: bytes) -> np.ndarray:
        table = ipc.open_stream(body).read_all()
        if not numeric:
            return schema.transform(table)[0]
        x = np.empty((table.num_rows, len(names)), dtype=np.float64)
        for j, n in enumerate(names):
            x[:, j] = table.column(n).to_numpy()
        return scaled(x)

    def score(x: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return module.score_terms(torch.from_numpy(x))[0]

    app = FastAPI(title="unusual-minimal")

    @app.get("/readyz")
    def readyz():
        return {"status": "ready"}

    @app.post("/v1/models/{name}/score")
    async def score_model(name: str, request: Request):
        if name != MODEL:
            return Response(b'{"error":"no such model"}', status_code=404, media_type="application/json")
        body = await request.body()
        try:
            if request.headers.get("content-type", "").startswith(ARROW_STREAM):
                s = score(from_arrow(body)).double().numpy()
                sink = pa.BufferOutputStream()
                out = pa.table({"anomaly_score": s})
                with ipc.new_stream(sink, out.schema) as w:
                    w.write_table(out)
                return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM)
            s = score(from_rows(json.loads(body)["rows"])).tolist()
        except (KeyError, TypeError, ValueError, pa.ArrowException) as e:
            return Response(json.dumps({"error": repr(e)}).encode(), status_code=422, media_type="application/json")
        return Response(json.dumps({"scores": s}, separators=(",", ":")).encode(), media_type="application/json")

    info = {"torch_threads": torch.get_num_threads(), "scoring": "inline", "uvicorn": uvicorn.__version__,
            "workers": 1, "access_log": a.access_log, "encoding": "numpy" if numeric else "schema.transform",
            "z_limit": Z_LIMIT, "answer": "scores only"}
    print("INFO " + json.dumps(info), flush=True)
    # it handles SIGTERM itself; uvloop and httptools where installed (uvicorn's "auto")
    uvicorn.run(app, host="127.0.0.1", port=a.port, workers=1, access_log=a.access_log, log_level="warning")
    return 0


def scorer_worker(argv: list[str]) -> int:
    """``serve_latency.py _scorer --bundle B --rows 1000,100000``: the plain in-process loop,
    ``Scorer(bundle).score_table(table)`` over the bulk tables the load generator sends; prints JSON."""
    p = argparse.ArgumentParser(prog="serve_latency.py _scorer")
    p.add_argument("--bundle", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--threads", default="0,1", help="torch threads to run it with; 0: torch's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0, help="per repeat (at least 2 calls)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch
    from unusual.models import Scorer

    default_threads = torch.get_num_threads()
    scorer = Scorer(a.bundle)
    table = _cardio()
    out = {"torch_default_threads": default_threads, "repeats": a.repeats, "seconds_per_repeat": a.seconds,
           "runs": []}
    for rows in _csv_ints(a.rows):
        tables = bulk_tables(table, rows, bulk_count(rows), a.seed)
        for t in _csv_ints(a.threads):
            torch.set_num_threads(t or default_threads)
            scorer.score_table(tables[0])  # warm
            rates = []
            for _ in range(a.repeats):
                n, t0 = 0, time.perf_counter()
                while n < 2 or time.perf_counter() - t0 < a.seconds:
                    scorer.score_table(tables[n % len(tables)])
                    n += 1
                rates.append(n * rows / (time.perf_counter() - t0))
            out["runs"].append({"rows": rows, "threads": t or default_threads, "threads_setting": t or "default",
                                "rows_per_s": round(float(np.median(rates)), 1),
                                "rows_per_s_runs": [round(r, 1) for r in rates]})
    print(json.dumps(out))
    return 0


# =========================================================================== load generators


def request_bodies(kind: str, rows: int, seed: int) -> tuple[list[bytes], str, int]:
    """The bodies a scenario sends, their Content-Type and rows per request: single-row JSON bodies of the
    cardio rows (shuffled), or ``bulk_count(rows)`` bulk bodies (JSON or Arrow IPC) of ``rows`` rows."""
    table = _cardio()
    if kind == "single":
        rng = np.random.default_rng(seed)
        pyrows = table.to_pylist()
        return [json.dumps({"rows": [pyrows[i]]}).encode() for i in rng.permutation(len(pyrows))], \
            "application/json", 1
    subsets = bulk_tables(table, rows, bulk_count(rows), seed)
    if kind == "bulk-json":
        return [json.dumps({"rows": t.to_pylist()}).encode() for t in subsets], "application/json", rows
    bodies = []
    for t in subsets:
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        bodies.append(sink.getvalue().to_pybytes())
    return bodies, ARROW_STREAM, rows


def load_worker(argv: list[str]) -> int:
    """``serve_latency.py _load --url U --kind single --concurrency C ...``: one scenario; prints JSON."""
    p = argparse.ArgumentParser(prog="serve_latency.py _load")
    p.add_argument("--url", required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--warmup", type=int, default=100, help="unrecorded requests first")
    p.add_argument("--warmup-seconds", type=float, default=3)
    p.add_argument("--rows", type=int, default=1000, help="rows per bulk request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60, help="seconds per request")
    a = p.parse_args(argv)

    import asyncio
    import resource

    import aiohttp

    bodies, ctype, rows_per = request_bodies(a.kind, a.rows, a.seed)
    headers = {"Content-Type": ctype}

    def check(data: bytes) -> bool:
        """The response has one result per row sent."""
        try:
            if a.kind == "bulk-arrow":
                return ipc.open_stream(data).read_all().num_rows == rows_per
            body = json.loads(data)
            return len(body["rows"] if "rows" in body else body["scores"]) == rows_per
        except Exception:  # noqa: BLE001
            return False

    async def phase(session, n: int, seconds: float) -> dict:
        state = {"issued": 0}
        lat, statuses, errors, bad = [], {}, [], 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        last = [t0]

        async def worker():
            nonlocal bad
            while state["issued"] < n and time.perf_counter() < deadline:
                i = state["issued"]
                state["issued"] += 1
                body = bodies[i % len(bodies)]
                t = time.perf_counter()
                try:
                    async with session.post(a.url, data=body, headers=headers) as r:
                        data = await r.read()
                        status = r.status
                except Exception as e:  # noqa: BLE001 - counted as an error
                    data, status = repr(e).encode(), 0
                done = time.perf_counter()
                lat.append(done - t)
                last[0] = max(last[0], done)
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200:
                    if len(errors) < 5:
                        errors.append(f"{status}: {data[:300].decode(errors='replace')}")
                elif (i < 20 or i % 20 == 0) and not check(data):  # a sample of the answers
                    bad += 1

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        elapsed = max(last[0] - t0, 1e-9)
        ms = np.array(lat) * 1000
        ok = statuses.get(200, 0)
        return {
            "requests": len(lat), "ok": ok, "errors": len(lat) - ok,
            "statuses": {str(k): v for k, v in statuses.items()},
            "error_samples": errors, "bad_payloads": bad, "seconds": round(elapsed, 3),
            "bounded_by": "requests" if state["issued"] >= n else "seconds",
            "req_per_s": round(ok / elapsed, 2), "rows_per_s": round(ok * rows_per / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3) if ms.size else None,
            "p90_ms": round(float(np.percentile(ms, 90)), 3) if ms.size else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 3) if ms.size else None,
            "mean_ms": round(float(ms.mean()), 3) if ms.size else None,
            "max_ms": round(float(ms.max()), 3) if ms.size else None,
        }

    async def main():
        connector = aiohttp.TCPConnector(limit=0, force_close=False)  # one kept-alive connection per worker
        timeout = aiohttp.ClientTimeout(total=a.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            warm = await phase(session, a.warmup, a.warmup_seconds) if a.warmup else None
            # The harness snapshots the server's CPU time between the warm-up and the measured phase.
            print("WARM", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            res = await phase(session, a.requests, a.seconds)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        res["client_cpu_seconds"] = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2)
        res["warmup"] = None if warm is None else {k: warm[k] for k in ("requests", "errors", "p50_ms", "seconds")}
        return res

    out = asyncio.run(main())
    out.update(kind=a.kind, concurrency=a.concurrency, rows_per_request=rows_per, body_bytes=len(bodies[0]),
               client="aiohttp", aiohttp=aiohttp.__version__)
    print(json.dumps(out))
    return 0


# =========================================================================== the batch job (subprocess)


def batch_worker(argv: list[str]) -> int:
    """``serve_latency.py _batch``: ``unusual.ray_jobs.score.run`` on a local Ray; prints its summary."""
    p = argparse.ArgumentParser(prog="serve_latency.py _batch")
    for flag in ("--bundle", "--data", "--output"):
        p.add_argument(flag, required=True)
    a = p.parse_args(argv)

    import ray
    from unusual.ray_jobs.score import ScoreJob, run

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        summary = run(ScoreJob(checkpoint=a.bundle, data=a.data, output=a.output, keep_columns=["id"], overwrite=True))
    finally:
        ray.shutdown()
    print(json.dumps(summary, default=str))
    return 0


# =========================================================================== process management (harness)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


class Server:
    """A server subprocess in its own session; everything in that session is ended in ``stop``."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict):
        self.name, self.cmd, self.port, self.env = name, cmd, port, env
        kind = SERVERS[name][0]
        self.app = kind if kind in SERVE_APPS else None  # the Serve application; None: a bare uvicorn process
        self.scores_only = kind == "minimal"  # answers only the scores
        self.url = f"http://127.0.0.1:{port}"
        self.psutil = psutil_module()
        self.out = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        self.proc: subprocess.Popen | None = None
        self.sid = -1
        self.pids: set[int] = set()  # every process of the server, known at stop

    def start(self, timeout: float) -> float:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.out, stderr=self.err,
                                     start_new_session=True)
        self.sid = self.proc.pid  # the new session's id is the leader's pid
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode} before it was ready:\n"
                                   f"--- stderr (last 40 lines) ---\n{self.stderr_tail(40)}")
            ready_line = self.app is None or "READY" in self.stdout()
            if ready_line and _wait_http(f"{self.url}/readyz", 0.1):
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server did not get ready in {timeout:.0f} s ({' '.join(self.cmd)}):\n"
                           f"--- stderr (last 40 lines) ---\n{self.stderr_tail(40)}")

    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def stderr_tail(self, n: int) -> str:
        self.err.seek(0)
        return _tail(self.err.read(), n)

    def info(self) -> dict | None:
        for line in self.stdout().splitlines():
            if line.startswith(("READY ", "INFO ")):
                try:
                    return json.loads(line.split(" ", 1)[1])
                except json.JSONDecodeError:
                    return None
        return None

    def members(self) -> list:
        """The leader, its descendants and every process of its session (Ray's GCS, raylet, workers)."""
        ps = self.psutil
        out = []
        for p in ps.process_iter(["ppid"]):
            try:
                if os.getsid(p.pid) == self.sid:
                    out.append(p)
            except OSError:
                continue
        if self.proc is not None:
            try:
                seen = {p.pid for p in out}
                out += [c for c in ps.Process(self.proc.pid).children(recursive=True) if c.pid not in seen]
            except ps.Error:
                pass
        return out

    def cpu_seconds(self) -> dict[tuple[int, float], tuple[str, float]]:
        """CPU seconds (user + system) so far of each process of the server, with what it is."""
        ps = self.psutil
        cpu = {}
        for p in self.members():
            try:
                t = p.cpu_times()
                cpu[(p.pid, p.create_time())] = (_label(p), t.user + t.system)
            except ps.Error:
                continue
        return cpu

    def replicas(self) -> int:
        """Model replicas running: processes whose title holds every part of ``REPLICA_MATCH``."""
        n, parts = 0, REPLICA_MATCH[self.app]
        for p in self.members():
            try:
                title = " ".join(p.cmdline())
            except self.psutil.Error:
                continue
            if all(x in title for x in parts):
                n += 1
        return n

    def processes(self) -> dict[str, int]:
        """How many processes of each kind the server runs (proxy, replicas, haproxy, raylet ...)."""
        kinds: dict[str, int] = {}
        for p in self.members():
            try:
                k = _label(p)
            except self.psutil.Error:
                continue
            kinds[k] = kinds.get(k, 0) + 1
        return dict(sorted(kinds.items()))

    def stop(self, grace: float) -> dict:
        """SIGTERM to the leader (Serve and Ray shut down in it), then to its process group, then SIGKILL
        to whatever of its session is left."""
        rec = {"returncode": None, "forced": False, "leftovers_killed": [], "tmp_leftovers_removed": []}
        if self.proc is None:
            return rec
        pids = {p.pid for p in self.members()} | {self.proc.pid}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                rec["forced"] = True
                for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        self.proc.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        rec["returncode"] = self.proc.poll()
        for _ in range(10):  # Ray's processes end shortly after the driver; give them a moment
            left = [p for p in self.members() if p.pid != self.proc.pid]
            if not left:
                break
            time.sleep(0.5)
        for p in [p for p in self.members() if p.pid != self.proc.pid]:
            try:
                rec["leftovers_killed"].append(f"{p.pid} {p.name()}")
                p.kill()
            except self.psutil.Error:
                pass
        # The temporary folders of this server's processes (fastpath.cleanup removes its HAProxy folder at a
        # clean exit; a forced stop leaves it).
        for d in own_tmp_dirs(pids):
            rec["tmp_leftovers_removed"].append(d)
            shutil.rmtree(d, ignore_errors=True)
        self.pids = pids
        rec["stderr_tail_at_exit"] = self.stderr_tail(15)
        self.out.close()
        self.err.close()
        return rec


def own_tmp_dirs(pids: set[int]) -> list[str]:
    """``unusual.runtime.temp_dir`` folders (``unusual-<kind>-<pid>-...``) of the processes ``pids``."""
    out = []
    for d in sorted(glob.glob(os.path.join(tempfile.gettempdir(), TMP_PREFIX + "*-*-*"))):
        parts = os.path.basename(d)[len(TMP_PREFIX):].split("-")
        if len(parts) >= 3 and parts[1].isdigit() and int(parts[1]) in pids and os.path.isdir(d):
            out.append(d)
    return out


def _label(p) -> str:
    """What a process is: its Ray title (``ray::ProxyActor``, ``ray::ServeReplica:unusual:gateway``; the
    method after a dot left out), else the executable, or the script a Python runs (``log_monitor.py``)."""
    cmd = p.cmdline() or [p.name()]
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]
    exe = os.path.basename(cmd[0])
    if exe.startswith("python"):
        script = next((c for c in cmd[1:] if c.endswith(".py")), None)
        return os.path.basename(script) if script else exe
    return exe


def _cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds used between two ``cpu_seconds`` snapshots, per kind of process (largest first);
    processes that ended in between are missed, those started in between count in full."""
    per: dict[str, float] = {}
    for k, (label, v) in after.items():
        per[label] = per.get(label, 0.0) + v - before.get(k, ("", 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if round(v, 2)}


def run_scenario(server: Server, args, kind: str, conc: int, rows: int, env: dict) -> dict:
    """One scenario against ``server`` with the chosen load generator (``--client``)."""
    if args.client == "wrk":
        return run_scenario_wrk(server, args, kind, conc, rows)
    return run_scenario_aiohttp(server, args, kind, conc, rows, env)


WRK_TIMEOUT_S = 60  # wrk's own default is 2 s: a slow answer would count as a timeout, not as latency
# The Lua script of a wrk run: POSTs the one body in BODY_PATH; done() prints one JSON line (WRK_TAG ...).
# With LIMIT > 0 (the warm-up), response() checks a sample of the answers (JSON: one "anomaly_score" per row
# sent, or with SCORES_ONLY a {"scores":[...]} of as many numbers; Arrow: an IPC stream, 0xFFFFFFFF first)
# and after LIMIT answers prints WARMED and stops the thread.
WRK_TAG = "WRKJSON "
WRK_WARMED = "WRKWARMED"  # printed by the warm-up's script once it has its answers; the harness then SIGINTs wrk
WRK_LUA = r"""-- written by benchmarks/serve_latency.py
local f = assert(io.open(BODY_PATH, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = CTYPE

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

if LIMIT > 0 then
  answers, checked, bad = 0, 0, 0
  function response(status, headers, body)
    answers = answers + 1
    if status == 200 and (answers <= 20 or answers % 20 == 0) then
      checked = checked + 1
      local good
      if KIND == "bulk-arrow" then
        good = #body > 8 and body:sub(1, 4) == "\255\255\255\255"
      elseif SCORES_ONLY then
        local inner = body:match('^{"scores":%[(.*)%]}$')
        good = inner ~= nil and select(2, inner:gsub(",", "")) + 1 == ROWS
      else
        local _, n = body:gsub('"anomaly_score"', "")
        good = n == ROWS
      end
      if not good then bad = bad + 1 end
    end
    if answers == LIMIT then
      io.write(WARMED .. "\n")
      io.flush()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local checked_all, bad_all = 0, 0
  for _, t in ipairs(threads) do
    checked_all = checked_all + (t:get("checked") or 0)
    bad_all = bad_all + (t:get("bad") or 0)
  end
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d,"min":%d,"stdev":%.1f},' ..
    '"checked":%d,"bad":%d}\n',
    TAG, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    latency.min, latency.stdev, checked_all, bad_all))
  io.flush()
end
"""
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_ms(text: str) -> float | None:
    """A wrk latency (``812.00us``, ``2.31ms``, ``1.02s``) in ms."""
    import re

    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else None


def parse_wrk(stdout: str) -> dict:
    """wrk's result: the JSON line of the script's done(), else (and as a cross-check) its text output:
    ``Requests/sec``, the ``--latency`` distribution, ``Non-2xx or 3xx responses`` and ``Socket errors``."""
    import re

    out: dict = {}
    for line in stdout.splitlines():
        if line.startswith(WRK_TAG):
            out["done"] = json.loads(line[len(WRK_TAG):])
    text: dict = {}
    if m := re.search(r"Requests/sec:\s+([0-9.]+)", stdout):
        text["req_per_s"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([0-9.]+\w+),", stdout):
        text["requests"] = int(m.group(1))
        text["duration_ms"] = _wrk_ms(m.group(2))
    for pct in (50, 75, 90, 99):
        if m := re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", stdout, re.M):
            text[f"p{pct}_ms"] = _wrk_ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", stdout)
    text["non_2xx_3xx"] = int(m.group(1)) if m else 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout):
        text["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    out["text"] = text
    return out


def _wrk_summary(parsed: dict, rows_per: int) -> dict:
    """requests, ok, errors, req/s, rows/s and latency (ms) of one wrk run, from done()'s JSON where it
    printed, else from the text."""
    d, t = parsed.get("done"), parsed["text"]
    if d:
        e = d["errors"]
        socket_errors = {k: e[k] for k in ("connect", "read", "write", "timeout")}
        status_errors, n, secs = e["status"], d["requests"], d["duration_us"] / 1e6
        lat = {f"{k}_ms": round(d["latency_us"][k] / 1000, 3) for k in ("p50", "p90", "p99", "mean", "max")}
    else:
        socket_errors = t.get("socket_errors", {})
        status_errors, n = t["non_2xx_3xx"], t["requests"]
        secs = (t.get("duration_ms") or 0) / 1000 or n / max(t["req_per_s"], 1e-9)
        lat = {"p50_ms": t.get("p50_ms"), "p90_ms": t.get("p90_ms"), "p99_ms": t.get("p99_ms"), "mean_ms": None,
               "max_ms": None}
    ok = n - status_errors
    secs = max(secs, 1e-9)
    return {"requests": n, "ok": ok, "errors": status_errors + sum(socket_errors.values()),
            "non_2xx_3xx": status_errors, "socket_errors": socket_errors, "seconds": round(secs, 3),
            "req_per_s": round(ok / secs, 2), "rows_per_s": round(ok * rows_per / secs, 1), **lat,
            "from": "done()" if d else "text"}


def run_scenario_wrk(server: Server, args, kind: str, conc: int, rows: int) -> dict:
    """One scenario with wrk (``wrk -t1 -c<conc> -d<s>s --latency -s <lua> <url>``, one connection per
    in-flight request, each POSTing one body over and over): a warm-up run ended (SIGINT) after the same number
    of answers as the aiohttp warm-up (at most ``--warmup-seconds``, rounded up to whole seconds), the server's
    CPU time read, the measured run of ``--seconds``, the CPU time read again. The client's CPU is wrk's
    (user + system, from the children's rusage)."""
    import resource

    bulk = kind != "single"
    seconds = (args.bulk_seconds or args.seconds) if bulk else args.seconds
    warm = args.bulk_warmup if bulk else max(args.warmup, 2 * conc)
    bodies, ctype, rows_per = request_bodies(kind, rows, args.seed)
    url = server.url + ROUTE
    base = {"kind": kind, "concurrency": conc, "rows_per_request": rows_per, "client": "wrk"}
    with tempfile.TemporaryDirectory(prefix="serve-latency-wrk-") as tmp:
        body_path = Path(tmp) / ("body.arrow" if kind == "bulk-arrow" else "body.json")
        body_path.write_bytes(bodies[0])

        def script(limit: int) -> str:
            path = Path(tmp) / f"load-{limit}.lua"
            head = (f"BODY_PATH = {json.dumps(str(body_path))}\nCTYPE = {json.dumps(ctype)}\n"
                    f"KIND = {json.dumps(kind)}\nROWS = {rows_per}\nLIMIT = {limit}\nTAG = {json.dumps(WRK_TAG)}\n"
                    f"WARMED = {json.dumps(WRK_WARMED)}\nSCORES_ONLY = {str(server.scores_only).lower()}\n")
            path.write_text(head + WRK_LUA)
            return str(path)

        def wrk(secs: float, limit: int) -> tuple[dict | None, str, float, list[str]]:
            cmd = [args.wrk, "-t1", f"-c{conc}", f"-d{max(1, math.ceil(secs))}s", "--latency",
                   "--timeout", f"{WRK_TIMEOUT_S}s", "-s", script(limit), url]
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            with tempfile.TemporaryFile("w+") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
                killed = threading.Event()

                def kill():
                    killed.set()
                    proc.kill()

                watchdog = threading.Timer(secs + WRK_TIMEOUT_S + 60, kill)
                watchdog.start()
                lines = []
                try:
                    for line in proc.stdout:
                        lines.append(line)
                        if line.startswith(WRK_WARMED) and proc.poll() is None:
                            # The warm-up's answers are in: SIGINT ends wrk's run now (it still reports; its
                            # main thread would otherwise sleep out -d).
                            proc.send_signal(signal.SIGINT)
                    proc.wait()
                finally:
                    watchdog.cancel()
                err.seek(0)
                stderr = err.read()
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
            stdout = "".join(lines)
            if killed.is_set():
                return None, f"wrk did not finish in time; killed\n{stdout}\n{stderr}", cpu, cmd
            if proc.returncode != 0:
                return None, f"wrk exit {proc.returncode}\n{stdout}\n{stderr}", cpu, cmd
            parsed = parse_wrk(stdout)
            if not parsed.get("done") and "requests" not in parsed["text"]:
                return None, f"wrk printed no result\n{stdout}\n{stderr}", cpu, cmd
            return parsed, stdout, cpu, cmd

        warm_rec = None
        if warm:
            parsed, text, _, _ = wrk(args.warmup_seconds, warm)
            if parsed is None:
                return {**base, "error": "warm-up: " + text.splitlines()[0], "stderr_tail": _tail(text, 30)}
            w = _wrk_summary(parsed, rows_per)
            d = parsed.get("done") or {}
            warm_rec = {"requests": w["requests"], "errors": w["errors"], "p50_ms": w["p50_ms"],
                        "seconds": w["seconds"],
                        "checked": d.get("checked"), "bad_payloads": d.get("bad")}
        replicas, stop = [], threading.Event()

        def sample():
            while not stop.wait(1.0):
                replicas.append(server.replicas())

        sampler = threading.Thread(target=sample, daemon=True) if server.app else None
        cpu0 = server.cpu_seconds()
        if sampler:
            replicas.append(server.replicas())
            sampler.start()
        t0 = time.perf_counter()
        try:
            parsed, text, client_cpu, cmd = wrk(seconds, 0)
            cpu1 = server.cpu_seconds()
        finally:
            stop.set()
            if sampler and sampler.is_alive():
                sampler.join()
        wall = time.perf_counter() - t0
    if parsed is None:
        return {**base, "error": text.splitlines()[0], "stderr_tail": _tail(text, 30)}
    res = {**base, **_wrk_summary(parsed, rows_per), "bounded_by": "seconds", "warmup": warm_rec,
           "bad_payloads": (warm_rec or {}).get("bad_payloads"), "bad_payloads_checked_in": "warm-up",
           "error_samples": [], "client_cpu_seconds": round(client_cpu, 2), "body_bytes": len(bodies[0]),
           "bodies": 1, "wrk_cmd": [Path(cmd[0]).name] + cmd[1:-3] + ["<lua>", "<url>"],
           "wrk_text": parsed["text"]}
    return _with_server_side(res, cpu0, cpu1, wall, sampler, replicas)


def _with_server_side(res: dict, cpu0, cpu1, wall: float, sampler, replicas: list) -> dict:
    """A scenario's result with what the server spent: CPU per process and per request, the measured
    wall time, the load average after, and (when sampled) the replicas it ran."""
    per = _cpu_delta(cpu0, cpu1)
    res["server_cpu_seconds"] = round(sum(per.values()), 2)
    res["server_cpu_ms_per_request"] = round(1000 * res["server_cpu_seconds"] / max(res["ok"], 1), 2)
    res["server_cpu_by_process"] = per
    res["measured_wall_seconds"] = round(wall, 2)
    res["load_average_after"] = loadavg()
    if sampler:
        res["replicas_max"] = max(replicas) if replicas else None
        res["replicas_end"] = replicas[-1] if replicas else None
    return res


def run_scenario_aiohttp(server: Server, args, kind: str, conc: int, rows: int, env: dict) -> dict:
    """One load subprocess against ``server``. The server's CPU time is read when the load generator has
    finished its warm-up (it waits for a line on stdin) and when it is done; its replicas are counted
    every second in between."""
    bulk = kind != "single"
    n = args.bulk_requests if bulk else args.requests
    seconds = (args.bulk_seconds or args.seconds) if bulk else args.seconds
    warm = args.bulk_warmup if bulk else max(args.warmup, 2 * conc)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_load", "--url", server.url + ROUTE, "--kind", kind,
           "--concurrency", str(conc), "--requests", str(n), "--seconds", str(seconds), "--warmup", str(warm),
           "--warmup-seconds", str(args.warmup_seconds), "--rows", str(rows), "--seed", str(args.seed)]
    replicas, stop = [], threading.Event()

    def sample():
        while not stop.wait(1.0):
            replicas.append(server.replicas())

    sampler = threading.Thread(target=sample, daemon=True) if server.app else None
    lines: queue.Queue = queue.Queue()
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                            text=True, start_new_session=True)

    def read():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()

    def next_line(deadline: float):
        try:
            return lines.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            raise TimeoutError from None

    out, problem, cpu0, cpu1, t0 = [], None, None, None, time.perf_counter()
    try:
        deadline = time.time() + args.warmup_seconds + 120  # start-up and the warm-up
        while (line := next_line(deadline)) not in ("WARM", None):
            out.append(line)
        if line is None:
            problem = "the load generator exited before its measured phase"
        else:
            cpu0 = server.cpu_seconds()
            if sampler:
                replicas.append(server.replicas())
                sampler.start()
            t0 = time.perf_counter()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            deadline = time.time() + seconds + 120
            while (line := next_line(deadline)) is not None:
                out.append(line)
            cpu1 = server.cpu_seconds()
        proc.wait(timeout=30)
    except TimeoutError:
        problem = "the load generator did not finish in time; killed"
    finally:
        stop.set()
        if sampler and sampler.is_alive():
            sampler.join()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.seek(0)
        stderr = err.read()
        err.close()
    wall = time.perf_counter() - t0
    res = next((json.loads(x) for x in reversed(out) if x.startswith("{")), None)
    if problem or proc.returncode != 0 or res is None:
        return {"kind": kind, "concurrency": conc, "rows_per_request": rows if bulk else 1,
                "error": problem or f"load generator exit {proc.returncode}", "stderr_tail": _tail(stderr, 30)}
    return _with_server_side(res, cpu0, cpu1, wall, sampler, replicas)


# =========================================================================== checks


def _post(url: str, body: bytes, ctype: str, timeout: float = 120) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _compare(ref: pa.Table, scores, flags=None, top=None) -> dict:
    """Scores (and, where the server answers them, flags and top features) vs the in-process Scorer's
    ``ref``; a comparison not made is None."""
    exp = ref.column("anomaly_score").to_numpy()
    got = np.asarray(scores, dtype=np.float64)
    diff = np.abs(got - exp)
    out = {
        "rows": int(len(got)),
        "max_abs_diff": float(diff.max()) if diff.size else None,
        "max_rel_diff": float((diff / np.maximum(np.abs(exp), 1e-12)).max()) if diff.size else None,
        "is_anomaly_equal": None if flags is None else list(flags) == ref.column("is_anomaly").to_pylist(),
        "top_feature_names_equal": None,
    }
    if top is not None:
        exp_top = [[f["feature"] for f in r] for r in ref.column("top_features").to_pylist()]
        out["top_feature_names_equal"] = [[f["feature"] for f in r] for r in top] == exp_top
    return out


def equality_check(url: str, ref: pa.Table, rows: pa.Table, singles: int, conc: int,
                   scores_only: bool = False) -> dict:
    """The endpoint's scores for ``rows`` (bulk Arrow, bulk JSON, ``singles`` single-row requests sent
    ``conc`` at a time, so that Serve batches them) vs the in-process Scorer's ``ref``. ``scores_only``
    (the minimal app): the answers hold only the scores, and only they are compared."""
    from concurrent.futures import ThreadPoolExecutor

    res: dict = {}
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, rows.schema) as w:
        w.write_table(rows)
    status, data = _post(url + ROUTE, sink.getvalue().to_pybytes(), ARROW_STREAM)
    if status == 200:
        out = ipc.open_stream(data).read_all()
        if scores_only:
            res["bulk_arrow"] = _compare(ref, out.column("anomaly_score").to_numpy())
        else:
            res["bulk_arrow"] = _compare(ref, out.column("anomaly_score").to_numpy(),
                                         out.column("is_anomaly").to_pylist(), out.column("top_features").to_pylist())
            res["bulk_arrow"]["model_version"] = out.column("model_version")[0].as_py()
    else:
        res["bulk_arrow"] = {"error": f"{status}: {data[:300]!r}"}
    status, data = _post(url + ROUTE, json.dumps({"rows": rows.to_pylist()}).encode(), "application/json")
    if status == 200:
        body = json.loads(data)
        if scores_only:
            res["bulk_json"] = _compare(ref, body["scores"])
        else:
            res["bulk_json"] = _compare(ref, [r["anomaly_score"] for r in body["rows"]],
                                        [r["is_anomaly"] for r in body["rows"]],
                                        [r["top_features"] for r in body["rows"]])
            res["bulk_json"]["model_version"] = body["model_version"]
    else:
        res["bulk_json"] = {"error": f"{status}: {data[:300]!r}"}
    one = rows.slice(0, singles).to_pylist()

    def post_one(r):
        return _post(url + ROUTE, json.dumps({"rows": [r]}).encode(), "application/json")

    with ThreadPoolExecutor(conc) as pool:
        answers = list(pool.map(post_one, one))
    bad = [s for s, _ in answers if s != 200]
    if bad:
        res["single_rows"] = {"error": f"{len(bad)} of {len(one)} requests failed, e.g. {answers[0][1][:300]!r}"}
    elif scores_only:
        res["single_rows"] = _compare(ref.slice(0, singles), [json.loads(d)["scores"][0] for _, d in answers])
        res["single_rows"]["concurrency"] = conc
    else:
        got = [json.loads(d)["rows"][0] for _, d in answers]
        res["single_rows"] = _compare(ref.slice(0, singles), [g["anomaly_score"] for g in got],
                                      [g["is_anomaly"] for g in got], [g["top_features"] for g in got])
        res["single_rows"]["concurrency"] = conc
    return res


def score_problems(chk: dict) -> list[str]:
    """What in an equality check is outside its tolerance (bulk: absolute, single rows: relative)."""
    problems = []
    for k, v in chk.items():
        if "error" in v:
            problems.append(f"{k}: {v['error'][:200]}")
            continue
        if k.startswith("bulk") and not v["max_abs_diff"] < BULK_TOLERANCE:
            problems.append(f"{k}: max |diff| {v['max_abs_diff']:.3g} >= {BULK_TOLERANCE:g}")
        if k == "single_rows" and not v["max_rel_diff"] < SINGLE_REL_TOLERANCE:
            problems.append(f"{k}: max relative diff {v['max_rel_diff']:.3g} >= {SINGLE_REL_TOLERANCE:g}")
        if v["is_anomaly_equal"] is False:  # None: not answered (the minimal app)
            problems.append(f"{k}: is_anomaly differs")
    return problems


def batch_job_check(args, bundle: Path, rows: pa.Table, ref: pa.Table, env: dict) -> dict:
    """``unusual.ray_jobs.score`` on a Parquet of the same rows (plus an ``id``), in a subprocess with its own Ray."""
    import pyarrow.parquet as pq

    work = Path(args.workdir) / "batch_check"
    work.mkdir(parents=True, exist_ok=True)
    data, out = work / "rows.parquet", work / "out"
    pq.write_table(rows.append_column("id", pa.array(np.arange(rows.num_rows, dtype=np.int64))), data)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_batch", "--bundle", str(bundle), "--data", str(data),
           "--output", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.batch_job_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"skipped": f"the batch job took over {args.batch_job_timeout:.0f} s; killed"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:  # Ray's processes of that session, should any outlive the driver
            ps = psutil_module()
            for p in ps.process_iter():
                try:
                    if os.getsid(p.pid) == proc.pid:
                        p.kill()
                except (OSError, ps.Error):
                    continue
        except Exception:  # noqa: BLE001
            pass
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr_tail": _tail(stderr, 20), "wall_seconds": wall}
    files = [f for f in out.rglob("*.parquet") if not any(s.startswith(("_", ".")) for s in f.relative_to(out).parts)]
    got = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")
    res = {"wall_seconds": wall, "ids": got.num_rows, **_compare(
        ref, got.column("anomaly_score").to_numpy(), got.column("is_anomaly").to_pylist(),
        got.column("top_features").to_pylist())}
    res["ids_match"] = got.column("id").to_pylist() == list(range(rows.num_rows))
    return res


# =========================================================================== the plain Scorer loop (subprocess)


def scorer_loop(args, bundle: Path, env: dict) -> dict:
    """The plain in-process loop (:func:`scorer_worker`) over the bulk Arrow tables, in a subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_scorer", "--bundle", str(bundle),
           "--rows", ",".join(map(str, args.bulk_rows)), "--repeats", str(args.scorer_repeats),
           "--seconds", str(args.scorer_seconds), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr_tail": _tail(proc.stderr, 20)}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["load_average_after"] = loadavg()
    return res


def loop_summary(runs: list[dict]) -> dict:
    """The denominator of the bulk ratios: per rows, the median of every repeat over the loop's runs
    (before and after the servers) at torch's default threads and at 1 thread, and the faster of the two
    (``rows_per_s``: the best a plain loop does here, so the ratio is not flattered by a slow setting)."""
    out: dict = {"rows_per_s": {}, "rows_per_s_default_threads": {}, "rows_per_s_1_thread": {}}
    for rows in sorted({r["rows"] for run in runs for r in run.get("runs", [])}):
        for key, default in (("rows_per_s_default_threads", True), ("rows_per_s_1_thread", False)):
            rates = [x for run in runs for r in run.get("runs", [])
                     if r["rows"] == rows and (r["threads_setting"] == "default") == default
                     and (default or r["threads"] == 1) for x in r["rows_per_s_runs"]]
            if rates:
                out[key][str(rows)] = round(float(np.median(rates)), 1)
        best = [v for k in ("rows_per_s_default_threads", "rows_per_s_1_thread")
                if (v := out[k].get(str(rows))) is not None]
        if best:
            out["rows_per_s"][str(rows)] = max(best)
    return out


# =========================================================================== report


def _key(s: dict) -> str:
    return f"{s['kind']}:{s.get('rows_per_request', 1)}@{s['concurrency']}"


def _div(a, b):
    return round(a / b, 3) if a is not None and b else None


def ratios(record: dict) -> list[dict]:
    """Every server's scenarios against the references measured in this invocation: single rows, req/s,
    p50 and p99 ÷ the minimal app's (:data:`REFERENCE`) at the same concurrency; bulk, rows/s ÷ the Scorer
    loop's at the same rows. Each with whether it meets the issue's target: single rows for
    :data:`TARGET_SERVERS` only, bulk Arrow for every server (None: no target or no reference)."""
    ref = {_key(s): s for s in record["servers"].get(REFERENCE, {}).get("scenarios", []) if "error" not in s}
    loop = record.get("scorer_loop", {}).get("rows_per_s", {})
    out = []
    for name, srv in record["servers"].items():
        for s in srv.get("scenarios", []):
            if "error" in s:
                continue
            f = ref.get(_key(s), {})
            r = {"server": name, "kind": s["kind"], "rows": s["rows_per_request"], "concurrency": s["concurrency"],
                 "req_per_s_vs_minimal": _div(s["req_per_s"], f.get("req_per_s")),
                 "p50_vs_minimal": _div(s["p50_ms"], f.get("p50_ms")),
                 "p99_vs_minimal": _div(s["p99_ms"], f.get("p99_ms"))}
            meets = None
            if s["kind"] == "single":
                if name in TARGET_SERVERS and r["req_per_s_vs_minimal"] is not None \
                        and r["p99_vs_minimal"] is not None:
                    meets = (r["req_per_s_vs_minimal"] >= TARGETS["single_req_per_s_vs_minimal_min"]
                             and r["p99_vs_minimal"] <= TARGETS["single_p99_vs_minimal_max"])
            else:
                r["rows_per_s_vs_scorer_loop"] = _div(s["rows_per_s"], loop.get(str(s["rows_per_request"])))
                if s["kind"] == "bulk-arrow" and r["rows_per_s_vs_scorer_loop"] is not None:
                    meets = r["rows_per_s_vs_scorer_loop"] >= TARGETS["bulk_arrow_rows_per_s_vs_scorer_loop_min"]
            r["meets_target"] = meets
            s["ratios"] = {k: v for k, v in r.items() if k not in ("server", "kind", "rows", "concurrency")}
            out.append(r)
    return out


def target_summary(record: dict) -> dict:
    """The single-row targets per target server: met at every concurrency measured (None: not measured)."""
    out = {}
    for name in TARGET_SERVERS:
        rs = [r for r in record.get("ratios", []) if r["server"] == name and r["kind"] == "single"]
        if name not in record["servers"]:
            continue
        verdicts = [r["meets_target"] for r in rs]
        out[name] = {
            "single_rows_met": None if not rs or None in verdicts else all(verdicts),
            "by_concurrency": {str(r["concurrency"]): {k: r[k] for k in
                                                       ("req_per_s_vs_minimal", "p99_vs_minimal", "meets_target")}
                               for r in rs},
        }
    return out


def _fmt(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _what(s: dict) -> str:
    if s["kind"] == "single":
        return "single row JSON"
    return f"{s['rows_per_request']:,} rows {'Arrow' if s['kind'] == 'bulk-arrow' else 'JSON'}"


def _fast_label(srv: dict) -> str:
    info = srv.get("info") or {}
    if "fast_path" not in info:
        return "" if srv.get("app") in BARE else "?"
    on = "on" if info["fast_path"] else "off"
    if info["fast_path"] != info.get("fast_path_requested"):
        on += " (asked " + ("on" if info.get("fast_path_requested") else "off") + ")"
    return on


def markdown(record: dict) -> str:
    t = TARGETS
    lines = [
        f"| server | fast path | requests | conc | n | non-200 | req/s | rows/s | p50 ms | p99 ms | "
        f"server CPU ms/req | req/s ÷ minimal (≥ {t['single_req_per_s_vs_minimal_min']}) | "
        f"p99 ÷ minimal (≤ {t['single_p99_vs_minimal_max']}) | "
        f"rows/s ÷ Scorer loop (≥ {t['bulk_arrow_rows_per_s_vs_scorer_loop_min']}) | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, srv in record["servers"].items():
        fast = _fast_label(srv)
        if srv.get("error"):
            lines.append(f"| {name} | {fast} | failed: {srv['error'].splitlines()[0][:80]} |" + " |" * 12)
        for s in srv.get("scenarios", []):
            if "error" in s:
                lines.append(f"| {name} | {fast} | {_what(s)} | {s['concurrency']} | failed: {s['error']} |"
                             + " |" * 10)
                continue
            r = s.get("ratios", {})
            meets = {True: "yes", False: "**no**", None: ""}[r.get("meets_target")]
            lines.append(
                f"| {name} | {fast} | {_what(s)} | {s['concurrency']} | {s['requests']} | {s['errors']} | "
                f"{s['req_per_s']:,.1f} | {s['rows_per_s']:,.0f} | {_fmt(s['p50_ms'], '.1f')} | "
                f"{_fmt(s['p99_ms'], '.1f')} | {s['server_cpu_ms_per_request']:.1f} | "
                f"{_fmt(r.get('req_per_s_vs_minimal') if s['kind'] == 'single' else None, '.2f')} | "
                f"{_fmt(r.get('p99_vs_minimal') if s['kind'] == 'single' else None, '.2f')} | "
                f"{_fmt(r.get('rows_per_s_vs_scorer_loop'), '.2f')} | {meets} |")
    loop = record.get("scorer_loop") or {}
    if loop.get("rows_per_s"):
        threads = next((r.get("torch_default_threads") for r in loop.get("runs", []) if "torch_default_threads" in r),
                       None)
        lines += ["", f"| plain Scorer loop | rows/s (the denominator: the faster) | torch default ({threads} "
                  "threads) | 1 thread | before / after the servers, default / 1 thread |",
                  "|---|---:|---:|---:|---|"]
        for rows, v in loop["rows_per_s"].items():
            per_run = " / ".join(
                _fmt(next((r["rows_per_s"] for r in run.get("runs", [])
                           if str(r["rows"]) == rows and r["threads_setting"] == setting), None), ",.0f")
                for run in loop.get("runs", []) for setting in ("default", 1))
            lines.append(f"| {int(rows):,} rows Arrow | {v:,.0f} | "
                         f"{_fmt(loop['rows_per_s_default_threads'].get(rows), ',.0f')} | "
                         f"{_fmt(loop['rows_per_s_1_thread'].get(rows), ',.0f')} | {per_run} |")
    lines.append("")
    for name, srv in record["servers"].items():
        bits = [f"start {srv.get('start_seconds', '?')} s"]
        if srv.get("info", {}).get("fast_path_line"):
            bits.append(srv["info"]["fast_path_line"])
        if srv.get("processes"):
            bits.append(f"haproxy processes {srv['processes'].get('haproxy', 0)}")
        bits.append(f"non-200: {srv.get('non_200_measured', '?')} measured, {srv.get('non_200_warmup', '?')} warm-up")
        stop = srv.get("stop") or {}
        if stop.get("forced") or stop.get("leftovers_killed") or stop.get("tmp_leftovers_removed"):
            bits.append(f"stop: forced {stop.get('forced')}, leftovers killed {stop.get('leftovers_killed')}, "
                        f"tmp folders removed {stop.get('tmp_leftovers_removed')}")
        lines.append(f"- {name}: " + "; ".join(bits))
        for k, v in (srv.get("score_check") or {}).items():
            if "error" in v:
                lines.append(f"  - {k}: {v['error']}")
            else:
                extra = "scores only" if v["is_anomaly_equal"] is None else (
                    f"is_anomaly equal {v['is_anomaly_equal']}, top features equal {v['top_feature_names_equal']}")
                lines.append(f"  - {k} vs in-process Scorer: {v['rows']} rows, max |diff| {v['max_abs_diff']:.3g} "
                             f"(relative {v['max_rel_diff']:.3g}), {extra}")
    b = record.get("batch_job_check")
    if b:
        if "max_abs_diff" in b:
            lines.append(f"- batch job (unusual.ray_jobs.score) vs in-process Scorer: {b['rows']} rows, "
                         f"max |diff| {b['max_abs_diff']:.3g}, is_anomaly equal {b['is_anomaly_equal']} "
                         f"({b['wall_seconds']} s)")
        else:
            lines.append(f"- batch job: {b.get('skipped') or b.get('error')}")
    for name, v in (record.get("targets_met") or {}).items():
        per = ", ".join(f"c={c}: {x['req_per_s_vs_minimal']} / {x['p99_vs_minimal']}"
                        for c, x in v["by_concurrency"].items())
        verdict = {True: "met", False: "**not met**", None: "not measured"}[v["single_rows_met"]]
        lines.append(f"- single-row targets of {name} (req/s ÷ minimal ≥ {TARGETS['single_req_per_s_vs_minimal_min']}, "
                     f"p99 ÷ minimal ≤ {TARGETS['single_p99_vs_minimal_max']}): {verdict} ({per})")
    st = record.get("settings", {})
    lines.append(f"- load generator: {st.get('client', 'aiohttp')}" + (f" ({st['wrk']})" if st.get("wrk") else ""))
    lines.append(f"- load average: start {record.get('load_average_start')}, end {record.get('load_average_end')}; "
                 f"wall {record.get('wall_seconds')} s")
    return "\n".join(lines)


def _write(record: dict, path: str, complete: bool) -> None:
    record["complete"] = complete
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def server_cmd(name: str, args, bundle: Path, port: int) -> list[str]:
    script = str(Path(__file__).resolve())
    app, fast = SERVERS[name]
    bare = ["--bundle", str(bundle), "--port", str(port), "--threads", str(args.bare_threads)]
    if app == "minimal":
        return [sys.executable, script, "_minimal", *bare] + (["--access-log"] if args.minimal_access_log else [])
    if app == "same-work":
        return [sys.executable, script, "_same_work", *bare] + (
            ["--threadpool"] if args.same_work_scoring == "threadpool" else [])
    cmd = [sys.executable, script, "_serve", "--app", app, "--fast", str(int(fast)), "--bundle", str(bundle),
           "--port", str(port), "--threads", str(args.bare_threads), "--ready-timeout", str(args.ready_timeout)]
    if app == "config" and args.config_out:
        cmd += ["--config-out", f"{args.config_out}.{name}.yaml"]
    if app in ("unusual", "config"):
        for flag, v in (("--max-batch-size", args.max_batch_size), ("--max-replicas", args.max_replicas)):
            if v:
                cmd += [flag, str(v)]
    return cmd


def scenario_list(args) -> list[tuple[str, int, int]]:
    """(kind, concurrency, rows per request): single rows at each concurrency, then per bulk size the Arrow
    requests (at --bulk-concurrency up to --small-bulk-max rows, at --large-bulk-concurrency above), and
    the JSON bulk requests of --bulk-json-rows at --bulk-json-concurrency."""
    out = [("single", c, 1) for c in args.concurrency]
    for rows in args.bulk_rows:
        concs = args.bulk_concurrency if rows <= args.small_bulk_max else args.large_bulk_concurrency
        out += [("bulk-arrow", c, rows) for c in concs]
        if rows in args.bulk_json_rows:
            out += [("bulk-json", c, rows) for c in args.bulk_json_concurrency]
    out += [("bulk-json", c, rows) for rows in args.bulk_json_rows if rows not in args.bulk_rows
            for c in args.bulk_json_concurrency]
    return out


def main() -> int:
    workers = {"_serve": serve_worker, "_same_work": same_work_worker, "_minimal": minimal_worker,
               "_load": load_worker, "_batch": batch_worker, "_scorer": scorer_worker}
    if len(sys.argv) > 1 and sys.argv[1] in workers:
        return workers[sys.argv[1]](sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                   help=f"comma list of {', '.join(SERVERS)} (measured in the order given; default "
                        f"{','.join(DEFAULT_SERVERS)}); the single-row ratios need {REFERENCE}")
    p.add_argument("--client", choices=("aiohttp", "wrk"), default="wrk" if shutil.which("wrk") else "aiohttp",
                   help="load generator: wrk (C, one thread; the default where `wrk` is on PATH) or aiohttp "
                        "(Python, one event loop)")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="the wrk executable")
    p.add_argument("--seconds", type=float, default=8, help="measured seconds per scenario (upper bound)")
    p.add_argument("--concurrency", type=_csv_ints, default=[1, 8, 32], help="in-flight single-row requests")
    p.add_argument("--requests", type=int, default=1_000_000, help="single-row requests per scenario (upper bound)")
    p.add_argument("--warmup", type=int, default=100, help="unrecorded single-row requests first (at least 2 x conc)")
    p.add_argument("--warmup-seconds", type=float, default=3, help="upper bound of each warm-up")
    p.add_argument("--bulk-rows", type=_csv_ints, default=[1000, 100_000], help="rows per bulk Arrow request")
    p.add_argument("--bulk-concurrency", type=_csv_ints, default=[1, 4],
                   help="in-flight bulk requests, sizes up to --small-bulk-max rows")
    p.add_argument("--large-bulk-concurrency", type=_csv_ints, default=[1], help="the same, larger sizes")
    p.add_argument("--small-bulk-max", type=int, default=10_000)
    p.add_argument("--bulk-json-rows", type=_csv_ints, default=[1000], help="rows per bulk JSON request ('' : none)")
    p.add_argument("--bulk-json-concurrency", type=_csv_ints, default=[1])
    p.add_argument("--bulk-requests", type=int, default=1_000_000, help="bulk requests per scenario (upper bound)")
    p.add_argument("--bulk-seconds", type=float, help="measured seconds per bulk scenario (default: --seconds)")
    p.add_argument("--bulk-warmup", type=int, default=3, help="unrecorded bulk requests first")
    p.add_argument("--scorer-repeats", type=int, default=3, help="repeats of the plain Scorer loop per size")
    p.add_argument("--scorer-seconds", type=float, default=1.0, help="seconds per repeat of the Scorer loop")
    p.add_argument("--max-batch-size", type=int,
                   help="ServeConfig.max_batch_size of unusual and config (default: the app's)")
    p.add_argument("--max-replicas", type=int,
                   help="ServeConfig.max_replicas of unusual and config (default: the app's)")
    p.add_argument("--bare-threads", "--fastapi-threads", dest="bare_threads", type=int, default=1,
                   help="torch threads of minimal, same-work and the serve-minimal replica")
    p.add_argument("--same-work-scoring", choices=("inline", "threadpool"), default="inline",
                   help="same-work scores in its event loop (default) or in Starlette's threadpool")
    p.add_argument("--minimal-access-log", action="store_true", help="uvicorn's access log in minimal (off)")
    p.add_argument("--config-out", help="config: keep the deployed Serve config as PREFIX.<server>.yaml")
    p.add_argument("--check-rows", type=int, default=1000, help="rows of the score-equality check")
    p.add_argument("--skip-batch-job", action="store_true", help="do not compare with the batch job")
    p.add_argument("--batch-job-timeout", type=float, default=90, help="seconds before the batch job is skipped")
    p.add_argument("--ready-timeout", type=float, default=180, help="seconds for a server to answer /readyz")
    p.add_argument("--idle-seconds", type=float, default=3, help="CPU of the idle server measured this long (0: no)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the benchmark bundle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(ROOT / "artifacts" / "bench_serve"), help="cached bundle, check data")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_latency.json"))
    args = p.parse_args()
    wrk_version = None
    if args.client == "wrk":
        try:
            wrk_version = subprocess.run([args.wrk, "-v"], capture_output=True, text=True,
                                         timeout=10).stdout.splitlines()[0].split(" [")[0]
        except (OSError, IndexError, subprocess.SubprocessError) as e:
            p.error(f"--client wrk: cannot run {args.wrk!r} ({e}); install wrk or use --client aiohttp")
    servers = [ALIASES.get(s.strip(), s.strip()) for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown or not servers:
        p.error(f"--servers: unknown {unknown}; use {', '.join(SERVERS)}")

    t_start = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each Ray here is a local one of its own
    scenarios = scenario_list(args)
    record = {
        "benchmark": "serve_latency",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        **environment(
            ("models", "numpy", "torch", "pyarrow", "ray", "fastapi", "starlette", "uvicorn", "aiohttp", "psutil"),
            memory_total_mib=round(psutil_module().virtual_memory().total / MIB),
        ),
        "load_average_start": loadavg(),
        "targets": TARGETS,
        "settings": {
            "servers": servers, "route": ROUTE, "scenarios": [list(x) for x in scenarios],
            "seconds": args.seconds, "concurrency": args.concurrency, "requests": args.requests,
            "warmup": args.warmup, "warmup_seconds": args.warmup_seconds,
            "bulk_rows": args.bulk_rows, "bulk_concurrency": args.bulk_concurrency,
            "large_bulk_concurrency": args.large_bulk_concurrency, "small_bulk_max": args.small_bulk_max,
            "bulk_json_rows": args.bulk_json_rows, "bulk_json_concurrency": args.bulk_json_concurrency,
            "bulk_requests": args.bulk_requests, "bulk_seconds": args.bulk_seconds or args.seconds,
            "bulk_warmup": args.bulk_warmup, "scorer_repeats": args.scorer_repeats,
            "scorer_seconds": args.scorer_seconds,
            "unusual_max_batch_size": args.max_batch_size, "unusual_max_replicas": args.max_replicas,
            "bare_torch_threads": args.bare_threads, "serve_minimal_torch_threads": args.bare_threads,
            "same_work_scoring": args.same_work_scoring, "minimal_access_log": args.minimal_access_log,
            "reference": REFERENCE, "target_servers": list(TARGET_SERVERS), "check_rows": args.check_rows,
            "client": args.client, "wrk": wrk_version,
            "load_generator": (
                f"wrk ({wrk_version}), -t1 -c<concurrency> --latency --timeout {WRK_TIMEOUT_S}s, one kept-alive "
                "connection per in-flight request, one body per scenario (the first of the aiohttp client's), "
                "measured for whole seconds (requests still in flight at the end are not counted); warm-up: a "
                "wrk run stopped after the same number of answers" if args.client == "wrk" else
                "aiohttp, one event loop in one subprocess per scenario, one kept-alive connection per worker"),
            "ray_address_in_env": os.environ.get("RAY_ADDRESS"),
        },
        "servers": {},
    }

    print(f"load generator: {args.client}" + (f" ({wrk_version}, {args.wrk})" if wrk_version else ""), flush=True)
    print(f"bundle: training or reusing under {workdir} ...", flush=True)
    bundle, bundle_meta = ensure_bundle(workdir, args.epochs, args.seed)
    record["bundle"] = {"path": str(bundle), **bundle_meta}

    from unusual.models import Scorer

    check_rows = _cardio().slice(0, args.check_rows)
    ref = Scorer(str(bundle)).score_table(check_rows)
    failed = False
    loop_runs: list[dict] = []
    server_pids: set[int] = set()

    def run_loop(when: str) -> None:
        nonlocal failed
        print(f"plain Scorer loop ({when}) ...", end=" ", flush=True)
        res = {"when": when, **scorer_loop(args, bundle, env)}
        loop_runs.append(res)
        record["scorer_loop"] = {"runs": loop_runs, **loop_summary(loop_runs),
                                 "denominator": "per rows, the faster of the medians of every repeat at torch's "
                                                "default threads and at 1 thread, runs before and after the "
                                                "servers together"}
        if "error" in res:
            failed = True
            print(f"failed: {res['error']}\n{res['stderr_tail']}", flush=True)
        else:
            print(", ".join(f"{r['rows']:,} rows x {r['threads']} threads: {r['rows_per_s']:,.0f} rows/s"
                            for r in res["runs"]), flush=True)
        _write(record, args.out, complete=False)

    if args.bulk_rows:
        run_loop("before")

    for name in servers:
        from unusual.runtime import free_port

        port = free_port()
        cmd = server_cmd(name, args, bundle, port)
        srv_rec: dict = {"app": SERVERS[name][0], "fast_path_requested": SERVERS[name][1],
                         "cmd": cmd, "scenarios": []}
        record["servers"][name] = srv_rec
        server = Server(name, cmd, port, env)
        print(f"{name}: starting on port {port} ...", end=" ", flush=True)
        try:
            srv_rec["start_seconds"] = round(server.start(args.ready_timeout), 2)
            srv_rec["info"] = server.info()
            srv_rec["processes"] = server.processes()
            fast = f", fast path {_fast_label(srv_rec)}" if server.app else ""
            print(f"ready in {srv_rec['start_seconds']:.1f} s{fast}", flush=True)
            chk = equality_check(server.url, ref, check_rows, singles=min(200, args.check_rows), conc=8,
                                 scores_only=server.scores_only)
            srv_rec["score_check"] = chk
            problems = score_problems(chk)
            if problems:
                failed = True
                srv_rec["score_check_problems"] = problems
            print("  score check: " + ", ".join(
                f"{k} max |diff| {v['max_abs_diff']:.3g}" if "error" not in v else f"{k} failed"
                for k, v in chk.items()) + (f"  !! {problems}" if problems else ""), flush=True)
            if args.idle_seconds > 0:  # what the server burns with no request at all
                c0 = server.cpu_seconds()
                time.sleep(args.idle_seconds)
                idle = _cpu_delta(c0, server.cpu_seconds())
                srv_rec["idle_cpu_cores"] = round(sum(idle.values()) / args.idle_seconds, 3)
                srv_rec["idle_cpu_by_process"] = idle
                print(f"  idle: {srv_rec['idle_cpu_cores']:.2f} cores busy", flush=True)
            for kind, conc, rows in scenarios:
                what = _what({"kind": kind, "rows_per_request": rows})
                print(f"  {what} at concurrency {conc} ...", end=" ", flush=True)
                s = run_scenario(server, args, kind, conc, rows, env)
                srv_rec["scenarios"].append(s)
                if "error" in s:
                    failed = True
                    print(f"failed: {s['error']}\n{s['stderr_tail']}", flush=True)
                    continue
                if s["errors"]:
                    failed = True
                print(f"{s['requests']} requests in {s['seconds']:.1f} s, {s['req_per_s']:,.1f} req/s, "
                      f"{s['rows_per_s']:,.0f} rows/s, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, "
                      f"{s['errors']} non-200, client CPU {s.get('client_cpu_seconds', '?')} s", flush=True)
                _write(record, args.out, complete=False)
        except Exception as e:  # noqa: BLE001 - recorded; the other servers still run
            failed = True
            srv_rec["error"] = f"{type(e).__name__}: {e}"
            print(f"\n!! {name}: {srv_rec['error']}", file=sys.stderr, flush=True)
        finally:
            if srv_rec.get("error") and server.proc is not None and "stderr (last" not in srv_rec["error"]:
                srv_rec["stderr_tail"] = server.stderr_tail(30)
            srv_rec["stop"] = server.stop(grace=60 if server.app else 15)
            server_pids |= server.pids
            if srv_rec["stop"]["tmp_leftovers_removed"]:
                failed = True  # fastpath.cleanup did not run: the server did not stop cleanly
            tail = srv_rec["stop"].pop("stderr_tail_at_exit", None)
            if srv_rec["stop"]["returncode"] not in (0, -signal.SIGTERM):  # uvicorn re-raises the SIGTERM it handled
                srv_rec["stop"]["stderr_tail"] = tail
        ok = [s for s in srv_rec["scenarios"] if "error" not in s]
        srv_rec["non_200_measured"] = sum(s["errors"] for s in ok)
        srv_rec["non_200_warmup"] = sum((s.get("warmup") or {}).get("errors", 0) for s in ok)
        if srv_rec["non_200_warmup"]:
            failed = True
        srv_rec["load_average_after"] = loadavg()
        _write(record, args.out, complete=False)

    if args.bulk_rows:
        run_loop("after")

    if not args.skip_batch_job:
        print("batch job on the same rows ...", end=" ", flush=True)
        try:
            record["batch_job_check"] = batch_job_check(args, bundle, check_rows, ref, env)
        except Exception as e:  # noqa: BLE001
            record["batch_job_check"] = {"error": f"{type(e).__name__}: {e}"}
        b = record["batch_job_check"]
        agree = "max_abs_diff" in b and b["max_abs_diff"] < BULK_TOLERANCE and b["is_anomaly_equal"] and b["ids_match"]
        if "max_abs_diff" in b and not agree:
            failed = True
            b["problem"] = f"outside the tolerance {BULK_TOLERANCE:g} or rows differ"
        print(b.get("skipped") or b.get("error") or f"max |diff| {b['max_abs_diff']:.3g} ({b['wall_seconds']} s)",
              flush=True)

    record["ratios"] = ratios(record)
    record["targets_met"] = target_summary(record)
    record["load_average_end"] = loadavg()
    record["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    record["tmp_folders_left"] = own_tmp_dirs(server_pids)  # of the servers' processes: should be none
    if record["tmp_folders_left"]:
        failed = True
    _write(record, args.out, complete=True)
    print()
    print(markdown(record))
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
