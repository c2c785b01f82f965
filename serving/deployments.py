"""The Serve deployments: a ``ModelServer`` per model, each the HTTP ingress of its own application
at ``/v1/models/<name>``, and one light ``Gateway`` application at ``/`` for the rest.

    GET  /healthz                       liveness                                  (gateway)
    GET  /readyz                        every model loaded (503 until then)       (gateway)
    GET  /v1/models                     models, versions, thresholds, features    (gateway)
    POST /v1/score                      the default model (the only one, or default_model), forwarded
    POST /v1/models/{name}/score        JSON rows, or a bulk Arrow IPC / Parquet body (the model's own app)
    POST /v1/models/{name}/stream       a sequence model's readings, state kept per entity (its own app)
    GET  /v1/models/{name}/             one model's version, threshold, features  (the model's own app)
    POST /v1/jobs                       submit a batch scoring job (Ray job submission)
    GET  /v1/jobs/{id}                  its status
    GET  /docs, /openapi.json           the documented API

A named model's scoring request crosses one hop (Serve's proxy, or HAProxy on the fast path, ->
the model's replica); ``POST /v1/score`` takes one more (gateway -> model). Both take the
application's :class:`~unusual.config.ServeConfig` as a plain dict (``model_dump()``) and validate
it again in the replica. What a request means is decided in :mod:`.handling`; this module only binds
it to Serve (handles, user_config) and FastAPI (routes, responses).

A model's checkpoint is its deployment's ``user_config``: ``ModelServer.reconfigure`` loads the bundle
and swaps it in one assignment (requests in flight finish on the bundle they started with), whether
Serve calls it on a live replica (a config file changing only the checkpoint) or on the new replicas
of a redeploy; every response names the model version that scored it.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures
# (``request: Request``) at runtime through Serve's ingress wrapper.
import asyncio
import logging
import os
import shlex
import time

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from ..config import ServeConfig
from . import handling, streaming
from .codec import ARROW_STREAM, PARQUET_TYPES, RequestError

API_VERSION = "v1"
# A streaming call not answered in this long is sent again (a reading kept by the first answers `repeat`):
# a call made while a replica joined the ring once waited out the client's 60 s.
STREAM_CALL_S = 10.0
STREAM_BATCH = 64  # readings of calls that arrive together at a stream replica, scored in one model call
INFO_TTL_S = 5.0  # the gateway's /stream reads a model's entity and time columns from its info this long
NO_CHECKPOINT_S = 10  # Serve calls reconfigure right after __init__: no checkpoint by then, none is coming
log = logging.getLogger("unusual.serve")


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


async def _error(request: Request, e: RequestError):
    """Both apps' handler of a :class:`RequestError` raised in a route: its status, ``{"error": message}``."""
    return JSONResponse({"error": e.message}, status_code=e.status)


def _response(r: handling.Answer) -> Response:
    """An answer of :mod:`.handling` as an HTTP response."""
    return Response(r.body, status_code=r.status, media_type=r.media_type, headers=r.headers)


async def _read(request: Request, limit: int, required: bool = False) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes (:func:`.handling.read_body`)."""
    length = request.headers.get("content-length")
    return await handling.read_body(request.stream(), length, limit, required=required)


def stream_deployment_name(model: str) -> str:
    """The Serve deployment of ``model``'s stream state (beside its replicas)."""
    return f"stream-{model}"


def deployment_name(model: str) -> str:
    """The Serve deployment of ``model``'s replicas (in its own application, or inside the gateway's)."""
    return f"model-{model}"


model_api = FastAPI(
    title="unusual model",
    version=API_VERSION,
    description="One model's scoring route: JSON rows online, Arrow IPC or Parquet bodies in bulk.",
    exception_handlers={RequestError: _error},
)


class ModelReplica:
    """One model: loads its bundle (``reconfigure``), scores requests.

    As :class:`ModelServer` (this class with its HTTP routes, ``POST …/score`` and ``GET …/``) it is
    the ingress of a Serve application at ``/v1/models/<name>`` (:func:`unusual.serving.app.applications`,
    :mod:`.configfile`): a scoring request crosses one hop, proxy -> this replica. The gateway reaches it
    through handles (``handle``, ``info``) for ``POST /v1/score``, and reaches this class, deployed
    without routes inside the gateway's application, for every route (:func:`unusual.serving.app.build_app`)."""

    def __init__(self, name: str, config: dict, stream=None):
        from ray.serve import metrics

        self.name = name
        self.streams = stream  # the handle of this model's StreamReplica deployment (None: no /stream)
        self.config = ServeConfig.model_validate(config)
        self.scorer = None
        self.checkpoint = None
        self.started = time.monotonic()
        self.metrics = handling.ModelMetrics(metrics, name)
        self._batch.set_max_batch_size(self.config.max_batch_size)
        self.active = 0  # requests in batched(): waiting for, or in, a model call

    def check_health(self) -> None:
        """Serve's health check: a replica that was never given a checkpoint can never answer."""
        if self.checkpoint is None and time.monotonic() - self.started > NO_CHECKPOINT_S:
            raise RuntimeError(
                f"model {self.name} has no checkpoint: set user_config: {{checkpoint: URI}} on deployment "
                f"{deployment_name(self.name)} (a Serve config file's `deployments:`)"
            )

    def reconfigure(self, user_config: dict) -> None:
        """Load (or swap to) the bundle at ``user_config["checkpoint"]``."""
        from ..models import Scorer
        from ..tracking import resolve_checkpoint

        uri = resolve_checkpoint(user_config["checkpoint"])  # an MLflow model URI: its bundle, read here
        device = "cuda" if self.config.use_gpu else "cpu"
        top_k = int(user_config.get("top_k", self.config.top_k))
        scorer = Scorer(uri, device=device, top_k=top_k, stream=False)
        old = self.scorer.version if self.scorer else None
        self.scorer, self.checkpoint = scorer, uri  # one assignment: requests in flight keep the old one
        log.info("model %s: %s -> %s (%s)", self.name, old, scorer.version, uri)

    def info(self) -> dict:
        return handling.model_info(self.name, self.scorer, self.checkpoint)

    async def handle(self, body: bytes, content_type: str) -> handling.Answer:
        """A scoring request's raw body -> the HTTP answer (status, body, media type, headers): a small
        JSON body of numbers on the fast path (:func:`.handling.fast_json`), anything else parsed into a
        table (:func:`.handling.score_request`)."""
        fast = await handling.fast_json(body, content_type, name=self.name, scorer=self.scorer,
                                        max_rows=self.config.max_rows, batched=self.batched, metrics=self.metrics)
        if fast is not None:
            return fast
        return await handling.score_request(
            body, content_type, name=self.name, max_rows=self.config.max_rows, score=self.score
        )

    async def score(self, table: pa.Table) -> dict:
        """Score one request's rows; returns the output table and the version, or the error."""
        return await handling.score_table(self.name, self.scorer, table, self.batched, self.metrics)

    async def batched(self, scorer, X):
        """``(scores, terms)`` of one request's model input: with the requests that arrive together
        (Serve's batching, up to ``max_batch_size`` rows, no wait), or alone when it has more rows than
        that or no other request is being scored here. One turn of the event loop first lets the requests
        read in the same turn get here too; a request alone then skips the batch queue (it cost 15 % of
        the requests/s at one request in flight: benchmarks/README.md, serve_latency)."""
        if len(X) <= self.config.max_batch_size:
            self.active += 1
            try:
                await asyncio.sleep(0)
                if self.active > 1:
                    return await self._batch((scorer, X))
            finally:
                self.active -= 1
        self.metrics.batch(scorer, len(X))
        return scorer.score_matrix(X)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0, batch_size_fn=handling.batch_rows)
    async def _batch(self, items: list[tuple]) -> list[tuple]:
        return handling.score_batch(items, self.metrics)

    # ----------------------------------------------------------------- streaming

    async def stream_route(self, body: bytes, content_type: str, params) -> handling.Answer:
        """A streaming request's answer: parsed and split here, each entity's readings sent to the
        StreamReplica holding it with this replica's checkpoint (:func:`.streaming.answer_request`)."""
        info = handling.model_info(self.name, self.scorer, self.checkpoint)
        return await stream_answer(self.streams, self.name, info, body, content_type, params, self.config.max_rows)

    # ----------------------------------------------------------------- its own routes

    @model_api.post("/score", summary="score rows with this model", openapi_extra=_JSON_BODY)
    async def score_http(self, request: Request):
        handling.check_auth(self.config.auth_token, request.headers.get("authorization"))
        body = await _read(request, self.config.max_body_bytes, required=True)
        return _response(await self.handle(body, request.headers.get("content-type", "application/json")))

    @model_api.post("/stream", summary="stream a sequence model's readings: state kept per entity")
    async def stream_http(self, request: Request):
        handling.check_auth(self.config.auth_token, request.headers.get("authorization"))
        body = await _read(request, self.config.max_body_bytes, required=True)
        ctype = request.headers.get("content-type", "application/json")
        return _response(await self.stream_route(body, ctype, request.query_params))

    @model_api.get("/", summary="this model: version, threshold, features")
    async def describe(self, request: Request):
        handling.check_auth(self.config.auth_token, request.headers.get("authorization"))
        return handling.finite(self.info())


ModelServer = serve.ingress(model_api)(ModelReplica)


async def stream_answer(streams, name: str, info: dict, body: bytes, content_type: str, params,
                        max_rows: int) -> handling.Answer:
    """``POST …/stream`` for the model ``info`` describes, its entities' calls sent through ``streams``
    (the model's StreamReplica handle; None: streaming is off for it) with its checkpoint."""
    if streams is None:
        return handling.error_answer(404, f"model {name} has no /stream route (deployed with streaming: false)")

    async def send(entity, call):
        call.checkpoint = info.get("checkpoint")
        return await send_keyed(streams, name, entity, call)

    return await streaming.answer_request(body, content_type, params, info, max_rows, send)


class StreamReplica:
    """The state of a sequence model's streams: each entity's recent rows, on the replica its readings
    reach by consistent hashing (the deployment's request router, keyed by the entity). Not an ingress:
    the model's replicas (or the gateway) call ``stream`` with the checkpoint they score with, loaded
    here on first use; a new checkpoint keeps the entities' rows when it reads windows the same way."""

    def __init__(self, name: str, config: dict):
        from ray.serve import metrics

        self.name = name
        self.config = ServeConfig.model_validate(config)
        self.state = None
        self.checkpoint = None
        self.loading = asyncio.Lock()
        self.active = 0  # calls in _score(): waiting for, or in, a model call
        self.metrics = handling.ModelMetrics(metrics, name)
        self.stream_metrics = handling.StreamMetrics(metrics, name)

    async def _state(self, checkpoint: str):
        """The entities' state, scoring with ``checkpoint`` (loaded on first use, or on a swap)."""
        async with self.loading:
            if checkpoint != self.checkpoint:
                from ..models import Scorer

                # on CPU: a reading's window is one small model call, cheaper there than a GPU round trip
                scorer = await asyncio.to_thread(Scorer, checkpoint, device="cpu", top_k=self.config.top_k,
                                                 stream=False)
                if self.state is None or not self.state.adopt(scorer):
                    if self.state is not None:
                        log.info("model %s: %s entities warm up again (%s reads windows differently)",
                                 self.name, self.state.entities, scorer.version)
                    self.state = streaming.StreamState(scorer, self.config.stream_entities, self.config.stream_idle_s)
                self.checkpoint = checkpoint
            return self.state

    async def stream(self, call: streaming.StreamCall) -> streaming.StreamResult:
        """One entity's readings, scored against (and kept in) its rows here."""
        if call.checkpoint is None:
            return streaming.StreamResult(error=(503, f"model {self.name} is still loading"))
        try:
            state = await self._state(call.checkpoint)
        except ValueError as e:  # a bundle that cannot stream (a row model, no time column)
            return streaming.StreamResult(error=(400, str(e)))
        result = await self._score(state, call)
        self.stream_metrics.observe(state.scorer, result)
        scores = streaming.scores(result)
        if scores.size:
            self.metrics.scored(state.scorer, scores)
        return result


    async def _score(self, state, call: streaming.StreamCall) -> streaming.StreamResult:
        """A call of readings with the calls that arrive together (Serve's batching, no wait: one model
        call for all their windows), or alone when no other is being scored here, or with history."""
        if call.history is None and call.readings is not None and call.readings.num_rows <= STREAM_BATCH:
            self.active += 1
            try:
                await asyncio.sleep(0)
                if self.active > 1:
                    return await self._batch((state, call))
            finally:
                self.active -= 1
        return streaming.score_call(state, call, self.name)

    @serve.batch(max_batch_size=STREAM_BATCH, batch_wait_timeout_s=0)
    async def _batch(self, items: list[tuple]) -> list[streaming.StreamResult]:
        return streaming.score_calls(items, self.name)


async def send_keyed(handle, name: str, entity, call, tries: int = 5) -> streaming.StreamResult:
    """``handle.stream(call)`` routed by ``entity`` (consistent hashing); a replica gone is retried."""
    from ray.exceptions import RayTaskError

    keyed = handle.options(session_id=streaming.session_key(entity))
    for attempt in range(tries):
        try:
            return await asyncio.wait_for(keyed.stream.remote(call), STREAM_CALL_S)
        except RayTaskError as e:  # the replica raised: ours, not a replica gone (score_call answers bad input)
            log.error("model %s: streaming entity %r failed", name, entity, exc_info=e)
            return streaming.StreamResult(error=(500, f"internal error streaming with model {name}"))
        except Exception as e:  # noqa: BLE001 - Ray's errors for a replica gone
            last = e
            await asyncio.sleep(0.05 * 2**attempt)
    log.warning("model %s: no replica took entity %r (%s: %s)", name, entity, type(last).__name__, last)
    return streaming.StreamResult(error=(503, f"model {name} is unavailable right now ({type(last).__name__}); retry"))


# --------------------------------------------------------------------------- the gateway

app = FastAPI(
    title="unusual",
    version=API_VERSION,
    description="Anomaly scoring with AE, VAE and LSTM detectors. JSON rows online, Arrow IPC or "
    "Parquet bodies in bulk, batch jobs on the cluster. Every response names the model version.",
    exception_handlers={RequestError: _error},
)


@serve.ingress(app)
class Gateway:
    """Listing, readiness, the default route, jobs: everything but a named model's scoring route,
    which its own application answers (one hop). ``models`` maps each model name to its
    ModelServer: a bound deployment of this application (Serve hands in its handle), or the
    ``(application, deployment)`` of a model deployed as an application of its own (looked up)."""

    def __init__(self, config: dict, models: dict, streams: dict | None = None):
        self.config = ServeConfig.model_validate(config)
        self.models = models  # model name -> DeploymentHandle, or (app, deployment); any name, even "config"
        self.streams = streams or {}  # model name -> its StreamReplica handle (build_app's one application)
        self.jobs = None
        self.described: dict = {}  # model -> (when, what it said of itself): /stream's entity and time columns

    def _handle(self, name: str):
        target = self.models[name]
        if isinstance(target, (tuple, list)):
            target = self.models[name] = serve.get_deployment_handle(target[1], app_name=target[0])
        return target

    def _authorize(self, request) -> None:
        handling.check_auth(self.config.auth_token, request.headers.get("authorization"))

    async def _score(self, name: str, request):
        self._authorize(request)
        handling.check_model(name, self.models)
        body = await _read(request, self.config.max_body_bytes, required=True)
        return _response(await self._forward(name, body, request.headers.get("content-type", "application/json")))

    async def _forward(self, name: str, body: bytes, ctype: str, tries: int = 5) -> handling.Answer:
        """The model's answer to a request. ``handle`` answers every request, bad ones included, so a
        call that raises met a replica that stopped (a swap rolling the replicas, a scale-down) or died:
        scoring has no side effects, so it is sent again, then a 503 (never a 500)."""

        for attempt in range(tries):
            try:
                return await self._handle(name).handle.remote(body, ctype)
            except Exception as e:  # noqa: BLE001 - Ray's errors for a replica gone
                last = e
                await asyncio.sleep(0.05 * 2**attempt)
        log.warning("model %s: no replica answered (%s: %s)", name, type(last).__name__, last)
        return handling.error_answer(503, f"model {name} is unavailable right now ({type(last).__name__}); retry")

    async def _info(self, name: str, timeout: float = 2.0) -> dict:
        """What the model's replica says of itself; not ready while it has no replica answering."""

        try:
            return await asyncio.wait_for(self._handle(name).info.remote(), timeout)
        except Exception as e:  # noqa: BLE001 - not deployed yet, starting, or restarting
            log.debug("model %s: no answer (%s: %s)", name, type(e).__name__, e)
            return {"name": name, "ready": False}

    async def _infos(self) -> list[dict]:

        return list(await asyncio.gather(*(self._info(name) for name in self.models)))

    @app.get("/healthz", summary="liveness")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: every model loaded")
    async def readyz(self):
        infos = await self._infos()
        waiting = [i["name"] for i in infos if not i.get("ready")]
        if waiting:
            raise RequestError(503, f"models still loading: {waiting}")
        return {"status": "ready", "models": [i["name"] for i in infos]}

    @app.get(f"/{API_VERSION}/models", summary="the served models and their versions")
    async def models(self, request: Request):
        self._authorize(request)
        return {"default": self.config.default_model, "models": handling.finite(await self._infos())}

    @app.post(f"/{API_VERSION}/score", summary="score rows with the default model", openapi_extra=_JSON_BODY)
    async def score_default(self, request: Request):
        name = handling.default_model(self.config.default_model, self.models, API_VERSION)
        return await self._score(name, request)

    @app.post(f"/{API_VERSION}/models/{{name}}/score", summary="score rows with one model", openapi_extra=_JSON_BODY)
    async def score_model(self, name: str, request: Request):
        return await self._score(name, request)

    @app.post(f"/{API_VERSION}/models/{{name}}/stream", summary="stream a sequence model's readings")
    async def stream_model(self, name: str, request: Request):
        self._authorize(request)
        handling.check_model(name, self.models)
        body = await _read(request, self.config.max_body_bytes, required=True)
        info = self.described.get(name)
        if info is None or time.monotonic() - info[0] > INFO_TTL_S or not info[1].get("ready"):
            info = self.described[name] = (time.monotonic(), await self._info(name))
        ctype = request.headers.get("content-type", "application/json")
        return _response(await stream_answer(self.streams.get(name), name, info[1], body, ctype,
                                             request.query_params, self.config.max_rows))

    @app.post(f"/{API_VERSION}/jobs", summary="submit a batch scoring job for a data URI")
    async def submit_job(self, request: Request):
        self._authorize(request)
        handling.check_jobs_allowed(self.config.auth_token, self.config.jobs_uri_prefixes)
        body = await _read(request, self.config.max_body_bytes)
        name, fields = handling.job_request(body, self.models, self.config.default_model)
        info = await self._info(name)
        cmd = handling.score_command(handling.score_job(info, fields, self.config.jobs_uri_prefixes))
        try:
            job_id = self._job_client().submit_job(entrypoint=shlex.join(cmd))
        except Exception as e:  # noqa: BLE001 - the cluster's job API is unreachable
            raise RequestError(503, f"cannot submit jobs to this cluster: {type(e).__name__}: {e}") from None
        return {"job_id": job_id, "model": name, "model_version": info["model_version"], "entrypoint": cmd}

    @app.get(f"/{API_VERSION}/jobs/{{job_id}}", summary="the status of a submitted scoring job")
    async def job_status(self, job_id: str, request: Request):
        self._authorize(request)
        try:
            info = self._job_client().get_job_info(job_id)
        except RuntimeError as e:
            raise RequestError(404, f"no job {job_id!r}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise RequestError(503, f"cannot reach this cluster's job API: {type(e).__name__}: {e}") from None
        return {"job_id": job_id, "status": str(info.status), "message": info.message}

    def _job_client(self):
        from ray.job_submission import JobSubmissionClient

        if self.jobs is None:
            # "auto": the dashboard of the cluster this replica runs in, found through the GCS
            address = self.config.jobs_address or os.environ.get("RAY_DASHBOARD_ADDRESS") or "auto"
            self.jobs = JobSubmissionClient(address)
        return self.jobs
