"""Synthetic data and helpers shared by the detector-core tests (imported by them and by conftest).

Every generator is seeded, so a failure is reproducible. Models are tiny
(one small hidden layer, a few epochs) and trained once per test module.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from sklearn.metrics import roc_auc_score

# Tiny models train faster single-threaded than with two threads fighting for
# two cores, and the suite must stay fast on small CI machines.
torch.set_num_threads(1)

N_FEATURES = 8
SEQ_CHANNELS = 4

# Small, fast model parameters per known kind. A family registered later gets
# only the training parameters (and entity/time columns if it is a sequence family).
TINY = {
    "ae": {"hidden": [16]},
    "vae": {"hidden": [16], "n_samples": 4},
    "lstm": {"hidden": 16, "window": 8},
}
TRAIN = {"epochs": 4, "batch_size": 64, "seed": 0}


def tiny_params(kind: str, **extra) -> dict:
    from unusual.models.registry import family

    fam = family(kind)
    params = {**TINY.get(kind, {}), **TRAIN}
    if fam.sequence:
        names = {f for f in fam.config.__dataclass_fields__}
        if "entity_column" in names:
            params["entity_column"] = "entity"
        if "time_column" in names:
            params["time_column"] = "t"
    params.update(extra)
    return params


def tabular(n: int, seed: int, d: int = N_FEATURES) -> np.ndarray:
    """Rows near a 3-dimensional linear subspace of R^d plus a little noise."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(1234).normal(size=(3, d))  # the same subspace for every call
    z = rng.normal(size=(n, 3))
    return (z @ w + 0.1 * rng.normal(size=(n, d))).astype(np.float64)


def plant_outliers(x: np.ndarray, frac: float, seed: int, magnitude: float = 10.0):
    """Adds a gross offset (``magnitude`` column standard deviations) to one
    column of a random ``frac`` of the rows. Returns (data, labels, column)."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    n = len(x)
    rows = rng.choice(n, max(1, int(frac * n)), replace=False)
    cols = rng.integers(0, x.shape[1], rows.size)
    sign = rng.choice([-1.0, 1.0], rows.size)
    x[rows, cols] += sign * magnitude * x.std(axis=0)[cols]
    y = np.zeros(n, dtype=np.int64)
    y[rows] = 1
    col = np.full(n, -1)
    col[rows] = cols
    return x, y, col


def series(entities: tuple[str, ...], length: int, seed: int, channels: int = SEQ_CHANNELS) -> pa.Table:
    """Noisy sinusoids, one multivariate series per entity, in entity-then-time order.

    Columns: ``entity`` (string), ``t`` (int64 time step), ``c0 … c{channels-1}``.
    """
    rng = np.random.default_rng(seed)
    cols = {"entity": [], "t": [], **{f"c{j}": [] for j in range(channels)}}
    steps = np.arange(length)
    for i, e in enumerate(entities):
        cols["entity"] += [e] * length
        cols["t"].append(steps)
        for j in range(channels):
            period = 12 + 4 * j
            phase = 0.7 * i + 0.3 * j
            cols[f"c{j}"].append(np.sin(2 * np.pi * steps / period + phase) + 0.05 * rng.normal(size=length))
    return pa.table(
        {
            "entity": pa.array(cols["entity"], pa.string()),
            "t": pa.array(np.concatenate(cols["t"]), pa.int64()),
            **{f"c{j}": pa.array(np.concatenate(cols[f"c{j}"])) for j in range(channels)},
        }
    )


def plant_spikes(table: pa.Table, frac: float, seed: int, magnitude: float = 8.0, margin: int = 0):
    """Adds a spike to one channel of a random ``frac`` of the rows (at least
    ``margin`` rows apart). Returns (table, labels, channel index)."""
    rng = np.random.default_rng(seed)
    chans = [c for c in table.column_names if c.startswith("c")]
    data = {c: table.column(c).to_numpy().copy() for c in chans}
    n = table.num_rows
    candidates = np.arange(margin, n, max(1, margin))
    rows = rng.choice(candidates, max(1, int(frac * n)), replace=False)
    which = rng.integers(0, len(chans), rows.size)
    for r, j in zip(rows, which):
        data[chans[j]][r] += magnitude * rng.choice([-1.0, 1.0])
    y = np.zeros(n, dtype=np.int64)
    y[rows] = 1
    col = np.full(n, -1)
    col[rows] = which
    out = table
    for c in chans:
        out = out.set_column(out.column_names.index(c), c, pa.array(data[c]))
    return out, y, col


def auc(labels, scores) -> float:
    return float(roc_auc_score(labels, scores))
