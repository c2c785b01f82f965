"""The streaming route of a sequence model, ``POST /v1/models/<name>/stream``, without Serve: parse a body
of readings, split it per entity, send each entity's readings to the replica that holds its state, and
merge the answers (the deployments bind it to Serve: :mod:`.deployments`).

A body is JSON ``{"rows": [reading, ...], "history": [row, ...], "late": "refuse" | "score"}`` (``rows``
or ``history`` or both; each reading an object with the entity, time and feature columns), or an Arrow
IPC / Parquet table of readings (``?history=true``: of history rows; ``?late=score``). ``history`` rows
are kept without being scored (:meth:`~.stream.StreamState.warm`: a client ends an entity's warm-up at
once), then ``rows`` are scored, each against its entity's rows, in time order per entity.

Affinity: the entry replica (whichever HAProxy or the gateway picked) calls the deployment's ``stream``
method once per entity with ``session_id`` = the entity, through a handle whose deployment routes by
consistent hashing on it (:data:`ROUTER`): every reading of an entity reaches the one replica that
holds its rows, and a change of the replica set moves about 1/n of the entities.

The answer has one row per reading, in the order sent (:class:`~.stream.StreamRow`: ``status`` scored /
warming / late, ``score``, ``is_anomaly``, ``top_features``, ``have`` / ``need``). Its HTTP status is 200,
409 when a late reading was refused (the first one named in ``error``: entity and both times), or the
status of an entity refused as a whole (422 naming the field or row, 503 when its replica could not be
reached); readings of the other entities are answered (and kept) all the same, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc

from .. import rayprivate
from .codec import RequestError, body_to_table, is_json, json_doc, media_type, rows_table, table_to_body
from .handling import Answer, answer, error_answer, rejection, version_headers
from .stream import LATE, StreamAnswer, StreamRow, StreamState

log = logging.getLogger("unusual.serve")

# Serve's consistent-hash request router (Ray >= 2.60), keyed by a handle call's ``session_id``; no
# fallback replica (a full replica makes its entities' calls wait, never moves them elsewhere).
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
ROUTER_KWARGS = {"num_fallback_replicas": 0}
TRUE = ("1", "true", "yes", "on")
# Entities of one request in flight at once: more filled a replica's max_ongoing_requests and the router
# backed the rest off (300 entities at once took over 60 s; a few at a time, about a second).
FANOUT = 16


@dataclass
class StreamCall:
    """Readings (scored) and history rows (kept only) of one request, or of one entity of it: what
    crosses the handle hop to the replica that holds the entity."""

    readings: pa.Table | None
    history: pa.Table | None = None
    late: str = "refuse"
    fmt: str = "json"
    checkpoint: str | None = None  # the bundle the entry replica scores with (the state replica loads it)

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in (self.readings, self.history) if t is not None)

    # Across the handle hop the tables travel as Arrow IPC bytes: Ray pickles a small table column by
    # column, which took over half of the entry replica's time at one reading per request (py-spy).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "readings": _ipc(self.readings), "history": _ipc(self.history)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, readings=_table(state["readings"]), history=_table(state["history"]))


def _ipc(table: pa.Table | None) -> bytes | None:
    if table is None:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _table(data: bytes | None) -> pa.Table | None:
    return None if data is None else pa.ipc.open_stream(pa.BufferReader(data)).read_all()


@dataclass
class StreamResult:
    """A replica's answer to one :class:`StreamCall`: the readings' rows, or the call's refusal."""

    answer: StreamAnswer | None = None
    kept: int = 0  # history rows kept
    late_history: int = 0  # history rows refused as late
    error: tuple[int, str] | None = None
    entities: int = 0
    evictions: int = 0


# --------------------------------------------------------------------------- the entry replica


def parse(body: bytes, content_type: str, params: Mapping[str, str], max_rows: int) -> StreamCall:
    """A request's body (and query) -> its :class:`StreamCall`, or a RequestError naming what is wrong."""
    late = params.get("late", "refuse")
    if is_json(content_type):
        doc = json_doc(body)
        if not any(k in doc for k in ("rows", "history")):
            raise RequestError(422, 'the body must be a JSON object with "rows" (readings to score) and/or '
                                    '"history" (rows to keep): {"rows": [{...}, ...]}')
        late = doc.get("late", late)
        call = StreamCall(rows_table(doc, "rows") if "rows" in doc else None,
                          rows_table(doc, "history") if "history" in doc else None, late)
    else:
        table, fmt = body_to_table(body, content_type)
        history = params.get("history", "").strip().lower() in TRUE
        call = StreamCall(None if history else table, table if history else None, late, fmt)
    if call.late not in LATE:
        raise RequestError(422, f"late must be one of {list(LATE)}; got {call.late!r}")
    if call.rows > max_rows:
        raise RequestError(413, f"{call.rows:,} rows is over the limit of {max_rows:,}")
    if call.rows == 0:
        raise RequestError(422, "no readings: send at least one row")
    return call


def _keys(table: pa.Table | None, entity: str | None, what: str) -> list:
    if table is None or table.num_rows == 0:
        return []
    if entity is None:  # a model of one series: one entity
        return [None] * table.num_rows
    if entity not in table.column_names:
        raise RequestError(422, f"{what} need the entity column {entity!r}")
    keys = table.column(entity).to_pylist()
    missing = [i for i, k in enumerate(keys) if k is None]
    if missing:
        raise RequestError(422, f"{what} {missing[:5]} have no {entity!r} (the entity column)")
    return keys


def _groups(keys: list) -> dict:
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def split(call: StreamCall, entity: str | None) -> list[tuple[object, StreamCall, list[int]]]:
    """One call per entity: ``(entity, its call, the request's reading numbers in it)``, in order of
    first appearance. A reading or history row with no entity refuses the request (422)."""
    rows, kept = _groups(_keys(call.readings, entity, "rows")), _groups(_keys(call.history, entity, "history"))
    if len(set(rows) | set(kept)) <= 1:  # one entity: the call as it is
        key = next(iter(rows or kept))
        return [(key, call, rows.get(key, []))]
    out = []
    for key in dict.fromkeys([*rows, *kept]):
        r, h = rows.get(key), kept.get(key)
        readings, history = call.readings.take(r) if r else None, call.history.take(h) if h else None
        part = StreamCall(readings, history, call.late, call.fmt)
        out.append((key, part, r or []))
    return out


def session_key(entity) -> str:
    """The routing key of an entity (a handle call's ``session_id``)."""
    return f"{type(entity).__name__}:{entity}"


async def answer_request(body: bytes, content_type: str, params: Mapping[str, str], info: dict, max_rows: int,
                         send: Callable[[object, StreamCall], Awaitable[StreamResult]]) -> Answer:
    """A streaming request's answer, for the model ``info`` describes (:func:`.handling.model_info`)."""
    name = info["name"]
    if not info.get("ready"):
        return error_answer(503, f"model {name} is still loading")
    if not info.get("time_column"):
        return error_answer(400, f"model {name} ({info.get('kind')}) scores rows on their own, not streams of "
                                 f"readings: POST them to /v1/models/{name}/score")
    try:
        call = parse(body, content_type, params, max_rows)
        return await route(call, info.get("entity_column"), info["time_column"], name, send)
    except RequestError as e:
        return error_answer(e.status, e.message)


async def route(call: StreamCall, entity: str | None, time_column: str | None, name: str,
                send: Callable[[object, StreamCall], Awaitable[StreamResult]]) -> Answer:
    """Send each entity's part of ``call`` to its replica (``send(entity, part)``, concurrently) and
    merge the answers into the request's."""
    t0 = time.perf_counter()
    parts = split(call, entity)
    gate, alone = asyncio.Semaphore(FANOUT), asyncio.Lock()

    async def one(key, part):  # a task of its own: its handle call gets a request id of its own
        async with gate:
            if len(parts) == 1 or rayprivate.new_request_id():
                return await send(key, part)
            async with alone:  # a Ray whose request context moved: calls sharing an id go one at a time
                return await send(key, part)

    results = await asyncio.gather(*(one(key, part) for key, part, _ in parts))
    rows: list[StreamRow | None] = [None] * (call.readings.num_rows if call.readings is not None else 0)
    errors, version, threshold, kept, late_history = [], None, None, 0, 0
    for (key, _, index), result in zip(parts, results):
        if result.error is not None:
            status, message = result.error
            errors.append((status, f"entity {key!r}: {message}"))
            times = _times(call.readings, time_column, index)
            for i, t in zip(index, times):
                rows[i] = StreamRow(key, t, "refused", message=message)
            continue
        version, threshold = result.answer.model_version, result.answer.threshold
        kept, late_history = kept + result.kept, late_history + result.late_history
        for i, row in zip(index, result.answer.rows):
            rows[i] = row
    return _answer(rows, errors, version, threshold, kept, late_history, call.fmt, name, t0)


def _times(readings: pa.Table | None, column: str | None, index: list[int]) -> list:
    """The times of the readings ``index`` (None where the readings have no such column)."""
    if readings is None or column not in readings.column_names:
        return [None] * len(index)
    return readings.column(column).take(index).to_pylist()


def _answer(rows: list[StreamRow], errors: list, version, threshold, kept: int, late_history: int, fmt: str,
            name: str, t0: float) -> Answer:
    late = next((r.message for r in rows if r.status == "late" and r.score is None), None)
    status, error = (errors[0][0], "; ".join(m for _, m in errors)) if errors else (409, late) if late else (200, None)
    merged = StreamAnswer(rows, version or "", threshold if threshold is not None else float("nan"))
    headers = version_headers(version, threshold) if version is not None else {}
    if fmt != "json":
        if version is None:
            return error_answer(status, error)
        table = merged.to_table()
        return Answer(status, table_to_body(table, fmt), media_type(fmt), {**headers, **_error_header(error)})
    payload = {"model": name, **merged.to_json(), "history": {"kept": kept, "late": late_history},
               "seconds": round(time.perf_counter() - t0, 6)}
    if error:
        payload["error"] = error
    return answer(status, payload, headers)


def _error_header(error: str | None) -> dict:
    return {"X-Stream-Error": error.encode("ascii", "replace").decode()[:1000]} if error else {}


# --------------------------------------------------------------------------- the replica holding the state


def score_call(state: StreamState, call: StreamCall, name: str) -> StreamResult:
    """One entity's (or request's) call on the replica that holds its rows: history kept, then readings
    scored. A call refused (a field or value at fault) keeps nothing."""
    before = state.evictions
    try:
        if call.history is not None and call.readings is not None:
            state.check(call.readings)  # refuse the readings before the history is kept
        warmed = state.warm(call.history) if call.history is not None else None
        scored = state.score(call.readings, late=call.late) if call.readings is not None else None
    except Exception as e:  # noqa: BLE001 - classified by rejection()
        return StreamResult(error=rejection(name, e), entities=state.entities, evictions=state.evictions - before)
    scorer = state.scorer
    scored = scored or StreamAnswer([], scorer.version, scorer.threshold)
    kept = warmed.count("kept") if warmed else 0
    late = warmed.count("late") if warmed else 0
    return StreamResult(scored, kept, late, entities=state.entities, evictions=state.evictions - before)


def score_calls(items: list[tuple[StreamState, StreamCall]], name: str) -> list[StreamResult]:
    """Calls of readings that arrived together (Serve's batching), scored as one call per state: one model
    call for all their windows. Should the merged call be refused (a bad value in one of them), each is
    scored alone, so that only the one at fault is refused."""
    out: list = [None] * len(items)
    for state in {id(st): st for st, _ in items}.values():
        mine = [i for i, (st, _) in enumerate(items) if st is state]
        for late in {items[i][1].late for i in mine}:
            group = [i for i in mine if items[i][1].late == late]
            for i, result in zip(group, _merged(state, [items[i][1] for i in group], late, name)):
                out[i] = result
    return out


def _merged(state: StreamState, calls: list[StreamCall], late: str, name: str) -> list[StreamResult]:
    if len(calls) > 1:
        before = state.evictions
        try:
            merged = pa.concat_tables([c.readings for c in calls], promote_options="permissive")
            answer = state.score(merged, late=late)
        except Exception:  # noqa: BLE001 - refused as a whole: nothing changed; each alone says why
            pass
        else:
            results, at = [], 0
            for c in calls:
                n = c.readings.num_rows
                part = StreamAnswer(answer.rows[at : at + n], answer.model_version, answer.threshold)
                results.append(StreamResult(part, entities=state.entities))
                at += n
            results[0].evictions = state.evictions - before
            return results
    return [score_call(state, c, name) for c in calls]


def scores(result: StreamResult) -> np.ndarray:
    """The scores a result answered (for the model's metrics)."""
    if result.answer is None:
        return np.zeros(0)
    return np.array([r.score for r in result.answer.rows if r.score is not None], float)
