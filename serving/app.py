"""The Ray Serve application: online and bulk scoring from checkpoint bundles.

One ``ModelServer`` deployment per model (autoscaled, dynamically batched,
each replica scoring through :class:`models.Scorer`) behind one ``Gateway``
ingress deployment (FastAPI) that routes by model name:

    GET  /healthz                       liveness
    GET  /readyz                        every model loaded (503 until then)
    GET  /v1/models                     models, versions, thresholds, features
    POST /v1/score                      the default model (the only one, or --default-model)
    POST /v1/models/{name}/score        JSON rows, or a bulk Arrow IPC / Parquet body
    POST /v1/jobs                       submit a batch scoring job (Ray job submission)
    GET  /v1/jobs/{id}                  its status
    GET  /docs, /openapi.json           the documented API

Build it with :func:`build_app` (``serve run unusual.serving.app:build_app models=ae=s3://…``,
``serve deploy`` with ``serving/serve_config.yaml``, a KubeRay RayService's
``import_path: unusual.serving.app:build_app``) or ``unusual serve``.

A new checkpoint for a model is a new ``user_config``: Serve calls
``ModelServer.reconfigure`` on the live replicas, which load the new bundle and
swap it in one assignment; requests in flight finish on the bundle they
started with, and every response names the model version that scored it.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures
# (``request: Request``) at runtime through Serve's ingress wrapper.
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from fastapi import Request
from ray import serve

from ..runtime import ResourceError

log = logging.getLogger("unusual.serve")

API_VERSION = "v1"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet")
TOKEN_ENV = "UNUSUAL_SERVE_TOKEN"
SCORE_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 1e4]


@dataclass
class ServeSettings:
    """Everything the application is built from (also the ``serve run`` / config-file arguments)."""

    models: dict[str, str]  # name -> checkpoint URI
    default_model: str | None = None
    top_k: int = 3
    max_body_bytes: int = 64 * 1024 * 1024
    max_rows: int = 1_000_000
    auth_token: str | None = None  # default: $UNUSUAL_SERVE_TOKEN; None = no authentication
    use_gpu: bool = False
    # Share of a GPU per model replica with use_gpu: the models are small, so replicas share GPUs
    # (2 models x 2 replicas fill one GPU). A whole GPU each left a second model's replica waiting
    # for a GPU forever on a 1-GPU machine (seen on an H100 with benchmarks/gpu_paths.py).
    gpus_per_replica: float = 0.25
    num_cpus: float = 0.25  # per model replica
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.005
    ray_address: str | None = None  # for /v1/jobs: the dashboard (default: $RAY_DASHBOARD_ADDRESS, else this cluster)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.models:
            raise ValueError("at least one model is needed: models={name: checkpoint URI}")
        for name in self.models:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"model name {name!r}: use letters, digits, '-', '_' or '.'")
        if self.default_model is None and len(self.models) == 1:
            self.default_model = next(iter(self.models))
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not one of {sorted(self.models)}")
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"replicas: need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")
        if not 0 < self.gpus_per_replica <= 1:
            raise ValueError(f"gpus_per_replica must be in (0, 1]; got {self.gpus_per_replica}")
        if self.auth_token is None:
            self.auth_token = os.environ.get(TOKEN_ENV) or None

    def replica_resources(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.gpus_per_replica if self.use_gpu else 0}

    def check_cluster(self, resources: dict) -> None:
        """Refuse at once what the cluster can never place (a replica would wait forever):
        ``resources`` is ``ray.cluster_resources()``."""
        n = len(self.models) * max(1, self.min_replicas)
        need = self.replica_resources()
        for key, label in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
            want, have = n * need[key], float(resources.get(label, 0))
            if want > have + 1e-9:
                flag = "--gpus-per-replica" if label == "GPU" else "num_cpus"
                raise ResourceError(
                    f"{len(self.models)} model(s) x {max(1, self.min_replicas)} replica(s) x {need[key]:g} {label} "
                    f"need {want:g} {label}(s); the cluster has {have:g}. Use a smaller {flag}, "
                    "fewer models or fewer --min-replicas"
                )


class RequestError(Exception):
    """A client error: HTTP ``status`` with a message naming the field at fault."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- request parsing


def rows_to_table(body: bytes) -> pa.Table:
    """``{"rows": [{"column": value, ...}, ...]}`` -> an Arrow table, or a RequestError."""

    def no_constants(name):  # NaN / Infinity are not JSON
        raise RequestError(422, f"{name} is not a valid JSON number; send null for a missing value")

    try:
        doc = json.loads(body, parse_constant=no_constants)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(doc, dict) or "rows" not in doc:
        raise RequestError(422, 'the body must be a JSON object with a "rows" field: {"rows": [{...}, ...]}')
    rows = doc["rows"]
    if not isinstance(rows, list):
        raise RequestError(422, f'"rows" must be a list of objects; got {type(rows).__name__}')
    if not rows:
        raise RequestError(422, '"rows" is empty: send at least one row')
    columns: dict[str, list] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RequestError(422, f"rows[{i}] must be an object of column: value; got {type(r).__name__}")
        for k in r:
            columns.setdefault(k, [])
    for i, r in enumerate(rows):
        missing = [k for k in columns if k not in r]
        if missing:
            raise RequestError(422, f"rows[{i}] lacks column(s) {missing} that other rows have")
        for k, v in r.items():
            columns[k].append(v)
    arrays = {}
    for k, values in columns.items():
        try:
            arrays[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kinds = sorted({type(v).__name__ for v in values if v is not None})
            raise RequestError(422, f"column {k!r} mixes value types {kinds}; send one type per column") from None
        if pa.types.is_nested(arrays[k].type):
            raise RequestError(422, f"column {k!r} holds nested values; send numbers or strings")
    return pa.table(arrays)


def body_to_table(body: bytes, content_type: str) -> tuple[pa.Table, str]:
    """The request body as a table and the response format (json, arrow or parquet)."""
    ctype = (content_type or "application/json").split(";")[0].strip().lower()
    if ctype in ("application/json", ""):
        return rows_to_table(body), "json"
    try:
        if ctype == ARROW_STREAM:
            return ipc.open_stream(pa.BufferReader(body)).read_all(), "arrow"
        if ctype in PARQUET_TYPES:
            return pq.read_table(pa.BufferReader(body)), "parquet"
    except (pa.ArrowInvalid, OSError) as e:
        raise RequestError(400, f"the body is not valid {ctype}: {e}") from None
    raise RequestError(
        415, f"unsupported Content-Type {ctype!r}; use application/json, {ARROW_STREAM} or {PARQUET_TYPES[0]}"
    )


def table_to_body(table: pa.Table, fmt: str) -> bytes:
    sink = io.BytesIO()
    if fmt == "arrow":
        with ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    else:
        pq.write_table(table, sink)
    return sink.getvalue()


def scored_rows(table: pa.Table) -> list[dict]:
    cols = ["anomaly_score", "is_anomaly", "top_features"]
    return table.select(cols).to_pylist()


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _answer(status: int, payload: dict, headers: dict | None = None) -> dict:
    body = json.dumps(_finite(payload), separators=(",", ":")).encode()
    return {"status": status, "body": body, "media_type": "application/json", "headers": headers or {}}


def _finite(obj):
    """JSON cannot carry NaN / inf: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- the model deployment


class ModelServer:
    """One model: loads its bundle (``reconfigure``), scores batches of requests."""

    def __init__(self, name: str, settings: dict):
        self.name = name
        self.settings = ServeSettings(**settings)
        self.scorer = None
        self.checkpoint = None
        self._metrics()
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def _metrics(self):
        from ray.serve import metrics

        keys = ("model", "model_version")
        self.m_rows = metrics.Counter("unusual_rows_scored", "rows scored", tag_keys=keys)
        self.m_anom = metrics.Counter("unusual_anomalies", "rows flagged anomalous", tag_keys=keys)
        self.m_bad = metrics.Counter("unusual_rejected_requests", "requests rejected for bad input", tag_keys=keys)
        self.m_score = metrics.Histogram(
            "unusual_anomaly_score", "anomaly scores (for quantiles)", boundaries=SCORE_BUCKETS, tag_keys=keys
        )
        self.m_batch = metrics.Histogram(
            "unusual_batch_rows", "rows per model call", boundaries=[1, 2, 4, 8, 16, 64, 256, 1024, 8192], tag_keys=keys
        )

    def reconfigure(self, config: dict) -> None:
        """Load (or swap to) the bundle at ``config["checkpoint"]``."""
        from ..models import Scorer

        uri = config["checkpoint"]
        device = "cuda" if self.settings.use_gpu else "cpu"
        scorer = Scorer(uri, device=device, top_k=int(config.get("top_k", self.settings.top_k)), stream=False)
        old = self.scorer.version if self.scorer else None
        self.scorer, self.checkpoint = scorer, uri  # one assignment: requests in flight keep the old one
        log.info("model %s: %s -> %s (%s)", self.name, old, scorer.version, uri)

    def info(self) -> dict:
        s = self.scorer
        if s is None:
            return {"name": self.name, "ready": False}
        return {
            "name": self.name,
            "ready": True,
            "model_version": s.version,
            "kind": s.bundle.kind,
            "threshold": s.threshold,
            "checkpoint": self.checkpoint,
            "features": [c.name for c in s.schema.columns],
            "entity_column": s.entity,
            "time_column": s.time,
            "window": getattr(s.bundle.model_config, "window", None),
        }

    async def handle(self, body: bytes, content_type: str) -> dict:
        """A scoring request's raw body -> the HTTP answer (status, body, media type, headers).

        Parsing and encoding happen here, in the model's autoscaled replicas, so
        the gateway only routes bytes."""
        t0 = time.perf_counter()
        try:
            table, fmt = body_to_table(body, content_type)
            if table.num_rows > self.settings.max_rows:
                raise RequestError(413, f"{table.num_rows:,} rows is over the limit of {self.settings.max_rows:,}")
        except RequestError as e:
            return _answer(e.status, {"error": e.message})
        result = await self.score(table)
        if "error" in result:
            return _answer(result["error"][0], {"error": result["error"][1]})
        out, version, threshold = result["table"], result["model_version"], result["threshold"]
        headers = {"X-Model-Version": version, "X-Threshold": repr(float(threshold))}
        if fmt == "json":
            payload = {
                "model": self.name,
                "model_version": version,
                "threshold": threshold,
                "rows": scored_rows(out),
                "seconds": round(time.perf_counter() - t0, 6),
            }
            return _answer(200, payload, headers)
        media = ARROW_STREAM if fmt == "arrow" else PARQUET_TYPES[0]
        return {"status": 200, "body": table_to_body(out, fmt), "media_type": media, "headers": headers}

    async def score(self, table: pa.Table) -> dict:
        """Score one request's rows; returns the output table and the version, or the error."""
        scorer = self.scorer
        if scorer is None:
            return {"error": (503, f"model {self.name} is still loading")}
        if table.num_rows == 0:
            return {"error": (422, "no rows to score")}
        if scorer.sequence:  # a request carries whole windows of its entities: never mixed with another
            try:
                out = scorer.score_table(table)
            except Exception as e:  # noqa: BLE001
                return self._rejected(scorer, e)
            return self._done(scorer, out)
        result = await self._batched(table)
        if isinstance(result, Exception):
            return self._rejected(scorer, result)
        return self._done(scorer, result)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _batched(self, tables: list[pa.Table]) -> list:
        scorer = self.scorer
        self.m_batch.observe(sum(t.num_rows for t in tables), tags=self._tags(scorer))
        return scorer.score_many(tables)

    def _tags(self, scorer) -> dict:
        return {"model": self.name, "model_version": scorer.version}

    def _rejected(self, scorer, e: Exception) -> dict:
        from ..models.errors import UnusualError

        self.m_bad.inc(tags=self._tags(scorer))
        if isinstance(e, (UnusualError, ValueError, TypeError, KeyError, pa.ArrowException)):
            return {"error": (422, str(e))}
        log.exception("model %s failed on a request", self.name)
        return {"error": (500, f"internal error scoring with model {self.name}: {type(e).__name__}")}

    def _done(self, scorer, out: pa.Table) -> dict:
        tags = self._tags(scorer)
        scores = out.column("anomaly_score").to_numpy()
        self.m_rows.inc(len(scores), tags=tags)
        flagged = int(np.count_nonzero(out.column("is_anomaly").to_numpy(zero_copy_only=False)))
        if flagged:
            self.m_anom.inc(flagged, tags=tags)
        for v in scores[: 256] if len(scores) > 256 else scores:  # a sample per request bounds the cost
            self.m_score.observe(float(v), tags=tags)
        return {"table": out, "model_version": scorer.version, "threshold": scorer.threshold}


# --------------------------------------------------------------------------- the gateway


def _fastapi_app():
    from fastapi import FastAPI

    return FastAPI(
        title="unusual",
        version=API_VERSION,
        description="Anomaly scoring with AE, VAE and LSTM detectors. JSON rows online, Arrow IPC or "
        "Parquet bodies in bulk, batch jobs on the cluster. Every response names the model version.",
    )


app = _fastapi_app()

_JSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["rows"],
                    "properties": {"rows": {"type": "array", "items": {"type": "object"}}},
                },
                "example": {"rows": [{"f00": 0.1, "f01": -1.2}]},
            },
            ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}},
            PARQUET_TYPES[0]: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "one result per input row, in input order (JSON), or the scored table in the "
            "request's format (Arrow IPC / Parquet; version and threshold in the X-Model-Version and "
            "X-Threshold headers)",
        },
        "4xx": {"description": '{"error": message naming the field at fault}'},
    },
}


@serve.ingress(app)
class Gateway:
    def __init__(self, settings: dict, **handles):
        self.settings = ServeSettings(**settings)
        self.handles = handles  # model name -> DeploymentHandle of its ModelServer
        self.jobs = None

    # ----------------------------------------------------------------- helpers
    def _error(self, status: int, message: str):
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": message}, status_code=status)

    def _authorized(self, request) -> bool:
        token = self.settings.auth_token
        if not token:
            return True
        got = request.headers.get("authorization", "")
        return got == f"Bearer {token}"

    async def _body(self, request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(413, f"the body ({int(length):,} bytes) is over the limit of {limit:,} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _score(self, name: str, request):
        from fastapi.responses import Response

        if not self._authorized(request):
            return self._error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        if name not in self.handles:
            return self._error(404, f"no model named {name!r}; models: {sorted(self.handles)}")
        try:
            body = await self._body(request)
            if not body:
                raise RequestError(422, 'empty body: send {"rows": [...]} or an Arrow / Parquet table')
        except RequestError as e:
            return self._error(e.status, e.message)
        ctype = request.headers.get("content-type", "application/json")
        r = await self.handles[name].handle.remote(body, ctype)
        return Response(r["body"], status_code=r["status"], media_type=r["media_type"], headers=r.get("headers"))

    # ----------------------------------------------------------------- routes
    @app.get("/healthz", summary="liveness")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: every model loaded")
    async def readyz(self):
        infos = await self._infos()
        waiting = [i["name"] for i in infos if not i.get("ready")]
        if waiting:
            return self._error(503, f"models still loading: {waiting}")
        return {"status": "ready", "models": [i["name"] for i in infos]}

    async def _infos(self) -> list[dict]:
        return [await h.info.remote() for h in self.handles.values()]

    @app.get(f"/{API_VERSION}/models", summary="the served models and their versions")
    async def models(self, request: Request):
        if not self._authorized(request):
            return self._error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return {"default": self.settings.default_model, "models": _finite(await self._infos())}

    @app.post(f"/{API_VERSION}/score", summary="score rows with the default model", openapi_extra=_JSON_BODY)
    async def score_default(self, request: Request):
        name = self.settings.default_model
        if name is None:
            return self._error(
                400, f"several models are served ({sorted(self.handles)}); use /{API_VERSION}/models/{{name}}/score"
            )
        return await self._score(name, request)

    @app.post(f"/{API_VERSION}/models/{{name}}/score", summary="score rows with one model", openapi_extra=_JSON_BODY)
    async def score_model(self, name: str, request: Request):
        return await self._score(name, request)

    @app.post(f"/{API_VERSION}/jobs", summary="submit a batch scoring job for a data URI")
    async def submit_job(self, request: Request):
        if not self._authorized(request):
            return self._error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        try:
            doc = json.loads(await self._body(request) or b"null")
        except RequestError as e:
            return self._error(e.status, e.message)
        except ValueError as e:
            return self._error(400, f"malformed JSON: {e}")
        if not isinstance(doc, dict):
            return self._error(422, 'send {"model": name, "data": URI, "output": URI, "keep_columns": [...]}')
        name = doc.get("model") or self.settings.default_model
        if name not in self.handles:
            return self._error(422, f"field 'model': no model named {name!r}; models: {sorted(self.handles)}")
        for key in ("data", "output"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                return self._error(422, f"field {key!r} is required: a Parquet URI")
        keep = doc.get("keep_columns", [])
        if not isinstance(keep, list) or not all(isinstance(c, str) for c in keep):
            return self._error(422, "field 'keep_columns' must be a list of column names")
        info = await self.handles[name].info.remote()
        cmd = [sys.executable, "-m", "unusual.ray_jobs.score", "--checkpoint", info["checkpoint"], "--data", doc["data"],
               "--output", doc["output"]]
        if keep:
            cmd += ["--keep-columns", ",".join(keep)]
        try:
            client = self._job_client()
            job_id = client.submit_job(entrypoint=" ".join(_quote(c) for c in cmd))
        except Exception as e:  # noqa: BLE001 - the cluster's job API is unreachable
            return self._error(503, f"cannot submit jobs to this cluster: {type(e).__name__}: {e}")
        return {"job_id": job_id, "model": name, "model_version": info["model_version"], "entrypoint": cmd}

    @app.get(f"/{API_VERSION}/jobs/{{job_id}}", summary="the status of a submitted scoring job")
    async def job_status(self, job_id: str, request: Request):
        if not self._authorized(request):
            return self._error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        try:
            info = self._job_client().get_job_info(job_id)
        except RuntimeError as e:
            return self._error(404, f"no job {job_id!r}: {e}")
        except Exception as e:  # noqa: BLE001
            return self._error(503, f"cannot reach this cluster's job API: {type(e).__name__}: {e}")
        return {"job_id": job_id, "status": str(info.status), "message": info.message}

    def _job_client(self):
        from ray.job_submission import JobSubmissionClient

        if self.jobs is None:
            # "auto": the dashboard of the cluster this replica runs in, found through the GCS
            address = self.settings.ray_address or os.environ.get("RAY_DASHBOARD_ADDRESS") or "auto"
            self.jobs = JobSubmissionClient(address)
        return self.jobs


# --------------------------------------------------------------------------- building the application


def wait_ready(url: str, timeout: float = 180.0) -> None:
    """Block until ``url``/readyz answers 200 (every model loaded); TimeoutError after ``timeout`` s."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Serve application at {url} did not become ready in {timeout:.0f} s")


def model_deployment(name: str, checkpoint: str, s: ServeSettings):
    return serve.deployment(
        ModelServer,
        name=f"model-{name}",
        ray_actor_options=s.replica_resources(),
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "initial_replicas": max(1, s.min_replicas),
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
        },
        max_ongoing_requests=max(8, 4 * s.max_batch_size),
        user_config={"checkpoint": checkpoint, "top_k": s.top_k},
        health_check_period_s=5,
    ).bind(name, asdict(s))


def build(settings: ServeSettings):
    """The application: one ModelServer deployment per model behind the Gateway.

    It does not check the cluster's resources: a Serve config file or RayService may
    deploy it on a cluster whose autoscaler adds the GPU nodes later. ``unusual serve``
    checks them before it starts (:meth:`ServeSettings.check_cluster`)."""
    handles = {name: model_deployment(name, uri, settings) for name, uri in settings.models.items()}
    gateway = serve.deployment(
        Gateway,
        name="gateway",
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=256,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": 16,  # it only routes bytes: many requests per replica
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
        },
    )
    return gateway.bind(asdict(settings), **handles)


def parse_models(spec) -> dict[str, str]:
    """``{"ae": "s3://…"}``, or ``"ae=s3://…,vae=/path"`` (as ``serve run`` passes arguments)."""
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    out = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"models: expected name=URI; got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build_app(args: dict):
    """Application builder for ``serve run unusual.serving.app:build_app models=…``, Serve config files and
    KubeRay's RayService (``import_path: unusual.serving.app:build_app`` with ``args``)."""
    args = dict(args)
    models = parse_models(args.pop("models", {}))
    fields = {f.name: f for f in ServeSettings.__dataclass_fields__.values() if f.name != "models"}
    kwargs = {}
    for k, v in args.items():
        if k not in fields:
            raise ValueError(f"unknown serve argument {k!r}; known: {sorted(fields)}")
        kwargs[k] = _coerce(k, v, fields[k].default)
    return build(ServeSettings(models=models, **kwargs))


def _coerce(name: str, v, default):
    """``serve run … key=value`` passes strings: convert them to the setting's type."""
    if not isinstance(v, str) or default is None or isinstance(default, str):
        return v
    try:
        if isinstance(default, bool):
            if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(v)
            return v.lower() in ("1", "true", "yes")
        return type(default)(v)
    except ValueError:
        raise ValueError(f"serve argument {name}={v!r}: expected a {type(default).__name__}") from None
