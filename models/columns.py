"""Which columns a model reads: the feature configuration, Arrow type checks and column choice.

The lowest layer of the feature code: :mod:`unusual.models.stats` summarises the chosen
columns and :mod:`unusual.models.features` builds the frozen schema from those summaries;
both import from here and never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import SchemaError
from .params import param, validate

SCALINGS = ("standard", "robust", "none")
NAN_POLICIES = ("raise", "impute")
UNSEEN_POLICIES = ("bucket", "raise")


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

    features: list[str] | None = param(None, shown="all columns", help="columns to use")
    exclude: list[str] = param(factory=list, shown="none", help="columns to leave out (ids, labels)")
    categorical: list[str] | None = param(None, shown="string columns", help=(
        'categorical columns, one-hot encoded with an "other" bucket; an explicit list makes any other '
        "non-numeric column an error"))
    scaling: str = param("standard", choices=SCALINGS, help=(
        "`standard` (mean / std), `robust` (median / IQR) or `none`"))
    nan_policy: str = param("raise", choices=NAN_POLICIES, help=(
        "`raise`: NaN, inf or null is an error naming the column and row; `impute`: replaced by the fit-time "
        'center (numeric) or the "other" bucket (categorical)'))
    unseen_category: str = param("bucket", choices=UNSEEN_POLICIES, help=(
        '`bucket`: a category not seen at fit time goes to the "other" bucket; `raise`: error naming the '
        "column and value"))
    max_categories: int = param(100, ge=1, help="most frequent categories kept per column")

    def __post_init__(self):
        validate(self)
        self.exclude = list(self.exclude or [])
        if self.features is not None:
            self.features = list(self.features)
        if self.categorical is not None:
            self.categorical = list(self.categorical)


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


def as_float(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as float64 numpy with nulls as NaN (one copy at most)."""
    if not pa.types.is_floating(col.type):
        col = pc.cast(col, pa.float64())
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def as_string(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A column as Arrow strings (dictionaries decoded, integers and booleans as text)."""
    if pa.types.is_dictionary(col.type) or not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return col
