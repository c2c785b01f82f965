"""The contract every registered model family honours.

Parametrized over ``unusual.models.registry.kinds()``: a newly registered family is
tested automatically. One tiny model per kind is trained once for the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch
from modeltestkit import auc, plant_outliers, plant_spikes, series, tabular, tiny_params
from unusual.models import Detector, Scorer, kinds
from unusual.models.registry import family

KINDS = kinds()


@dataclass
class Case:
    kind: str
    sequence: bool
    params: dict
    det: Detector
    fitted: object  # what fit returned
    train: object
    test: object  # ndarray (tabular) or pa.Table (sequence)
    labels: np.ndarray  # 1 = planted outlier
    planted: np.ndarray  # index of the feature the outlier was planted in, -1 for normal rows
    feature_names: list[str]


def _test_data(sequence: bool):
    if sequence:
        # Spikes at least 12 rows apart so that one spike's echo in later
        # windows does not land on another planted row.
        table = series(("a", "b", "c"), 160, seed=1)
        table, y, col = plant_spikes(table, frac=0.03, seed=2, magnitude=8.0, margin=12)
        return table, y, col, [f"c{j}" for j in range(4)]
    x, y, col = plant_outliers(tabular(600, seed=1), frac=0.05, seed=2, magnitude=10.0)
    return x, y, col, [f"x{j}" for j in range(x.shape[1])]


@pytest.fixture(scope="module", params=KINDS)
def case(request, tab_train, seq_train) -> Case:
    kind = request.param
    sequence = family(kind).sequence
    # The contract is about one-row outliers: a family that can average a row's score over the steps
    # before it (the LSTM's default, score_steps = the window) spreads a spike over the next rows by
    # design, and its look-ahead over the rows before it (tests/models/test_lstm_scoring.py), so here each row
    # is scored by its own step.
    fields = family(kind).config.__dataclass_fields__
    one_step = {"score_steps": 1, "score_lookahead": 0} if "score_steps" in fields else {}
    params = tiny_params(kind, **one_step)
    det = Detector(kind, **params)
    train = seq_train if sequence else tab_train
    fitted = det.fit(train)
    test, y, col, names = _test_data(sequence)
    return Case(kind, sequence, params, det, fitted, train, test, y, col, names)


def test_fit_returns_self(case):
    assert case.fitted is case.det
    assert np.isfinite(case.det.threshold_)


def test_score_shape_dtype_finite(case):
    s = case.det.score(case.test)
    n = len(case.labels)
    assert s.shape == (n,)
    assert s.dtype == np.float64
    assert np.isfinite(s).all()
    # Not a constant function.
    assert s.std() > 0


def test_higher_score_means_more_anomalous(case):
    s = case.det.score(case.test)
    y = case.labels
    assert s[y == 1].mean() > s[y == 0].mean()
    assert auc(y, s) > 0.9, f"{case.kind}: ROC-AUC of planted outliers {auc(y, s):.3f}"


def test_top_feature_names_the_planted_column(case):
    out = case.det.score_table(case.test)
    tops = out.column("top_features").to_pylist()
    rows = np.flatnonzero(case.labels == 1)
    hits = [tops[r][0]["feature"] == case.feature_names[case.planted[r]] for r in rows]
    assert np.mean(hits) >= 0.8, f"{case.kind}: top feature matched the planted column in {np.mean(hits):.0%}"


def test_predict_is_score_above_threshold(case):
    s = case.det.score(case.test)
    p = case.det.predict(case.test)
    assert p.shape == s.shape
    assert set(np.unique(p)) <= {0, 1}
    np.testing.assert_array_equal(p, (s > case.det.threshold_).astype(int))
    # Gross outliers are flagged; normal rows mostly are not.
    y = case.labels
    assert p[y == 1].mean() >= 0.8
    assert p[y == 0].mean() <= 0.15


def test_save_load_round_trip(case, tmp_path):
    uri = str(tmp_path / f"{case.kind}-bundle")
    version = case.det.save(uri)
    assert version == case.det.version
    loaded = Detector.load(uri)
    assert loaded.kind == case.kind
    assert loaded.version == version
    assert loaded.threshold_ == case.det.threshold_
    assert np.array_equal(loaded.score(case.test), case.det.score(case.test))
    assert loaded.score_table(case.test).equals(case.det.score_table(case.test))


def test_seeded_fit_is_reproducible(case):
    again = Detector(case.kind, **case.params).fit(case.train)
    assert np.array_equal(again.score(case.test), case.det.score(case.test))
    assert again.threshold_ == case.det.threshold_
    a, b = again.bundle_.module.state_dict(), case.det.bundle_.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The manifests differ only in wall-clock time, and so in the hash and version
    # derived from them.
    strip = ("content_hash", "model_version", "training")
    ma, mb = (d.bundle_.manifest.to_json() for d in (again, case.det))
    assert {k: v for k, v in ma.items() if k not in strip} == {k: v for k, v in mb.items() if k not in strip}
    ta, tb = (dict(m["training"], seconds=0.0) for m in (ma, mb))
    assert ta == tb


def test_another_seed_gives_another_model(case):
    other = Detector(case.kind, **{**case.params, "seed": 1}).fit(case.train)
    assert not np.array_equal(other.score(case.test), case.det.score(case.test))
    assert other.version != case.det.version


def test_score_table_columns(case):
    out = case.det.score_table(case.test)
    n = len(case.labels)
    assert out.num_rows == n
    assert out.column_names == ["anomaly_score", "is_anomaly", "top_features", "model_version"]
    assert out.schema.field("anomaly_score").type == pa.float64()
    assert out.schema.field("is_anomaly").type == pa.bool_()
    assert out.schema.field("model_version").type == pa.string()
    top_type = out.schema.field("top_features").type
    assert pa.types.is_list(top_type)
    assert top_type.value_type == pa.struct([("feature", pa.string()), ("contribution", pa.float64())])

    scores = out.column("anomaly_score").to_numpy()
    assert np.array_equal(scores, case.det.score(case.test))
    assert np.array_equal(out.column("is_anomaly").to_numpy(zero_copy_only=False), scores > case.det.threshold_)
    assert set(out.column("model_version").to_pylist()) == {case.det.version}
    assert out.column("anomaly_score").null_count == 0

    k = min(3, len(case.feature_names))
    for row in out.column("top_features").to_pylist():
        assert len(row) == k
        contrib = [f["contribution"] for f in row]
        assert contrib == sorted(contrib, reverse=True)
        assert all(np.isfinite(contrib))
        names = [f["feature"] for f in row]
        assert len(set(names)) == k
        assert set(names) <= set(case.feature_names)


@pytest.mark.parametrize("top_k", [1, 5])
def test_scorer_top_k(case, top_k):
    out = Scorer(case.det.bundle_, top_k=top_k).score_table(case.test)
    lengths = {len(v) for v in out.column("top_features").to_pylist()}
    assert lengths == {min(top_k, len(case.feature_names))}


def test_results_come_back_in_input_order(case):
    """Rows out == rows in, and a shuffled input gives the same per-row results."""
    table = case.test if case.sequence else pa.table({f"x{j}": case.test[:, j] for j in range(case.test.shape[1])})
    n = table.num_rows
    perm = np.random.default_rng(7).permutation(n)
    shuffled = table.take(pa.array(perm))
    ordered_out = case.det.score_table(table)
    shuffled_out = case.det.score_table(shuffled)
    assert shuffled_out.num_rows == n
    # Row i of the shuffled output belongs to input row perm[i].
    assert np.array_equal(
        shuffled_out.column("anomaly_score").to_numpy(), ordered_out.column("anomaly_score").to_numpy()[perm]
    )
    assert shuffled_out.column("top_features").to_pylist() == [
        ordered_out.column("top_features").to_pylist()[i] for i in perm
    ]


def test_chunking_does_not_change_scores(case):
    ref = case.det.score(case.test)
    np.testing.assert_allclose(Scorer(case.det.bundle_, chunk_rows=17).scores(case.test), ref, rtol=1e-5, atol=1e-6)


def test_tabular_row_scores_do_not_depend_on_the_batch(case):
    if case.sequence:
        pytest.skip("sequence rows are scored with their history")
    ref = case.det.score(case.test)
    np.testing.assert_allclose(case.det.score(case.test[5:10]), ref[5:10], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(case.det.score(case.test[7:8]), ref[7:8], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- family options


def test_vae_elbo_score_adds_the_kl_term(tab_train):
    """The training loss does not depend on ``score``: the same seed gives the
    same weights, and the negative ELBO is the reconstruction NLL plus KL >= 0."""
    params = tiny_params("vae")
    nll = Detector("vae", **params, score="nll").fit(tab_train)
    elbo = Detector("vae", **params, score="elbo").fit(tab_train)
    x = tabular(100, seed=4)
    kl = elbo.score(x) - nll.score(x)
    assert kl.min() >= -1e-4
    assert kl.max() > 1e-3
    assert elbo.bundle_.manifest.family_config["score"] == "elbo"
