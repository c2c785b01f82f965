"""Mergeable partial statistics: summarise blocks of rows anywhere, merge the summaries in any order.

- :class:`NumStats`: count, mean and variance (Chan's parallel update), min / max, the
  non-finite count and a bounded, uniform reservoir sample (for quantiles) of one
  numeric column.
- :class:`FeatureStats`: the :class:`NumStats` of every numeric feature column and the
  category counts of every categorical one, from which
  :meth:`unusual.models.features.FeatureSchema.from_stats` builds the frozen schema.

Each has ``merge(other) -> merged``, so the distributed jobs reduce them with one
generic aggregation (:class:`unusual.ray_jobs.aggregates.MergeAggregate`). Pure numpy and
pyarrow: nothing here imports Ray.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .columns import FeatureConfig, as_float, as_string, resolve_columns
from .errors import SchemaError

RESERVOIR = 50_000  # most values a NumStats sample holds


@dataclass
class NumStats:
    """Mergeable statistics of the values of one numeric column (NaN / inf counted, not summarised).

    ``sample`` holds every finite value while there are at most :data:`RESERVOIR` of
    them (``count == sample.size``), else a uniform sample of that many; ``seen`` is how
    many finite values the sample stands for. Random choices use ``rng``, by default a
    fresh ``numpy.random.default_rng(0)`` per call, so results do not depend on the
    machine a block was summarised on.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    nonfinite: int = 0
    sample: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    seen: int = 0  # finite values offered to the reservoir

    @classmethod
    def of(cls, values: np.ndarray, rng: np.random.Generator | None = None) -> NumStats:
        finite = values[np.isfinite(values)]
        s = cls(nonfinite=int(values.size - finite.size))
        if finite.size:
            rng = np.random.default_rng(0) if rng is None else rng
            s.count = int(finite.size)
            s.mean = float(finite.mean())
            s.m2 = float(((finite - s.mean) ** 2).sum())
            s.min, s.max = float(finite.min()), float(finite.max())
            s.sample = finite if finite.size <= RESERVOIR else rng.choice(finite, RESERVOIR, replace=False)
            s.seen = int(finite.size)
        return s

    def merge(self, o: NumStats, rng: np.random.Generator | None = None) -> NumStats:
        n = self.count + o.count
        out = NumStats(nonfinite=self.nonfinite + o.nonfinite)
        if n == 0:
            return out
        delta = o.mean - self.mean
        out.count = n
        out.mean = self.mean + delta * o.count / n
        out.m2 = self.m2 + o.m2 + delta * delta * self.count * o.count / n
        out.min, out.max = min(self.min, o.min), max(self.max, o.max)
        out.seen = self.seen + o.seen
        pooled = np.concatenate([self.sample, o.sample])
        if pooled.size > RESERVOIR:
            # Weight each side by how many values it stands for, so the merged
            # sample stays uniform over everything seen.
            w = np.concatenate(
                [
                    np.full(self.sample.size, self.seen / max(self.sample.size, 1)),
                    np.full(o.sample.size, o.seen / max(o.sample.size, 1)),
                ]
            )
            rng = np.random.default_rng(0) if rng is None else rng
            pooled = rng.choice(pooled, RESERVOIR, replace=False, p=w / w.sum())
        out.sample = pooled
        return out


@dataclass
class FeatureStats:
    """Mergeable partial statistics of the feature columns of a table."""

    numeric: dict[str, NumStats]
    categorical: dict[str, Counter]
    dtypes: dict[str, str]
    null_categories: dict[str, int]
    n_rows: int
    passthrough: list[str]

    @classmethod
    def from_table(
        cls, table: pa.Table, cfg: FeatureConfig, reserved: tuple[str, ...] = (), seed: int = 0
    ) -> FeatureStats:
        numeric, categorical, passthrough = resolve_columns(table.schema, cfg, reserved)
        rng = np.random.default_rng(seed)
        num = {c: NumStats.of(as_float(table.column(c)), rng) for c in numeric}
        cat, nulls = {}, {}
        for c in categorical:
            col = as_string(table.column(c))
            counts = pc.value_counts(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
            cnt = Counter()
            for item in counts.to_pylist():
                if item["values"] is None:
                    nulls[c] = nulls.get(c, 0) + item["counts"]
                else:
                    cnt[item["values"]] += item["counts"]
            cat[c] = cnt
        dtypes = {c: str(table.schema.field(c).type) for c in numeric + categorical}
        return cls(num, cat, dtypes, nulls, table.num_rows, passthrough)

    def merge(self, other: FeatureStats, seed: int = 0) -> FeatureStats:
        if list(self.numeric) != list(other.numeric) or list(self.categorical) != list(other.categorical):
            raise SchemaError(
                f"data shards disagree on their feature columns: {sorted(self.dtypes)} vs {sorted(other.dtypes)}"
            )
        rng = np.random.default_rng(seed)
        num = {c: self.numeric[c].merge(other.numeric[c], rng) for c in self.numeric}
        cat = {c: self.categorical[c] + other.categorical[c] for c in self.categorical}
        nulls = dict(Counter(self.null_categories) + Counter(other.null_categories))
        return FeatureStats(num, cat, self.dtypes, nulls, self.n_rows + other.n_rows, self.passthrough)
