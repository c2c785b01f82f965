"""Sequence (LSTM) scoring: batch independence with streaming context, the
look-ahead (each row's score averaged with the next rows' of its series), the
edge-padding rule for short series, window validation, ndarray input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from modeltestkit import plant_spikes, series, tiny_params
from unusual.models import Detector, SchemaError, Scorer

WINDOW = 8
OBJECTIVES = ("forecast", "reconstruct")


@pytest.fixture(scope="module", params=OBJECTIVES)
def det(request, seq_train) -> Detector:
    # Causal scores (no look-ahead), so that batch cuts cannot matter; the look-ahead has its own tests below.
    params = tiny_params("lstm", window=WINDOW, objective=request.param, score_lookahead=0)
    return Detector("lstm", **params).fit(seq_train)


@pytest.fixture(scope="module")
def ahead(seq_train, det) -> tuple[Detector, Detector]:
    """The default look-ahead (``score_steps`` = half the window) and the same weights scored causally."""
    objective = det.bundle_.model_config.objective
    model = Detector("lstm", **tiny_params("lstm", window=WINDOW, objective=objective)).fit(seq_train)
    assert model.bundle_.model_config.score_lookahead == WINDOW // 2
    return model, det


@pytest.fixture(scope="module")
def scoring_table() -> pa.Table:
    # Entities of different lengths, so batch cuts land at many positions
    # within and between entities, not in sorted order (so a batch is
    # regrouped internally); a few spikes so scores vary a lot.
    parts = [series((e,), n, seed=10 + i) for i, (e, n) in enumerate([("m", 37), ("b", 90), ("z", 5), ("a", 61)])]
    table, _, _ = plant_spikes(pa.concat_tables(parts), frac=0.03, seed=3)
    return table


def _batched_scores(bundle, table: pa.Table, size: int) -> np.ndarray:
    scorer = Scorer(bundle, stream=True)
    out = [scorer.scores(table.slice(a, size)) for a in range(0, table.num_rows, size)]
    return np.concatenate(out)


@pytest.mark.parametrize("size", [1, 3, WINDOW, 13, 64, 1000])
def test_streaming_batches_match_one_go(det, scoring_table, size):
    whole = Scorer(det.bundle_).scores(scoring_table)
    assert whole.shape == (scoring_table.num_rows,)
    batched = _batched_scores(det.bundle_, scoring_table, size)
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)


def test_streaming_score_table_matches_one_go(det, scoring_table):
    whole = Scorer(det.bundle_).score_table(scoring_table)
    scorer = Scorer(det.bundle_, stream=True)
    parts = [scorer.score_table(scoring_table.slice(a, 29)) for a in range(0, scoring_table.num_rows, 29)]
    batched = pa.concat_tables(parts)
    assert batched.num_rows == whole.num_rows
    np.testing.assert_allclose(
        batched.column("anomaly_score").to_numpy(), whole.column("anomaly_score").to_numpy(), rtol=1e-5, atol=1e-6
    )
    assert batched.column("is_anomaly").equals(whole.column("is_anomaly"))


def _loop_mean(v: np.ndarray, rows: int, ok: np.ndarray | None = None, starts=None) -> np.ndarray:
    """The look-ahead as a plain loop: each valid row's mean over the valid rows of the next ``rows`` rows
    of its series (``starts``: series offsets, default one series); other rows keep their value."""
    ok = np.ones(len(v), bool) if ok is None else ok
    starts = [0, len(v)] if starts is None else starts
    want = v.copy()
    for a, b in zip(starts[:-1], starts[1:]):
        for i in range(a, b):
            span = slice(i, min(i + rows + 1, b))
            if ok[i]:
                want[i] = v[span][ok[span]].mean(0)
    return want


@pytest.mark.parametrize("width", [None, 3, 20])  # scores (n,), and per-column terms in one or several blocks
def test_forward_mean_against_a_loop(width):
    from unusual.models.windows import forward_mean

    rng = np.random.default_rng(0)
    v = rng.normal(size=(50,) if width is None else (50, width)).astype(np.float32)
    starts, ok, rows = np.array([0, 7, 30, 31, 50]), rng.random(50) > 0.2, 5
    want = _loop_mean(v, rows, ok, starts)
    got = forward_mean(v, starts, rows, ok)
    assert got.dtype == v.dtype and got.shape == v.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(forward_mean(v, starts, 0, ok), v)  # no look-ahead: unchanged


def test_forward_mean_after_a_huge_score():
    """A glitch's score (float32 allows 3e38) must not wash out the means of the rows after it."""
    from unusual.models.windows import forward_mean

    v = np.linspace(1.0, 2.0, 40).astype(np.float32)
    v[10] = 1e30
    starts = np.array([0, 40])
    got = forward_mean(v, starts, 4)
    np.testing.assert_allclose(got, _loop_mean(v, 4), rtol=1e-6)
    assert got[11:36] == pytest.approx([v[i : i + 5].mean() for i in range(11, 36)], rel=1e-6)


def test_lookahead_averages_the_next_rows_of_each_entity(ahead, scoring_table):
    model, causal = ahead
    np.testing.assert_array_equal(
        model.bundle_.module.state_dict()["head.weight"], causal.bundle_.module.state_dict()["head.weight"]
    )  # one seed, one model
    got, base = model.score(scoring_table), causal.score(scoring_table)
    entity = scoring_table.column("entity").to_numpy(zero_copy_only=False)
    t = scoring_table.column("t").to_numpy()
    for e in np.unique(entity):
        rows = np.flatnonzero(entity == e)
        rows = rows[np.argsort(t[rows], kind="stable")]
        want = _loop_mean(base[rows], WINDOW // 2)
        np.testing.assert_allclose(got[rows], want, rtol=1e-5, atol=1e-6, err_msg=e)
        assert got[rows[-1]] == pytest.approx(base[rows[-1]], rel=1e-6)  # the newest row: its own trailing score


def test_lookahead_in_a_stream_settles_once_the_next_rows_arrive(ahead, scoring_table):
    """Streaming batches of one entity: a row's score equals the one-go score once
    ``score_lookahead`` rows after it are in its batch; the last rows of a batch average
    the rows there are."""
    model, _ = ahead
    one = scoring_table.filter(pa.compute.equal(scoring_table.column("entity"), "b"))  # 90 rows in time order
    whole = Scorer(model.bundle_).scores(one)
    scorer = Scorer(model.bundle_, stream=True)
    cut, look = 50, WINDOW // 2
    first, second = scorer.scores(one.slice(0, cut)), scorer.scores(one.slice(cut))
    np.testing.assert_allclose(first[: cut - look], whole[: cut - look], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second, whole[cut:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(first[cut - look :], whole[cut - look : cut])


def test_without_stream_each_batch_starts_fresh(det, scoring_table):
    """stream=False (or reset()) forgets the previous batch: the first row of a
    batch cut mid-entity is scored as the start of a series."""
    cut = 50  # inside entity "b" (rows 37..126)
    second = scoring_table.slice(cut)
    fresh = Scorer(det.bundle_).scores(second)
    no_stream = Scorer(det.bundle_, stream=False)
    no_stream.scores(scoring_table.slice(0, cut))
    np.testing.assert_array_equal(no_stream.scores(second), fresh)
    streaming = Scorer(det.bundle_, stream=True)
    streaming.scores(scoring_table.slice(0, cut))
    streaming.reset()
    np.testing.assert_array_equal(streaming.scores(second), fresh)
    # ... and with the context kept, the start of the second batch differs.
    streaming = Scorer(det.bundle_, stream=True)
    streaming.scores(scoring_table.slice(0, cut))
    assert not np.allclose(streaming.scores(second)[:WINDOW], fresh[:WINDOW])


def test_detector_score_calls_are_independent(det, scoring_table):
    first = det.score(scoring_table)
    det.score(scoring_table.slice(0, 40))
    np.testing.assert_array_equal(det.score(scoring_table), first)


@pytest.mark.parametrize("length", [1, 3, WINDOW - 1])
def test_series_shorter_than_window_is_edge_padded(det, length):
    short = series(("z",), length, seed=5)
    s = det.score(short)
    assert s.shape == (length,)
    assert np.isfinite(s).all()
    # Edge padding: the missing history is copies of the series' first row, so
    # prefixing the series with enough copies of that row changes no score.
    k = WINDOW + 2
    first = short.slice(0, 1)
    pad = pa.concat_tables([first] * k)
    pad = pad.set_column(pad.column_names.index("t"), "t", pa.array(np.arange(-k, 0), pa.int64()))
    padded = pa.concat_tables([pad, short])
    np.testing.assert_allclose(det.score(padded)[k:], s, rtol=1e-5, atol=1e-6)


def test_short_series_alongside_long_ones(det):
    table = pa.concat_tables([series(("long",), 40, seed=1), series(("tiny",), 2, seed=2)])
    out = det.score_table(table)
    assert out.num_rows == 42
    assert out.column("anomaly_score").null_count == 0
    assert np.isfinite(out.column("anomaly_score").to_numpy()).all()


def test_window_longer_than_every_training_series_raises(seq_train):
    short = series(("a", "b"), 20, seed=0)
    det = Detector("lstm", **tiny_params("lstm", window=50))
    with pytest.raises(SchemaError, match=r"window 50 is longer than every series: the longest has 20 row\(s\)"):
        det.fit(short)


def test_ndarray_without_entity_is_one_series():
    rng = np.random.default_rng(0)
    steps = np.arange(300)
    x = np.stack([np.sin(2 * np.pi * steps / p) for p in (10, 17, 23)], axis=1) + 0.05 * rng.normal(size=(300, 3))
    det = Detector("lstm", hidden=16, window=WINDOW, epochs=3, seed=0, score_lookahead=0).fit(x)  # causal: batch-free
    s = det.score(x)
    assert s.shape == (300,)
    assert np.isfinite(s).all()
    # The same data as named columns, and batched with streaming context.
    named = {f"x{j}": x[:, j] for j in range(3)}
    np.testing.assert_array_equal(det.score(named), s)
    scorer = Scorer(det.bundle_, stream=True)
    batched = np.concatenate([scorer.scores(x[a : a + 41]) for a in range(0, 300, 41)])
    np.testing.assert_allclose(batched, s, rtol=1e-5, atol=1e-6)
    # A spike stands out.
    x2 = x.copy()
    x2[150, 1] += 6.0
    s2 = det.score(x2)
    assert s2[150] > np.quantile(s, 0.99)


def test_mask_errors_follow_input_order(det, scoring_table):
    """errors="mask" on a shuffled sequence batch: each error and null score land
    on the input row that was bad, and every row is still answered."""
    n = scoring_table.num_rows
    bad = {"c1": [0, 60], "c2": [n - 1, 100]}  # input row -> the column at fault
    dirty = scoring_table
    for col, rows in bad.items():
        values = dirty.column(col).to_numpy().copy()
        values[rows] = np.nan if col == "c1" else np.inf
        dirty = dirty.set_column(dirty.column_names.index(col), col, pa.array(values))
    perm = np.random.default_rng(1).permutation(n)
    out = Scorer(det.bundle_, errors="mask").score_table(dirty.take(pa.array(perm)))
    assert out.num_rows == n
    expected = [None] * n
    for col, rows in bad.items():
        for r in rows:
            expected[r] = f"{col}: NaN/inf/null"
    # Output row i belongs to input row perm[i].
    assert out.column("error").to_pylist() == [expected[p] for p in perm]
    scores = out.column("anomaly_score")
    assert scores.null_count == 4
    assert all(scores[i].as_py() is None for i in range(n) if expected[perm[i]])


def test_lookahead_leaves_quarantined_rows_out_of_the_means(ahead, scoring_table):
    """A bad row (quarantined) is not averaged into the scores of the rows before it."""
    model, causal = ahead
    values = scoring_table.column("c1").to_numpy().copy()
    values[[40, 41, 100]] = np.nan  # entity "b" (rows 37..126): two bad rows together and one alone
    dirty = scoring_table.set_column(scoring_table.column_names.index("c1"), "c1", pa.array(values))
    got, base = (
        Scorer(d.bundle_, errors="mask").score_table(dirty).column("anomaly_score").to_numpy(zero_copy_only=False)
        for d in (model, causal)
    )
    rows = np.arange(37, 127)  # entity "b" in time order
    ok = ~np.isnan(base[rows])
    assert np.flatnonzero(~ok).tolist() == [3, 4, 63] and np.isnan(got[rows][~ok]).all()
    want = _loop_mean(base[rows], WINDOW // 2, ok)
    np.testing.assert_allclose(got[rows][ok], want[ok], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("column", ["entity", "t"])
@pytest.mark.parametrize("rows", [1, 50])
def test_missing_entity_or_time_column_at_score_time(det, scoring_table, column, rows):
    with pytest.raises(SchemaError, match=rf"column '{column}' is missing \(needed as entity/time column\)") as e:
        det.score(scoring_table.slice(0, rows).drop_columns([column]))
    assert e.value.column == column


def test_missing_entity_column_at_fit_time(seq_train):
    with pytest.raises(SchemaError, match=r"column 'entity' is missing"):
        Detector("lstm", **tiny_params("lstm")).fit(seq_train.drop_columns(["entity"]))


def test_categorical_entity_and_timestamp_time_columns(det, scoring_table):
    """Entity columns arrive dictionary-encoded from pandas 'category' and polars
    Categorical, time columns as timestamps; shuffled, they score like the plain table."""
    ref = det.score(scoring_table)
    start = np.datetime64("2024-01-01T00:00:00", "us")
    stamps = start + scoring_table.column("t").to_numpy().astype("timedelta64[m]")
    typed = scoring_table.set_column(1, "t", pa.array(stamps))
    typed = typed.set_column(0, "entity", typed.column("entity").dictionary_encode())
    perm = np.random.default_rng(2).permutation(typed.num_rows)
    shuffled = typed.take(pa.array(perm))
    assert pa.types.is_dictionary(shuffled.schema.field("entity").type)
    np.testing.assert_array_equal(det.score(shuffled), ref[perm])
    pdf = shuffled.to_pandas()
    assert isinstance(pdf["entity"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(det.score(pdf), ref[perm])
    np.testing.assert_array_equal(
        det.score(pl.from_arrow(shuffled).with_columns(pl.col("entity").cast(pl.String).cast(pl.Categorical))),
        ref[perm],
    )


def test_fit_on_shuffled_categorical_entities_equals_fit_on_ordered(seq_train):
    """Training groups and orders rows by entity and time itself."""
    params = tiny_params("lstm")
    ordered = Detector("lstm", **params).fit(seq_train)
    perm = np.random.default_rng(3).permutation(seq_train.num_rows)
    shuffled = seq_train.take(pa.array(perm)).to_pandas().astype({"entity": "category"})
    other = Detector("lstm", **params).fit(shuffled)
    assert np.array_equal(other.score(seq_train), ordered.score(seq_train))
