"""The feature schema: which columns a model reads and how they become a matrix.

Fitting happens in two steps so that the distributed path can do the first one
per data block and merge the results without collecting data on one machine:

1. :class:`FeatureStats` holds mergeable partial statistics of a table (counts,
   mean and variance with Chan's parallel update, a bounded reservoir sample
   for quantiles, category counts).
2. :meth:`FeatureSchema.from_stats` turns merged statistics into the frozen
   schema that is stored in the checkpoint bundle and applied to every batch.

The matrix layout is: every numeric column scaled to ``(x - center) / scale``,
then every categorical column one-hot encoded over its vocabulary plus one
final "other" bucket (categories unseen at fit time, or too rare to keep).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import SchemaError

SCALINGS = ("standard", "robust", "none")
NAN_POLICIES = ("raise", "impute")
UNSEEN_POLICIES = ("bucket", "raise")
OTHER_BUCKET = "__other__"
_RESERVOIR = 50_000


@dataclass
class FeatureConfig:
    """How columns are chosen and encoded. Stored in the bundle.

    - ``features``: the columns to use; ``None`` uses every column except
      ``exclude`` and the entity / time columns of a sequence model.
    - ``categorical``: ``None`` treats every string or dictionary column as
      categorical; an explicit list makes any other non-numeric column an error.
    - ``scaling``: ``standard`` (mean / std), ``robust`` (median / IQR) or ``none``.
    - ``nan_policy``: ``raise`` rejects NaN, inf and nulls with an error naming
      the column and row; ``impute`` replaces them with the fit-time center
      (numeric) or the "other" bucket (categorical).
    - ``unseen_category``: ``bucket`` maps categories unseen at fit time to the
      "other" bucket; ``raise`` rejects them.
    - ``max_categories``: the most frequent categories kept per column.
    """

    features: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    categorical: list[str] | None = None
    scaling: str = "standard"
    nan_policy: str = "raise"
    unseen_category: str = "bucket"
    max_categories: int = 100

    def __post_init__(self):
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _check_choice("unseen_category", self.unseen_category, UNSEEN_POLICIES)
        if self.max_categories < 1:
            raise ValueError(f"max_categories must be >= 1, got {self.max_categories}")
        self.exclude = list(self.exclude or [])
        if self.features is not None:
            self.features = list(self.features)
        if self.categorical is not None:
            self.categorical = list(self.categorical)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def is_numeric_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def is_categorical_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return is_categorical_type(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def resolve_columns(
    schema: pa.Schema, cfg: FeatureConfig, reserved: tuple[str, ...] = ()
) -> tuple[list[str], list[str], list[str]]:
    """Split a table's columns into (numeric, categorical, passthrough) names.

    ``reserved`` are columns the model needs but does not encode (the entity and
    time columns of a sequence model). Raises :class:`SchemaError` naming the
    column for a requested feature that is absent or of an unusable type.
    """
    names = list(schema.names)
    reserved = tuple(c for c in reserved if c)
    for col in reserved:
        if col not in names:
            raise SchemaError(f"column {col!r} is missing (needed as entity/time column)", col)
    for col in [*(cfg.features or []), *(cfg.categorical or [])]:
        if col not in names:
            raise SchemaError(f"column {col!r} is missing; the table has {names}", col)
    if cfg.features is not None:
        chosen = [c for c in cfg.features if c not in cfg.exclude]
    else:
        chosen = [c for c in names if c not in cfg.exclude and c not in reserved]
    if not chosen:
        raise SchemaError("no feature columns left to fit on after features/exclude")
    numeric, categorical = [], []
    for col in chosen:
        t = schema.field(col).type
        declared = cfg.categorical is not None and col in cfg.categorical
        if declared:
            if not (is_categorical_type(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)):
                raise SchemaError(
                    f"column {col!r} is declared categorical but has type {t}; "
                    "categorical columns must be strings or integers",
                    col,
                )
            categorical.append(col)
        elif is_numeric_type(t):
            numeric.append(col)
        elif is_categorical_type(t) and cfg.categorical is None:
            categorical.append(col)
        else:
            raise SchemaError(
                f"column {col!r} has non-numeric type {t} and is not declared categorical; "
                "add it to categorical=[...] or exclude=[...]",
                col,
            )
    passthrough = [c for c in names if c not in numeric and c not in categorical]
    return numeric, categorical, passthrough


def _as_float(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as float64 numpy with nulls as NaN (one copy at most)."""
    if not pa.types.is_floating(col.type):
        col = pc.cast(col, pa.float64())
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _as_string(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_dictionary(col.type) or not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return col


# --------------------------------------------------------------------------- statistics


@dataclass
class _NumStats:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    nonfinite: int = 0
    sample: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    seen: int = 0  # finite values offered to the reservoir

    @classmethod
    def of(cls, values: np.ndarray, rng: np.random.Generator) -> _NumStats:
        finite = values[np.isfinite(values)]
        s = cls(nonfinite=int(values.size - finite.size))
        if finite.size:
            s.count = int(finite.size)
            s.mean = float(finite.mean())
            s.m2 = float(((finite - s.mean) ** 2).sum())
            s.min, s.max = float(finite.min()), float(finite.max())
            s.sample = finite if finite.size <= _RESERVOIR else rng.choice(finite, _RESERVOIR, replace=False)
            s.seen = int(finite.size)
        return s

    def merge(self, o: _NumStats, rng: np.random.Generator) -> _NumStats:
        n = self.count + o.count
        out = _NumStats(nonfinite=self.nonfinite + o.nonfinite)
        if n == 0:
            return out
        delta = o.mean - self.mean
        out.count = n
        out.mean = self.mean + delta * o.count / n
        out.m2 = self.m2 + o.m2 + delta * delta * self.count * o.count / n
        out.min, out.max = min(self.min, o.min), max(self.max, o.max)
        out.seen = self.seen + o.seen
        pooled = np.concatenate([self.sample, o.sample])
        if pooled.size > _RESERVOIR:
            # Weight each side by how many values it stands for, so the merged
            # sample stays uniform over everything seen.
            w = np.concatenate(
                [
                    np.full(self.sample.size, self.seen / max(self.sample.size, 1)),
                    np.full(o.sample.size, o.seen / max(o.sample.size, 1)),
                ]
            )
            pooled = rng.choice(pooled, _RESERVOIR, replace=False, p=w / w.sum())
        out.sample = pooled
        return out


@dataclass
class FeatureStats:
    """Mergeable partial statistics of the feature columns of a table."""

    numeric: dict[str, _NumStats]
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
        num = {c: _NumStats.of(_as_float(table.column(c)), rng) for c in numeric}
        cat, nulls = {}, {}
        for c in categorical:
            col = _as_string(table.column(c))
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


# --------------------------------------------------------------------------- the schema


@dataclass
class ColumnSpec:
    """One feature column as the model sees it."""

    name: str
    kind: str  # "numeric" | "categorical"
    dtype: str
    center: float = 0.0
    scale: float = 1.0
    constant: bool = False
    vocabulary: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.vocabulary) + 1


@dataclass
class FeatureSchema:
    """The frozen, serialisable feature schema of a fitted model."""

    columns: list[ColumnSpec]
    config: FeatureConfig
    passthrough: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------- building
    @classmethod
    def fit(cls, table: pa.Table, cfg: FeatureConfig, reserved: tuple[str, ...] = ()) -> FeatureSchema:
        if table.num_rows == 0:
            raise SchemaError("cannot fit on an empty table (0 rows)")
        return cls.from_stats(FeatureStats.from_table(table, cfg, reserved), cfg)

    @classmethod
    def from_stats(cls, stats: FeatureStats, cfg: FeatureConfig) -> FeatureSchema:
        columns: list[ColumnSpec] = []
        for name, s in stats.numeric.items():
            if s.nonfinite and cfg.nan_policy == "raise":
                raise SchemaError(
                    f"column {name!r} has {s.nonfinite} NaN/inf/null value(s) in the training data; "
                    "clean them or pass nan_policy='impute'",
                    name,
                )
            if s.count == 0:
                raise SchemaError(f"column {name!r} has no finite values to fit on", name)
            std = math.sqrt(s.m2 / s.count)
            center, scale = s.mean, std
            if cfg.scaling == "robust":
                q25, q50, q75 = np.quantile(s.sample, [0.25, 0.5, 0.75])
                center, scale = float(q50), float(q75 - q25) / 1.349
                if scale <= 0:
                    scale = std
            elif cfg.scaling == "none":
                center, scale = 0.0, 1.0
            constant = s.max - s.min <= 1e-12 * max(1.0, abs(s.max))
            if constant or scale <= 1e-12 * max(1.0, abs(center)):
                # A column constant at fit time carries no information about
                # normal variation; any departure from the constant is kept as
                # its raw difference so that it still raises the error.
                scale = 1.0
                constant = True
            columns.append(ColumnSpec(name, "numeric", stats.dtypes[name], float(center), float(scale), constant))
        for name, counts in stats.categorical.items():
            if stats.null_categories.get(name) and cfg.nan_policy == "raise":
                raise SchemaError(
                    f"column {name!r} has {stats.null_categories[name]} null value(s) in the training data; "
                    "clean them or pass nan_policy='impute'",
                    name,
                )
            vocab = [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][: cfg.max_categories]
            columns.append(ColumnSpec(name, "categorical", stats.dtypes[name], vocabulary=vocab))
        return cls(columns, cfg, list(stats.passthrough))

    # ----------------------------------------------------------------- layout
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    def slices(self) -> list[tuple[str, int, int]]:
        """(feature name, start, stop) of each feature's block in the matrix."""
        out, start = [], 0
        for c in self.columns:
            out.append((c.name, start, start + c.width))
            start += c.width
        return out

    def group_matrix(self) -> np.ndarray:
        """A (width, n_features) 0/1 matrix that sums matrix columns per feature."""
        g = np.zeros((self.width, len(self.columns)), dtype=np.float32)
        for j, (_, a, b) in enumerate(self.slices()):
            g[a:b, j] = 1.0
        return g

    # ----------------------------------------------------------------- validation
    def validate(self, table: pa.Table, allowed_extra: tuple[str, ...] = ()) -> None:
        """Check columns and types; raise :class:`SchemaError` naming the column."""
        names = set(table.schema.names)
        missing = [c.name for c in self.columns if c.name not in names]
        if missing:
            raise SchemaError(f"missing column(s) {missing}; the model needs {self.names}", missing[0])
        known = set(self.names) | set(self.passthrough) | set(allowed_extra)
        extra = [c for c in table.schema.names if c not in known]
        if extra:
            raise SchemaError(
                f"unexpected column(s) {extra}; the model was fit on {self.names}"
                " (drop them, or pass them as pass-through columns)",
                extra[0],
            )
        for c in self.columns:
            t = table.schema.field(c.name).type
            if c.kind == "numeric" and not is_numeric_type(t):
                raise SchemaError(f"column {c.name!r} has type {t}, expected a numeric type ({c.dtype})", c.name)
            if c.kind == "categorical" and not (
                is_categorical_type(t) or (not is_categorical_type(_parse_type(c.dtype)) and is_numeric_type(t))
            ):
                raise SchemaError(f"column {c.name!r} has type {t}, expected a categorical type ({c.dtype})", c.name)

    # ----------------------------------------------------------------- transform
    def transform(
        self, table: pa.Table, errors: str = "raise", allowed_extra: tuple[str, ...] = ()
    ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
        """Encode ``table`` into a float32 matrix of shape (rows, width).

        With ``errors="raise"`` a bad value raises :class:`SchemaError` naming
        the column and the first bad row. With ``errors="mask"`` bad rows are
        imputed so the matrix is usable, and a boolean mask of them plus one
        reason string per row are returned, so callers can quarantine them.
        """
        self.validate(table, allowed_extra)
        n = table.num_rows
        out = np.empty((n, self.width), dtype=np.float32)
        bad = np.zeros(n, dtype=bool) if errors == "mask" else None
        reasons: list[str] | None = [""] * n if errors == "mask" else None
        strict = self.config.nan_policy == "raise"
        for c, (_, a, b) in zip(self.columns, self.slices()):
            col = table.column(c.name)
            if c.kind == "numeric":
                x = _as_float(col)
                nonfinite = ~np.isfinite(x)
                if nonfinite.any():
                    if strict:
                        rows = np.flatnonzero(nonfinite)
                        _reject(
                            bad,
                            reasons,
                            rows,
                            c.name,
                            f"has NaN/inf/null at row {int(rows[0])}",
                            "nan_policy",
                            "NaN/inf/null",
                        )
                    x = np.where(nonfinite, c.center, x)
                out[:, a] = (x - c.center) / c.scale
            else:
                out[:, a:b] = 0.0
                col = _as_string(col)
                idx = pc.index_in(col, value_set=pa.array(c.vocabulary, pa.string()))
                idx = np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.float64)
                missing = np.isnan(idx)
                if missing.any():
                    isnull = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
                    null_rows = np.flatnonzero(isnull)
                    if null_rows.size and strict:
                        _reject(
                            bad,
                            reasons,
                            null_rows,
                            c.name,
                            f"has a null at row {int(null_rows[0])}",
                            "nan_policy",
                            "null",
                        )
                    unseen_rows = np.flatnonzero(missing & ~isnull)
                    if unseen_rows.size and self.config.unseen_category == "raise":
                        value = col.take([int(unseen_rows[0])]).to_pylist()[0]
                        _reject(
                            bad,
                            reasons,
                            unseen_rows,
                            c.name,
                            f"has unseen category {value!r} at row {int(unseen_rows[0])}",
                            "unseen_category",
                            "unseen category",
                        )
                    idx[missing] = len(c.vocabulary)
                out[np.arange(n), a + idx.astype(np.int64)] = 1.0
        return out, bad, reasons

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {
            "columns": [asdict(c) for c in self.columns],
            "config": asdict(self.config),
            "passthrough": list(self.passthrough),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSchema:
        return cls(
            [ColumnSpec(**c) for c in d["columns"]],
            FeatureConfig(**d["config"]),
            list(d.get("passthrough", [])),
        )


def _reject(bad, reasons, rows: np.ndarray, column: str, what: str, policy: str, why: str) -> None:
    """Raise for bad rows (``bad is None``), or mark them for quarantine with a reason."""
    if bad is None:
        raise SchemaError(
            f"column {column!r} {what} ({rows.size} row(s) in all); {policy} is 'raise'", column, rows[:100].tolist()
        )
    bad[rows] = True
    why = f"{column}: {why}"
    for r in rows:
        reasons[r] = f"{reasons[r]}; {why}" if reasons[r] else why


def _parse_type(s: str) -> pa.DataType:
    try:
        return pa.type_for_alias(s)
    except (ValueError, KeyError):
        return pa.string()
