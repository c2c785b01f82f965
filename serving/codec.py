"""Request and response bodies: JSON rows, Arrow IPC streams and Parquet files to Arrow tables and back.

Pure pyarrow, numpy and json: no Serve, no FastAPI, no PyTorch. A body that cannot become a table is a
:class:`RequestError` carrying the HTTP status and a message naming the field at fault.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ..models.tables import OUTPUT_COLUMNS

ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet")
SCORED_COLUMNS = [c for c in OUTPUT_COLUMNS if c != "model_version"]  # per row; the version is the answer's


class RequestError(Exception):
    """A client error: HTTP ``status`` with a message naming the field at fault."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


NESTED = "malformed JSON: nested deeper than the parser allows"


def rows_to_table(body: bytes) -> pa.Table:
    """``{"rows": [{"column": value, ...}, ...]}`` -> an Arrow table, or a RequestError."""
    doc = json_doc(body)
    if "rows" not in doc:
        raise RequestError(422, 'the body must be a JSON object with a "rows" field: {"rows": [{...}, ...]}')
    return rows_table(doc, "rows")


def rows_table(doc: dict, key: str) -> pa.Table:
    """``doc[key]``, a non-empty list of row objects, as an Arrow table (else a RequestError naming it)."""
    columns = _columns(_rows(doc, key), key)
    return pa.table({k: _array(k, values) for k, values in columns.items()})


def _no_constants(name):  # NaN / Infinity are not JSON
    raise RequestError(422, f"{name} is not a valid JSON number; send null for a missing value")


def json_doc(body: bytes) -> dict:
    """The body as a JSON object (a RequestError saying what is wrong otherwise)."""
    try:
        doc = json.loads(body, parse_constant=_no_constants)
    except RequestError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, NESTED) from None
    if not isinstance(doc, dict):
        raise RequestError(422, 'the body must be a JSON object with a "rows" field: {"rows": [{...}, ...]}')
    return doc


def _rows(doc: dict, key: str) -> list:
    """The body's ``key`` field: a non-empty list."""
    rows = doc[key]
    if not isinstance(rows, list):
        raise RequestError(422, f'"{key}" must be a list of objects; got {type(rows).__name__}')
    if not rows:
        raise RequestError(422, f'"{key}" is empty: send at least one row')
    return rows


def _columns(rows: list, key: str = "rows") -> dict[str, list]:
    """The rows' values by column; every row an object with the same columns (else the row at fault)."""
    columns: dict[str, list] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RequestError(422, f"{key}[{i}] must be an object of column: value; got {type(r).__name__}")
        for k in r:
            columns.setdefault(k, [])
    for i, r in enumerate(rows):
        missing = [k for k in columns if k not in r]
        if missing:
            raise RequestError(422, f"{key}[{i}] lacks column(s) {missing} that other rows have")
        for k, v in r.items():
            columns[k].append(v)
    return columns


def _array(k: str, values: list) -> pa.Array:
    """One column's values as an Arrow array of one flat type (else a RequestError naming the column)."""
    try:
        array = pa.array(values)
    except RecursionError:
        raise RequestError(422, f"column {k!r} holds nested values; send numbers or strings") from None
    except OverflowError:  # an integer beyond int64: as the float it is to the model
        try:
            array = pa.array([float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values])
        except (OverflowError, pa.ArrowInvalid, pa.ArrowTypeError):
            raise RequestError(422, f"column {k!r} holds a number too large for a float64") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        types = sorted({type(v).__name__ for v in values if v is not None})
        raise RequestError(422, f"column {k!r} mixes value types {types}; send one type per column") from None
    if pa.types.is_nested(array.type):
        raise RequestError(422, f"column {k!r} holds nested values; send numbers or strings")
    return array


def _constant(name):
    raise ValueError(name)  # NaN / Infinity: not JSON; the general path names it


def numeric_rows(body: bytes, names: list[str], max_rows: int) -> np.ndarray | None:
    """The fast path of a JSON body: ``{"rows": [...]}`` whose every row holds exactly the columns
    ``names``, each an int or a float, as a float64 matrix in ``names``' order. None for any other body
    (malformed, another column, a null, a string, a bool, too many rows): :func:`body_to_table` answers
    those, errors included, so both paths give one answer per body."""
    try:
        doc = json.loads(body, parse_constant=_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    rows = doc.get("rows") if type(doc) is dict else None
    if type(rows) is not list or not rows or len(rows) > max_rows:
        return None
    width, values = len(names), []
    try:
        for r in rows:
            if type(r) is not dict or len(r) != width:
                return None
            values.extend([r[c] for c in names])
    except KeyError:
        return None
    if not set(map(type, values)) <= _NUMBERS:
        return None
    try:
        return np.array(values, np.float64).reshape(len(rows), width)
    except OverflowError:  # an integer past float64's range
        return None


_NUMBERS = {int, float}


def _ctype(content_type: str | None) -> str:
    return (content_type or "application/json").split(";")[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """A JSON body (the Content-Type application/json, or none)."""
    return _ctype(content_type) in ("application/json", "")


def body_to_table(body: bytes, content_type: str) -> tuple[pa.Table, str]:
    """The request body as a table and the response format (json, arrow or parquet)."""
    ctype = _ctype(content_type)
    if ctype in ("application/json", ""):
        return rows_to_table(body), "json"
    try:
        if ctype == ARROW_STREAM:
            return ipc.open_stream(pa.BufferReader(body)).read_all(), "arrow"
        if ctype in PARQUET_TYPES:
            return pq.read_table(pa.BufferReader(body)), "parquet"
    except (pa.ArrowInvalid, OSError) as e:
        raise RequestError(400, f"the body is not valid {ctype}: {e}") from None
    raise RequestError(
        415, f"unsupported Content-Type {ctype!r}; use application/json, {ARROW_STREAM} or {PARQUET_TYPES[0]}"
    )


def table_to_body(table: pa.Table, fmt: str) -> bytes:
    """A scored table in the request's bulk format: an Arrow IPC stream (``arrow``) or Parquet."""
    sink = io.BytesIO()
    if fmt == "arrow":
        with ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    else:
        pq.write_table(table, sink)
    return sink.getvalue()


def media_type(fmt: str) -> str:
    """The Content-Type of a bulk answer in ``fmt`` (arrow or parquet)."""
    return ARROW_STREAM if fmt == "arrow" else PARQUET_TYPES[0]


def scored_rows(table: pa.Table) -> list[dict]:
    """The per-row results of a JSON answer, in input order."""
    return table.select(SCORED_COLUMNS).to_pylist()
