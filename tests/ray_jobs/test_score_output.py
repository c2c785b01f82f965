"""The encodings of the scoring job's output parts (``parquet_options``, no Ray): per column, values unchanged."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from unusual.models.tables import TOP_FEATURE_TYPE, parquet_options


def test_output_parts_encode_each_column_as_it_pays_and_read_back_equal():
    rng = np.random.default_rng(0)
    n = 5000
    top = [
        [{"feature": f"f{j:02d}", "contribution": float(np.float32(v))} for j, v in zip(rng.integers(0, 32, 3), row)]
        for row in rng.random((n, 3))
    ]
    table = pa.table(
        {
            "id": np.arange(n, dtype=np.int64),
            "label": rng.choice(["normal", "attack"], n),
            "x": pa.array(rng.normal(size=n).astype(np.float32)),
            "anomaly_score": rng.random(n).astype(np.float32).astype(np.float64),
            "is_anomaly": rng.random(n) < 0.1,
            "top_features": pa.array(top, TOP_FEATURE_TYPE),
            "model_version": ["ae-0123456789ab"] * n,
        }
    )
    opts = parquet_options(table.schema)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, **opts) as w:
        w.write_table(table)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert back.schema == table.schema and back.equals(table)

    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert set(cols) == {
        "id", "label", "x", "anomaly_score", "is_anomaly", "model_version",
        "top_features.list.element.feature", "top_features.list.element.contribution",
    }  # fmt: skip
    dictionary = {p for p, c in cols.items() if "RLE_DICTIONARY" in c.encodings}
    assert dictionary == {"label", "model_version", "top_features.list.element.feature"}
    split = {p for p, c in cols.items() if "BYTE_STREAM_SPLIT" in c.encodings}
    assert split == {"x", "anomaly_score", "top_features.list.element.contribution"}
    stats = {p for p, c in cols.items() if c.is_stats_set}
    assert stats == {"id", "label", "x", "anomaly_score", "is_anomaly", "model_version"}
