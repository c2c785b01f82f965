"""Detection on data as users have it: trained on rows that still hold their anomalies, without labels.

ODDS cardio (shipped in ``unusual.ray_jobs.sample_data``: 1,831 rows, 176 anomalies) is fit whole, label
left out, and scored whole, as the README's first hour does. Measured at commit e0d595d (torch 2.13 CPU,
seed 0): ROC-AUC ae 0.926, vae 0.926 (IsolationForest 0.909-0.936 over seeds 0-2; the ae before these
defaults, 0.632). At contamination 0.01 the ae flags 1.1 % of the rows, 18 of its 21 flags true anomalies.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from modeltestkit import auc
from unusual.models import Detector
from unusual.models.detector import split_params
from unusual.ray_jobs import sample_data

from unusual.sklearn import AutoencoderDetector, VAEDetector


@pytest.fixture(scope="module")
def cardio():
    t = sample_data.load("cardio")
    return t.drop_columns(["label"]), t.column("label").to_numpy()


@pytest.fixture(scope="module")
def fitted(cardio):
    X, _ = cardio
    return {kind: Detector(kind, seed=0).fit(X) for kind in ("ae", "vae")}


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_roc_auc_floor_when_trained_on_the_anomalies_too(fitted, cardio, kind):
    X, y = cardio
    score = auc(y, fitted[kind].score(X))
    assert score >= 0.85, f"{kind} trained on all of cardio: ROC-AUC {score:.3f} < 0.85"


def test_the_threshold_flags_about_contamination_of_the_training_rows(fitted, cardio):
    """The threshold is the (1 - contamination) quantile of the validation split's scores, a sample of the
    same contaminated data: about ``contamination`` of the training rows are flagged, mostly anomalies."""
    X, y = cardio
    base = y.mean()  # 9.6 % anomalies
    for contamination in (0.01, 0.05):
        det = fitted["ae"] if contamination == 0.01 else Detector("ae", seed=0, contamination=contamination).fit(X)
        flagged = det.predict(X).astype(bool)
        share = flagged.mean()
        assert 0.5 * contamination <= share <= 2 * contamination, (contamination, share)
        precision = y[flagged].mean()
        assert precision >= 3 * base, f"contamination {contamination}: precision {precision:.2f}, base {base:.2f}"


def test_the_joint_score_is_its_two_terms_each_about_one_on_a_usual_row(fitted, cardio):
    """score = error term (each column's error over its usual error, averaged) + latent term (squared
    Mahalanobis distance of the code over the latent width); the per-column terms sum to the score."""
    X, _ = cardio
    det = fitted["ae"]
    module = det.bundle_.module
    x = torch.from_numpy(det.schema_.transform(X)[0])
    with torch.no_grad():
        score, terms = module.score_terms(x)
        z = module.encoder(x)
        err = ((module.decoder(z) - x) ** 2 / module.error_scale).mean(-1)
        d = z - module.latent_mean
        latent = ((d @ module.latent_precision) * d).sum(-1) / module.latent
    np.testing.assert_allclose(score.numpy(), (err + latent).numpy(), rtol=1e-4)
    np.testing.assert_allclose(terms.sum(-1).numpy(), score.numpy(), rtol=1e-4)
    # Calibrated on these very rows: the mean error term is 1 (up to the scale's floor), the latent term
    # a little under 1 (the ridge on the covariance).
    assert 0.9 <= float(err.mean()) <= 1.0 + 1e-4
    assert 0.7 <= float(latent.mean()) <= 1.0 + 1e-4


def test_clean_switches_to_the_clean_data_defaults_and_explicit_values_win():
    for kind in ("ae", "vae"):
        model, _, train, _ = split_params(kind, {})
        assert (model.trim, train.epochs, train.patience, train.clean) == ((0.2 if kind == "ae" else 0.1), 20, 3, False)
        model, _, train, _ = split_params(kind, {"clean": True})
        assert (model.trim, train.epochs, train.patience, train.clean) == (0.0, 60, 8, True)
        model, _, train, _ = split_params(kind, {"clean": True, "epochs": 7, "trim": 0.05})
        assert (model.trim, train.epochs, train.patience) == (0.05, 7, 8)
    # The LSTM has no separate clean-data defaults.
    assert split_params("lstm", {"clean": True})[2].epochs == 60
    # scikit-learn: parameters left at their defaults take the clean-data values, set ones are kept.
    assert "epochs" not in AutoencoderDetector(clean=True)._detector_params()
    assert AutoencoderDetector(clean=True, epochs=5)._detector_params()["epochs"] == 5
    assert "trim" not in VAEDetector(clean=True)._detector_params()
    assert AutoencoderDetector()._detector_params()["trim"] == 0.2


def test_a_parameter_of_the_wrong_type_is_named():
    with pytest.raises(TypeError) as e:
        Detector("ae", epochs="three")
    assert str(e.value) == "parameter 'epochs' must be an integer; got 'three'"
    with pytest.raises(TypeError) as e:
        Detector("ae", latent="wide")
    assert str(e.value) == "parameter 'latent' must be an integer or null; got 'wide'"
    with pytest.raises(TypeError) as e:
        Detector("vae", trim=True)
    assert str(e.value) == "parameter 'trim' must be a number; got True"
    Detector("ae", lr=1, latent=None, hidden=[8])  # an int where a float is asked, None where allowed


def test_the_command_line_names_a_wrong_param_and_passes_clean(tmp_path):
    from unusual.config import FitJob

    job = FitJob(data="x.parquet", output=str(tmp_path / "m"), clean=True)
    assert job.detector() == ("ae", {"clean": True})
    args = ["fit", "--data", str(sample_data.path("cardio")), "--output", str(tmp_path / "m")]
    p = subprocess.run([sys.executable, "-m", "unusual.cli", *args, "--param", "epochs=three"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == "unusual fit: error: parameter 'epochs' must be an integer; got 'three'"
    v = subprocess.run([sys.executable, "-m", "unusual.cli", "--version"], capture_output=True, text=True, timeout=60)
    from unusual import __version__

    assert v.returncode == 0 and v.stdout.strip() == f"unusual {__version__}"
