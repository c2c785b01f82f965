"""Bad inputs get their documented errors; every accepted input format scores alike.

The categorical tests use an NSL-KDD-like synthetic frame (protocol_type,
service, flag plus numeric traffic counters).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from modeltestkit import tabular
from unusual.models import Detector, NotFittedError, SchemaError, Scorer
from unusual.models.columns import FeatureConfig
from unusual.models.features import FeatureSchema
from unusual.models.stats import FeatureStats

TINY = {"hidden": [16], "epochs": 4, "batch_size": 64, "seed": 0}
CATEGORICAL = ["protocol_type", "service", "flag"]
SERVICES = {"tcp": ["http", "ftp", "smtp"], "udp": ["domain_u", "private"], "icmp": ["ecr_i"]}


def network_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    proto = rng.choice(["tcp", "udp", "icmp"], n, p=[0.7, 0.2, 0.1])
    service = np.array([rng.choice(SERVICES[p]) for p in proto])
    flag = rng.choice(["SF", "S0"], n, p=[0.9, 0.1])
    src = rng.lognormal(6, 1, n) * np.where(service == "http", 3.0, 1.0)
    return pd.DataFrame(
        {
            "protocol_type": proto,
            "service": service,
            "flag": flag,
            "duration": rng.exponential(2.0, n),
            "src_bytes": src,
            "dst_bytes": src * rng.uniform(0.5, 2.0, n),
            "count": rng.poisson(5, n).astype(np.int64),
        }
    )


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return network_frame(1200, seed=0)


@pytest.fixture(scope="module")
def test_frame() -> pd.DataFrame:
    return network_frame(40, seed=1)


@pytest.fixture(scope="module")
def cat_det(frame) -> Detector:
    return Detector("ae", **TINY).fit(frame)


@pytest.fixture(scope="module")
def strict_unseen_det(frame) -> Detector:
    return Detector("ae", unseen_category="raise", **TINY).fit(frame)


@pytest.fixture(scope="module")
def impute_det(frame) -> Detector:
    dirty = frame.copy()
    dirty.loc[[3, 10], "src_bytes"] = np.nan
    dirty.loc[20, "duration"] = np.inf
    dirty.loc[7, "service"] = None
    return Detector("ae", nan_policy="impute", **TINY).fit(dirty)


@pytest.fixture(scope="module")
def num_det() -> Detector:
    return Detector("ae", **TINY).fit(tabular(800, seed=0))


# --------------------------------------------------------------------------- schema errors


def test_schema_is_inferred_from_the_frame(cat_det):
    kinds = {c.name: c.kind for c in cat_det.schema_.columns}
    assert kinds == {
        **dict.fromkeys(CATEGORICAL, "categorical"),
        **dict.fromkeys(["duration", "src_bytes", "dst_bytes", "count"], "numeric"),
    }
    service = next(c for c in cat_det.schema_.columns if c.name == "service")
    assert sorted(service.vocabulary) == sorted(v for vs in SERVICES.values() for v in vs)


def test_missing_column_is_named(cat_det, test_frame):
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['src_bytes'\]") as e:
        cat_det.score(test_frame.drop(columns=["src_bytes"]))
    assert e.value.column == "src_bytes"


def test_extra_column_is_named(cat_det, test_frame):
    with pytest.raises(SchemaError, match=r"unexpected column\(s\) \['label'\]") as e:
        cat_det.score(test_frame.assign(label="normal"))
    assert e.value.column == "label"
    # Declared as pass-through, the same column is accepted and ignored.
    scorer = Scorer(cat_det.bundle_, passthrough=["label"])
    np.testing.assert_array_equal(scorer.scores(test_frame.assign(label="normal")), cat_det.score(test_frame))


def test_column_order_does_not_matter(cat_det, test_frame):
    reordered = test_frame[list(reversed(test_frame.columns))]
    np.testing.assert_array_equal(cat_det.score(reordered), cat_det.score(test_frame))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_with_nan_policy_raise_names_column_and_row(cat_det, test_frame, bad):
    df = test_frame.copy()
    df.loc[5, "src_bytes"] = bad
    df.loc[9, "src_bytes"] = bad
    with pytest.raises(SchemaError, match=r"column 'src_bytes' has NaN/inf/null at row 5 \(2 row\(s\) in all\)") as e:
        cat_det.score(df)
    assert e.value.column == "src_bytes"
    assert e.value.rows == [5, 9]


def test_null_category_with_nan_policy_raise(cat_det, test_frame):
    df = test_frame.copy()
    df.loc[4, "service"] = None
    with pytest.raises(SchemaError, match=r"column 'service' has a null at row 4"):
        cat_det.score(df)


def test_nan_in_training_data_with_nan_policy_raise(frame):
    df = frame.copy()
    df.loc[11, "duration"] = np.nan
    with pytest.raises(SchemaError, match=r"column 'duration' has 1 NaN/inf/null value\(s\) in the training data"):
        Detector("ae", **TINY).fit(df)


def test_nan_policy_impute(impute_det, test_frame):
    numeric = {c.name: c for c in impute_det.schema_.columns if c.kind == "numeric"}
    assert np.isfinite(numeric["src_bytes"].center) and np.isfinite(numeric["duration"].center)
    df = test_frame.copy()
    df.loc[2, "src_bytes"] = np.nan
    df.loc[3, "duration"] = np.inf
    df.loc[6, "service"] = None
    s = impute_det.score(df)
    assert np.isfinite(s).all()
    # Imputation means: the fit-time center for numbers, the "other" bucket for categories.
    ref = test_frame.copy()
    ref.loc[2, "src_bytes"] = numeric["src_bytes"].center
    ref.loc[3, "duration"] = numeric["duration"].center
    ref.loc[6, "service"] = "never-seen-service"
    np.testing.assert_allclose(s, impute_det.score(ref), rtol=1e-6)
    unchanged = np.setdiff1d(np.arange(len(df)), [2, 3, 6])
    np.testing.assert_array_equal(s[unchanged], impute_det.score(test_frame)[unchanged])


def test_string_in_numeric_column(cat_det, test_frame):
    table = pa.Table.from_pandas(test_frame, preserve_index=False)
    as_text = pa.array(["abc"] + [str(v) for v in test_frame["src_bytes"][1:]])
    table = table.set_column(table.column_names.index("src_bytes"), "src_bytes", as_text)
    with pytest.raises(SchemaError, match=r"column 'src_bytes' has type string, expected a numeric type") as e:
        cat_det.score(table)
    assert e.value.column == "src_bytes"
    # The same through a dict of numpy arrays (a mixed array becomes a string array).
    data = {c: test_frame[c].to_numpy() for c in test_frame.columns}
    data["src_bytes"] = np.array(["abc", *test_frame["src_bytes"][1:]])
    with pytest.raises(SchemaError, match=r"column 'src_bytes' has type string"):
        cat_det.score(data)


def test_string_in_numeric_pandas_object_column(cat_det, test_frame):
    df = test_frame.copy()
    df["src_bytes"] = df["src_bytes"].astype(object)
    df.loc[0, "src_bytes"] = "abc"
    with pytest.raises(SchemaError, match="src_bytes"):
        cat_det.score(df)


def test_empty_batch(cat_det, frame):
    with pytest.raises(SchemaError, match=r"empty table \(0 rows\)"):
        Detector("ae", **TINY).fit(frame.iloc[:0])
    empty = frame.iloc[:0]
    s = cat_det.score(empty)
    assert s.shape == (0,)
    out = cat_det.score_table(empty)
    assert out.num_rows == 0
    assert out.column_names == ["anomaly_score", "is_anomaly", "top_features", "model_version"]
    assert out.schema.field("anomaly_score").type == pa.float64()
    masked = Scorer(cat_det.bundle_, errors="mask").score_table(pa.Table.from_pandas(empty, preserve_index=False))
    assert masked.num_rows == 0 and "error" in masked.column_names


def test_unseen_category_goes_to_the_other_bucket(cat_det, test_frame):
    df = test_frame.copy()
    df.loc[0, "service"] = "telnet"
    df.loc[1, "flag"] = "REJ"
    s = cat_det.score(df)
    assert np.isfinite(s).all()
    np.testing.assert_array_equal(s[2:], cat_det.score(test_frame)[2:])
    assert s[0] != cat_det.score(test_frame)[0]


def test_unseen_category_raise(strict_unseen_det, test_frame):
    df = test_frame.copy()
    df.loc[3, "service"] = "telnet"
    with pytest.raises(SchemaError, match=r"column 'service' has unseen category 'telnet' at row 3") as e:
        strict_unseen_det.score(df)
    assert e.value.column == "service"
    assert e.value.rows == [3]
    # Known categories are fine.
    assert np.isfinite(strict_unseen_det.score(test_frame)).all()


def test_undeclared_string_column_with_explicit_categorical(frame):
    with pytest.raises(SchemaError, match=r"column 'flag' has non-numeric type .* not declared categorical") as e:
        Detector("ae", categorical=["protocol_type", "service"], **TINY).fit(frame)
    assert e.value.column == "flag"


def test_float_column_declared_categorical(frame):
    with pytest.raises(SchemaError, match=r"column 'duration' is declared categorical but has type double"):
        Detector("ae", categorical=[*CATEGORICAL, "duration"], **TINY).fit(frame)


def test_declared_categorical_missing_from_data(frame):
    with pytest.raises(SchemaError, match=r"column 'proto' is missing"):
        Detector("ae", categorical=["proto"], **TINY).fit(frame)


# --------------------------------------------------------------------------- formats


def _formats_numeric(x: np.ndarray) -> dict:
    names = [f"x{j}" for j in range(x.shape[1])]
    pdf = pd.DataFrame(x, columns=names)
    table = pa.Table.from_pandas(pdf, preserve_index=False)
    return {
        "ndarray": x,
        "pandas": pdf,
        "polars": pl.from_pandas(pdf),
        "pyarrow": table,
        "recordbatch": table.to_batches()[0],
        "dict": {n: x[:, j] for j, n in enumerate(names)},
        "ndarray-float32": x.astype(np.float32),
    }


def test_all_input_formats_score_alike_numeric(num_det):
    x = tabular(50, seed=3)
    formats = _formats_numeric(x)
    ref = num_det.score(x)
    for name, data in formats.items():
        if name == "ndarray-float32":
            np.testing.assert_allclose(num_det.score(data), ref, rtol=1e-5, err_msg=name)
        else:
            assert np.array_equal(num_det.score(data), ref), name


def test_all_input_formats_score_alike_categorical(cat_det, test_frame):
    ref = cat_det.score(test_frame)
    formats = {
        "pyarrow": pa.Table.from_pandas(test_frame, preserve_index=False),
        "polars": pl.from_pandas(test_frame),
        "polars-categorical": pl.from_pandas(test_frame).with_columns(pl.col(CATEGORICAL).cast(pl.Categorical)),
        "pandas-category": test_frame.astype({c: "category" for c in CATEGORICAL}),
        "dict": {c: test_frame[c].to_numpy() for c in test_frame.columns},
        "dict-of-lists": {c: test_frame[c].tolist() for c in test_frame.columns},
    }
    for name, data in formats.items():
        assert np.array_equal(cat_det.score(data), ref), name


def test_unsupported_inputs(num_det):
    with pytest.raises(TypeError, match="expected a pyarrow Table"):
        num_det.score([[1.0] * 8])
    with pytest.raises(SchemaError, match=r"must be 2-D"):
        num_det.score(np.zeros((2, 2, 8)))


# --------------------------------------------------------------------------- errors="mask"


def test_scorer_mask_quarantines_bad_rows(cat_det, test_frame):
    df = test_frame.copy()
    df.loc[2, "src_bytes"] = np.nan
    df.loc[5, "service"] = None
    df.loc[5, "duration"] = np.inf
    out = Scorer(cat_det.bundle_, errors="mask").score_table(df)
    assert out.num_rows == len(df)
    assert out.column_names[-1] == "error"
    errors = out.column("error").to_pylist()
    assert "src_bytes" in errors[2]
    assert "service" in errors[5] and "duration" in errors[5]
    bad = [2, 5]
    good = np.setdiff1d(np.arange(len(df)), bad)
    assert all(errors[i] is None for i in good)
    scores = out.column("anomaly_score").to_pylist()
    assert all(scores[i] is None for i in bad)
    assert all(out.column(c)[i].as_py() is None for c in ("is_anomaly", "top_features") for i in bad)
    clean = cat_det.score(test_frame)
    np.testing.assert_array_equal(np.array([scores[i] for i in good]), clean[good])
    # The unmasked columns of good rows equal a plain score_table.
    plain = cat_det.score_table(test_frame.iloc[good].reset_index(drop=True))
    assert out.take(pa.array(good)).drop_columns(["error"]).equals(plain)


def test_scorer_mask_unseen_category(strict_unseen_det, test_frame):
    df = test_frame.copy()
    df.loc[7, "flag"] = "REJ"
    out = Scorer(strict_unseen_det.bundle_, errors="mask").score_table(df)
    errors = out.column("error").to_pylist()
    assert errors[7] == "flag: unseen category"
    assert out.column("anomaly_score")[7].as_py() is None
    assert sum(e is not None for e in errors) == 1


def test_scorer_mask_still_rejects_schema_errors(cat_det, test_frame):
    # A missing column cannot be quarantined row by row.
    with pytest.raises(SchemaError, match="src_bytes"):
        Scorer(cat_det.bundle_, errors="mask").score_table(test_frame.drop(columns=["src_bytes"]))


def test_scorer_rejects_unknown_errors_mode(cat_det):
    with pytest.raises(ValueError, match="errors must be 'raise' or 'mask'"):
        Scorer(cat_det.bundle_, errors="ignore")


# --------------------------------------------------------------------------- API misuse


def test_unknown_parameter_is_named():
    with pytest.raises(TypeError, match=r"unknown parameter 'hiden' for kind 'ae'"):
        Detector("ae", hiden=[8])
    with pytest.raises(TypeError, match=r"unknown parameter 'window' for kind 'vae'"):
        Detector("vae", window=8)


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_unknown_norm_fails_at_construction(kind):
    with pytest.raises(ValueError, match=r"^norm must be one of \('layer', None\); got 'batch'$"):
        Detector(kind, norm="batch")


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown model kind 'gan'"):
        Detector("gan")


def test_use_before_fit_raises_not_fitted(tmp_path):
    det = Detector("ae")
    x = tabular(5, seed=0)
    for call in (det.score, det.predict, det.score_table):
        with pytest.raises(NotFittedError, match="not fitted"):
            call(x)
    with pytest.raises(NotFittedError):
        det.save(str(tmp_path / "b"))
    with pytest.raises(NotFittedError):
        _ = det.version


# --------------------------------------------------------------------------- the feature schema itself


def test_merged_stats_equal_stats_of_the_whole_table(frame):
    """The distributed path fits statistics per block and merges them."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    cfg = FeatureConfig()
    whole = FeatureSchema.fit(table, cfg)
    parts = [FeatureStats.from_table(table.slice(a, 300), cfg, seed=a) for a in range(0, table.num_rows, 300)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert merged.n_rows == table.num_rows
    schema = FeatureSchema.from_stats(merged, cfg)
    assert schema.names == whole.names
    for a, b in zip(schema.columns, whole.columns):
        assert a.center == pytest.approx(b.center, rel=1e-12, abs=1e-12), a.name
        assert a.scale == pytest.approx(b.scale, rel=1e-12), a.name
        assert a.vocabulary == b.vocabulary, a.name


def test_robust_and_no_scaling(frame):
    table = pa.Table.from_pandas(frame, preserve_index=False)
    robust = {c.name: c for c in FeatureSchema.fit(table, FeatureConfig(scaling="robust")).columns}
    q25, q50, q75 = np.quantile(frame["src_bytes"], [0.25, 0.5, 0.75])
    assert robust["src_bytes"].center == pytest.approx(q50)
    assert robust["src_bytes"].scale == pytest.approx((q75 - q25) / 1.349)
    plain = {c.name: c for c in FeatureSchema.fit(table, FeatureConfig(scaling="none")).columns}
    assert (plain["src_bytes"].center, plain["src_bytes"].scale) == (0.0, 1.0)


def test_vocabulary_is_most_frequent_first_and_capped(frame):
    table = pa.Table.from_pandas(frame, preserve_index=False)
    schema = FeatureSchema.fit(table, FeatureConfig(max_categories=2))
    service = next(c for c in schema.columns if c.name == "service")
    assert service.vocabulary == list(frame["service"].value_counts().index[:2])
    assert service.width == 3  # two kept categories + the "other" bucket
    # Rare categories share the "other" bucket.
    x, _, _ = schema.transform(table)
    a, b = next((a, b) for name, a, b in schema.slices() if name == "service")
    other = ~frame["service"].isin(service.vocabulary).to_numpy()
    assert np.array_equal(x[:, b - 1] == 1.0, other)
    assert np.all(x[:, a:b].sum(axis=1) == 1.0)


def test_constant_column_keeps_raw_departures():
    table = pa.table({"a": np.arange(100.0), "k": np.full(100, 7.0)})
    schema = FeatureSchema.fit(table, FeatureConfig())
    k = schema.columns[1]
    assert k.constant and k.scale == 1.0 and k.center == 7.0
    x, _, _ = schema.transform(pa.table({"a": [1.0], "k": [9.5]}))
    assert x[0, 1] == pytest.approx(2.5)
