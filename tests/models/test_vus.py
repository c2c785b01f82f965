"""models/vus.py against TSB-AD's reference (tsb-ad 1.5, installed without its dependencies) on fixed,
seeded data, and its behaviour on edge cases.

``TSB_AD.evaluation.metrics.get_metrics`` takes about a second per call on these short series, most of
it in metrics other than VUS (affiliation, range-F1), so it is called on one case; every case is
compared with ``generate_curve(labels, score, window, "opt", 250)``, the call ``get_metrics`` makes for
its ``VUS-ROC`` / ``VUS-PR`` (the test that uses both checks that they agree)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from unusual.models.vus import series_period, vus

TOL = 1e-9


def _labels(n: int, segments) -> np.ndarray:
    y = np.zeros(n, np.int64)
    for a, b in segments:
        y[a : b + 1] = 1
    return y


def _bumped(n: int, y: np.ndarray, seed: int, lift: float = 1.5) -> np.ndarray:
    """Noise, with the labelled rows (and a few near them) lifted on a share of rows."""
    rng = np.random.default_rng(seed)
    near = np.convolve(y, np.ones(7), mode="same") > 0
    return rng.gamma(2.0, 1.0, n) + lift * near * (rng.random(n) < 0.6)


def _case(name: str):
    """(labels, scores, window) of one fixed case."""
    if name == "segments":  # segments of different lengths, one a single row
        y = _labels(800, [(100, 129), (300, 300), (420, 431), (600, 659)])
        return y, _bumped(800, y, 0), 30
    if name == "start-and-end":  # a segment at the very first and one at the very last row; an odd window
        y = _labels(500, [(0, 14), (240, 251), (485, 499)])
        return y, _bumped(500, y, 1), 25
    if name == "ties":  # scores rounded: many thresholds tie
        y = _labels(600, [(50, 69), (300, 339), (500, 509)])
        return y, np.round(_bumped(600, y, 2), 1), 16
    if name == "window-0":
        y = _labels(400, [(30, 49), (200, 204), (350, 379)])
        return y, _bumped(400, y, 3), 0
    if name == "window-over-gap":  # buffers of the two segments 6 rows apart overlap and merge
        y = _labels(500, [(200, 209), (216, 229), (400, 410)])
        return y, _bumped(500, y, 4), 40
    if name == "constant":
        y = _labels(300, [(100, 119), (250, 259)])
        return y, np.full(300, 0.25), 12
    if name == "default-window":  # get_metrics' default, 100
        y = _labels(700, [(80, 119), (450, 469)])
        return y, _bumped(700, y, 5), 100
    raise KeyError(name)


CASES = ["segments", "start-and-end", "ties", "window-0", "window-over-gap", "constant", "default-window"]


def _reference(y: np.ndarray, s: np.ndarray, window: int) -> tuple[float, float]:
    """(VUS-PR, VUS-ROC) as TSB-AD's get_metrics computes them."""
    pytest.importorskip("TSB_AD")
    from TSB_AD.evaluation.basic_metrics import generate_curve

    *_, vus_roc, vus_pr = generate_curve(y.astype(int), s, window, "opt", 250)
    return float(vus_pr), float(vus_roc)


@pytest.mark.parametrize("name", CASES)
def test_vus_equals_tsb_ad(name):
    y, s, window = _case(name)
    want_pr, want_roc = _reference(y, s, window)
    got = vus(y, s) if window == 100 else vus(y, s, window=window)  # 100: vus()'s default, as get_metrics'
    assert abs(got["vus_pr"] - want_pr) <= TOL, (got, want_pr)
    assert abs(got["vus_roc"] - want_roc) <= TOL, (got, want_roc)


def test_vus_equals_tsb_ad_get_metrics():
    pytest.importorskip("TSB_AD")
    from TSB_AD.evaluation.metrics import get_metrics

    y, s, window = _case("segments")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ill-defined precision in the threshold metrics
        ref = get_metrics(s, y, slidingWindow=window)
    got = vus(y, s, window=window)
    assert abs(got["vus_pr"] - ref["VUS-PR"]) <= TOL and abs(got["vus_roc"] - ref["VUS-ROC"]) <= TOL
    assert (float(ref["VUS-PR"]), float(ref["VUS-ROC"])) == pytest.approx(_reference(y, s, window), abs=1e-15)


def _periodic(n: int, period: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return np.sin(2 * np.pi * t / period) + 0.3 * np.sin(2 * np.pi * t / (period / 3)) + 0.2 * rng.normal(size=n)


SERIES = {
    "sine-48": lambda: _periodic(3000, 48, 0),
    "sine-173": lambda: _periodic(4000, 173, 1),
    "sine-350 (beyond 300: the default)": lambda: _periodic(5000, 350, 2),
    "noise": lambda: np.random.default_rng(3).normal(size=2000),
    "random walk": lambda: np.cumsum(np.random.default_rng(4).normal(size=2000)),
    "longer than 20000 rows": lambda: _periodic(25_000, 96, 5),
}


@pytest.mark.parametrize("name", list(SERIES))
def test_series_period_equals_tsb_ad(name):
    pytest.importorskip("TSB_AD")
    pytest.importorskip("statsmodels")
    from TSB_AD.utils.slidingWindows import find_length_rank

    x = SERIES[name]()
    assert series_period(x) == int(find_length_rank(x.reshape(-1, 1), rank=1))


def test_series_period_finds_the_period():
    assert abs(series_period(_periodic(3000, 48, 0)) - 48) <= 1
    assert series_period(_periodic(5000, 350, 2)) == 125  # outside 3 … 300


def test_no_anomaly_gives_nan():
    out = vus(np.zeros(50), np.random.default_rng(0).random(50), window=10)
    assert set(out) == {"vus_pr", "vus_roc"} and all(math.isnan(v) for v in out.values())


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError) as e:
        vus([0, 1, 0], [0.1, 0.2, 0.3, 0.4])
    assert str(e.value) == "label and score lengths differ: 3 vs 4"


def test_negative_window_raises():
    with pytest.raises(ValueError, match="window must be >= 0"):
        vus([0, 1, 0], [0.1, 0.2, 0.3], window=-1)


def test_a_well_placed_score_beats_a_shifted_one():
    """The same bump of scores on the labelled segment, a few rows off it (inside the buffer) and far
    from it: VUS-PR ranks them in that order, and only the far one is near chance in VUS-ROC."""
    n, window = 1000, 40
    y = _labels(n, [(300, 339)])
    noise = np.random.default_rng(6).random(n) * 0.5

    def bumped(shift: int) -> np.ndarray:
        s = noise.copy()
        s[300 + shift : 340 + shift] += 1.0
        return s

    on, near, far = (vus(y, bumped(k), window) for k in (0, 12, 400))
    assert on["vus_pr"] > near["vus_pr"] > far["vus_pr"]
    assert on["vus_roc"] > near["vus_roc"] > far["vus_roc"]
    assert far["vus_pr"] < 0.2 and on["vus_pr"] > 0.8
