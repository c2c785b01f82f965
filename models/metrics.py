"""Detection-quality metrics, pure numpy.

Two kinds:

- exact, in-memory metrics of a score vector and a 0/1 label vector:
  :func:`roc_auc`, :func:`average_precision`, :func:`prf`, :func:`best_f1`,
  and their point-adjusted variants for time series (:func:`label_segments`,
  :func:`point_adjust`, :func:`best_f1_pa`, :func:`adjusted_scores`);
- :class:`ScoreHistogram`, mergeable per-bin counts of positive and negative
  scores for data that does not fit one machine: each block of rows becomes a
  histogram over shared bin edges, histograms add up, and ROC-AUC, average
  precision and the best F1 come from the merged counts. When the edges are the
  distinct scores (one score value per bin) every metric equals the exact one.

Conventions: higher scores are more anomalous, a prediction at threshold ``t``
is ``score >= t``, and labels are positive when non-zero / true.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# =========================================================================== exact metrics


def _two_classes(label: np.ndarray, what: str) -> tuple[int, int]:
    npos = int(label.sum())
    nneg = int(label.size - npos)
    if npos == 0 or nneg == 0:
        raise ValueError(f"{what} needs both classes; got {npos} positive and {nneg} negative labels")
    return npos, nneg


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC by the rank-sum formula (ties get their average rank)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    npos, nneg = _two_classes(y, "ROC-AUC")
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv.reshape(-1)]  # 1-based average rank of each score
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores
    taken as thresholds from the highest down (as scikit-learn computes it)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    npos, _ = _two_classes(y, "average precision")
    cand, inv = np.unique(s, return_inverse=True)
    pos = np.bincount(inv.reshape(-1), weights=y, minlength=cand.size)
    tot = np.bincount(inv.reshape(-1), minlength=cand.size)
    return _ap_from_counts(pos, tot - pos, npos)


def ranking_metrics(label: np.ndarray, scores: np.ndarray) -> dict:
    """ROC-AUC and PR-AUC (average precision) of one score vector."""
    return {"roc_auc": roc_auc(label, scores), "pr_auc": average_precision(label, scores)}


def label_segments(label: np.ndarray) -> np.ndarray:
    """(start, stop) of every maximal run of 1s in a 0/1 label vector; shape (k, 2)."""
    lab = np.asarray(label).astype(bool).astype(np.int8)
    d = np.diff(np.concatenate([[0], lab, [0]]))
    return np.stack([np.flatnonzero(d == 1), np.flatnonzero(d == -1)], axis=1)


def point_adjust(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Standard point adjustment: if any point of a labelled segment is flagged,
    every point of that segment counts as flagged. Points outside labelled
    segments are left as they are."""
    out = np.asarray(pred).astype(bool).copy()
    for a, b in label_segments(label):
        if out[a:b].any():
            out[a:b] = True
    return out


def adjusted_scores(scores: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Scores with every labelled segment's scores replaced by the segment's maximum.

    ``adjusted_scores(s, y) >= t`` equals ``point_adjust(s >= t, y)`` for every
    threshold ``t``, so any threshold-sweeping metric of the adjusted scores
    (ROC, PR, best F1) is the point-adjusted one.
    """
    out = np.array(scores, dtype=np.float64, copy=True)
    for a, b in label_segments(label):
        out[a:b] = out[a:b].max()
    return out


def prf(pred: np.ndarray, label: np.ndarray) -> dict:
    """Precision, recall and F1 of a 0/1 prediction (F1 = 0 when undefined)."""
    pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    tp = int((pred & label).sum())
    fp = int((pred & ~label).sum())
    fn = int((~pred & label).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"f1": f1, "precision": p, "recall": r, "flagged": int(pred.sum())}


def _best_from_counts(tp: np.ndarray, fp: np.ndarray, positives: int, thresholds: np.ndarray) -> dict:
    fn = positives - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    i = int(np.argmax(f1))
    p = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 0.0
    r = tp[i] / positives if positives else 0.0
    return {"f1": float(f1[i]), "precision": float(p), "recall": float(r), "threshold": float(thresholds[i])}


def best_f1(scores: np.ndarray, label: np.ndarray) -> dict:
    """Best F1 over every threshold ``score >= t`` (t = each distinct score), no adjustment."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(label).astype(bool)
    cand = np.unique(s)  # ascending
    pos_sorted = np.sort(s[y])
    neg_sorted = np.sort(s[~y])
    tp = pos_sorted.size - np.searchsorted(pos_sorted, cand, side="left")  # positives with s >= t
    fp = neg_sorted.size - np.searchsorted(neg_sorted, cand, side="left")
    return _best_from_counts(tp, fp, int(y.sum()), cand)


def best_f1_pa(scores: np.ndarray, label: np.ndarray) -> dict:
    """Best F1 with point adjustment over every threshold ``score >= t``.

    Exact and vectorised: a labelled segment is detected at threshold t iff its
    maximum score is >= t, and then all its points are true positives; false
    positives are the normal points with score >= t (adjustment never touches
    them). Equivalent to ``prf(point_adjust(scores >= t, label), label)`` for
    every distinct score t.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(label).astype(bool)
    segs = label_segments(y)
    seg_max = np.array([s[a:b].max() for a, b in segs]) if len(segs) else np.empty(0)
    seg_len = (segs[:, 1] - segs[:, 0]) if len(segs) else np.empty(0, dtype=np.int64)
    order = np.argsort(seg_max)
    seg_max, seg_len = seg_max[order], seg_len[order]
    # suffix sums: detected points when thresholds t <= seg_max[j:]
    suffix = np.concatenate([np.cumsum(seg_len[::-1])[::-1], [0]])
    cand = np.unique(s)
    tp = suffix[np.searchsorted(seg_max, cand, side="left")]
    neg_sorted = np.sort(s[~y])
    fp = neg_sorted.size - np.searchsorted(neg_sorted, cand, side="left")
    return _best_from_counts(tp, fp, int(y.sum()), cand)


# =========================================================================== histograms


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray, npos: int) -> float:
    """Average precision from per-threshold-group counts in ascending score order."""
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    hit = pos[::-1] > 0  # recall moves only where positives are
    if not hit.any():
        return float("nan")
    return float(np.sum(pos[::-1][hit] / npos * tp[hit] / (tp[hit] + fp[hit])))


def quantile_edges(sample: np.ndarray, bins: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Bin edges at the quantiles of a score sample (adapting to heavy tails),
    plus the true minimum and maximum when known; ascending and distinct."""
    sample = np.asarray(sample, dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    parts = []
    if sample.size:
        parts.append(np.quantile(sample, np.linspace(0.0, 1.0, max(int(bins), 2)), method="inverted_cdf"))
    parts += [np.array([v], np.float64) for v in (lo, hi) if v is not None and np.isfinite(v)]
    if not parts:
        return np.zeros(1)
    return np.unique(np.concatenate(parts))


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a curve, evenly spaced along its length, ends kept."""
    if x.size <= max_points:
        return x, y
    step = np.hypot(np.diff(x), np.diff(y))
    along = np.concatenate([[0.0], np.cumsum(step)])
    if along[-1] <= 0:
        idx = np.linspace(0, x.size - 1, max_points).round().astype(int)
    else:
        idx = np.searchsorted(along, np.linspace(0.0, along[-1], max_points), side="left")
        idx = np.clip(idx, 0, x.size - 1)
        idx[0], idx[-1] = 0, x.size - 1
    idx = np.unique(idx)
    return x[idx], y[idx]


@dataclass
class ScoreHistogram:
    """Counts of positive and negative scores per bin, mergeable across blocks of rows.

    ``edges`` (ascending, K values) define K bins: bin k holds the scores in
    ``[edges[k], edges[k+1])``; scores below ``edges[0]`` fall in the first bin
    and scores at or above ``edges[-1]`` in the last. Thresholds ``score >= edges[k]``
    are therefore exact. ``tp / fp / fn / tn`` are the confusion counts of the
    model's own prediction (``is_anomaly``), and ``segments`` counts labelled
    segments for point-adjusted histograms.

    ROC-AUC counts a positive and a negative in the same bin as half a
    correctly ordered pair: the exact AUC of the binned scores, and the exact
    AUC of the scores when every bin holds one distinct score.
    """

    edges: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    segments: int = 0

    @classmethod
    def empty(cls, edges: np.ndarray) -> ScoreHistogram:
        edges = np.asarray(edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size == 0 or np.any(np.diff(edges) <= 0):
            raise ValueError("histogram edges must be a non-empty, strictly increasing 1-D array")
        k = edges.size
        return cls(edges, np.zeros(k, np.int64), np.zeros(k, np.int64))

    @classmethod
    def of(
        cls, scores: np.ndarray, label: np.ndarray, edges: np.ndarray, pred: np.ndarray | None = None
    ) -> ScoreHistogram:
        return cls.empty(edges).add(scores, label, pred)

    def bin_of(self, scores: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.edges, np.asarray(scores, dtype=np.float64), side="right") - 1
        return np.clip(idx, 0, self.edges.size - 1)

    def add(self, scores: np.ndarray, label: np.ndarray, pred: np.ndarray | None = None) -> ScoreHistogram:
        """Count more rows (in place; returns self). NaN scores must be dropped by the caller."""
        y = np.asarray(label).astype(bool)
        idx = self.bin_of(scores)
        k = self.edges.size
        self.pos += np.bincount(idx[y], minlength=k)
        self.neg += np.bincount(idx[~y], minlength=k)
        if pred is not None:
            p = np.asarray(pred).astype(bool)
            self.tp += int((p & y).sum())
            self.fp += int((p & ~y).sum())
            self.fn += int((~p & y).sum())
            self.tn += int((~p & ~y).sum())
        return self

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        if self.edges.shape != other.edges.shape or not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge histograms with different bin edges")
        return ScoreHistogram(
            self.edges,
            self.pos + other.pos,
            self.neg + other.neg,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.tn + other.tn,
            self.segments + other.segments,
        )

    # ------------------------------------------------------------------ counts

    @property
    def positives(self) -> int:
        return int(self.pos.sum())

    @property
    def negatives(self) -> int:
        return int(self.neg.sum())

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        """(tp, fp) of ``score >= edges[k]`` for every k (ascending k)."""
        return np.cumsum(self.pos[::-1])[::-1], np.cumsum(self.neg[::-1])[::-1]

    # ------------------------------------------------------------------ metrics

    def roc_auc(self) -> float:
        npos, nneg = self.positives, self.negatives
        if npos == 0 or nneg == 0:
            return float("nan")
        neg_below = np.concatenate([[0], np.cumsum(self.neg)[:-1]])
        pairs = np.sum(self.pos.astype(np.float64) * (neg_below + 0.5 * self.neg))
        return float(pairs / (float(npos) * float(nneg)))

    def average_precision(self) -> float:
        if self.positives == 0:
            return float("nan")
        return _ap_from_counts(self.pos, self.neg, self.positives)

    def best_f1(self) -> dict:
        """Best F1 over the thresholds ``score >= edges[k]``, with that threshold."""
        if self.positives == 0:
            return {"f1": float("nan"), "precision": float("nan"), "recall": float("nan"), "threshold": float("nan")}
        tp, fp = self._cumulative()
        return _best_from_counts(tp, fp, self.positives, self.edges)

    def at_threshold(self) -> dict:
        """Precision, recall and F1 of the model's own prediction (``is_anomaly``)."""
        tp, fp, fn = self.tp, self.fp, self.fn
        nan = float("nan")
        p = tp / (tp + fp) if tp + fp else nan
        r = tp / (tp + fn) if tp + fn else nan
        f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else nan
        return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": self.tn}

    def roc_curve(self, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(false positive rate, true positive rate), from (0, 0) to (1, 1)."""
        tp, fp = self._cumulative()
        fpr = np.concatenate([[0.0], fp[::-1] / max(self.negatives, 1)])
        tpr = np.concatenate([[0.0], tp[::-1] / max(self.positives, 1)])
        keep = np.concatenate([[True], (self.pos[::-1] + self.neg[::-1]) > 0])
        return _thin(fpr[keep], tpr[keep], max_points)

    def pr_curve(self, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) from the highest threshold down, starting at (0, 1)."""
        tp, fp = self._cumulative()
        tp, fp = tp[::-1], fp[::-1]
        keep = (self.pos[::-1] + self.neg[::-1]) > 0
        tp, fp = tp[keep], fp[keep]
        recall = np.concatenate([[0.0], tp / max(self.positives, 1)])
        precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1)])
        return _thin(recall, precision, max_points)

    def density(self, groups: int = 60, clip: float = 0.001) -> dict:
        """The score distribution of each label, for plotting.

        The axis runs from the ``clip`` to the ``1 - clip`` quantile of the
        scores (each class weighted equally, so rare positives keep their range;
        the scores beyond fall in the end groups) and is logarithmic when every
        score in that range is positive and it spans more than two decades,
        linear otherwise. It is cut into ``groups`` equal-width groups; each
        holds the bins whose lower edge falls in it. Returns the group
        boundaries (``edges``, ``groups + 1`` scores), ``scale`` (``"log"`` or
        ``"linear"``) and the fraction of each class in each group
        (``positive``, ``negative``).
        """
        wp = self.pos / max(self.positives, 1)
        wn = self.neg / max(self.negatives, 1)
        w = (wp + wn) / max(float((wp + wn).sum()), 1e-300)
        finite = np.isfinite(self.edges)
        cum = np.cumsum(w)
        occupied = np.flatnonzero((w > 0) & finite)
        if occupied.size == 0:
            lo = hi = float(self.edges[finite][0]) if finite.any() else 0.0
        else:
            lo_i = max(int(np.searchsorted(cum, clip, side="left")), int(occupied[0]))
            hi_i = min(int(np.searchsorted(cum, 1.0 - clip, side="left")), int(occupied[-1]))
            lo, hi = float(self.edges[min(lo_i, hi_i)]), float(self.edges[max(lo_i, hi_i)])
        if hi <= lo:
            hi = lo + max(abs(lo), 1.0) * 1e-6
        log = lo > 0 and hi / lo > 100
        f = np.log if log else (lambda v: v)
        a, b = float(f(lo)), float(f(hi))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = f(np.where(self.edges > 0, self.edges, lo)) if log else self.edges
            g = np.floor((t - a) / (b - a) * groups)
        g = np.clip(np.nan_to_num(g, nan=0.0, posinf=groups - 1, neginf=0.0), 0, groups - 1).astype(np.int64)
        g[self.edges < lo] = 0
        bounds = np.linspace(a, b, groups + 1)
        return {
            "edges": (np.exp(bounds) if log else bounds).tolist(),
            "scale": "log" if log else "linear",
            "positive": np.bincount(g, weights=wp, minlength=groups).tolist(),
            "negative": np.bincount(g, weights=wn, minlength=groups).tolist(),
        }
