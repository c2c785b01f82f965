"""Numerics that cannot hide an anomaly.

An extreme but finite value (1e30, 1e308, the largest float64) gets a finite, very high score and is
flagged, by ``Detector.score`` and by the ``Scorer`` under either error policy: scaled inputs are
clipped to ``Z_LIMIT`` scales before the float32 model sees them. Property-based tests (hypothesis)
drive the ``Scorer`` with any finite values, any mix of NaN / inf / null under each NaN policy and
error policy, and any cut of the rows into batches: rows out = rows in, and each row has a finite
score or carries an error (``errors="raise"``: the call raises, naming the column and row).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modeltestkit import N_FEATURES, tiny_params
from unusual.models import Detector, SchemaError, Scorer
from unusual.models.features import Z_LIMIT

KINDS = ("ae", "vae")
EXTREMES = (1e30, -1e30, 1e308, -1e308, float(np.finfo(np.float64).max))
NAMES = [f"x{j}" for j in range(N_FEATURES)]


@pytest.fixture(scope="module")
def dets(tab_train) -> dict:
    out = {}
    for kind in KINDS:
        out[kind] = Detector(kind, **tiny_params(kind)).fit(tab_train)
        out[f"{kind}-impute"] = Detector(kind, nan_policy="impute", **tiny_params(kind)).fit(tab_train)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", EXTREMES)
def test_an_extreme_finite_value_gets_a_finite_high_score_and_is_flagged(dets, tab_train, kind, value):
    det = dets[kind]
    x = tab_train[:6].copy()
    x[3, 1] = value
    scores = det.score(x)
    assert np.isfinite(scores).all(), scores
    assert det.predict(x)[3] == 1
    assert scores[3] > 1000 * det.threshold_
    for errors in ("raise", "mask"):
        out = Scorer(det.bundle_, errors=errors).score_table(x)
        assert out.column("anomaly_score").null_count == 0 and out.column("is_anomaly").to_pylist()[3] is True
        if errors == "mask":
            assert out.column("error").null_count == out.num_rows  # scored, not quarantined
        assert out.column("top_features")[3].as_py()[0]["feature"] == "x1"


def test_values_past_the_clip_score_alike_and_below_it_grow(dets, tab_train):
    det = dets["ae"]
    center, scale = det.schema_.columns[0].center, det.schema_.columns[0].scale
    x = np.repeat(tab_train[:1], 4, axis=0)
    x[:, 0] = center + scale * np.array([10.0, 1e3, 2 * Z_LIMIT, 1e300])
    s = det.score(x)
    assert s[0] < s[1] < s[2] and s[2] == pytest.approx(s[3])


_FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
_MISSING = st.sampled_from([float("nan"), float("inf"), float("-inf"), None])


def _rows(draw, n: int, missing: bool) -> pa.Table:
    value = st.one_of(_FINITE, _MISSING) if missing else _FINITE
    cols = {name: draw(st.lists(value, min_size=n, max_size=n)) for name in NAMES}
    return pa.table({k: pa.array(v, pa.float64()) for k, v in cols.items()})


def _cuts(draw, n: int) -> list[tuple[int, int]]:
    points = sorted(set(draw(st.lists(st.integers(0, n), max_size=4))) | {0, n})
    return list(zip(points[:-1], points[1:]))


def _nonfinite(table: pa.Table) -> np.ndarray:
    bad = np.zeros(table.num_rows, dtype=bool)
    for col in table.columns:
        x = col.to_numpy(zero_copy_only=False).astype(np.float64)
        bad |= ~np.isfinite(x)
    return bad


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_any_finite_rows_in_any_batches_score_finite(dets, data):
    kind = data.draw(st.sampled_from(KINDS))
    n = data.draw(st.integers(1, 30))
    table = _rows(data.draw, n, missing=False)
    errors = data.draw(st.sampled_from(["raise", "mask"]))
    scorer = Scorer(dets[kind].bundle_, errors=errors)
    outs = [scorer.score_table(table.slice(a, b - a)) for a, b in _cuts(data.draw, n)]
    out = pa.concat_tables(outs)
    assert out.num_rows == n
    scores = out.column("anomaly_score").to_numpy(zero_copy_only=False)
    assert np.isfinite(scores).all(), scores
    if errors == "mask":
        assert out.column("error").null_count == n


@SETTINGS
@given(data=st.data())
def test_any_mix_of_nan_inf_and_null_is_scored_or_carries_an_error(dets, data):
    kind = data.draw(st.sampled_from(KINDS))
    impute = data.draw(st.booleans())
    errors = data.draw(st.sampled_from(["raise", "mask"]))
    n = data.draw(st.integers(1, 30))
    table = _rows(data.draw, n, missing=True)
    expected_bad = np.zeros(n, dtype=bool) if impute else _nonfinite(table)
    scorer = Scorer(dets[f"{kind}-impute" if impute else kind].bundle_, errors=errors)
    cuts = _cuts(data.draw, n)
    if errors == "raise" and expected_bad.any():
        first = int(np.flatnonzero(expected_bad)[0])
        a, b = next((a, b) for a, b in cuts if a <= first < b)
        with pytest.raises(SchemaError, match="has NaN/inf/null at row"):
            scorer.score_table(table.slice(a, b - a))
        return
    out = pa.concat_tables([scorer.score_table(table.slice(a, b - a)) for a, b in cuts])
    assert out.num_rows == n
    scores = out.column("anomaly_score").to_numpy(zero_copy_only=False).astype(np.float64)
    if errors == "mask":
        error = np.array([e is not None for e in out.column("error").to_pylist()])
        assert (error == expected_bad).all()
        assert np.isnan(scores[error]).all()  # null: not a score
        reasons = [e for e in out.column("error").to_pylist() if e]
        assert all("NaN/inf/null" in r for r in reasons), reasons[:3]
    assert np.isfinite(scores[~expected_bad]).all(), scores
