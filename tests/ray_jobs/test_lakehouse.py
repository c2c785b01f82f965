"""Lakehouse tables as scoring input: real Delta and Iceberg tables written by their own libraries
(on local disk and on the session's S3 endpoint) list their Parquet data files at the current
version, or only those appended after a watermark; anything but appends after it is refused."""

from __future__ import annotations

import sys
import uuid

import pyarrow as pa
import pytest
from unusual.ray_jobs.lakehouse import (
    DELTA_INSTALL,
    ICEBERG_INSTALL,
    delta_storage_options,
    is_table_uri,
    table_snapshot,
)
from unusual.ray_jobs.local_io import DataError, filesystem, read_footers

deltalake = pytest.importorskip("deltalake")  # the [delta] and [iceberg] extras are in [dev]
pytest.importorskip("pyiceberg")


def rows(start: int, n: int, part: str = "a") -> pa.Table:
    return pa.table({"x": pa.array(range(start, start + n), pa.int64()), "y": pa.array([0.5] * n),
                     "part": pa.array([part] * n)})


def footer_rows(files) -> int:
    """The rows of the listed files as pyarrow reads them through the project's filesystem helper."""
    pafs, _, _ = filesystem(files[0].path)
    paths = [filesystem(f.path)[1] for f in files]
    metas = read_footers(paths, pafs)
    assert [m.num_rows for m in metas] == [f.rows for f in files]
    return sum(m.num_rows for m in metas)


# ---------------------------------------------------------------- URIs and packages


def test_table_uris_are_told_from_parquet_paths_and_bad_ones_are_named():
    assert is_table_uri("delta+s3://b/t") and is_table_uri("delta+/abs/t") and is_table_uri("iceberg://c/ns.t")
    assert not is_table_uri("s3://b/data") and not is_table_uri("/data/x.parquet")
    for bad, says in [("s3://b/data", "not a table URI"), ("delta+", "no table location"),
                      ("iceberg://cat/events", "<namespace>.<table>"), ("iceberg:///ns.t", "<namespace>.<table>"),
                      ("iceberg://nosuchcatalog/ns.t", "PYICEBERG_CATALOG__NOSUCHCATALOG__URI")]:
        with pytest.raises(DataError) as e:
            table_snapshot(bad)
        assert bad in str(e.value) and says in str(e.value)
    with pytest.raises(DataError, match="integer"):
        table_snapshot("delta+/t", since="3")


def test_a_missing_library_says_what_to_install(monkeypatch, tmp_path):
    for name in ("deltalake", "pyiceberg", "pyiceberg.catalog"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DataError) as e:
        table_snapshot(f"delta+{tmp_path}")
    assert DELTA_INSTALL in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError) as e:
        table_snapshot("iceberg://cat/ns.t")
    assert ICEBERG_INSTALL in str(e.value) and "\n" not in str(e.value)


def test_delta_storage_options_come_from_the_aws_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert delta_storage_options("s3://b/t") == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                                 "AWS_ALLOW_HTTP": "true", "AWS_REGION": "eu-west-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    assert delta_storage_options("s3://b/t")["AWS_ENDPOINT_URL"] == "https://s3.example.com"
    assert "AWS_ALLOW_HTTP" not in delta_storage_options("s3://b/t")
    assert delta_storage_options("/local/table") == {}


# ---------------------------------------------------------------- Delta Lake


@pytest.fixture
def delta_table(tmp_path):
    """Version 0: 10 rows; version 1: 7 rows appended in two partitions (one with a space in its value)."""
    location = str(tmp_path / "my events")  # a space in the table's path: the log encodes its paths
    deltalake.write_deltalake(location, rows(0, 10), partition_by=["part"])
    deltalake.write_deltalake(location, pa.concat_tables([rows(10, 4, "a"), rows(14, 3, "b c")]), mode="append",
                              partition_by=["part"])
    return location


def test_delta_lists_the_current_files_and_those_appended_since_a_version(delta_table):
    uri = f"delta+{delta_table}"
    full = table_snapshot(uri)
    assert (full.format, full.version, full.since, full.partition_columns) == ("delta", 1, None, ["part"])
    # deltalake's own file_uris() keeps the root URL-encoded (my%20events): the same files, by name
    assert sorted(f.path.rpartition("/")[2] for f in full.files) == sorted(
        u.rpartition("/")[2] for u in deltalake.DeltaTable(delta_table).file_uris())
    assert all(f.path.startswith(f"{delta_table}/part=") for f in full.files)
    assert footer_rows(full.files) == 17 and all(f.size > 0 for f in full.files)

    new = table_snapshot(uri, since=0)
    assert (new.version, new.since) == (1, 0) and len(new.files) == 2
    assert footer_rows(new.files) == 7 and sorted(f.partition["part"] for f in new.files) == ["a", "b c"]
    assert {f.path for f in new.files} < {f.path for f in full.files}
    assert table_snapshot(f"delta+file://{delta_table}", since=0).files == new.files

    assert table_snapshot(uri, since=1).files == []  # nothing since the current version
    for since in (2, -1):
        with pytest.raises(DataError, match=f"version {since} is not a version of the table"):
            table_snapshot(uri, since=since)
    with pytest.raises(DataError, match="no Delta table"):
        table_snapshot(f"delta+{delta_table}-missing")


def test_delta_rewrites_after_the_watermark_are_refused(delta_table):
    uri = f"delta+{delta_table}"
    deltalake.write_deltalake(delta_table, rows(17, 2), mode="append", partition_by=["part"])  # version 2
    deltalake.DeltaTable(delta_table).delete("x < 3")  # version 3
    assert footer_rows(table_snapshot(uri).files) == 16  # the current version itself is fine
    for since in (0, 1, 2):
        with pytest.raises(DataError, match=r"version 3 \(DELETE\).*rescore") as e:
            table_snapshot(uri, since=since)
        assert uri in str(e.value)
    assert table_snapshot(uri, since=3).files == []
    deltalake.write_deltalake(delta_table, rows(0, 5), mode="overwrite", partition_by=["part"])  # version 4
    with pytest.raises(DataError, match=r"version 4 \(WRITE \(Overwrite\)\)"):
        table_snapshot(uri, since=3)


def test_delta_compaction_of_appended_files_alone_keeps_the_appended_rows(tmp_path):
    location = str(tmp_path / "t")
    deltalake.write_deltalake(location, rows(0, 10, "old"), partition_by=["part"],  # the masks are read
                              configuration={"delta.enableDeletionVectors": "true"})  # (delta-rs writes none)
    for start in (10, 13):  # versions 1 and 2: one file each
        deltalake.write_deltalake(location, rows(start, 3, "new"), mode="append", partition_by=["part"])
    deltalake.DeltaTable(location).optimize.compact(partition_filters=[("part", "=", "new")])  # version 3
    new = table_snapshot(f"delta+{location}", since=0)  # version 0's file untouched: the 6 rows, in one file
    assert new.version == 3 and len(new.files) == 1 and footer_rows(new.files) == 6
    with pytest.raises(DataError, match=r"version 3 \(OPTIMIZE\) removed or rewrote data of version 1"):
        table_snapshot(f"delta+{location}", since=1)  # version 1's file compacted with version 2's rows


def test_delta_tables_whose_files_hold_physical_column_names_are_refused(tmp_path):
    location = str(tmp_path / "t")
    deltalake.write_deltalake(location, rows(0, 3), configuration={"delta.columnMapping.mode": "name"})
    with pytest.raises(DataError, match="column mapping"):
        table_snapshot(f"delta+{location}")


# ---------------------------------------------------------------- Apache Iceberg


def iceberg_catalog(monkeypatch, name: str, db, warehouse: str, **writer_properties):
    """A SQL catalog on SQLite, configured the PyIceberg way (environment variables) for the module
    under test; the writer's own catalog object may carry extra properties (the S3 endpoint)."""
    from pyiceberg.catalog.sql import SqlCatalog

    monkeypatch.setenv(f"PYICEBERG_CATALOG__{name.upper()}__URI", f"sqlite:///{db}")
    monkeypatch.setenv(f"PYICEBERG_CATALOG__{name.upper()}__WAREHOUSE", warehouse)
    catalog = SqlCatalog(name, uri=f"sqlite:///{db}", warehouse=warehouse, **writer_properties)
    catalog.create_namespace_if_not_exists("sensors.raw")
    return catalog


def test_iceberg_lists_the_current_files_and_those_appended_since_a_snapshot(monkeypatch, tmp_path):
    catalog = iceberg_catalog(monkeypatch, "localcat", tmp_path / "cat.db", f"file://{tmp_path}/warehouse")
    table = catalog.create_table(("sensors", "raw", "events"), schema=rows(0, 1).schema)
    uri = "iceberg://localcat/sensors.raw.events"
    with pytest.raises(DataError, match="no snapshot yet"):
        table_snapshot(uri)
    table.append(rows(0, 10))
    first = table.current_snapshot().snapshot_id
    table.append(rows(10, 4))
    table.append(rows(14, 3))
    current = table.current_snapshot().snapshot_id

    full = table_snapshot(uri)
    assert (full.format, full.version, full.since, len(full.files)) == ("iceberg", current, None, 3)
    assert footer_rows(full.files) == 17 and all(f.path.startswith(str(tmp_path)) for f in full.files)
    new = table_snapshot(uri, since=first)
    assert (new.version, new.since, len(new.files)) == (current, first, 2)
    assert footer_rows(new.files) == 7 and {f.path for f in new.files} < {f.path for f in full.files}
    assert table_snapshot(uri, since=current).files == []
    with pytest.raises(DataError, match="not a snapshot of the table"):
        table_snapshot(uri, since=12345)
    with pytest.raises(DataError, match="has no table sensors.raw.nothing"):
        table_snapshot("iceberg://localcat/sensors.raw.nothing")

    table.manage_snapshots().rollback_to_snapshot(first).commit()
    with pytest.raises(DataError, match=f"snapshot {current} is not an ancestor of the current snapshot {first}"):
        table_snapshot(uri, since=current)
    table.append(rows(10, 7))
    current = table.current_snapshot().snapshot_id
    assert footer_rows(table_snapshot(uri, since=first).files) == 7

    table.delete("x < 3")
    with pytest.raises(DataError, match=r"snapshot \d+ after the watermark \d+ is not an append \((delete|overwr)"):
        table_snapshot(uri, since=current)
    after_delete = table.current_snapshot().snapshot_id
    table.overwrite(rows(100, 5))
    with pytest.raises(DataError, match="is not an append.*rescore"):
        table_snapshot(uri, since=after_delete)
    assert footer_rows(table_snapshot(uri).files) == 5


# ---------------------------------------------------------------- on S3


def test_both_formats_list_appended_files_on_s3(monkeypatch, tmp_path, s3_bucket, s3_endpoint):
    run = uuid.uuid4().hex[:8]
    location = f"s3://{s3_bucket}/lakehouse/delta {run}"  # a space: the log's URL-encoded root
    for table in (rows(0, 10), rows(10, 6)):
        deltalake.write_deltalake(location, table, mode="append", storage_options=delta_storage_options(location))
    new = table_snapshot(f"delta+{location}", since=0)
    assert new.version == 1 and all(f.path.startswith(location + "/") for f in new.files)
    assert footer_rows(new.files) == 6

    warehouse = f"s3://{s3_bucket}/lakehouse/iceberg-{run}"
    # the writer names the endpoint and region itself (else pyarrow asks AWS for the bucket's region);
    # the module under test takes them from AWS_ENDPOINT_URL and AWS_DEFAULT_REGION
    catalog = iceberg_catalog(monkeypatch, "s3cat", tmp_path / "cat.db", warehouse,
                              **{"s3.endpoint": s3_endpoint, "s3.region": "us-east-1"})
    table = catalog.create_table(("sensors", "raw", "events"), schema=rows(0, 1).schema)
    table.append(rows(0, 10))
    first = table.current_snapshot().snapshot_id
    table.append(rows(10, 6))
    new = table_snapshot("iceberg://s3cat/sensors.raw.events", since=first)
    assert new.version == table.current_snapshot().snapshot_id and len(new.files) == 1
    assert new.files[0].path.startswith(warehouse + "/") and footer_rows(new.files) == 6
