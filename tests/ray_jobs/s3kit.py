"""Writing test tables to the session's S3 endpoint as Parquet shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs


def put_shards(bucket: str, prefix: str, table: pa.Table, n: int, row_group: int | None = None) -> str:
    """``table`` as ``n`` Parquet shards under ``s3://bucket/prefix``; returns that URI."""
    fs = s3fs.S3FileSystem()
    step = -(-table.num_rows // n)
    for i in range(n):
        with fs.open(f"{bucket}/{prefix}/part-{i:03d}.parquet", "wb") as f:
            pq.write_table(table.slice(i * step, step), f, row_group_size=row_group)
    return f"s3://{bucket}/{prefix}"


def cardio_with_ids() -> pa.Table:
    """The shipped cardio data with an int64 ``id`` column (0..n-1): the batch tests' input."""
    from unusual.ray_jobs import sample_data

    t = sample_data.load("cardio")
    return t.append_column("id", pa.array(np.arange(t.num_rows, dtype=np.int64)))
