"""VUS-PR and VUS-ROC: the volume under the range-based PR and ROC surfaces.

The time-series metrics of TSB-AD (Paparrizos et al., "Volume Under the Surface",
VLDB 2022; Liu & Paparrizos, "The Elephant in the Room", NeurIPS 2024), computed
exactly as its reference implementation ``TSB_AD.evaluation.metrics.get_metrics``
does (``generate_curve(..., version="opt", thre=250)``), which
``tests/models/test_vus.py`` checks on fixed data. Point-wise PR / ROC punish a
detector that fires a few steps before or after a labelled segment; point
adjustment rewards a random one (one hit anywhere in a segment counts the whole
segment). VUS instead grows every labelled segment by a soft buffer (weights
``sqrt(1 - d / w)`` at distance ``d``) of each width ``w`` in ``0 … window``,
scores the range-based PR / ROC curve of each width and averages the areas.

The reference loops over widths x thresholds x segments with full-length copies;
here, for each width, the thresholds' counts come from one sort of the scores
(``searchsorted``), so a series of 10^6 rows takes seconds.

``window`` is the buffer's largest width. TSB-AD sets it per series to the period
of the data (:func:`series_period`, the first channel for multivariate data); its
``get_metrics`` defaults to 100.
"""

from __future__ import annotations

import numpy as np

from .metrics import label_segments

THRESHOLDS = 250  # TSB-AD's ``thre``: scores at this many evenly spaced ranks are the thresholds


def _grown(seq: list[tuple[int, int]], half: int, n: int) -> list[tuple[int, int]]:
    """The segments grown by ``half`` on each side, those that then touch merged (``new_sequence``)."""
    out = []
    a = max(seq[0][0] - half, 0)
    for (_, e), (s_next, _) in zip(seq[:-1], seq[1:]):
        if e + half < s_next - half:
            out.append((a, e + half))
            a = s_next - half
    out.append((a, min(seq[-1][1] + half, n - 1)))
    return out


def _buffered(label: np.ndarray, seq: list[tuple[int, int]], width: int) -> np.ndarray:
    """Labels with a soft buffer of ``width // 2`` rows each side of every segment (``sequencing``)."""
    out = label.astype(np.float64)
    n = out.size
    for s, e in seq:
        after = np.arange(e + 1, min(e + width // 2 + 1, n))
        out[after] += np.sqrt(1 - (after - e) / width)
        before = np.arange(max(s - width // 2, 0), s)
        out[before] += np.sqrt(1 - (s - before) / width)
    return np.minimum(out, 1.0)


def _count_at_or_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="left")


def vus(label, score, window: int = 100, thresholds: int = THRESHOLDS) -> dict:
    """``{"vus_pr", "vus_roc"}`` of one series' scores against its 0/1 labels, in time order.

    NaN for both when the labels hold no anomaly (the surfaces are undefined)."""
    y = (np.asarray(label).reshape(-1) > 0).astype(np.int64)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"label and score lengths differ: {y.size} vs {s.size}")
    window = int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0; got {window}")
    seq = [(int(a), int(b) - 1) for a, b in label_segments(y)]  # inclusive ends, as TSB-AD's ranges
    if not seq:
        return {"vus_pr": float("nan"), "vus_roc": float("nan")}
    n, P = s.size, int(y.sum())
    ascending = np.sort(s)
    thr = ascending[::-1][np.linspace(0, n - 1, thresholds).astype(int)]  # descending
    n_pred = _count_at_or_above(ascending, thr).astype(np.float64)
    # TP from the labelled rows themselves, the same for every width
    tp_label = _count_at_or_above(np.sort(s[y == 1]), thr).astype(np.float64)
    auc, ap = np.zeros(window + 1), np.zeros(window + 1)
    for width in range(window + 1):
        ext = _buffered(y, seq, width)
        grown = _grown(seq, width // 2, n)
        # the buffer rows (inside a grown segment, not labelled) count with their weight when flagged
        buf = (ext > 0) & (y == 0)
        order = np.argsort(s[buf], kind="stable")
        buf_scores, buf_weights = s[buf][order], ext[buf][order]
        tail = np.concatenate([np.cumsum(buf_weights[::-1])[::-1], [0.0]])
        extra = tail[np.searchsorted(buf_scores, thr, side="left")]
        # a grown segment "exists" at a threshold when any of its rows is flagged there
        seg_max = np.array([s[a : b + 1].max() for a, b in grown])
        existence = (seg_max[None, :] >= thr[:, None]).sum(axis=1) / len(grown)
        tp = tp_label + extra
        p_new = P + extra / 2
        tpr = np.minimum(tp / p_new, 1.0) * existence
        fpr = (n_pred - tp) / (n - p_new)
        precision = tp / n_pred
        tpr_c = np.concatenate([[0.0], tpr, [1.0]])
        fpr_c = np.concatenate([[0.0], fpr, [1.0]])
        auc[width] = np.dot(np.diff(fpr_c), (tpr_c[1:] + tpr_c[:-1]) / 2)
        ap[width] = np.dot(np.diff(tpr_c[:-1]), precision)
    return {"vus_pr": float(ap.mean()), "vus_roc": float(auc.mean())}


def _acf(x: np.ndarray, nlags: int) -> np.ndarray:
    """Autocorrelation at lags 0 … nlags (statsmodels' ``acf(x, nlags, fft=True)``)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    n = x.size
    size = 1 << int(np.ceil(np.log2(2 * n - 1))) if n > 1 else 1
    f = np.fft.rfft(x, size)
    acov = np.fft.irfft(f * np.conj(f), size)[: nlags + 1] / n
    return acov / acov[0] if acov[0] else np.zeros(nlags + 1)


def series_period(x, default: int = 125) -> int:
    """The period of a 1-D series from its autocorrelation, as TSB-AD's ``find_length_rank(x, rank=1)``
    (the lag of the highest local maximum of the ACF over lags 3 … 400; ``default`` when there is
    none or it lies outside 3 … 300). TSB-AD uses it as each series' VUS window."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)[:20000]
    base = 3
    if x.size < base + 2:
        return default
    ac = _acf(x, min(400, x.size - 1))[base:]
    peaks = np.flatnonzero((ac[1:-1] > ac[:-2]) & (ac[1:-1] > ac[2:])) + 1
    if peaks.size == 0:
        return default
    best = peaks[np.argsort(ac[peaks], kind="stable")[::-1][0]]
    return int(best + base) if 3 <= best <= 300 else default
