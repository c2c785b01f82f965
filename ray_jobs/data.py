"""Ray Data adapters: Parquet on object storage in, encoded training data out.

The feature schema is fit with a distributed aggregation (mergeable
per-block :class:`unusual.models.stats.FeatureStats`, reduced with Ray Data's
aggregation API: the driver sees one merged summary, never the rows). Encoding, the
train / validation split and LSTM windowing run in Ray tasks with the same
``models`` functions the in-memory API uses.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import ray

from ..models.columns import FeatureConfig, resolve_columns
from ..models.features import FeatureSchema
from ..models.stats import FeatureStats
from ..models.windows import training_windows
from .aggregates import merged
from .local_io import DataError, list_parquet_files, read_footers

ENTITY_KEY = "__unusual_entity__"


def list_parquet(uri: str) -> tuple[list[str], pa.fs.FileSystem, pa.Schema]:
    """The Parquet files at a URI and the one schema they share (every footer is read, in threads).
    Raises :class:`DataError` with the reason."""
    files, pafs = list_parquet_files(uri)
    first = None
    for f, meta in zip(files, read_footers(files, pafs)):
        schema = meta.schema.to_arrow_schema().remove_metadata()
        if first is None:
            first = (f, schema)
        elif not schema.equals(first[1]):
            raise DataError(
                f"Parquet shards disagree on their schema: {first[0]} has {_describe(first[1])} "
                f"but {f} has {_describe(schema)}"
            )
    return files, pafs, first[1]


def _describe(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


def read_parquet(uri: str, columns: list[str] | None = None) -> tuple[ray.data.Dataset, pa.Schema]:
    files, pafs, schema = list_parquet(uri)
    ds = ray.data.read_parquet(files, filesystem=pafs, columns=columns)
    return ds, schema


# --------------------------------------------------------------------------- schema


def fit_schema(
    ds: ray.data.Dataset, schema: pa.Schema, cfg: FeatureConfig, reserved: tuple[str, ...] = (), seed: int = 0
) -> tuple[FeatureSchema, int]:
    """The feature schema from per-block statistics merged by a Ray Data aggregation.

    Column choice and types are checked on the Parquet schema first, so bad
    columns fail fast with a :class:`models.SchemaError` naming them.
    """
    resolve_columns(schema, cfg, reserved)
    summarise = partial(FeatureStats.from_table, cfg=cfg, reserved=reserved, seed=seed)
    stats = merged(ds, summarise, partial(FeatureStats.merge, seed=seed))
    if stats is None or stats.n_rows == 0:
        raise DataError("the data has no rows")
    return FeatureSchema.from_stats(stats, cfg), stats.n_rows


# --------------------------------------------------------------------------- splits


def row_uniforms(x: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per row, from the row's content and the seed.

    Deterministic whatever the block layout, so every pass over the data (and a
    resumed run) puts each row on the same side of the train/validation split.
    """
    flat = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32).view(np.uint32).astype(np.uint64)
    h = np.full(len(x), (0xCBF29CE484222325 ^ seed) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(flat.shape[1]):
            h = (h ^ flat[:, j]) * np.uint64(0x100000001B3)
        # splitmix64 finaliser for good low bits
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def encode_rows(batch: pa.Table, schema: FeatureSchema, allowed: tuple[str, ...], val_fraction: float, seed: int):
    """A table's rows encoded (float32 ``x``) with their side of the split (``val``)."""
    x, _, _ = schema.transform(batch, allowed_extra=allowed)
    return {"x": x, "val": row_uniforms(x, seed) < val_fraction}


def encoded_rows(
    ds: ray.data.Dataset, schema: FeatureSchema, val_fraction: float, seed: int, allowed: tuple[str, ...] = ()
) -> ray.data.Dataset:
    """A tabular dataset encoded in Ray tasks: ``x`` and ``val`` columns (``select_part`` picks one side)."""
    return ds.map_batches(
        encode_rows,
        batch_format="pyarrow",
        fn_kwargs={"schema": schema, "allowed": allowed, "val_fraction": val_fraction, "seed": seed},
    )


def _windows_of_group(
    group: pa.Table,
    schema: FeatureSchema,
    entity: str | None,
    time: str | None,
    context: int,
    val_fraction: float,
    seed: int,
) -> dict:
    ws = training_windows(group, schema, entity, time, context, allowed_extra=(ENTITY_KEY,))
    windows = ws[np.arange(len(ws))] if len(ws) else np.empty((0, context, schema.width), np.float32)
    return {"x": windows, "val": row_uniforms(windows, seed) < val_fraction}


def window_dataset(
    ds: ray.data.Dataset,
    schema: FeatureSchema,
    entity: str | None,
    time: str | None,
    context: int,
    val_fraction: float,
    seed: int,
) -> ray.data.Dataset:
    """Full training windows, built per entity (never across entities) in Ray tasks.

    Rows are grouped by entity with a distributed shuffle; each group is sorted
    by time and windowed by :class:`unusual.models.windows.WindowSet`. Without an entity
    column the whole series is one group, windowed in one task.
    """
    key = entity
    if key is None:
        key = ENTITY_KEY
        ds = ds.map_batches(
            lambda b: b.append_column(ENTITY_KEY, pa.array(np.zeros(b.num_rows, np.int8))), batch_format="pyarrow"
        )
    fn_kwargs = {
        "schema": schema,
        "entity": entity,
        "time": time,
        "context": context,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    return ds.groupby(key).map_groups(_windows_of_group, batch_format="pyarrow", fn_kwargs=fn_kwargs)


def select_part(ds: ray.data.Dataset, part: str) -> ray.data.Dataset:
    def pick(batch: dict) -> dict:
        keep = batch["val"] if part == "val" else ~batch["val"]
        return {"x": batch["x"][keep]}

    return ds.map_batches(pick, batch_format="numpy")
