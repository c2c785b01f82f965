"""Streaming scoring of a sequence model: a replica keeps each entity's recent rows and scores each new
reading at once, causally.

The batch path scores a row with the window of the ``context`` rows of its series that end at it
(:mod:`unusual.models.windows`; ``context`` is the family's ``context_length``: the LSTM's ``window``
rows plus the row itself when it forecasts, ``window`` rows when it reconstructs). A stream holds, per
entity, the last ``context - 1`` rows it was sent (encoded with the bundle's feature schema, in a ring),
so that a reading's window is those rows plus the reading itself: its score is the one the batch
:class:`~unusual.models.Scorer` gives the same row of the same series with no look-ahead
(``score_lookahead=0``): the row's trailing score, which the threshold was fit on, known when the row
arrives. A bundle with a look-ahead averages each row's score with the rows after it in batch; a
stream cannot wait for them and answers the trailing score, as the batch scorer does for the newest
row of a call.

An entity with fewer than ``context`` rows is *warming*: it has no score (the batch scorer would pad
its window with copies of the first row; a stream never answers a padded score). Readings are taken in
time order per entity; one at or before the entity's last time is *late*: refused, or with
``late="score"`` scored against the entity's rows without being kept. A reading with no entity or no
time refuses the whole call (:class:`StreamError`, a ``ValueError``: HTTP 422), as does a feature the
schema refuses; a refused call or reading changes nothing.

Memory is bounded: at most ``max_entities`` entities (the least recently sent one is evicted past
that), and an entity not sent for ``idle_seconds`` is dropped on the next call; either comes back
warming. Each entity's rows are one slot of a pool array ``(slots, context - 1, width)`` of float32,
so a call's windows are gathered in a few vectorised steps and scored in one model call.

Plain Python, no Ray: the Serve route (one entity on one replica, by consistent hashing) calls it.
Calls are serialised by a lock.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..models.errors import SchemaError
from ..models.tables import TOP_FEATURE_TYPE, to_table
from ..models.windows import segments, sort_order

LATE = ("refuse", "score")


class StreamError(SchemaError):
    """A call refused as a whole (a reading with no entity or time, a time that cannot be ordered):
    nothing was scored or kept. ``column`` names the field, ``rows`` the readings at fault."""


@dataclass(slots=True)
class StreamRow:
    """One reading's answer.

    ``status``: ``scored``; ``warming`` (the entity has ``have`` of the ``need`` rows a score needs; no
    score); ``late`` (at or before the entity's last time: not kept; scored only with ``late="score"``);
    ``kept`` (:meth:`StreamState.warm`: kept, not scored); ``repeat`` (the entity's last kept reading sent
    again, same time and values, as a retry sends it: its score again, top features not kept; nothing
    changes). ``have``: the rows of the reading's window, itself included, up to ``need`` (a refused late
    reading: the entity's rows). ``score``, ``is_anomaly``
    and ``top_features`` are the Scorer's (``anomaly_score > threshold``), None when not scored."""

    entity: Any
    time: Any
    status: str
    score: float | None = None
    is_anomaly: bool | None = None
    top_features: list[dict] | None = None
    have: int | None = None
    need: int | None = None
    message: str | None = None


@dataclass
class StreamAnswer:
    """The answers to one call's readings, in the order they were sent."""

    rows: list[StreamRow]
    model_version: str
    threshold: float

    def to_json(self) -> dict:
        """A JSON-ready dict (times and entities that are not JSON types as ISO strings / strings)."""
        return {"model_version": self.model_version, "threshold": self.threshold,
                "rows": [{**asdict(r), "entity": _plain(r.entity), "time": _plain(r.time)} for r in self.rows]}

    def to_table(self) -> pa.Table:
        """One row per reading; the version and threshold in the schema's metadata."""
        rows = self.rows
        table = pa.table({
            "entity": pa.array([r.entity for r in rows]),
            "time": pa.array([r.time for r in rows]),
            "status": pa.array([r.status for r in rows], pa.string()),
            "anomaly_score": pa.array([r.score for r in rows], pa.float64()),
            "is_anomaly": pa.array([r.is_anomaly for r in rows], pa.bool_()),
            "top_features": pa.array([r.top_features for r in rows], TOP_FEATURE_TYPE),
            "have": pa.array([r.have for r in rows], pa.int64()),
            "need": pa.array([r.need for r in rows], pa.int64()),
            "message": pa.array([r.message for r in rows], pa.string()),
        })
        meta = {"model_version": self.model_version, "threshold": repr(self.threshold)}
        return table.replace_schema_metadata(meta)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)


def _plain(v):
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return v.isoformat() if hasattr(v, "isoformat") else str(v)


@dataclass
class _Batch:
    """A call's readings grouped per entity in time order (``order``: input row of each sorted row)."""

    order: np.ndarray
    X: np.ndarray  # encoded features, sorted order
    starts: np.ndarray  # each entity's first sorted row, and the end
    keys: list
    times: list
    time_column: str


@dataclass
class _Plan:
    """What a call does, worked out before anything changes: per entity its live slot (-1: none) and
    stored rows; per reading whether it is kept, the rows its entity has before it, and for a late one
    the time it is not after."""

    slot: np.ndarray
    count: np.ndarray
    group: np.ndarray
    kept: np.ndarray
    before: np.ndarray
    prior: list
    scored: np.ndarray
    late: str
    score: np.ndarray | None = None  # each reading's score (NaN: none), once scored


class StreamState:
    """Per-entity recent rows of one sequence bundle, bounded, scoring each new reading causally."""

    def __init__(self, scorer, max_entities: int = 100_000, idle_seconds: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        if not scorer.sequence:
            raise ValueError(f"a {scorer.bundle.kind!r} model scores rows on their own: nothing to stream")
        if scorer.time is None:
            raise ValueError("streaming needs the model's time_column to order each entity's readings")
        if max_entities < 1 or not idle_seconds > 0:
            raise ValueError(f"max_entities must be >= 1 and idle_seconds > 0; got {max_entities}, {idle_seconds}")
        self.scorer = scorer
        self.max_entities = int(max_entities)
        self.idle_seconds = float(idle_seconds)
        self.clock = clock
        self.need = int(scorer.bundle.module.context_length)  # rows in a window, the scored one included
        self.keep = self.need - 1  # rows kept per entity
        self.width = scorer.schema.width
        self.evictions = 0  # entities dropped: past max_entities, or idle (``expired`` of them)
        self.expired = 0
        self._rows = np.zeros((0, self.keep, self.width), np.float32)  # slot -> ring of its last rows
        self._count = np.zeros(0, np.int64)  # slot -> rows its entity was sent (history index of the next)
        self._seen = np.zeros(0, np.float64)  # slot -> clock of its last kept reading
        self._score = np.zeros(0, np.float64)  # slot -> score of its last kept reading (NaN: not scored)
        self._last: list = []  # slot -> time of its last kept reading
        self._slots: OrderedDict = OrderedDict()  # entity -> slot, least recently sent first
        self._free: list[int] = []
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- public
    @property
    def entities(self) -> int:
        """Entities held (idle ones count until a call drops them)."""
        return len(self._slots)

    def score(self, readings, *, late: str = "refuse") -> StreamAnswer:
        """Score each reading (entity, time and feature columns; many entities, several readings each)
        against its entity's rows, and keep it. An entity's readings are taken in time order."""
        if late not in LATE:
            raise ValueError(f"late must be one of {LATE}; got {late!r}")
        with self._lock:
            return self._call(to_table(readings), late, scoring=True)

    def warm(self, history) -> StreamAnswer:
        """Keep rows of each entity's recent history without scoring them (no model call): the readings
        after it are scored at once. Late rows are refused, as in :meth:`score`."""
        with self._lock:
            return self._call(to_table(history), "refuse", scoring=False)

    def check(self, readings) -> None:
        """Refuse ``readings`` as :meth:`score` would for a field or value at fault (a StreamError or
        SchemaError naming it), changing nothing."""
        with self._lock:
            self._read(to_table(readings))

    def adopt(self, scorer) -> bool:
        """Score with ``scorer`` from now on, keeping the entities' rows, when they mean the same to it
        (the same window, entity, time and feature encoding); False (nothing changed) otherwise."""
        old = self.scorer
        same = (int(scorer.bundle.module.context_length) == self.need and scorer.sequence
                and (scorer.entity, scorer.time) == (old.entity, old.time)
                and scorer.schema.to_dict() == old.schema.to_dict())
        if same:
            with self._lock:
                self.scorer = scorer
        return same

    def expire(self) -> int:
        """Drop the entities idle past ``idle_seconds`` now (calls do it too); how many."""
        with self._lock:
            return self._expire(float(self.clock()))

    def memory_bytes(self) -> int:
        """Bytes held: the rows pool and per-slot arrays, and each entity's key, last time and entry."""
        with self._lock:
            arrays = self._rows.nbytes + self._count.nbytes + self._seen.nbytes + self._score.nbytes
            lists = sys.getsizeof(self._last) + sys.getsizeof(self._free) + sys.getsizeof(self._slots)
            objects = sum(sys.getsizeof(k) + sys.getsizeof(self._last[s]) for k, s in self._slots.items())
            return arrays + lists + objects

    def snapshot(self) -> dict:
        """Each entity's ``(rows sent, last time, its kept rows oldest first)``, copies (tests, debugging)."""
        with self._lock:
            return {k: (int(self._count[s]), self._last[s], self._ordered(s)) for k, s in self._slots.items()}

    # ----------------------------------------------------------------- a call
    def _call(self, table: pa.Table, late: str, scoring: bool) -> StreamAnswer:
        version, threshold = self.scorer.version, self.scorer.threshold
        if table.num_rows == 0:
            return StreamAnswer([], version, threshold)
        now = float(self.clock())
        batch = self._read(table)
        plan = self._plan(batch, now, late, scoring)
        results = self._results(batch, plan)  # raises (a score that is not finite) before any change
        rows = self._answers(batch, plan, results, scoring)
        plan.score = np.full(len(batch.times), np.nan)
        plan.score[np.flatnonzero(plan.scored)] = [r["anomaly_score"] for r in results]
        self._commit(batch, plan, now)
        return StreamAnswer(rows, version, threshold)

    def _read(self, table: pa.Table) -> _Batch:
        """Check the entity and time values, encode the features (row numbers of errors are the input's),
        group per entity in time order."""
        ent, tm = self.scorer.entity, self.scorer.time
        for name, role in ((ent, "entity"), (tm, "time")):
            if name is not None:
                _check_field(table, name, role)
        table = _timestamps(table, tm)
        X = self._encode(table)
        order = sort_order(table, ent, tm)
        if order is None:
            order = np.arange(table.num_rows)
        else:
            table, X = table.take(pa.array(order)), X[order]
        starts, keys = segments(table, ent)
        return _Batch(order, X, starts, keys, table.column(tm).to_pylist(), tm)

    def _encode(self, table: pa.Table) -> np.ndarray:
        """The readings' model input. A schema of numbers only, given finite numbers in every feature and
        no unknown column, is encoded straight from the arrays (:meth:`FeatureSchema.numeric_matrix`, the
        values :meth:`~FeatureSchema.transform` gives; 2 ms less per reading of 38 features); anything
        else, bad input included, through ``transform``, which names what is wrong."""
        schema = self.scorer.schema
        if schema.numeric and set(table.column_names) <= self._known:
            raw = _finite_numbers(table, schema.names)
            if raw is not None:
                return schema.numeric_matrix(raw)
        X, _, _ = schema.transform(table, "raise", self.scorer.allowed_extra)
        return X

    @property
    def _known(self) -> set:
        s = self.scorer.schema
        return {*s.names, *s.passthrough, *self.scorer.allowed_extra}

    def _plan(self, batch: _Batch, now: float, late: str, scoring: bool) -> _Plan:
        n, starts = len(batch.times), batch.starts
        groups = len(batch.keys)
        slot = np.full(groups, -1, np.int64)
        count = np.zeros(groups, np.int64)
        last = [None] * groups
        for g, key in enumerate(batch.keys):
            s = self._live(key, now)
            if s is not None:
                slot[g], count[g], last[g] = s, self._count[s], self._last[s]
        kept = np.zeros(n, bool)
        before = np.zeros(n, np.int64)
        prior: list = [None] * n
        for g, key in enumerate(batch.keys):
            _order_group(key, batch, int(starts[g]), int(starts[g + 1]), last[g], int(count[g]), kept, before, prior)
        group = np.repeat(np.arange(groups), np.diff(starts))
        candidates = kept | (late == "score")
        scored = candidates & (before + 1 >= self.need) if scoring else np.zeros(n, bool)
        return _Plan(slot, count, group, kept, before, prior, scored, late)

    def _results(self, batch: _Batch, plan: _Plan) -> list[dict]:
        """The scored readings' answers (the Scorer's rows), in sorted order of those readings."""
        sel = np.flatnonzero(plan.scored)
        if sel.size == 0:
            return []
        scores, terms = self.scorer.score_matrix(self._windows(batch, plan, sel))
        return self.scorer.rows(scores, terms)

    def _windows(self, batch: _Batch, plan: _Plan, sel: np.ndarray) -> np.ndarray:
        """The windows ``(len(sel), need, width)`` of the readings ``sel`` (sorted rows): the ``keep`` rows
        their entity has before them (kept ones, then this call's kept readings before them), then
        themselves."""
        W = np.empty((sel.size, self.need, self.width), np.float32)
        W[:, -1] = batch.X[sel]
        if self.keep == 0:
            return W
        g = plan.group[sel]
        c = plan.count[g][:, None]
        h = plan.before[sel, None] - np.arange(self.keep, 0, -1)[None, :]  # history index of each earlier row
        prev = W[:, :-1]
        stored = h < c
        slots = np.broadcast_to(plan.slot[g][:, None], h.shape)
        prev[stored] = self._rows[slots[stored], h[stored] % self.keep]
        new = ~stored
        if new.any():  # the k-th kept reading of this call of group g: sorted row kept_rows[first[g] + k]
            kept_rows = np.flatnonzero(plan.kept)
            first = np.searchsorted(kept_rows, batch.starts[:-1])
            k = (h - c)[new]
            prev[new] = batch.X[kept_rows[first[np.broadcast_to(g[:, None], h.shape)[new]] + k]]
        return W

    def _answers(self, batch: _Batch, plan: _Plan, results: list[dict], scoring: bool) -> list[StreamRow]:
        """Each reading's :class:`StreamRow`, in input order."""
        out: list = [None] * len(batch.times)
        it = iter(results)
        need = self.need
        rows = zip(batch.order.tolist(), plan.group.tolist(), batch.times, plan.before.tolist(), plan.kept.tolist(),
                   plan.scored.tolist(), plan.prior)
        for i, (r, g, t, before, kept, scored, prior) in enumerate(rows):
            row = StreamRow(batch.keys[g], t, "scored", have=min(before + 1, need), need=need)
            if scored:
                res = next(it)
                row.score, row.is_anomaly = res["anomaly_score"], res["is_anomaly"]
                row.top_features = res["top_features"]
            if not kept and not scored and self._repeat(row, batch, plan, g, i, prior):
                pass
            elif not kept:
                self._late(row, prior, before, scored, scoring and plan.late == "score")
            elif not scoring:
                row.status = "kept"
            elif not scored:
                row.status = "warming"
                row.message = f"warming: {row.have} of the {need} rows a score needs; {need - row.have} more"
            out[r] = row
        return out

    def _repeat(self, row: StreamRow, batch: _Batch, plan: _Plan, g: int, i: int, prior) -> bool:
        """A reading sent again (the entity's last kept one: same time, same values, as a client or proxy
        retrying a request whose answer was lost): it gets that reading's score again, not a refusal."""
        s, c = int(plan.slot[g]), int(plan.count[g])
        if s < 0 or self.keep == 0 or plan.before[i] != c or not (prior == row.time):
            return False
        if not np.array_equal(batch.X[i], self._rows[s, (c - 1) % self.keep], equal_nan=True):
            return False
        row.status, row.have = "repeat", min(c, self.need)
        score = float(self._score[s])
        if np.isfinite(score):
            row.score, row.is_anomaly = score, bool(score > self.scorer.threshold)
        row.message = (f"sent again: entity {row.entity!r} reading at {_plain(row.time)} was kept already; "
                       "its answer again")
        return True

    def _late(self, row: StreamRow, prior, before: int, scored: bool, tried: bool) -> None:
        head = (f"late: entity {row.entity!r} reading at {_plain(row.time)} is not after its last reading at "
                f"{_plain(prior)}")
        row.status = "late"
        if scored:
            row.message = f"{head}; scored against the entity's rows, not kept"
        elif tried:
            row.message = (f"{head}; not scored (the entity has {before} of the {self.keep} rows before a reading "
                           "that a score needs), not kept")
        else:
            row.message, row.have = f"{head}; refused", min(before, self.need)

    def _commit(self, batch: _Batch, plan: _Plan, now: float) -> None:
        """Keep each entity's kept readings: the entities held become the most recent (so that slots for
        the new ones are taken from others), the new ones get slots, then all rows are written at once.
        An entity of the call evicted by a later one of it (more entities than ``max_entities``) is not kept."""
        self._expire(now)  # the entities the plan found idle
        kept_rows = np.flatnonzero(plan.kept)
        first = np.searchsorted(kept_rows, batch.starts)
        n_kept = np.diff(first)
        todo = np.flatnonzero(n_kept)
        keys = [batch.keys[g] for g in todo.tolist()]
        for key in keys:
            if key in self._slots:
                self._slots.move_to_end(key)
        for key in keys:
            if key not in self._slots:
                self._allocate(key)
        slots = np.array([self._slots.get(key, -1) for key in keys], np.int64)
        todo, slots = todo[slots >= 0], slots[slots >= 0]
        self._count[slots] = plan.count[todo] + n_kept[todo]  # the plan's count is 0 for a new entity
        self._seen[slots] = now
        for s, row in zip(slots.tolist(), kept_rows[first[todo + 1] - 1].tolist()):
            self._last[s] = batch.times[row]
            self._score[s] = plan.score[row]
        if self.keep:  # the last ``keep`` kept rows of each entity, each to its ring position
            slot_of = np.full(len(batch.keys), -1, np.int64)
            slot_of[todo] = slots
            g = plan.group[kept_rows]
            rank = np.arange(kept_rows.size) - first[g]
            write = (slot_of[g] >= 0) & (rank >= n_kept[g] - self.keep)
            ring = (plan.count[g] + rank)[write] % self.keep
            self._rows[slot_of[g][write], ring] = batch.X[kept_rows[write]]

    # ----------------------------------------------------------------- slots
    def _live(self, key, now: float) -> int | None:
        s = self._slots.get(key)
        if s is None or now - self._seen[s] > self.idle_seconds:
            return None
        return s

    def _expire(self, now: float) -> int:
        dropped = 0
        while self._slots:
            key, s = next(iter(self._slots.items()))
            if now - self._seen[s] <= self.idle_seconds:
                break
            self._drop(key)
            dropped += 1
        self.expired += dropped
        self.evictions += dropped
        if dropped and len(self._count) > 64 and 4 * len(self._slots) < len(self._count):
            self._compact()
        return dropped

    def _drop(self, key) -> int:
        s = self._slots.pop(key)
        self._last[s] = None
        self._free.append(s)
        return s

    def _allocate(self, key) -> int:
        if len(self._slots) >= self.max_entities:
            self._drop(next(iter(self._slots)))  # the least recently sent
            self.evictions += 1
        if not self._free:
            self._resize(min(self.max_entities, len(self._count) + len(self._count) // 4 + 8))
        s = self._free.pop()
        self._slots[key] = s
        self._count[s] = 0
        return s

    def _resize(self, size: int) -> None:
        """Grow or shrink the pool to ``size`` slots, the held entities in the first ones (their order kept)."""
        live = list(self._slots.items())
        idx = np.array([s for _, s in live], np.int64)
        rows = np.zeros((size, self.keep, self.width), np.float32)
        count, seen, score = np.zeros(size, np.int64), np.zeros(size, np.float64), np.zeros(size, np.float64)
        rows[: len(live)], count[: len(live)], seen[: len(live)] = self._rows[idx], self._count[idx], self._seen[idx]
        score[: len(live)] = self._score[idx]
        last = [self._last[s] for s in idx.tolist()] + [None] * (size - len(live))
        self._rows, self._count, self._seen, self._last, self._score = rows, count, seen, last, score
        self._slots = OrderedDict((k, i) for i, (k, _) in enumerate(live))
        self._free = list(range(size - 1, len(live) - 1, -1))  # pop() takes the lowest

    def _compact(self) -> None:
        self._resize(max(8, len(self._slots) + len(self._slots) // 4 + 8))

    def _ordered(self, s: int) -> np.ndarray:
        c = int(self._count[s])
        h = np.arange(max(0, c - self.keep), c)
        return self._rows[s, h % self.keep].copy() if self.keep else self._rows[s, :0].copy()


def _finite_numbers(table: pa.Table, names: list[str]) -> np.ndarray | None:
    """``(rows, len(names))`` float64 of the columns ``names`` when each is of numbers, all finite; else None."""
    cols = []
    for n in names:
        col = table.column(n)
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)) or col.null_count:
            return None
        cols.append(col.to_numpy())
    raw = np.column_stack(cols).astype(np.float64, copy=False)
    return raw if np.isfinite(raw).all() else None


def _timestamps(table: pa.Table, name: str) -> pa.Table:
    """Times as one type whatever the body: ISO-8601 strings (JSON) and Arrow timestamps of any unit as
    microsecond timestamps, so that readings sent either way order against each other."""
    col = table.column(name)
    target = pa.timestamp("us", getattr(col.type, "tz", None)) if pa.types.is_timestamp(col.type) else None
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col = pc.cast(col, pa.timestamp("us"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return table  # not ISO-8601 times: ordered as the strings they are
    elif target is not None and col.type != target:
        col = pc.cast(col, target)
    else:
        return table
    return table.set_column(table.column_names.index(name), name, col)


def _check_field(table: pa.Table, name: str, role: str) -> None:
    """Every reading has its entity / time: a missing column or value is a :class:`StreamError`."""
    if name not in table.column_names:
        raise StreamError(f"readings need the {role} column {name!r}", name)
    col = table.column(name)
    floating = pa.types.is_floating(col.type)
    if not col.null_count and not floating:
        return
    missing = col.is_null()
    if floating:
        missing = pc.or_(missing, pc.is_nan(col))
    rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    if rows.size:
        raise StreamError(
            f"{role} column {name!r} has no value at row {int(rows[0])} ({rows.size} row(s) in all); "
            f"every reading needs its {role}", name, rows[:100].tolist())


def _order_group(key, batch: _Batch, a: int, b: int, last, count: int, kept, before, prior) -> None:
    """One entity's readings (sorted rows a..b, in time order): kept unless at or before the last kept
    time; ``before``: the rows the entity has before each."""
    k = 0
    for i in range(a, b):
        t = batch.times[i]
        try:
            late = last is not None and not t > last
        except TypeError:
            raise StreamError(f"entity {key!r}: time {t!r} (row {int(batch.order[i])}) cannot be ordered after "
                              f"its last time {last!r}", batch.time_column, [int(batch.order[i])]) from None
        before[i] = count + k
        if late:
            prior[i] = last
        else:
            kept[i], last, k = True, t, k + 1
