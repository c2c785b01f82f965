"""The metric helpers of models/metrics.py against scikit-learn and hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from unusual.models.metrics import (
    ScoreHistogram,
    adjusted_scores,
    average_precision,
    best_f1,
    best_f1_pa,
    label_segments,
    point_adjust,
    prf,
    quantile_edges,
    roc_auc,
)


def _heavy(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed scores (log-Student-t, like reconstruction errors), 5 % positives scoring higher."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.05
    s = np.exp(rng.standard_t(2, size=n) + 1.5 * y)
    return s, y


def test_exact_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.random(3000) < 0.1
    s = np.round(rng.normal(size=3000) + y, 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_one_class_is_an_error():
    with pytest.raises(ValueError, match="ROC-AUC needs both classes; got 0 positive and 3 negative labels"):
        roc_auc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="average precision needs both classes; got 2 positive and 0 negative"):
        average_precision([1, 1], [0.1, 0.2])


@pytest.mark.parametrize("bins", [16384, 2048])
def test_histogram_close_to_sklearn_on_heavy_tails(bins):
    s, y = _heavy()
    # edges from a 5 000-score sample, as the batch job gets them from its reservoir
    sample = np.random.default_rng(2).choice(s, 5000, replace=False)
    h = ScoreHistogram.of(s, y, quantile_edges(sample, bins, s.min(), s.max()))
    assert h.positives == y.sum() and h.negatives == (~y).sum()
    assert h.roc_auc() == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert h.average_precision() == pytest.approx(average_precision_score(y, s), abs=1e-3)
    assert h.best_f1()["f1"] == pytest.approx(best_f1(s, y)["f1"], abs=1e-2)
    # the best F1 over the edges is an exact F1: the one of thresholding at that edge
    b = h.best_f1()
    assert b["f1"] == pytest.approx(prf(s >= b["threshold"], y)["f1"], abs=1e-12)


def test_histogram_exact_when_edges_are_the_distinct_scores():
    s, y = _heavy(5000, seed=3)
    s = np.round(np.log(s), 0)  # a dozen distinct values, heavy ties
    h = ScoreHistogram.of(s, y, np.unique(s), pred=s >= 2)
    assert h.roc_auc() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert h.average_precision() == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert h.best_f1() == pytest.approx(best_f1(s, y), abs=1e-12)
    at, ref = h.at_threshold(), prf(s >= 2, y)
    assert (at["precision"], at["recall"], at["f1"]) == pytest.approx((ref["precision"], ref["recall"], ref["f1"]))
    assert at["tp"] + at["fp"] == ref["flagged"] and at["tp"] + at["fp"] + at["fn"] + at["tn"] == s.size
    # the full ROC curve's trapezoid area is the AUC with ties counted half
    fpr, tpr = h.roc_curve(max_points=10**6)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(h.roc_auc(), abs=1e-12)


def test_merge_of_two_halves_equals_the_whole():
    s, y = _heavy(4000, seed=4)
    pred = s > 5
    edges = quantile_edges(s, 512, s.min(), s.max())
    whole = ScoreHistogram.of(s, y, edges, pred)
    a = ScoreHistogram.of(s[:1500], y[:1500], edges, pred[:1500])
    b = ScoreHistogram.of(s[1500:], y[1500:], edges, pred[1500:])
    m = a.merge(b)
    assert np.array_equal(m.pos, whole.pos) and np.array_equal(m.neg, whole.neg)
    assert (m.tp, m.fp, m.fn, m.tn) == (whole.tp, whole.fp, whole.fn, whole.tn)
    assert m.roc_auc() == whole.roc_auc() and m.average_precision() == whole.average_precision()
    with pytest.raises(ValueError, match="different bin edges"):
        a.merge(ScoreHistogram.empty(edges[:-1]))


def test_curves_and_density_for_the_report():
    s, y = _heavy()
    h = ScoreHistogram.of(s, y, quantile_edges(s, 16384, s.min(), s.max()))
    fpr, tpr = h.roc_curve()
    recall, precision = h.pr_curve()
    assert len(fpr) <= 200 and len(recall) <= 200
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert (recall[0], precision[0], recall[-1]) == (0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(recall) >= 0)
    d = h.density(40)
    assert d["scale"] == "log" and len(d["edges"]) == 41 and len(d["positive"]) == 40
    assert sum(d["positive"]) == pytest.approx(1.0) and sum(d["negative"]) == pytest.approx(1.0)
    # negative scores: a linear axis
    assert ScoreHistogram.of(-s, y, np.unique(-s)).density()["scale"] == "linear"


# --------------------------------------------------------------------------- point adjustment

# Two labelled segments, [1, 4) and [6, 8); negatives score 0.1, 0.6 and 0.9.
SCORES = np.array([0.1, 0.7, 0.2, 0.3, 0.6, 0.9, 0.1, 0.4])
LABEL = np.array([0, 1, 1, 1, 0, 0, 1, 1])


def test_point_adjust_by_hand():
    label = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0])
    pred = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1])
    assert label_segments(label).tolist() == [[1, 4], [6, 8]]
    assert point_adjust(pred, label).astype(int).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 1]
    m = prf(point_adjust(pred, label), label)  # TP 3, FP 1, FN 2
    assert (m["precision"], m["recall"], m["f1"]) == (0.75, 0.6, pytest.approx(2 / 3))
    assert point_adjust([0, 1, 0, 0], [1, 1, 0, 1]).astype(int).tolist() == [1, 1, 0, 0]


def test_adjusted_scores_by_hand():
    assert adjusted_scores(SCORES, LABEL).tolist() == [0.1, 0.7, 0.7, 0.7, 0.6, 0.9, 0.4, 0.4]
    assert adjusted_scores([0.3, 0.2], [1, 1]).tolist() == [0.3, 0.3]
    assert adjusted_scores([0.3, 0.2], [0, 0]).tolist() == [0.3, 0.2]


def test_best_f1_by_hand_with_and_without_adjustment():
    # Without adjustment the best is to flag everything: TP 5, FP 3 -> F1 10/13.
    assert best_f1(SCORES, LABEL) == pytest.approx({"f1": 10 / 13, "precision": 5 / 8, "recall": 1.0, "threshold": 0.1})
    # With it, t = 0.2 catches both segments (maxima 0.7 and 0.4) and two negatives: TP 5, FP 2 -> 5/6.
    want = {"f1": 5 / 6, "precision": 5 / 7, "recall": 1.0, "threshold": 0.2}
    assert best_f1_pa(SCORES, LABEL) == pytest.approx(want)
    # The histogram of the adjusted scores gives the same, and the point-adjusted ROC-AUC:
    # positives (0.7 x3, 0.4 x2) above negatives (0.1, 0.6, 0.9): 3 x 2 + 2 x 1 = 8 of 15 pairs.
    h = ScoreHistogram.of(adjusted_scores(SCORES, LABEL), LABEL, np.unique(SCORES))
    assert h.best_f1() == pytest.approx(want)
    assert h.roc_auc() == pytest.approx(8 / 15)


def test_adjusted_scores_give_point_adjusted_predictions_at_every_threshold():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(5, 80))
        lab = np.repeat(rng.random(n // 4 + 1) < 0.3, 4)[:n]
        sc = np.round(rng.normal(size=n) + lab, 1)
        adj = adjusted_scores(sc, lab)
        for t in np.unique(sc):
            assert np.array_equal(adj >= t, point_adjust(sc >= t, lab))
        if lab.any():
            assert best_f1(adj, lab)["f1"] == pytest.approx(best_f1_pa(sc, lab)["f1"], abs=1e-12)
