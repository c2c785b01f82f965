"""Request handling without a framework: plain functions the deployments call, testable without Serve.

- the gateway's checks: the bearer token, the model a route names, the body's size;
- a model replica's path from a request body to its answer: parse (:mod:`.codec`), score through the
  :class:`~unusual.models.Scorer` (one call, or Serve's batching for row-wise families), encode; and
  the fast path of small JSON bodies of numbers (:func:`fast_json`: no Arrow table on the way);
- answers: :class:`Answer` (status, body, media type, headers), JSON without NaN / inf;
- the Prometheus metrics of a model (defined on the ``ray.serve.metrics`` module handed in);
- ``POST /v1/jobs``: the request's fields validated as a :class:`~unusual.config.ScoreJob` and the
  ``python -m unusual.ray_jobs.score`` command built from it (serving never imports the jobs).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..config import ConfigError, ScoreJob
from ..models.errors import UnusualError
from .codec import NESTED, RequestError, body_to_table, is_json, media_type, numeric_rows, scored_rows, table_to_body

log = logging.getLogger("unusual.serve")

UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer <token>)"
SCORE_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 1e4]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 64, 256, 1024, 8192]
SCORE_SAMPLE = 16  # scores observed per request: each observe costs microseconds; a sample bounds the cost

# --------------------------------------------------------------------------- answers


def finite(obj):
    """JSON cannot carry NaN / inf: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Answer:
    """An HTTP answer of a model replica (what its route sends, and what the gateway's ``handle`` call
    gets back from it): the status, the body, its media type and the headers."""

    status: int
    body: bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def answer(status: int, payload: dict, headers: dict | None = None) -> Answer:
    """An HTTP answer with a JSON body."""
    try:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN / inf somewhere (a contribution, a threshold): null there
        body = json.dumps(finite(payload), separators=(",", ":")).encode()
    return Answer(status, body, "application/json", headers or {})


def version_headers(version: str, threshold: float) -> dict[str, str]:
    """Every scored answer's headers: the model version that scored it and its threshold."""
    return {"X-Model-Version": version, "X-Threshold": repr(float(threshold))}


def error_answer(status: int, message: str) -> Answer:
    return answer(status, {"error": message})


# --------------------------------------------------------------------------- the gateway's checks


DIGEST = "sha256:"


def _sha256(text: str) -> str:
    return DIGEST + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def token_digest(token: str) -> str:
    """``sha256:<hex>`` of a configured bearer token (a digest stays as it is): what the replicas are
    given, so the token itself is in no deployment's arguments (the Ray dashboard shows them), and what
    a Serve config file may hold instead of the token."""
    return token if token.startswith(DIGEST) else _sha256(token)


def check_auth(token: str | None, authorization: str | None) -> None:
    """401 unless no token is configured or ``authorization`` is ``Bearer <token>``. ``token`` is the
    token or its :func:`token_digest`; the presented token is always hashed (a digest presented as the
    token does not pass) and the digests are compared in constant time."""
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    presented = _sha256(given) if scheme == "Bearer" and given else ""
    if not hmac.compare_digest(presented.encode(), token_digest(token).encode()):
        raise RequestError(401, UNAUTHORIZED)


JOBS_NEED = (
    "POST /v1/jobs is off: a job reads and writes storage with the cluster's credentials, so it needs a "
    "token (--token) and the URI prefixes jobs may use (--jobs-uri-prefixes)"
)


def check_jobs_allowed(token: str | None, prefixes: Collection[str]) -> None:
    """403 unless jobs are on: a token and at least one allowed URI prefix are configured."""
    if not token or not prefixes:
        raise RequestError(403, JOBS_NEED)


def check_uri(field: str, uri: str, prefixes: Collection[str]) -> None:
    """403 unless ``uri`` is one of ``prefixes`` or lies under one (a prefix is a folder: ``s3://b/x``
    does not admit ``s3://b/x-other``; no ``..`` step out of it)."""
    parts = uri.replace("\\", "/").split("/")
    inside = any(uri == p.rstrip("/") or uri.startswith(p.rstrip("/") + "/") for p in prefixes)
    if ".." in parts or not inside:
        raise RequestError(403, f"field {field!r}: {uri!r} is outside the allowed URI prefixes {sorted(prefixes)}")


def check_model(name: str, names: Collection[str]) -> None:
    if name not in names:
        raise RequestError(404, f"no model named {name!r}; models: {sorted(names)}")


def default_model(name: str | None, names: Collection[str], api: str) -> str:
    """The model of ``POST /{api}/score``; 400 when several are served and none is the default."""
    if name is None:
        raise RequestError(400, f"several models are served ({sorted(names)}); use /{api}/models/{{name}}/score")
    return name


async def read_body(
    chunks: AsyncIterable[bytes], content_length: str | None, limit: int, *, required: bool = False
) -> bytes:
    """The request body, refused (413) as soon as it is known to be over ``limit`` bytes: by its
    Content-Length, else while it streams in. ``required``: an empty body is a 422."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise RequestError(413, f"the body ({int(content_length):,} bytes) is over the limit of {limit:,} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
        parts.append(chunk)
    body = b"".join(parts)
    if required and not body:
        raise RequestError(422, 'empty body: send {"rows": [...]} or an Arrow / Parquet table')
    return body


# --------------------------------------------------------------------------- a model replica


class ModelMetrics:
    """A model's Prometheus metrics, tagged with the model and the version that scored.

    ``metrics`` is ``ray.serve.metrics`` (or anything with its Counter / Histogram)."""

    def __init__(self, metrics, name: str):
        self.name = name
        keys = ("model", "model_version")
        self.rows = metrics.Counter("unusual_rows_scored", "rows scored", tag_keys=keys)
        self.anomalies = metrics.Counter("unusual_anomalies", "rows flagged anomalous", tag_keys=keys)
        self.rejected = metrics.Counter("unusual_rejected_requests", "requests rejected for bad input", tag_keys=keys)
        self.scores = metrics.Histogram(
            "unusual_anomaly_score", "anomaly scores (for quantiles)", boundaries=SCORE_BUCKETS, tag_keys=keys
        )
        self.batch_rows = metrics.Histogram(
            "unusual_batch_rows", "rows per model call", boundaries=BATCH_BUCKETS, tag_keys=keys
        )

    def tags(self, scorer) -> dict:
        return {"model": self.name, "model_version": scorer.version}

    def batch(self, scorer, rows: int) -> None:
        self.batch_rows.observe(rows, tags=self.tags(scorer))

    def scored(self, scorer, scores: np.ndarray) -> None:
        tags = self.tags(scorer)
        self.rows.inc(len(scores), tags=tags)
        flagged = int(np.count_nonzero(scores > scorer.threshold))
        if flagged:
            self.anomalies.inc(flagged, tags=tags)
        for v in scores[:SCORE_SAMPLE].tolist():
            self.scores.observe(v, tags=tags)


class StreamMetrics:
    """A sequence model's streaming gauges: the entities this replica holds, and those it evicted (past
    ``stream_entities``, or idle past ``stream_idle_s``)."""

    def __init__(self, metrics, name: str):
        self.name = name
        keys = ("model", "model_version")
        self.entities = metrics.Gauge("unusual_stream_entities", "entities whose recent rows this replica holds",
                                      tag_keys=keys)
        self.evictions = metrics.Counter("unusual_stream_evictions", "entities dropped: least recently sent past "
                                         "the limit, or idle", tag_keys=keys)

    def observe(self, scorer, result) -> None:
        tags = {"model": self.name, "model_version": scorer.version}
        self.entities.set(result.entities, tags=tags)
        if result.evictions:
            self.evictions.inc(result.evictions, tags=tags)


THREAD_ROWS = 4096  # a request of this many rows is scored in a thread: the replica keeps answering others


def batch_rows(items: list[tuple]) -> int:
    """The rows of a batch of ``(scorer, X)`` items (Serve's ``batch_size_fn``)."""
    return sum(len(x) for _, x in items)


def score_batch(items: list[tuple], metrics: ModelMetrics) -> list[tuple[np.ndarray, np.ndarray]]:
    """Requests that arrived together (``(scorer, model input)`` each), scored in one model call per
    scorer (a swap may leave two in one batch): each request's ``(scores, terms)``."""
    out: list = [None] * len(items)
    for scorer in {id(s): s for s, _ in items}.values():
        mine = [i for i, (s, _) in enumerate(items) if s is scorer]
        xs = [items[i][1] for i in mine]
        X = np.concatenate(xs) if len(xs) > 1 else xs[0]
        metrics.batch(scorer, len(X))
        scores, terms = scorer.score_matrix(X)
        at = 0
        for i, x in zip(mine, xs):
            out[i] = (scores[at : at + len(x)], terms[at : at + len(x)])
            at += len(x)
    return out


def rejection(name: str, e: Exception) -> tuple[int, str]:
    """(status, message) of a scoring call that raised: the client's fault (422, the message names
    the column or row) or ours (500, logged)."""
    if isinstance(e, (UnusualError, ValueError, TypeError, KeyError, pa.ArrowException)):
        return 422, str(e)
    log.error("model %s failed on a request", name, exc_info=e)
    return 500, f"internal error scoring with model {name}: {type(e).__name__}"


async def score_table(
    name: str, scorer, table: pa.Table, batched: Callable[..., Awaitable], metrics: ModelMetrics
) -> dict:
    """One request's rows scored: ``{"table", "model_version", "threshold"}`` or ``{"error": (status, msg)}``.

    A tabular model's rows go through ``batched(scorer, X) -> (scores, terms)`` (the replica's Serve
    batching: requests that arrive together share a model call); a sequence model's request carries
    whole windows of its entities and is scored alone. A request of :data:`THREAD_ROWS` rows or more is
    scored in a thread, so it does not stall the requests behind it."""
    if scorer is None:
        return {"error": (503, f"model {name} is still loading")}
    if table.num_rows == 0:
        return {"error": (422, "no rows to score")}
    try:
        if table.num_rows >= THREAD_ROWS:
            out = await asyncio.to_thread(scorer.score_table, table)
        elif scorer.sequence:
            out = scorer.score_table(table)
        else:
            out = scorer.output(*await batched(scorer, scorer.transform(table)))
    except Exception as e:  # noqa: BLE001 - classified by rejection()
        metrics.rejected.inc(tags=metrics.tags(scorer))
        return {"error": rejection(name, e)}
    metrics.scored(scorer, out.column("anomaly_score").to_numpy())
    return {"table": out, "model_version": scorer.version, "threshold": scorer.threshold}


async def fast_json(
    body: bytes, content_type: str, *, name: str, scorer, max_rows: int, batched: Callable[..., Awaitable],
    metrics: ModelMetrics,
) -> Answer | None:
    """A JSON body of numbers for a tabular model of numeric features, straight to its answer: parsed
    into the model input in the bundle's column order (:func:`.codec.numeric_rows`), scored, answered
    from the arrays, with no Arrow table on the way. None for any other request: :func:`score_request`
    answers it (errors included), and gives the same answer to the bodies both take."""
    if scorer is None or not scorer.numeric or not is_json(content_type):
        return None
    t0 = time.perf_counter()
    raw = numeric_rows(body, scorer.schema.names, max_rows)
    if raw is None:
        return None
    try:
        scores, terms = await batched(scorer, scorer.schema.numeric_matrix(raw))
        rows = scorer.rows(scores, terms)
    except Exception:  # noqa: BLE001 - the general path scores it again and answers why
        return None
    metrics.scored(scorer, scores)
    payload = {"model": name, "model_version": scorer.version, "threshold": scorer.threshold, "rows": rows,
               "seconds": round(time.perf_counter() - t0, 6)}
    return answer(200, payload, version_headers(scorer.version, scorer.threshold))


async def score_request(
    body: bytes, content_type: str, *, name: str, max_rows: int, score: Callable[[pa.Table], Awaitable[dict]]
) -> Answer:
    """A scoring request's raw body -> its answer: JSON rows in, JSON out; Arrow / Parquet in, the
    scored table out in the same format (version and threshold in the X-Model-Version and
    X-Threshold headers). ``score`` is :func:`score_table` bound to the replica's scorer."""
    t0 = time.perf_counter()
    try:
        table, fmt = body_to_table(body, content_type)
        if table.num_rows > max_rows:
            raise RequestError(413, f"{table.num_rows:,} rows is over the limit of {max_rows:,}")
    except RequestError as e:
        return error_answer(e.status, e.message)
    result = await score(table)
    if "error" in result:
        return error_answer(*result["error"])
    out, version, threshold = result["table"], result["model_version"], result["threshold"]
    headers = version_headers(version, threshold)
    if fmt == "json":
        payload = {
            "model": name,
            "model_version": version,
            "threshold": threshold,
            "rows": scored_rows(out),
            "seconds": round(time.perf_counter() - t0, 6),
        }
        return answer(200, payload, headers)
    return Answer(200, table_to_body(out, fmt), media_type(fmt), headers)


def model_info(name: str, scorer, checkpoint: str | None) -> dict:
    """What ``GET /v1/models`` says of a model (``ready: False`` until its bundle is loaded)."""
    if scorer is None:
        return {"name": name, "ready": False}
    return {
        "name": name,
        "ready": True,
        "model_version": scorer.version,
        "kind": scorer.bundle.kind,
        "threshold": scorer.threshold,
        "checkpoint": checkpoint,
        "features": [c.name for c in scorer.schema.columns],
        "entity_column": scorer.entity,
        "time_column": scorer.time,
        "window": getattr(scorer.bundle.model_config, "window", None),
        "score_lookahead": getattr(scorer.bundle.model_config, "score_lookahead", None),
    }


# --------------------------------------------------------------------------- POST /v1/jobs

SCORE_MODULE = "unusual.ray_jobs.score"
# The request's fields: the scoring job's own, except the bundle (the served model's) and the cluster.
JOB_FIELDS = ("model", *(n for n in ScoreJob.cli_fields() if n not in ("checkpoint", "address")))


class ScoreRequest(ScoreJob):
    """A ScoreJob whose validation errors name the request's JSON fields, not the CLI flags."""

    @classmethod
    def flags_of(cls, name: str) -> list[str]:
        return [f"field {name!r}"]


def job_request(body: bytes, names: Collection[str], default: str | None) -> tuple[str, dict]:
    """``{"model": name, "data": URI, "output": URI, ...}`` -> (the model's name, the scoring job's fields)."""
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, NESTED) from None
    if not isinstance(doc, dict):
        raise RequestError(422, 'send {"model": name, "data": URI, "output": URI, "keep_columns": [...]}')
    unknown = sorted(set(doc) - set(JOB_FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; known: {sorted(JOB_FIELDS)}")
    fields = dict(doc)
    name = fields.pop("model", None) or default
    if not isinstance(name, str) or name not in names:
        raise RequestError(422, f"field 'model': no model named {name!r}; models: {sorted(names)}")
    return name, fields


def score_job(info: dict, fields: dict, prefixes: Collection[str] = ()) -> ScoreJob:
    """The scoring job of a request's ``fields`` on the model described by ``info`` (:func:`model_info`);
    its ``data`` and ``output`` must lie under one of ``prefixes``."""
    if not info.get("ready"):
        raise RequestError(503, f"model {info['name']} is still loading")
    try:
        request = ScoreRequest.validated({**fields, "checkpoint": info["checkpoint"]})
    except ConfigError as e:
        raise RequestError(422, str(e)) from None
    for key in ("data", "output"):
        if not getattr(request, key).strip():
            raise RequestError(422, f"field {key!r}: a Parquet URI is needed; got ''")
        check_uri(key, getattr(request, key), prefixes)
    return request


def score_command(job: ScoreJob, python: str = sys.executable) -> list[str]:
    """``python -m unusual.ray_jobs.score`` with a flag for each field ``job`` was given."""
    cmd = [python, "-m", SCORE_MODULE]
    for name in ScoreJob.cli_fields():
        value = getattr(job, name)
        if name not in job.model_fields_set or value is None:
            continue
        flag = ScoreJob.flags_of(name)[0]
        if isinstance(value, bool):
            cmd.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            if value:
                cmd += [flag, ",".join(str(v) for v in value)]
        else:
            cmd += [flag, str(value)]
    return cmd
