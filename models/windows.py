"""Windows of a time series, built per entity, in time order.

Rows are first grouped by entity and ordered by time (stable sort; rows keep
their input order when there is no entity or time column). Each row t gets the
window of the ``context`` rows ending at t. Where a series has fewer than
``context - 1`` rows before t, the window is left-padded with copies of the
series' first row (edge padding); this is the documented rule for the start of
every series and for series shorter than the window. Training only uses full,
unpadded windows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import SchemaError


def sort_order(table: pa.Table, entity: str | None, time: str | None) -> np.ndarray | None:
    """Row order grouping entities together in time order, or None if already so."""
    names = [c for c in (entity, time) if c]
    for c in names:
        if c not in table.column_names:
            raise SchemaError(f"column {c!r} is missing (needed as entity/time column)", c)
    if not names or table.num_rows < 2:
        return None
    # Dictionary-encoded keys (pandas category, polars Categorical) are sorted by
    # value; Arrow cannot sort a table on a dictionary column directly.
    key_table = pa.table({c: _decoded(table.column(c)) for c in names})
    keys = [(c, "ascending") for c in names]
    order = pc.sort_indices(key_table, sort_keys=keys).to_numpy()
    if np.all(order[1:] > order[:-1]):
        return None
    # A stable sort keeps the input order of rows that tie on (entity, time).
    return np.lexsort([np.arange(table.num_rows)] + [_sort_key(key_table.column(c)) for c, _ in reversed(keys)])


def _decoded(col):
    return pc.cast(col, col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _sort_key(col) -> np.ndarray:
    # Rank values so any orderable Arrow type (strings, timestamps) can be lexsorted.
    return pc.rank(col, sort_keys="ascending", tiebreaker="dense").to_numpy()


def segments(table: pa.Table, entity: str | None) -> tuple[np.ndarray, list]:
    """Start offsets of each entity's run of rows (table already grouped) and the entity values."""
    n = table.num_rows
    if entity is None or n == 0:
        return np.array([0, n]), [None]
    col = table.column(entity).combine_chunks()
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise SchemaError(f"entity column {entity!r} is null at row {row}", entity, [row])
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    change = pc.not_equal(col.slice(1), col.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(change) + 1, [n]])
    values = col.take(pa.array(starts[:-1])).to_pylist()
    return starts, values


class WindowSet:
    """Full training windows over per-entity series, gathered on demand.

    ``data`` is the encoded matrix of all series back to back; ``ends`` are the
    positions of the last row of every full window. ``ws[idx]`` returns the
    windows ``(len(idx), context, width)`` without materialising them all.
    """

    def __init__(self, data: np.ndarray, starts: np.ndarray, context: int):
        self.data = data
        self.context = context
        ends = [np.arange(a + context - 1, b) for a, b in zip(starts[:-1], starts[1:]) if b - a >= context]
        self.ends = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
        self.lengths = np.diff(starts)
        self._offsets = np.arange(-context + 1, 1)

    def __len__(self) -> int:
        return int(self.ends.size)

    def __getitem__(self, idx) -> np.ndarray:
        return self.data[self.ends[idx, None] + self._offsets]


def training_windows(
    table: pa.Table, schema, entity: str | None, time: str | None, context: int, allowed_extra: tuple[str, ...] = ()
) -> WindowSet:
    """Group, order and encode a table, then index its full windows per entity.

    The one path from rows to training windows, used by the in-memory API and
    by the Ray job (per entity group)."""
    order = sort_order(table, entity, time)
    if order is not None:
        table = table.take(pa.array(order))
    allowed = tuple(c for c in (entity, time, *allowed_extra) if c)
    x, _, _ = schema.transform(table, allowed_extra=allowed)
    starts, _ = segments(table, entity)
    return WindowSet(x, starts, context)


def padded_windows(series: np.ndarray, context: int, history: np.ndarray | None = None):
    """(padded matrix, end positions) so that ``m[ends[i] + arange(-context+1, 1)]``
    is the window of row i of ``series``, using ``history`` (earlier rows of the
    same series, e.g. from a previous batch) before edge padding."""
    prefix = history if history is not None and len(history) else series[:0]
    pad_len = max(0, context - 1 - len(prefix))
    first = prefix[:1] if len(prefix) else series[:1]
    pad = np.repeat(first, pad_len, axis=0)
    full = np.concatenate([pad, prefix[-(context - 1) :] if context > 1 and len(prefix) else prefix[:0], series])
    offset = len(full) - len(series)
    return full, np.arange(offset, offset + len(series))


def no_windows_error(window: int, context: int, longest: int | None = None) -> SchemaError:
    """The error for data that gives no full training window (``longest``: the longest series, when known)."""
    longest_is = f"the longest has {longest} row(s) and " if longest is not None else ""
    return SchemaError(
        f"window {window} is longer than every series: {longest_is}a training window needs {context}; "
        "use a smaller window or more data per entity"
    )


_BLOCK = 8  # columns per pass: bounds the float64 work arrays of a wide, long series


def forward_mean(values: np.ndarray, starts: np.ndarray, rows: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Each row's mean of its own value and those of the next ``rows`` rows of the
    same series (fewer at the series' end), over the ``valid`` rows only.

    ``values`` is ``(n,)`` or ``(n, k)`` in series order, ``starts`` the series'
    offsets (as :func:`segments`). A row that is not valid keeps its own value.
    The sums are built by adding the shifted rows, never as differences of running
    totals: one huge score (a glitch) would swamp a running total and turn the means
    of every later row of the series into rounding noise.
    """
    if rows <= 0 or len(values) == 0:
        return values
    n = len(values)
    ok = np.ones(n, bool) if valid is None else valid
    seg_end = np.repeat(starts[1:], np.diff(starts))  # one past each row's series end
    reach = min(rows, int(np.diff(starts).max()) - 1)  # no series has rows beyond this
    # joins[k - 1]: row i + k is in row i's series and valid (rows i < n - k)
    joins = [(np.arange(n - k) + k < seg_end[: n - k]) & ok[k:] for k in range(1, reach + 1)]
    count = ok.astype(np.int64)
    for k, join in enumerate(joins, 1):
        count[: n - k] += join
    flat = values.reshape(n, -1)
    out = np.empty_like(flat)
    for c in range(0, flat.shape[1], _BLOCK):
        v = flat[:, c : c + _BLOCK].astype(np.float64)
        total = np.where(ok[:, None], v, 0.0)
        for k, join in enumerate(joins, 1):
            np.add(total[: n - k], v[k:], out=total[: n - k], where=join[:, None])
        out[:, c : c + _BLOCK] = np.where(ok[:, None], total / np.maximum(count, 1)[:, None], v)
    return out.reshape(values.shape)
