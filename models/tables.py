"""Accepted input formats, all turned into a pyarrow Table.

A pyarrow Table or RecordBatch, a pandas or polars DataFrame, a dict of column
name to array, or a 2-D numpy array (columns named ``x0 … x{d-1}``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import SchemaError

# The scorer's attribution column: the top-k features of each row, largest share first.
TOP_FEATURE_TYPE = pa.list_(pa.struct([("feature", pa.string()), ("contribution", pa.float64())]))


def to_table(data) -> pa.Table:
    try:
        return _to_table(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        # e.g. a pandas object column mixing numbers and strings; Arrow's
        # message names the column.
        raise SchemaError(f"cannot convert the input to a table: {e}") from None


def _to_table(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    mod = type(data).__module__.split(".")[0]
    if mod == "polars":
        return data.to_arrow()
    if mod == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, dict):
        try:
            return pa.table({str(k): _column(v) for k, v in data.items()})
        except (pa.ArrowInvalid, ValueError) as e:
            raise SchemaError(f"cannot build a table from the given columns: {e}") from None
    if isinstance(data, np.ndarray):
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2:
            raise SchemaError(f"a numpy input must be 2-D (rows, features); got shape {data.shape}")
        return pa.table({f"x{j}": data[:, j] for j in range(data.shape[1])})
    raise TypeError(
        "expected a pyarrow Table, a pandas or polars DataFrame, a dict of arrays or a 2-D numpy array; "
        f"got {type(data).__name__}"
    )


def _column(v):
    if isinstance(v, (pa.Array, pa.ChunkedArray)):
        return v
    arr = np.asarray(v)
    if arr.ndim != 1:
        raise SchemaError(f"each column must be 1-D; got shape {arr.shape}")
    return arr
