"""The Scorer's output columns against brute-force references: top-k (ties, NaN, k above the
number of features, one-hot groups), the feature transform, the error and version columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from modeltestkit import tabular
from unusual.models import Detector, Scorer
from unusual.models.scorer import CHUNK, SMALL, top_k

TINY = {"hidden": [16], "epochs": 2, "batch_size": 64, "seed": 0}


def brute_top_k(c: np.ndarray, k: int) -> list[list[int]]:
    """Per row: the columns of the k largest values, largest first; ties to the lower column; NaN last."""
    k = min(k, c.shape[1])
    key = lambda row: lambda j: (1, 0.0, j) if np.isnan(row[j]) else (0, -float(row[j]), j)  # noqa: E731
    return [sorted(range(len(row)), key=key(row))[:k] for row in c]


def tied(n: int, m: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Few distinct values per row, so ties are everywhere, plus zeros of both signs."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 4, size=(n, m)).astype(dtype) / 4
    c[rng.random((n, m)) < 0.05] = -0.0
    return c


@pytest.mark.parametrize(
    "n,m,k",
    [
        (SMALL - 1, 10, 3),  # the sorted path
        (3 * CHUNK + 17, 32, 3),  # several blocks, the last one partial
        (2000, 5, 7),  # k above the number of columns
        (1500, 1, 3),
        (1200, 300, 4),  # more than 255 columns (wider weights)
        (1000, 6, 6),  # a full sort
    ],
)
def test_top_k_matches_brute_force_with_ties(n, m, k):
    c = tied(n, m, seed=n + m)
    idx, vals = top_k(c, k)
    assert idx.tolist() == brute_top_k(c, k)
    assert vals.dtype == c.dtype
    assert np.array_equal(vals, np.take_along_axis(c, idx, axis=1))
    assert np.array_equal(np.signbit(vals), np.signbit(np.take_along_axis(c, idx, axis=1)))


@pytest.mark.parametrize("n", [50, 4000])
def test_top_k_rows_with_nan_and_infinities(n):
    rng = np.random.default_rng(n)
    c = rng.normal(size=(n, 12)).astype(np.float32)
    c[3, 5] = np.nan
    c[7, :] = np.nan
    c[11, 2] = np.inf
    c[13, [1, 4, 9]] = np.inf
    c[17, :10] = -np.inf  # fewer finite values than k
    c[19, [0, 6]] = -np.inf
    c[23, :] = -np.inf
    k = 4
    idx, vals = top_k(c, k)
    assert idx.tolist() == brute_top_k(c, k)
    assert np.array_equal(vals, np.take_along_axis(c, idx, axis=1), equal_nan=True)


def test_top_k_float64_and_empty():
    c = tied(700, 9, seed=1, dtype=np.float64)
    assert top_k(c, 3)[0].tolist() == brute_top_k(c, 3)
    assert top_k(c, 3)[1].dtype == np.float64
    for shape, k in (((0, 5), 3), ((5, 0), 3), ((5, 4), 0)):
        idx, vals = top_k(np.zeros(shape, np.float32), k)
        assert idx.shape == vals.shape == (shape[0], 0 if 0 in (shape[1], k) else k)


# --------------------------------------------------------------------------- the Scorer against references


def reference(scorer: Scorer, table: pa.Table, k: int):
    """Scores and top features computed the long way: the transform per value, the model, a Python sort."""
    schema = scorer.schema
    x = np.zeros((table.num_rows, schema.width), np.float32)
    for c, (_, a, _) in zip(schema.columns, schema.slices()):
        col = table.column(c.name)
        if c.kind == "numeric":
            x[:, a] = (col.to_numpy().astype(np.float64) - c.center) / c.scale
        else:
            vocab = {v: i for i, v in enumerate(c.vocabulary)}
            for r, v in enumerate(col.to_pylist()):
                x[r, a + vocab.get(v, len(c.vocabulary))] = 1.0
    with torch.inference_mode():
        parts = [scorer.bundle.module.score_terms(torch.from_numpy(x[a : a + scorer.chunk_rows]))
                 for a in range(0, len(x), scorer.chunk_rows)]  # fmt: skip
    scores = np.concatenate([s.double().numpy() for s, _ in parts])
    terms = np.concatenate([t.numpy() for _, t in parts])
    contrib = terms if scorer._group is None else terms @ schema.group_matrix()
    names = schema.names
    top = [[{"feature": names[j], "contribution": float(row[j])} for j in cols]
           for row, cols in zip(contrib, brute_top_k(contrib, k))]  # fmt: skip
    return x, scores, top


@pytest.fixture(scope="module")
def numeric_det() -> Detector:
    return Detector("ae", **TINY).fit(tabular(600, seed=0))


@pytest.fixture(scope="module")
def grouped_det() -> Detector:
    rng = np.random.default_rng(0)
    n = 900
    frame = pa.table(
        {
            "level": rng.normal(size=n),
            "kind": rng.choice(["a", "b", "c", "d"], n),
            "flag": rng.choice(["on", "off"], n),
            "load": rng.gamma(2.0, size=n).astype(np.float32),
        }
    )
    return Detector("ae", **TINY).fit(frame)


def numeric_table(n: int, seed: int) -> pa.Table:
    x = tabular(n, seed=seed)
    cols = {f"x{j}": x[:, j] for j in range(x.shape[1])}
    cols["x1"] = cols["x1"].astype(np.float32)  # float32, read without a float64 copy
    cols["x2"] = np.round(cols["x2"] * 100).astype(np.int64)  # an integer column, cast
    t = pa.table(cols)
    return pa.concat_tables([t.slice(0, n // 3), t.slice(n // 3)])  # two chunks per column


@pytest.mark.parametrize("k", [1, 3, 50])
def test_scorer_matches_the_reference(numeric_det, k):
    table = numeric_table(SMALL + 700, seed=3)
    scorer = Scorer(numeric_det.bundle_, top_k=k)
    x, scores, top = reference(scorer, table, k)
    assert np.array_equal(scorer.schema.transform(table)[0], x)
    out = scorer.score_table(table)
    assert np.array_equal(out.column("anomaly_score").to_numpy(), scores)
    assert out.column("top_features").to_pylist() == top
    assert out.column("top_features").type == scorer.score_table(table.slice(0, 3)).column("top_features").type


@pytest.mark.parametrize("k", [2, 3, 9])
def test_grouped_features_match_the_reference(grouped_det, k):
    rng = np.random.default_rng(5)
    n = SMALL + 300
    table = pa.table(
        {
            "level": rng.normal(size=n),
            "kind": rng.choice(["a", "b", "c", "d", "unseen"], n),
            "flag": rng.choice(["on", "off"], n),
            "load": rng.gamma(2.0, size=n).astype(np.float32),
        }
    )
    scorer = Scorer(grouped_det.bundle_, top_k=k)
    assert scorer._group is not None
    _, scores, top = reference(scorer, table, k)
    out = scorer.score_table(table)
    assert np.array_equal(out.column("anomaly_score").to_numpy(), scores)
    assert out.column("top_features").to_pylist() == top
    assert {len(r) for r in out.column("top_features").to_pylist()} == {min(k, 4)}


def test_error_column_only_on_bad_rows(numeric_det):
    scorer = Scorer(numeric_det.bundle_, errors="mask")
    table = numeric_table(SMALL + 100, seed=4)
    clean = scorer.score_table(table)
    assert clean.column("error").null_count == table.num_rows
    assert clean.column("error").type == pa.string()
    x0 = table.column("x0").to_numpy().copy()
    x0[[2, 40, SMALL + 7]] = [np.nan, np.inf, -np.inf]
    out = scorer.score_table(table.set_column(0, "x0", pa.array(x0)))
    err = out.column("error").to_pylist()
    assert [i for i, e in enumerate(err) if e] == [2, 40, SMALL + 7]
    assert all(e.startswith("x0: ") for e in err if e)
    assert out.column("anomaly_score").null_count == 3
    good = np.ones(table.num_rows, bool)
    good[[2, 40, SMALL + 7]] = False
    ref = clean.column("anomaly_score").to_numpy()
    assert np.array_equal(out.column("anomaly_score").to_numpy(zero_copy_only=False)[good], ref[good])


def test_version_column_for_every_batch_size(numeric_det):
    scorer = Scorer(numeric_det.bundle_)
    for n in (SMALL + 50, 3, 0, SMALL + 51, 1):
        versions = scorer.score_table(numeric_table(max(n, 3), seed=n).slice(0, n)).column("model_version")
        assert versions.to_pylist() == [scorer.version] * n
