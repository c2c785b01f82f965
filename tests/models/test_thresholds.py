"""Thresholds: quantile false-positive rate, POT / GPD tail fits, config validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from modeltestkit import tabular
from unusual.models import Detector
from unusual.models.thresholds import (
    ThresholdConfig,
    fit_gpd,
    fit_threshold,
    fit_threshold_tail,
    pot_threshold,
    tail_fraction,
)


def gpd_sample(rng, n: int, xi: float, sigma: float) -> np.ndarray:
    """Generalized Pareto draws by inversion (xi = 0: exponential)."""
    u = rng.uniform(size=n)
    if xi == 0:
        return -sigma * np.log(u)
    return sigma * (u ** (-xi) - 1.0) / xi


def gpd_quantile(p_exceed: float, xi: float, sigma: float) -> float:
    if xi == 0:
        return -sigma * math.log(p_exceed)
    return sigma * (p_exceed ** (-xi) - 1.0) / xi


# --------------------------------------------------------------------------- quantile


@pytest.mark.parametrize("contamination", [0.01, 0.05, 0.2])
def test_quantile_threshold_false_positive_rate(contamination):
    rng = np.random.default_rng(0)
    rec = fit_threshold(rng.normal(size=20_000), ThresholdConfig(contamination=contamination))
    assert rec.threshold == "quantile" and rec.n_scores == 20_000
    fresh = rng.normal(size=400_000)
    fpr = float(np.mean(fresh > rec.value))
    assert abs(fpr - contamination) < 0.1 * contamination + 0.002, fpr


def test_threshold_ignores_nonfinite_scores():
    scores = np.r_[np.arange(100.0), np.nan, np.inf, -np.inf]
    rec = fit_threshold(scores, ThresholdConfig(contamination=0.1))
    assert rec.n_scores == 100
    assert rec.value == pytest.approx(np.quantile(np.arange(100.0), 0.9))
    with pytest.raises(ValueError, match="zero finite scores"):
        fit_threshold(np.array([np.nan, np.inf]), ThresholdConfig())


def test_detector_threshold_false_positive_rate_on_held_out_normal_data():
    det = Detector("ae", hidden=[16], epochs=4, seed=0, contamination=0.05).fit(tabular(3000, seed=0))
    fresh = tabular(4000, seed=9)
    fpr = det.predict(fresh).mean()
    # 450 validation scores: the quantile is estimated to about +-0.01; the
    # model also fits its training rows a little better than fresh ones.
    assert 0.02 <= fpr <= 0.10, fpr


# --------------------------------------------------------------------------- GPD / POT


def test_fit_gpd_exponential_has_zero_shape():
    rng = np.random.default_rng(1)
    xi, sigma = fit_gpd(rng.exponential(2.0, 5000))
    assert abs(xi) < 0.06
    assert sigma == pytest.approx(2.0, rel=0.08)


@pytest.mark.parametrize("xi_true, sigma_true", [(0.3, 2.0), (-0.3, 1.0)])
def test_fit_gpd_recovers_shape_and_scale(xi_true, sigma_true):
    rng = np.random.default_rng(2)
    xi, sigma = fit_gpd(gpd_sample(rng, 5000, xi_true, sigma_true))
    assert xi == pytest.approx(xi_true, abs=0.08)
    assert sigma == pytest.approx(sigma_true, rel=0.1)


def test_fit_gpd_pareto_tail_has_positive_shape():
    # Classical Pareto with tail index alpha = 2: excesses over its minimum are GPD with xi = 1/alpha.
    rng = np.random.default_rng(3)
    pareto = rng.pareto(2.0, 5000)
    xi, _ = fit_gpd(pareto)
    assert 0.3 < xi < 0.7


def test_fit_gpd_degenerate_inputs():
    assert fit_gpd(np.array([])) == (0.0, 1e-12)
    xi, sigma = fit_gpd(np.array([1.5]))
    assert xi == 0.0 and sigma == 1.5
    xi, sigma = fit_gpd(np.zeros(10))
    assert xi == 0.0 and sigma > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pot_on_exponential_scores_finds_the_true_quantile(seed):
    rng = np.random.default_rng(seed)
    scores = rng.exponential(1.0, 20_000)
    rec = fit_threshold(scores, ThresholdConfig(threshold="pot", contamination=1e-3))
    assert rec.threshold == "pot"
    assert rec.value == pytest.approx(math.log(1000), rel=0.15)  # 6.91
    assert rec.gpd["peaks"] == 400
    assert abs(rec.gpd["xi"]) < 0.2


def test_pot_extrapolates_beyond_the_sample():
    # 1e-5 on 20 000 scores: the empirical quantile is just the sample maximum.
    rng = np.random.default_rng(4)
    scores = rng.exponential(1.0, 20_000)
    value, gpd = pot_threshold(np.sort(scores), scores.size, 1e-5, 0.98)
    assert "fallback" not in gpd
    assert value == pytest.approx(math.log(1e5), rel=0.15)  # 11.5


def test_pot_on_heavy_tail():
    rng = np.random.default_rng(5)
    scores = gpd_sample(rng, 50_000, 0.25, 1.0)
    value, gpd = pot_threshold(np.sort(scores), scores.size, 1e-3, 0.98)
    assert gpd["xi"] == pytest.approx(0.25, abs=0.1)
    assert value == pytest.approx(gpd_quantile(1e-3, 0.25, 1.0), rel=0.15)


def test_pot_falls_back_to_the_quantile_with_too_few_peaks():
    scores = np.random.default_rng(6).exponential(1.0, 100)  # 2 peaks above the 98% level
    value, gpd = pot_threshold(np.sort(scores), scores.size, 0.01, 0.98)
    assert gpd == {"fallback": "quantile", "peaks": 2}
    assert value == np.quantile(scores, 0.99)


def test_pot_falls_back_when_the_target_is_inside_the_body():
    scores = np.random.default_rng(7).exponential(1.0, 10_000)
    value, gpd = pot_threshold(np.sort(scores), scores.size, 0.1, 0.98)  # 10% is not in the top 2% tail
    assert gpd["fallback"] == "quantile"
    assert value == np.quantile(scores, 0.9)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kind, params, field",
    [
        ("ae", {"threshold": "mad"}, "threshold"),
        ("ae", {"contamination": 0.0}, "contamination"),
        ("ae", {"contamination": 0.5}, "contamination"),
        ("ae", {"pot_level": 1.0}, "pot_level"),
        ("ae", {"pot_level": 0.3}, "pot_level"),
        ("ae", {"epochs": 0}, "epochs"),
        ("ae", {"batch_size": 0}, "batch_size"),
        ("ae", {"val_fraction": 1.0}, "val_fraction"),
        ("ae", {"scaling": "minmax"}, "scaling"),
        ("ae", {"nan_policy": "drop"}, "nan_policy"),
        ("ae", {"unseen_category": "ignore"}, "unseen_category"),
        ("ae", {"max_categories": 0}, "max_categories"),
        ("vae", {"score": "kl"}, "score"),
        ("vae", {"n_samples": 0}, "n_samples"),
        ("lstm", {"objective": "classify"}, "objective"),
        ("lstm", {"window": 0}, "window"),
    ],
)
def test_invalid_config_values_name_the_field(kind, params, field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        Detector(kind, **params)


def test_threshold_config_direct():
    with pytest.raises(ValueError, match="contamination"):
        ThresholdConfig(contamination=-0.1)
    with pytest.raises(ValueError, match="threshold"):
        ThresholdConfig(threshold="Quantile")


def test_threshold_without_validation_split_is_fit_on_training_scores():
    x = tabular(300, seed=0)
    det = Detector("ae", hidden=[8], epochs=2, seed=0, val_fraction=0.0).fit(x)
    thr = det.bundle_.manifest.threshold
    assert thr.fit_on == "training"
    assert thr.n_scores == 300
    assert det.threshold_ == pytest.approx(np.quantile(det.score(x), 0.99), rel=1e-5)


@pytest.mark.parametrize("method", ["quantile", "pot"])
def test_threshold_from_the_top_tail_equals_the_threshold_from_all_scores(method):
    """The distributed runner passes only the top of the score distribution."""
    scores = np.random.default_rng(8).gamma(2.0, 1.0, 30_000)
    cfg = ThresholdConfig(threshold=method, contamination=0.01)
    full = fit_threshold(scores, cfg)
    m = int(np.ceil(tail_fraction(cfg) * scores.size)) + 2
    tail = np.sort(scores)[-m:]
    assert fit_threshold_tail(tail, scores.size, cfg).value == full.value
    with pytest.raises(ValueError, match="tail is too short"):
        fit_threshold_tail(tail[-10:], scores.size, cfg)
