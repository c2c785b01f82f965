"""The feature schema: which columns a model reads and how they become a matrix.

Fitting happens in two steps so that the distributed path can do the first one
per data block and merge the results without collecting data on one machine:

1. :class:`unusual.models.stats.FeatureStats` holds mergeable partial statistics of a
   table (counts, mean and variance with Chan's parallel update, a bounded reservoir
   sample for quantiles, category counts) of the columns that
   :func:`unusual.models.columns.resolve_columns` chooses.
2. :meth:`FeatureSchema.from_stats` turns merged statistics into the frozen
   schema that is stored in the checkpoint bundle and applied to every batch.

The matrix layout is: every numeric column scaled to ``(x - center) / scale``
(computed in float64 and clipped to ``±Z_LIMIT`` before it is stored as float32,
so that no finite input, 1e308 included, can overflow the model into a NaN score:
a value that far out is scored as if it were ``Z_LIMIT`` scales away, which is
far past any threshold), then every categorical column one-hot encoded over its vocabulary plus one
final "other" bucket (categories unseen at fit time, or too rare to keep).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .columns import (
    FeatureConfig,
    as_float,
    as_string,
    is_categorical_type,
    is_numeric_type,
)
from .errors import SchemaError
from .stats import FeatureStats

OTHER_BUCKET = "__other__"
# Scaled values are clipped to this many scales from the center: a row that far out is anomalous
# whatever the model, and its squared errors (~1e12) stay finite in float32 (max ~3.4e38).
Z_LIMIT = 1e6


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

    @property
    def numeric(self) -> bool:
        """Every feature numeric: the model input is the scaled columns themselves (:meth:`numeric_matrix`)."""
        return all(c.kind == "numeric" for c in self.columns)

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([c.center for c in self.columns], np.float64),
                np.array([c.scale for c in self.columns], np.float64))

    def numeric_matrix(self, raw: np.ndarray) -> np.ndarray:
        """Finite numbers, (rows, features) in :attr:`names` order, of a :attr:`numeric` schema -> the model
        input: the same values :meth:`transform` gives (``(x - center) / scale`` in float64, clipped, stored
        as float32), with no table on the way (the endpoint's small JSON bodies)."""
        centers, scales = self._affine
        with np.errstate(over="ignore"):  # past float64's range: inf, clipped as transform() clips it
            z = np.subtract(raw, centers)
            np.divide(z, scales, out=z)
        return np.clip(z, -Z_LIMIT, Z_LIMIT, out=z).astype(np.float32)

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
        tmp = np.empty(n, dtype=np.float64)
        for c, (_, a, b) in zip(self.columns, self.slices()):
            if c.kind == "numeric":
                self._numeric(c, table.column(c.name), out[:, a], tmp, bad, reasons)
            else:
                self._categorical(c, table.column(c.name), out[:, a:b], bad, reasons)
        return out, bad, reasons

    def _numeric(self, c: ColumnSpec, col, out: np.ndarray, tmp: np.ndarray, bad, reasons) -> None:
        """``out[:] = clip((x - center) / scale)``, in float64 in one reused buffer, stored as float32; float
        columns are read without a copy of their own. NaN / inf / null: by ``nan_policy``."""
        with np.errstate(over="ignore", invalid="ignore"):  # NaN / inf / overflow: looked at below
            _centered(col, c.center, tmp)
            total = np.add.reduce(tmp)
        if np.isfinite(total):  # no NaN/inf/null (or an overflow): checked no further
            np.divide(tmp, c.scale, out=tmp)
            out[:] = np.clip(tmp, -Z_LIMIT, Z_LIMIT, out=tmp)
            return
        x = as_float(col)
        nonfinite = ~np.isfinite(x)
        if nonfinite.any():
            if self.config.nan_policy == "raise":
                rows = np.flatnonzero(nonfinite)
                why = f"has NaN/inf/null at row {int(rows[0])}"
                _reject(bad, reasons, rows, c.name, why, "nan_policy", "NaN/inf/null")
            x = np.where(nonfinite, c.center, x)
        with np.errstate(over="ignore"):  # (x - center) / scale past float64's range: inf, clipped
            out[:] = np.clip((x - c.center) / c.scale, -Z_LIMIT, Z_LIMIT)

    def _categorical(self, c: ColumnSpec, col, out: np.ndarray, bad, reasons) -> None:
        """One-hot ``out`` (rows, vocabulary + 1); a null or an unseen category goes to the last ("other")
        column, or is an error by ``nan_policy`` / ``unseen_category``."""
        out[:] = 0.0
        col = as_string(col)
        idx = pc.index_in(col, value_set=pa.array(c.vocabulary, pa.string()))
        idx = np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.float64)
        missing = np.isnan(idx)
        if missing.any():
            isnull = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            null_rows = np.flatnonzero(isnull)
            if null_rows.size and self.config.nan_policy == "raise":
                why = f"has a null at row {int(null_rows[0])}"
                _reject(bad, reasons, null_rows, c.name, why, "nan_policy", "null")
            unseen_rows = np.flatnonzero(missing & ~isnull)
            if unseen_rows.size and self.config.unseen_category == "raise":
                value = col.take([int(unseen_rows[0])]).to_pylist()[0]
                why = f"has unseen category {value!r} at row {int(unseen_rows[0])}"
                _reject(bad, reasons, unseen_rows, c.name, why, "unseen_category", "unseen category")
            idx[missing] = len(c.vocabulary)
        out[np.arange(len(idx)), idx.astype(np.int64)] = 1.0

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


def _centered(col, center: float, out: np.ndarray) -> None:
    """``out[:] = x - center`` in float64, ``x`` the column (nulls as NaN), read chunk by chunk."""
    if not pa.types.is_floating(col.type):
        np.subtract(as_float(col), center, out=out)
        return
    start = 0
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        out[start : start + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        start += len(chunk)
    np.subtract(out, center, out=out)


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
