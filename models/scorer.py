"""The one Scorer: load a bundle once, score batches.

Every consumer (the in-memory ``Detector``, the Ray Data batch job, the Serve
deployment, the evaluation job) scores through this class, so preprocessing,
windowing, thresholds and attributions are implemented exactly once.

Output columns, one row per input row, in input order:

- ``anomaly_score`` (float64): higher = more anomalous
- ``is_anomaly`` (bool): ``anomaly_score > threshold``
- ``top_features`` (list<struct<feature: string, contribution: double>>): the
  ``top_k`` features with the largest share of the score, largest first
- ``model_version`` (string): the bundle's version
- ``error`` (string, only with ``errors="mask"``): why a row could not be scored
  (its other columns are null), for quarantine

A score is never a silent NaN: inputs are clipped so that any finite value scores
finite (:data:`unusual.models.features.Z_LIMIT`), and a row whose score is still not
finite is an error (:class:`~unusual.models.errors.ScoreError` with ``errors="raise"``,
quarantined with a reason with ``errors="mask"``).

Sequence models (LSTM): rows are grouped per entity and ordered by time within
a batch, and scored with the window of rows before them. With ``stream=True``
(the default) the scorer remembers the last ``window`` rows of each entity of
the previous batch, so when each entity's rows arrive together and in time
order, the scores do not depend on where the batches are cut, except that a
model with a look-ahead (the LSTM's ``score_lookahead``) averages each row's score
with those of the rows after it in the same batch: the last ``score_lookahead``
rows of an entity in a batch average fewer rows than they would in one call.
The batch job scores each entity's rows in one call. ``reset()`` forgets that
context.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .bundle import Bundle, load_bundle
from .errors import ScoreError
from .registry import family
from .tables import TOP_FEATURE_TYPE, to_table
from .training import resolve_device
from .windows import forward_mean, padded_windows, segments, sort_order


class Scorer:
    def __init__(
        self,
        bundle: Bundle | str,
        device: str = "cpu",
        top_k: int = 3,
        chunk_rows: int = 16384,
        passthrough: tuple[str, ...] | list[str] = (),
        errors: str = "raise",
        stream: bool = True,
    ):
        if errors not in ("raise", "mask"):
            raise ValueError(f"errors must be 'raise' or 'mask'; got {errors!r}")
        self.device = resolve_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, map_location=self.device)
        self.bundle.module.to(self.device).eval()
        self.top_k = top_k
        self.chunk_rows = chunk_rows
        self.errors = errors
        self.stream = stream
        self.schema = self.bundle.schema
        self.sequence = family(self.bundle.kind).sequence
        self.numeric = not self.sequence and self.schema.numeric  # rows of numbers only: Schema.numeric_matrix
        cfg = self.bundle.model_config
        self.entity = getattr(cfg, "entity_column", None)
        self.time = getattr(cfg, "time_column", None)
        self.lookahead = getattr(cfg, "score_lookahead", 0) or 0
        self.allowed_extra = tuple(c for c in (*passthrough, self.entity, self.time) if c)
        self._names = pa.array(self.schema.names, pa.string())
        self._group = None if self.schema.width == len(self.schema.columns) else self.schema.group_matrix()
        self._context: dict = {}
        self._version_col: pa.Array | None = None

    # ----------------------------------------------------------------- public
    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def threshold(self) -> float:
        return self.bundle.threshold

    def reset(self) -> None:
        """Forget the sequence context carried over from previous batches."""
        self._context = {}

    def __call__(self, batch) -> pa.Table:
        """Ray Data ``map_batches`` entry point (``batch_format="pyarrow"``)."""
        return self.score_table(batch)

    def score_table(self, data) -> pa.Table:
        table = to_table(data)
        scores, terms, bad, reasons = self._score(table)
        return self._output(scores, terms, bad, reasons)

    def transform(self, data) -> np.ndarray:
        """A tabular batch's model input (:meth:`score_matrix`); a bad value raises, naming its column."""
        X, _, _ = self.schema.transform(to_table(data), "raise", self.allowed_extra)
        return X

    def score_matrix(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The scores (float64) and per-input-column score terms of a tabular model input."""
        return self._run(lambda a, b: X[a:b], len(X))

    def output(self, scores: np.ndarray, terms: np.ndarray) -> pa.Table:
        """:meth:`score_matrix`'s result as :meth:`score_table` answers it (a score that is not finite raises)."""
        return self._output(scores, terms, None, None)

    def rows(self, scores: np.ndarray, terms: np.ndarray) -> list[dict]:
        """:meth:`score_matrix`'s result as Python rows: what :meth:`output`'s table holds (without the
        version), built with no table (the endpoint's JSON answers); a score that is not finite raises."""
        nonfinite = ~np.isfinite(scores)
        if nonfinite.any():
            _not_finite(scores, nonfinite, None, None)
        contrib = terms if self._group is None else terms @ self._group
        idx, vals = top_k(contrib, min(self.top_k, contrib.shape[1]))
        names, threshold = self.schema.names, self.threshold
        return [
            {"anomaly_score": s, "is_anomaly": s > threshold,
             "top_features": [{"feature": names[j], "contribution": v} for j, v in zip(ix, vx)]}
            for s, ix, vx in zip(scores.tolist(), idx.tolist(), vals.astype(np.float64).tolist())
        ]

    def scores(self, data) -> np.ndarray:
        """Just the anomaly scores, shape (n,); a score that is not finite raises :class:`ScoreError`
        with ``errors="raise"`` (with ``errors="mask"`` a bad row's score is NaN)."""
        scores, _, bad, _ = self._score(to_table(data))
        nonfinite = ~np.isfinite(scores)
        if bad is None and nonfinite.any():
            _not_finite(scores, nonfinite, None, None)
        if bad is not None:
            scores = np.where(bad | nonfinite, np.nan, scores)
        return scores

    # ----------------------------------------------------------------- internals
    @torch.inference_mode()
    def _run(self, fetch, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Score ``n`` rows; ``fetch(a, b)`` returns the model input of rows a..b."""
        width = self.schema.width
        scores = np.empty(n, dtype=np.float64)
        terms = np.empty((n, width), dtype=np.float32)
        for a in range(0, n, self.chunk_rows):
            b = min(n, a + self.chunk_rows)
            x = torch.from_numpy(np.ascontiguousarray(fetch(a, b))).to(self.device)
            s, t = self.bundle.module.score_terms(x)
            scores[a:b] = s.double().cpu().numpy()
            terms[a:b] = t.float().cpu().numpy()
        return scores, terms

    def _score(self, table: pa.Table):
        if not self.sequence:
            X, bad, reasons = self.schema.transform(table, self.errors, self.allowed_extra)
            scores, terms = self._run(lambda a, b: X[a:b], table.num_rows)
            return scores, terms, bad, reasons
        return self._score_sequence(table)

    def _score_sequence(self, table: pa.Table):
        n = table.num_rows
        context = self.bundle.module.context_length
        order = sort_order(table, self.entity, self.time)
        t = table.take(pa.array(order)) if order is not None else table
        X, bad, reasons = self.schema.transform(t, self.errors, self.allowed_extra)
        starts, keys = segments(t, self.entity)
        times = t.column(self.time).combine_chunks() if self.time else None
        pieces, ends, offset, carry = [], [], 0, {}
        for (a, b), key in zip(zip(starts[:-1], starts[1:]), keys):
            if b <= a:
                continue
            seg = X[a:b]
            first_t = times[int(a)].as_py() if times is not None else None
            last_t = times[int(b) - 1].as_py() if times is not None else None
            history = None
            if self.stream and key in self._context:
                hist_rows, hist_t = self._context[key]
                if hist_t is None or first_t is None or first_t >= hist_t:
                    history = hist_rows
            full, e = padded_windows(seg, context, history)
            pieces.append(full)
            ends.append(e + offset)
            offset += len(full)
            if self.stream and context > 1:
                carry[key] = (full[-(context - 1) :].copy(), last_t)
        if self.stream:
            self._context = carry
        if n == 0:
            return np.empty(0), np.empty((0, self.schema.width), np.float32), bad, reasons
        M = np.concatenate(pieces)
        E = np.concatenate(ends)
        offsets = np.arange(-context + 1, 1)
        scores, terms = self._run(lambda a, b: M[E[a:b, None] + offsets], n)
        if self.lookahead:  # quarantined and non-finite rows are left out of their neighbours' means
            valid = np.isfinite(scores) if bad is None else np.isfinite(scores) & ~bad
            scores = forward_mean(scores, starts, self.lookahead, valid)
            terms = forward_mean(terms, starts, self.lookahead, valid)
        if order is not None:
            inv = np.empty_like(order)
            inv[order] = np.arange(n)
            scores, terms = scores[inv], terms[inv]
            if bad is not None:
                bad = bad[inv]
                reasons = [reasons[i] for i in inv]
        return scores, terms, bad, reasons

    def _output(self, scores, terms, bad, reasons) -> pa.Table:
        n = scores.size
        nonfinite = ~np.isfinite(scores)
        if bad is not None:
            nonfinite &= ~bad  # imputed rows are quarantined already
        if nonfinite.any():
            bad, reasons = _not_finite(scores, nonfinite, bad, reasons)
        contrib = terms if self._group is None else terms @ self._group  # (n, n_features)
        k = min(self.top_k, contrib.shape[1])
        idx, vals = top_k(contrib, k)
        struct = pa.StructArray.from_arrays(
            [self._names.take(pa.array(idx.ravel())), pa.array(vals.ravel().astype(np.float64))],
            names=["feature", "contribution"],
        )
        mask = None if bad is None else pa.array(bad)
        top = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * k),  # k entries per row
            struct,
            type=TOP_FEATURE_TYPE,
            mask=mask,
        )
        score_arr = pa.array(scores, pa.float64(), mask=bad)
        flag = pa.array(scores > self.threshold, pa.bool_(), mask=bad)
        cols = {"anomaly_score": score_arr, "is_anomaly": flag, "top_features": top, "model_version": self._versions(n)}
        if bad is not None:
            cols["error"] = _errors(bad, reasons)
        return pa.table(cols)

    def _versions(self, n: int) -> pa.Array:
        """The version column: one array built for the largest batch so far, sliced (no copy)."""
        if self._version_col is None or len(self._version_col) < n:
            v = self.version.encode()
            offsets = np.arange(n + 1, dtype=np.int64) * len(v)
            if offsets[-1] >= 2**31:  # past 32-bit offsets: let Arrow build it (chunked)
                return pa.array(np.full(n, self.version, object), pa.string())
            self._version_col = pa.StringArray.from_buffers(
                n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(v * n)
            )
        return self._version_col.slice(0, n)


def _not_finite(scores: np.ndarray, rows: np.ndarray, bad, reasons):
    """Rows whose score is NaN / inf: an error with ``errors="raise"`` (``bad is None``), else quarantined."""
    at = np.flatnonzero(rows)
    why = f"the model's score is not finite ({scores[at[0]]}); the row's values overflow the model"
    if bad is None:
        raise ScoreError(f"row {int(at[0])}: {why} ({at.size} row(s) in all)", at[:100].tolist())
    bad = bad | rows
    for r in at:
        reasons[r] = f"{reasons[r]}; score: not finite" if reasons[r] else f"score: {why}"
    return bad, reasons


def _errors(bad: np.ndarray, reasons: list[str]) -> pa.Array:
    """The error column: each bad row's reason, null elsewhere; only the bad rows are touched in Python."""
    rows = np.flatnonzero(bad)
    if rows.size == 0:
        return pa.nulls(bad.size, pa.string())
    text = pa.array([reasons[r] for r in rows], pa.string())
    return text.take(pa.array(np.cumsum(bad) - 1, mask=~bad))


# --------------------------------------------------------------------------- top-k

SMALL = 512  # rows below which a plain sort is as fast
CHUNK = 8192  # rows per block of the vectorised top-k (its transposed block stays in cache)


def top_k(c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row of ``c`` (rows, columns), largest first:
    their column indices (int64) and values. Ties go to the lower column; NaN
    comes last (a row with NaN or infinities is sorted as a whole)."""
    n, m = c.shape
    k = max(0, min(k, m))
    if k == 0 or n == 0:
        return np.zeros((n, k), np.int64), np.zeros((n, k), c.dtype)
    if n < SMALL or m >= 2**16:
        return _sorted_top_k(c, k)
    # Per block of rows, transposed (columns x rows) so that every step is a
    # vectorised pass over rows: the row maximum, the lowest column holding it
    # (the largest of m - j over the columns j equal to it), then that entry
    # masked with -inf for the next pass.
    wtype = np.uint8 if m < 2**8 else np.uint16
    weight = np.arange(m, 0, -1, dtype=wtype)[:, None]
    idx = np.empty((n, k), np.int64)
    block = min(n, CHUNK)
    buf, eq, w = np.empty((m, block), c.dtype), np.empty((m, block), bool), np.empty((m, block), wtype)
    cols = np.arange(block)
    finite = np.ones(n, bool)
    for a in range(0, n, block):
        r = min(n, a + block) - a
        t, e, ww = buf[:, :r], eq[:, :r], w[:, :r]
        for s in range(0, r, 256):  # transposed in small tiles: several times faster than in one go
            np.copyto(t[:, s : s + 256], c[a + s : a + min(r, s + 256)].T)
        for j in range(k):
            top = np.maximum.reduce(t, axis=0)
            finite[a : a + r] &= np.isfinite(top)
            np.equal(t, top, out=e)
            np.multiply(e, weight, out=ww)
            i = m - np.maximum.reduce(ww, axis=0).astype(np.int64)
            np.minimum(i, m - 1, out=i)  # a NaN row matches nothing; sorted below
            idx[a : a + r, j] = i
            if j + 1 < k:
                t[i, cols[:r]] = -np.inf
    vals = np.take_along_axis(c, idx, axis=1)
    odd = np.flatnonzero(~finite)
    if odd.size:  # a NaN or an infinity met on the way: those rows the slow, exact way
        idx[odd], vals[odd] = _sorted_top_k(c[odd], k)
    return idx, vals


def _sorted_top_k(c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: a stable sort of each row, descending (ties: lower column first; NaN last)."""
    idx = np.argsort(-c, axis=1, kind="stable")[:, :k].astype(np.int64)
    return idx, np.take_along_axis(c, idx, axis=1)
