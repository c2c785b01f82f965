"""The detector's threshold fit on a Ray Dataset of scores, without collecting every score."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ..models.columns import as_float
from ..models.stats import NumStats
from ..models.thresholds import fit_threshold_tail, tail_fraction
from .aggregates import merged


def _score_stats(block: pa.Table) -> NumStats:
    return NumStats.of(as_float(block.column("score")), np.random.default_rng(0))


def fit_threshold_at_scale(scores, cfg) -> dict:
    """The threshold over a Ray Dataset of scores (a float ``score`` column) without collecting them all.

    Pass 1 merges per-block counts and reservoir samples (a Ray Data aggregation of
    :class:`unusual.models.stats.NumStats`) to find a score below which at most the needed
    top tail lies (with a safety margin); pass 2 collects the exact scores above it. The
    result equals fitting on every score (``unusual.models.thresholds.fit_threshold_tail``).
    """
    stats = merged(scores, _score_stats)
    if stats is None:
        raise ValueError("cannot fit a threshold: the validation split is empty")
    n = stats.count
    if n == 0:
        raise ValueError("cannot fit a threshold on zero finite scores")
    need = int(math.ceil(tail_fraction(cfg) * n)) + 2
    frac = min(1.0, 2.0 * need / n + 0.001)
    lower = float(np.quantile(stats.sample, 1.0 - frac)) if frac < 1.0 else -math.inf
    while True:
        tail = np.sort(
            np.concatenate(
                [b["score"] for b in scores.filter(expr=f"score >= {lower!r}").iter_batches(batch_format="numpy")]
                or [np.empty(0)]
            )
        )
        tail = tail[np.isfinite(tail)]
        if tail.size >= need or lower == -math.inf:
            break
        lower = -math.inf  # the sample misjudged the tail: take every score
    rec = fit_threshold_tail(tail, n, cfg)
    rec["collected"] = int(tail.size)
    return rec
