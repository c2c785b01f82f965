"""Detection-quality floors on real data shipped with scikit-learn.

Set-up as in the ODDS "wbc" / "wine" benchmarks: one class is normal, another
is the anomaly class, subsampled to 10% of the normal test rows. The model is
trained (default model and training parameters) on a seeded 70% of the normal
rows and scored on the other 30% plus the anomalies. With only a handful of
anomalies one subsample gives a noisy ROC-AUC, so the floor applies to the
mean over 50 seeded subsamples (and, looser, to the AUC against all anomaly rows).

Measured (torch 2.13 CPU, default parameters, model seeds 0/1/2):

    breast_cancer  ae   mean AUC 0.907 / 0.932 / 0.941   all-anomaly AUC 0.901 / 0.927 / 0.938
    breast_cancer  vae  mean AUC 0.966 / 0.966 / 0.966   all-anomaly AUC 0.962 / 0.962 / 0.963
    wine           ae   mean AUC 0.908 / 0.910 / 0.914   all-anomaly AUC 0.919 / 0.923 / 0.925
    wine           vae  mean AUC 0.909 / 0.907 / 0.912   all-anomaly AUC 0.922 / 0.920 / 0.924

The floors are the seed-0 values minus a margin of about 0.1.
"""

from __future__ import annotations

import numpy as np
import pytest
from modeltestkit import auc
from sklearn.datasets import load_breast_cancer, load_wine
from unusual.models import Detector


def _breast_cancer():
    d = load_breast_cancer()
    return d.data, d.target == 1  # benign is normal, malignant the anomaly


def _wine():
    d = load_wine()
    return d.data, d.target != 0  # classes 1 and 2 normal, class 0 the anomaly (as ODDS wine)


DATASETS = {"breast_cancer": _breast_cancer, "wine": _wine}
# (dataset, kind): floor on the mean subsample AUC
FLOORS = {
    ("breast_cancer", "ae"): 0.80,
    ("breast_cancer", "vae"): 0.86,
    ("wine", "ae"): 0.80,
    ("wine", "vae"): 0.80,
}


def _split(x, normal, seed: int = 0):
    rng = np.random.default_rng(seed)
    norm = rng.permutation(np.flatnonzero(normal))
    n_train = int(round(0.7 * norm.size))
    return x[norm[:n_train]], x[norm[n_train:]], x[~normal]


@pytest.fixture(scope="module", params=sorted(FLOORS), ids=lambda p: f"{p[0]}-{p[1]}")
def measured(request):
    dataset, kind = request.param
    x, normal = DATASETS[dataset]()
    train, test_normal, anomalies = _split(x, normal)
    det = Detector(kind, seed=0).fit(train)  # default model and training parameters
    sn, sa = det.score(test_normal), det.score(anomalies)
    k = max(1, int(round(0.1 * sn.size)))
    labels = np.r_[np.zeros(sn.size), np.ones(k)]
    subsampled = [
        auc(labels, np.r_[sn, sa[np.random.default_rng(100 + s).choice(sa.size, k, replace=False)]]) for s in range(50)
    ]
    full = auc(np.r_[np.zeros(sn.size), np.ones(sa.size)], np.r_[sn, sa])
    return request.param, float(np.mean(subsampled)), full


def test_roc_auc_floor(measured):
    key, mean_auc, full_auc = measured
    floor = FLOORS[key]
    assert mean_auc >= floor, f"{key}: mean ROC-AUC {mean_auc:.3f} < floor {floor}"
    assert full_auc >= floor - 0.02, f"{key}: ROC-AUC on all anomalies {full_auc:.3f} < {floor - 0.02}"
