"""Storage access without Ray: filesystems for any fsspec URI, listing Parquet shards, storage
errors that name the URI, and reading a whole (small) table for the single-process commands
(the Ray jobs stream instead of reading everything)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from ..models.errors import storage_problem


def filesystem(uri: str) -> tuple[pa.fs.FileSystem, str, fsspec.AbstractFileSystem]:
    """(pyarrow filesystem, path, fsspec filesystem) for a local path or URI.

    fsspec resolves credentials and endpoints from the standard environment
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` …), never from flags.
    """
    fs, path = fsspec.core.url_to_fs(str(uri))
    return PyFileSystem(FSSpecHandler(fs)), path, fs


class DataError(ValueError):
    """The data at a URI cannot be used: absent, empty, unreadable or inconsistent."""


@contextmanager
def storage_errors(uri: str, doing: str = "reading"):
    """Turn object-storage failures into a :class:`DataError` naming the URI."""
    try:
        yield
    except FileNotFoundError as e:
        raise DataError(f"no data at {uri}: {e}") from None
    except Exception as e:
        problem = storage_problem(e, uri, doing)  # no credentials, access denied
        if problem is not None:
            raise DataError(problem) from None
        if isinstance(e, OSError):  # s3fs maps missing buckets and other failures to OSError subclasses
            raise DataError(f"cannot access {uri}: {e}") from None
        raise


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_parquet_files(uri: str) -> tuple[list[str], pa.fs.FileSystem]:
    """The Parquet files at a URI (a file, a folder or a prefix), sorted.

    Files under a folder whose name starts with ``_`` or ``.`` (job metadata,
    quarantines, temporary files) are not data, as for Spark and Hive.
    Raises :class:`DataError` when there are none.
    """
    pafs, path, fs = filesystem(uri)
    with storage_errors(uri):
        if fs.isfile(path):
            files = [path]
        else:
            root = path.rstrip("/")
            files = sorted(p for p in fs.find(root) if p.endswith(".parquet") and not _hidden(p[len(root) + 1 :]))
            if not files and not fs.isdir(path):
                files = sorted(p for p in fs.glob(root + "*") if p.endswith(".parquet"))
    if not files:
        raise DataError(f"no Parquet files at {uri}")
    return files, pafs


def refuse_existing_bundle(uri: str, overwrite: bool) -> None:
    """Before any work: a bundle already at ``uri`` is an error unless ``overwrite`` (``--overwrite``)."""
    from ..models.bundle import MANIFEST
    from ..models.errors import BundleError

    _, path, fs = filesystem(uri)
    with storage_errors(uri, "checking"):
        exists = fs.exists(f"{path.rstrip('/')}/{MANIFEST}")
    if exists and not overwrite:
        raise BundleError(f"a bundle already exists at {uri}; pass --overwrite to replace it")


FOOTER_THREADS = 16  # footers are small reads: object stores answer many at once


def read_footers(files: list[str], pafs, threads: int = FOOTER_THREADS) -> list[pq.FileMetaData]:
    """The Parquet footers of ``files`` (in their order), read in threads; an
    unreadable one is a :class:`DataError` naming the file."""

    def read(f):
        try:
            return pq.read_metadata(f, filesystem=pafs)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read the Parquet footer of {f}: {e}") from None

    if not files:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        return list(pool.map(read, files))


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
