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
# What the Scorer adds to each row (models/scorer.py's docstring says what each means); the batch job's
# output, the endpoint's answers and the evaluation read these names and types from here.
OUTPUT_SCHEMA = pa.schema(
    [
        ("anomaly_score", pa.float64()),
        ("is_anomaly", pa.bool_()),
        ("top_features", TOP_FEATURE_TYPE),
        ("model_version", pa.string()),
    ]
)
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)


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


def parquet_options(schema: pa.Schema) -> dict:
    """``ParquetWriter`` options for the scorer's output (and any columns beside it): per
    column, the encoding that pays; ``pq.ParquetWriter(f, schema, **parquet_options(schema))``.

    Text (model version, feature names, text keep columns) is dictionary encoded; numbers
    are not (hashing each score, contribution and id into a dictionary that is given up
    anyway made the write twice as slow). Floats are written byte-stream-split: scores and
    contributions are float32 values widened to float64, whose zero low bytes snappy then
    compresses (a part is about half the size). Statistics (min / max) are kept for the
    flat columns, where readers filter, and left out inside ``top_features``.
    Measured on benchmarks/score_throughput.py's output: written about 2.5x faster than
    with pyarrow's defaults, into about 0.6x the bytes; read back the same.
    """
    leaves = list(_leaves(schema))
    return {
        "use_dictionary": [p for p, t, _ in leaves if _is_text(t)],
        "column_encoding": {p: "BYTE_STREAM_SPLIT" for p, t, _ in leaves if t in (pa.float32(), pa.float64())},
        "write_statistics": [p for p, _, nested in leaves if not nested],
    }


def _leaves(fields, prefix: str = ""):
    """(Parquet column path, type, nested) of every leaf column (nested lists named ``list.element``)."""
    for f in fields:
        t, path = f.type, f"{prefix}{f.name}"
        while pa.types.is_list(t) or pa.types.is_large_list(t):
            t, path = t.value_type, f"{path}.list.element"
        if pa.types.is_struct(t):
            yield from _leaves([t.field(i) for i in range(t.num_fields)], f"{path}.")
        else:
            yield path, t, path != f.name


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
