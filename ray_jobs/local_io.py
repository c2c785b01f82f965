"""Reading a whole (small) table from a local path or any fsspec URI, for the
single-process commands. The Ray jobs stream instead of reading everything."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
from pyarrow.fs import FSSpecHandler, PyFileSystem


def filesystem(uri: str) -> tuple[pa.fs.FileSystem, str, fsspec.AbstractFileSystem]:
    """(pyarrow filesystem, path, fsspec filesystem) for a local path or URI.

    fsspec resolves credentials and endpoints from the standard environment
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` …), never from flags.
    """
    fs, path = fsspec.core.url_to_fs(str(uri))
    return PyFileSystem(FSSpecHandler(fs)), path, fs


def read_table(uri: str) -> pa.Table:
    """A Parquet file, a folder / prefix of Parquet shards, or a CSV file."""
    pafs, path, fs = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"no data at {uri}")
    if path.endswith((".csv", ".csv.gz")):
        with fs.open(path, "rb", compression="infer") as f:
            return pacsv.read_csv(f)
    table = ds.dataset(path, filesystem=pafs, format="parquet").to_table()
    if table.num_rows == 0:
        raise ValueError(f"the data at {uri} has no rows")
    return table
