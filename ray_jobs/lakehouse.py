"""Lakehouse tables as scoring input: the Parquet data files of a Delta Lake or Apache Iceberg table
at its current version, or only those appended since a watermark (an earlier version).

    delta+s3://bucket/tables/events          a Delta table at its location (delta+file:///…, delta+/abs/path)
    iceberg://prod/analytics.events          an Iceberg table in the PyIceberg catalog ``prod``

    snap = table_snapshot(uri)               # every data file of the current version
    snap = table_snapshot(uri, since=7)      # the files appended after version 7; snap.version: the next watermark

Files are full URIs (``s3://…``) or local paths, read with :func:`local_io.filesystem` like any Parquet
input, so object storage is configured the project's way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` …).
The table formats' own libraries read the metadata and are optional extras, imported only here:
``pip install "unusual[delta]"`` (deltalake) and ``pip install "unusual[iceberg]"`` (pyiceberg). Iceberg
catalogs are configured the PyIceberg way (``~/.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__<NAME>__URI`` …).

Watermarks: a Delta version, or an Iceberg snapshot id. With ``since`` the listing holds only appended
rows, or it fails: when a commit after ``since`` deleted, updated, merged, overwrote or compacted rows
that ``since`` held, its files mix old rows and new ones, and the error says to rescore the table.
Delta compares the files live at ``since`` with those live now (a file of ``since`` removed, or given a
deletion vector, fails); Iceberg follows the snapshots after ``since``, each of which must be an append.

Rows hidden by row-level deletes (Delta deletion vectors, Iceberg delete files) are still in the Parquet
files, so a listing holding such files is refused too. Delta tables with column mapping (physical column
names in the files) are refused; Delta partition columns are not in the files (``partition_columns``,
each file's ``partition`` values).
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import pydantic

from .local_io import DataError

__all__ = ["DELTA_INSTALL", "ICEBERG_INSTALL", "TableFile", "TableSnapshot", "delta_storage_options",
           "iceberg_catalog_properties", "is_table_uri", "table_snapshot"]

DELTA_PREFIX = "delta+"
ICEBERG_PREFIX = "iceberg://"
DELTA_INSTALL = 'pip install "unusual[delta]"'
ICEBERG_INSTALL = 'pip install "unusual[iceberg]"'
RESCORE = "rows appended since then cannot be told apart from rewritten ones: rescore the whole table (no watermark)"


class TableFile(pydantic.BaseModel):
    path: str  # a full URI (s3://…) or a local path, readable through local_io.filesystem
    size: int  # bytes
    rows: int | None  # from the table's metadata; None where the writer recorded no statistics
    partition: dict[str, Any] = {}  # Delta: partition values, which are not in the file itself


class TableSnapshot(pydantic.BaseModel):
    uri: str  # the table URI as given
    format: str  # "delta" | "iceberg"
    version: int  # the Delta version or the Iceberg snapshot id listed: the next watermark
    files: list[TableFile]  # every data file of `version` (since=None), or those appended after `since`
    since: int | None
    partition_columns: list[str] = []  # Delta: columns held in the files' `partition`, not in the files


def is_table_uri(uri: str) -> bool:
    """Whether ``uri`` names a lakehouse table (``delta+…``, ``iceberg://…``) rather than Parquet files."""
    return isinstance(uri, str) and uri.startswith((DELTA_PREFIX, ICEBERG_PREFIX))


def table_snapshot(uri: str, since: int | None = None) -> TableSnapshot:
    """The data files of the table at ``uri`` now, or those appended after the version / snapshot
    ``since`` (none when ``since`` is the current one). Raises :class:`DataError` for a URI that
    names no table, an unknown or newer ``since``, or a change after ``since`` other than appends."""
    if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
        raise DataError(f"{uri}: the watermark must be a table version or snapshot id (an integer), not {since!r}")
    if uri.startswith(DELTA_PREFIX):
        return _delta_snapshot(uri, since)
    if uri.startswith(ICEBERG_PREFIX):
        return _iceberg_snapshot(uri, since)
    raise DataError(f"{uri} is not a table URI: use delta+<location> or iceberg://<catalog>/<namespace>.<table>")


def _one_line(e: BaseException) -> str:
    """A library error on one line (delta-rs prints indented, coloured trees)."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split()) or type(e).__name__


def _local_or_uri(path: str) -> str:
    """``file:`` URIs as local paths; Hadoop's ``s3a://`` / ``s3n://`` as ``s3://``."""
    parts = urlsplit(path)
    if parts.scheme == "file":
        return parts.path
    if parts.scheme in ("s3a", "s3n"):
        return "s3" + path[len(parts.scheme):]
    return path


def _s3_endpoint() -> str | None:
    # botocore's order: the S3-specific variable first
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _aws_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


# ---------------------------------------------------------------- Delta Lake


def delta_storage_options(location: str) -> dict[str, str]:
    """deltalake's storage options for a table location, from the standard AWS variables the rest of
    the project uses: the endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; plain HTTP allowed
    when it is an ``http://`` one, as for MinIO or the local endpoint) and the region. Credentials are
    left to delta-rs, which reads ``AWS_ACCESS_KEY_ID`` & co. and the other sources of the AWS chain."""
    if urlsplit(location).scheme not in ("s3", "s3a"):
        return {}
    options = {}
    if endpoint := _s3_endpoint():
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if region := _aws_region():
        options["AWS_REGION"] = region
    return options


def _deltalake(uri: str):
    try:
        import deltalake
    except ImportError:
        raise DataError(f"{uri}: reading Delta tables needs the deltalake package: {DELTA_INSTALL}") from None
    return deltalake


def _delta_table(deltalake, uri: str, location: str, version: int | None = None):
    from deltalake.exceptions import TableNotFoundError

    try:
        return deltalake.DeltaTable(location, version=version, storage_options=delta_storage_options(location))
    except TableNotFoundError:
        raise DataError(f"{uri}: no Delta table at {location} (no _delta_log)") from None
    except Exception as e:  # storage (OSError), protocol and log errors from delta-rs
        at = "" if version is None else f" at version {version}"
        raise DataError(f"{uri}: cannot load the Delta table{at}: {_one_line(e)}") from None


def _delta_root(table) -> str:
    """The table's location, decoded (``table_uri`` is a URL: ``my%20table``; ``file_uris()`` keeps
    the encoded root for local tables, which names no file)."""
    parts = urlsplit(table.table_uri.rstrip("/"))
    path = unquote(parts.path)
    return path if parts.scheme == "file" else _local_or_uri(f"{parts.scheme}://{parts.netloc}{path}")


def _delta_files(table) -> dict[str, TableFile]:
    """The live data files of a loaded version by their path in the log (URI-encoded, relative)."""
    import pyarrow as pa

    root = _delta_root(table)
    actions = pa.table(table.get_add_actions(flatten=False))
    has_partition = "partition" in actions.column_names
    files = {}
    for row in actions.to_pylist():
        path = unquote(row["path"])
        full = _local_or_uri(path) if "://" in path else f"{root}/{path}"
        part = (row.get("partition") or {}) if has_partition else {}
        files[row["path"]] = TableFile(path=full, size=row["size_bytes"], rows=row["num_records"], partition=part)
    return files


def _delta_deleted(table) -> dict[str, tuple]:
    """Files (by base name) carrying a deletion vector -> the vector's keep mask; {} for tables
    without the feature (the masks are read only where the protocol allows them)."""
    features = table.protocol().reader_features or []
    if "deletionVectors" not in features:
        return {}
    import pyarrow as pa

    masks = pa.table(table.deletion_vectors().read_all()).to_pylist()
    return {posixpath.basename(unquote(m["filepath"])): tuple(m["selection_vector"]) for m in masks}


def _check_delta_layout(uri: str, table) -> None:
    mode = table.metadata().configuration.get("delta.columnMapping.mode", "none")
    if mode != "none":
        raise DataError(f"{uri}: the Delta table uses column mapping (mode {mode}): its Parquet files hold "
                        "physical column names, not the table's; scoring reads the files themselves")


def _refuse_deletion_vectors(uri: str, version: int, files: list[TableFile], deleted: dict[str, tuple]) -> None:
    hit = [f.path for f in files if posixpath.basename(f.path) in deleted]
    if hit:
        raise DataError(f"{uri}: {len(hit)} data file(s) of version {version} have deletion vectors (rows "
                        f"deleted in place, still in the Parquet files), e.g. {hit[0]}: purge them first "
                        "(REORG TABLE … APPLY (PURGE), or OPTIMIZE)")


def _delta_operation(commit: dict) -> str:
    params = commit.get("operationParameters") or {}
    mode = params.get("mode") or params.get("outputMode")
    op = commit.get("operation", "unknown operation")
    return f"{op} ({mode})" if mode else op


def _delta_rewrites(table, since: int, version: int) -> str:
    """The commits after ``since`` that are not appends, for the error message."""
    try:
        history = table.history(limit=version - since)
    except Exception:  # the message does without it
        history = []
    appends = {"WRITE (Append)", "STREAMING UPDATE (Append)"}
    found = sorted((c["version"], _delta_operation(c)) for c in history if c.get("version", -1) > since)
    named = [f"version {v} ({op})" for v, op in found if op not in appends]
    return ", ".join(named) or f"a commit between versions {since} and {version}"


def _delta_appended(uri: str, deltalake, location: str, table, since: int, now: dict[str, TableFile]):
    version = table.version()
    if since < 0 or since > version:
        raise DataError(f"{uri}: the watermark version {since} is not a version of the table (current: {version}): "
                        "it comes from another table, or the table was recreated")
    if since == version:
        return []
    old = _delta_table(deltalake, uri, location, version=since)
    before = _delta_files(old)
    removed = before.keys() - now.keys()
    deleted_now, deleted_then = _delta_deleted(table), _delta_deleted(old)
    changed = [p for p in before.keys() & now.keys()
               if deleted_now.get(posixpath.basename(unquote(p))) != deleted_then.get(posixpath.basename(unquote(p)))]
    if removed or changed:
        raise DataError(f"{uri}: {_delta_rewrites(table, since, version)} removed or rewrote data of version "
                        f"{since} (the watermark); {RESCORE}")
    files = [f for p, f in now.items() if p not in before]
    _refuse_deletion_vectors(uri, version, files, deleted_now)
    return files


def _delta_snapshot(uri: str, since: int | None) -> TableSnapshot:
    location = uri[len(DELTA_PREFIX):]
    if not location:
        raise DataError(f"{uri}: no table location after delta+ (delta+s3://bucket/path or delta+/abs/path)")
    deltalake = _deltalake(uri)
    table = _delta_table(deltalake, uri, location)
    _check_delta_layout(uri, table)
    now = _delta_files(table)
    if since is None:
        files = list(now.values())
        _refuse_deletion_vectors(uri, table.version(), files, _delta_deleted(table))
    else:
        files = _delta_appended(uri, deltalake, location, table, since, now)
    return TableSnapshot(uri=uri, format="delta", version=table.version(), files=files, since=since,
                         partition_columns=list(table.metadata().partition_columns))


# ---------------------------------------------------------------- Apache Iceberg


def _parse_iceberg_uri(uri: str) -> tuple[str, tuple[str, ...]]:
    catalog, _, name = uri[len(ICEBERG_PREFIX):].partition("/")
    namespace, _, table = name.rpartition(".")
    if not catalog or not namespace or not table or "/" in name:
        raise DataError(f"{uri}: an Iceberg table URI is iceberg://<catalog>/<namespace>.<table> "
                        "(the namespace may be dotted: the last dot separates the table)")
    return catalog, (*namespace.split("."), table)


def iceberg_catalog_properties(name: str) -> dict[str, Any]:
    """The PyIceberg configuration of catalog ``name`` as it is now (``~/.pyiceberg.yaml``,
    ``PYICEBERG_CATALOG__<NAME>__…``: pyiceberg itself reads them once, at import), with the S3
    endpoint and region taken from the standard AWS variables where the catalog sets none:
    PyIceberg's own S3 client (pyarrow's) does not read ``AWS_ENDPOINT_URL``. Credentials come from
    the AWS chain (``AWS_ACCESS_KEY_ID`` …) or the catalog (``s3.access-key-id``, vended by REST)."""
    from pyiceberg.utils.config import Config

    conf = dict(Config().get_catalog_config(name) or {})
    if not conf:
        return {}
    if "s3.endpoint" not in conf and (endpoint := _s3_endpoint()):
        conf["s3.endpoint"] = endpoint
    if not {"s3.region", "client.region"} & conf.keys() and (region := _aws_region()):
        conf["s3.region"] = region
    return conf


def _iceberg_table(uri: str):
    try:
        from pyiceberg.catalog import load_catalog
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
    except ImportError:
        raise DataError(f"{uri}: reading Iceberg tables needs the pyiceberg package: {ICEBERG_INSTALL}") from None
    name, identifier = _parse_iceberg_uri(uri)
    properties = iceberg_catalog_properties(name)
    if not properties:
        raise DataError(f"{uri}: no Iceberg catalog named {name} is configured: set PYICEBERG_CATALOG__"
                        f"{name.upper()}__URI (and __WAREHOUSE …) or add it to ~/.pyiceberg.yaml")
    try:
        catalog = load_catalog(name, **properties)
        return catalog.load_table(identifier)
    except (NoSuchTableError, NoSuchNamespaceError):
        raise DataError(f"{uri}: catalog {name} has no table {'.'.join(identifier)}") from None
    except Exception as e:  # misconfigured catalog, unreachable service, storage errors
        raise DataError(f"{uri}: cannot load the Iceberg table: {_one_line(e)}") from None


def _iceberg_file(uri: str, data_file) -> TableFile:
    from pyiceberg.manifest import FileFormat

    if data_file.file_format != FileFormat.PARQUET:
        raise DataError(f"{uri}: data file {data_file.file_path} is {data_file.file_format.value}, not Parquet")
    return TableFile(path=_local_or_uri(data_file.file_path), size=data_file.file_size_in_bytes,
                     rows=data_file.record_count)


def _iceberg_all(uri: str, table, snapshot) -> list[TableFile]:
    tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())
    with_deletes = [t.file.file_path for t in tasks if t.delete_files]
    if with_deletes:
        raise DataError(f"{uri}: {len(with_deletes)} data file(s) of snapshot {snapshot.snapshot_id} have delete "
                        f"files (rows deleted by merge-on-read, still in the Parquet files), e.g. {with_deletes[0]}: "
                        "rewrite the data files first (rewrite_data_files)")
    return [_iceberg_file(uri, t.file) for t in tasks]


def _iceberg_since(uri: str, table, since: int) -> list:
    """The snapshots after ``since`` up to the current one, oldest first."""
    chain, snapshot = [], table.current_snapshot()
    while snapshot.snapshot_id != since:
        chain.append(snapshot)
        parent = snapshot.parent_snapshot_id
        snapshot = None if parent is None else table.snapshot_by_id(parent)
        if snapshot is None:
            if table.snapshot_by_id(since) is not None:
                raise DataError(f"{uri}: the watermark snapshot {since} is not an ancestor of the current snapshot "
                                f"{table.current_snapshot().snapshot_id} (the table was rolled back); {RESCORE}")
            raise DataError(f"{uri}: the watermark snapshot {since} is not a snapshot of the table (expired, or "
                            "from another table); rescore the whole table (no watermark)")
    return chain[::-1]


def _iceberg_appended(uri: str, table, since: int) -> list[TableFile]:
    from pyiceberg.manifest import DataFileContent, ManifestContent, ManifestEntryStatus
    from pyiceberg.table.snapshots import Operation

    files = []
    for snapshot in _iceberg_since(uri, table, since):
        summary = snapshot.summary
        operation = summary.operation if summary is not None else None
        deletes = int((summary or {}).get("added-delete-files") or 0)
        if operation != Operation.APPEND or deletes:
            what = "added delete files" if operation == Operation.APPEND else (operation.value if operation else "?")
            raise DataError(f"{uri}: snapshot {snapshot.snapshot_id} after the watermark {since} is not an append "
                            f"({what}); {RESCORE}")
        for manifest in snapshot.manifests(table.io):
            if manifest.added_snapshot_id != snapshot.snapshot_id or manifest.content != ManifestContent.DATA:
                continue
            for entry in manifest.fetch_manifest_entry(table.io):
                if (entry.status == ManifestEntryStatus.ADDED and entry.snapshot_id == snapshot.snapshot_id
                        and entry.data_file.content == DataFileContent.DATA):
                    files.append(_iceberg_file(uri, entry.data_file))
    return files


def _iceberg_snapshot(uri: str, since: int | None) -> TableSnapshot:
    table = _iceberg_table(uri)
    snapshot = table.current_snapshot()
    if snapshot is None:
        at = "" if since is None else f", so the watermark snapshot {since} is not one of its snapshots"
        raise DataError(f"{uri}: the Iceberg table has no snapshot yet (no data){at}")
    try:
        files = _iceberg_all(uri, table, snapshot) if since is None else _iceberg_appended(uri, table, since)
    except DataError:
        raise
    except Exception as e:  # manifests unreadable: storage errors
        raise DataError(f"{uri}: cannot read the Iceberg table's manifests: {_one_line(e)}") from None
    return TableSnapshot(uri=uri, format="iceberg", version=snapshot.snapshot_id, files=files, since=since)
