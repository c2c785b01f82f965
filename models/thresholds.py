"""Thresholds fit on validation scores; the threshold belongs to the model.

- ``quantile``: the (1 - contamination) quantile of the validation scores, i.e.
  a target false-positive rate of ``contamination`` on normal data.
- ``pot``: peaks over threshold (as in SPOT, Siffer et al., KDD 2017). Scores
  above an initial high quantile (``pot_level``) are fit with a generalized
  Pareto tail and the threshold is the score exceeded with probability
  ``contamination`` under that tail. It extrapolates beyond the validation
  sample, which matters when the target rate is small.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .manifest import ThresholdRecord
from .params import param, validate


@dataclass
class ThresholdConfig:
    threshold: str = param("quantile", choices=("quantile", "pot"), help=(
        "`quantile`: the (1 − contamination) quantile of validation scores; `pot`: peaks over threshold with "
        "a generalized Pareto tail (SPOT)"))
    contamination: float = param(0.01, gt=0, lt=0.5, help="target false-positive rate on normal data")
    pot_level: float = param(0.98, ge=0.5, lt=1, help="initial quantile of the POT tail")

    def __post_init__(self):
        validate(self)


def fit_threshold(scores: np.ndarray, cfg: ThresholdConfig) -> ThresholdRecord:
    """The threshold record stored in the bundle manifest."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.sort(scores[np.isfinite(scores)])
    return fit_threshold_tail(scores, scores.size, cfg)


def tail_fraction(cfg: ThresholdConfig) -> float:
    """The top fraction of the scores that :func:`fit_threshold_tail` needs."""
    return 1.0 - min(cfg.pot_level, 1.0 - cfg.contamination)


def fit_threshold_tail(tail: np.ndarray, n: int, cfg: ThresholdConfig) -> ThresholdRecord:
    """The threshold from the ``len(tail)`` largest of ``n`` finite scores, sorted
    ascending. With the whole sorted sample this is exact; a distributed runner
    passes only the top :func:`tail_fraction` (plus a margin) and gets the same
    answer without collecting every score."""
    if n == 0:
        raise ValueError("cannot fit a threshold on zero finite scores")
    if cfg.threshold == "quantile":
        return ThresholdRecord(**asdict(cfg), n_scores=int(n), value=_tail_quantile(tail, n, 1.0 - cfg.contamination))
    value, gpd = pot_threshold(tail, n, cfg.contamination, cfg.pot_level)
    return ThresholdRecord(**asdict(cfg), n_scores=int(n), value=value, gpd=gpd)


def _tail_quantile(tail: np.ndarray, n: int, q: float) -> float:
    """numpy's default (linear) quantile of n sorted values, given the top len(tail)."""
    h = q * (n - 1)
    lo = int(math.floor(h))
    i = lo - (n - tail.size)
    if i < 0:
        raise ValueError(f"the score tail is too short for quantile {q}: {tail.size} of {n} scores")
    hi = min(i + 1, tail.size - 1)
    return float(tail[i] + (h - lo) * (tail[hi] - tail[i]))


def fit_gpd(excess: np.ndarray) -> tuple[float, float]:
    """Generalized Pareto (shape xi, scale sigma) by probability-weighted moments
    (Hosking & Wallis, 1987): closed form and robust on small samples."""
    x = np.sort(excess)
    n = x.size
    if n < 2 or x.mean() <= 0:
        return 0.0, float(max(x.mean(), 1e-12)) if n else 1e-12
    b0 = x.mean()
    b1 = float(np.sum(x * (np.arange(n) / (n - 1)))) / n  # E[X F(X)]
    a1 = b0 - b1  # E[X (1 - F(X))]
    k = b0 / (b0 - 2 * a1) - 2  # Hosking's k = -xi
    sigma = 2 * b0 * a1 / (b0 - 2 * a1)
    xi = -k
    if not np.isfinite(xi) or not np.isfinite(sigma) or sigma <= 0:
        return 0.0, float(b0)
    return float(xi), float(sigma)


def pot_threshold(tail: np.ndarray, n: int, risk: float, level: float) -> tuple[float, dict]:
    """SPOT's initial step on the top ``len(tail)`` of ``n`` sorted scores."""
    t = _tail_quantile(tail, n, level)
    excess = tail[tail > t] - t
    nt = excess.size
    if nt < 5 or risk * n / max(nt, 1) >= 1.0:
        # Too few peaks for a tail fit, or a target inside the body: the
        # empirical quantile is the honest answer.
        return _tail_quantile(tail, n, 1.0 - risk), {"fallback": "quantile", "peaks": int(nt)}
    xi, sigma = fit_gpd(excess)
    r = risk * n / nt
    if abs(xi) < 1e-6:
        z = t - sigma * math.log(r)
    else:
        z = t + (sigma / xi) * (r ** (-xi) - 1.0)
    return float(z), {"xi": xi, "sigma": sigma, "t": t, "peaks": int(nt)}
