"""The training data of ``unusual train``, prepared on the driver for the Ray Train workers.

Three ways, chosen by the size of the input:

- ``driver``: inputs up to ``--driver-read-mb`` of Parquet are read, fit and encoded by the
  driver itself (the in-memory API's functions), and handed to the workers through the object
  store. Ray Data's fixed cost per stage (seconds) would exceed the work.
- ``object-store``: larger inputs are read, fit and encoded by Ray Data tasks and the encoded
  blocks kept in the object store (when they fit in a quarter of it, or ``--cache``).
- ``streaming``: the rest (or ``--no-cache``) streams from storage every epoch through
  ``iter_torch_batches``.

In the first two, each worker fetches its contiguous share of the encoded samples once and
trains from one in-memory tensor, as a plain PyTorch loop would (:class:`Pieces`). Every way
splits train / validation with the same content hash (:func:`~unusual.ray_jobs.data.row_uniforms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.dataset as pads

from ..models.columns import resolve_columns
from ..models.detector import prepare_training_data
from ..models.features import FeatureSchema
from ..models.stats import FeatureStats
from ..models.windows import no_windows_error
from . import data as rdata
from .local_io import DataError, storage_errors

MIB = 1024 * 1024


@dataclass
class Pieces:
    """Encoded samples in the object store: ``refs[i]`` holds ``counts[i]`` samples (a dict of
    numpy ``x`` and ``val`` or a Ray Data block with those columns)."""

    refs: list
    counts: list[int]

    @property
    def total(self) -> int:
        return int(sum(self.counts))


@dataclass
class Prepared:
    schema: FeatureSchema
    n_rows: int  # input rows
    n_samples: int  # rows, or full windows
    how: str  # "driver" | "object-store" | "streaming"
    pieces: Pieces | None = None
    train_ds: object = None  # streaming: Ray Datasets of the two parts
    val_ds: object = None
    keep: list = field(default_factory=list)  # what must outlive training (materialized datasets)


def input_bytes(files: list[str], pafs) -> int:
    return int(sum(max(i.size or 0, 0) for i in pafs.get_file_info(files)))


def _on_driver(job, files, pafs, fam, model_cfg, feat_cfg, train_cfg, reserved) -> Prepared:
    import ray

    with storage_errors(job.data):
        table = pads.dataset(files, filesystem=pafs, format="parquet").to_table()
    if table.num_rows == 0:
        raise DataError("the data has no rows")
    stats = FeatureStats.from_table(table, cfg=feat_cfg, reserved=reserved, seed=train_cfg.seed)
    schema = FeatureSchema.from_stats(stats, feat_cfg)
    # The in-memory API's encoding (and its errors); windows are materialised for the workers.
    data = prepare_training_data(table, schema, model_cfg, model_cfg.context_length if fam.sequence else None)
    x = data[np.arange(len(data))] if fam.sequence else data
    arrays = {"x": x, "val": rdata.row_uniforms(x, train_cfg.seed) < train_cfg.val_fraction}
    n = len(arrays["x"])
    return Prepared(schema, table.num_rows, n, "driver", Pieces([ray.put(arrays)], [n]))


def _pieces_of(ds) -> Pieces:
    refs, counts = [], []
    for bundle in ds.iter_internal_ref_bundles():
        for ref, meta in zip(bundle.block_refs, bundle.metadata):
            if meta.num_rows:
                refs.append(ref)
                counts.append(int(meta.num_rows))
    return Pieces(refs, counts)


def prepare(job, fam, model_cfg, feat_cfg, train_cfg, progress) -> Prepared:
    """Read, fit the feature schema, encode and split the data of a :class:`TrainJob`."""
    import ray

    files, pafs, schema_pa = rdata.list_parquet(job.data)
    size = input_bytes(files, pafs)
    reserved = (model_cfg.entity_column, model_cfg.time_column) if fam.sequence else ()
    resolve_columns(schema_pa, feat_cfg, reserved)  # bad columns fail before any work
    if job.cache is not False and size <= job.driver_read_mb * MIB:
        progress(f"reading {len(files)} file(s), {size / MIB:,.1f} MiB, from {job.data} on the driver …")
        return _on_driver(job, files, pafs, fam, model_cfg, feat_cfg, train_cfg, reserved)

    progress(f"fitting the feature schema on {len(files)} file(s), {size / MIB:,.1f} MiB, at {job.data} …")
    ds = ray.data.read_parquet(files, filesystem=pafs)
    schema, n_rows = rdata.fit_schema(ds, schema_pa, feat_cfg, reserved, train_cfg.seed)
    allowed = tuple(c for c in reserved if c)
    vf, seed = train_cfg.val_fraction, train_cfg.seed
    if fam.sequence:
        encoded = rdata.window_dataset(
            ds, schema, model_cfg.entity_column, model_cfg.time_column, model_cfg.context_length, vf, seed
        )
    else:
        encoded = rdata.encoded_rows(ds, schema, vf, seed, allowed)
    store = ray.cluster_resources().get("object_store_memory", 0)
    per_sample = schema.width * 4 * (model_cfg.context_length if fam.sequence else 1)
    cached = job.cache if job.cache is not None else n_rows * per_sample < 0.25 * store
    if cached or fam.sequence:  # windows are counted (and checked) once, here
        progress("encoding the training data into the object store …" if cached else "building the windows …")
        encoded = encoded.materialize()
    if cached:
        pieces = _pieces_of(encoded)
        if pieces.total == 0 and fam.sequence:
            raise no_windows_error(model_cfg.window, model_cfg.context_length)
        if pieces.total == 0:
            raise DataError("the data has no rows")
        return Prepared(schema, n_rows, pieces.total, "object-store", pieces, keep=[encoded])
    n_samples = encoded.count() if fam.sequence else n_rows
    if n_samples == 0:
        raise no_windows_error(model_cfg.window, model_cfg.context_length)
    return Prepared(
        schema,
        n_rows,
        n_samples,
        "streaming",
        train_ds=rdata.select_part(encoded, "train"),
        val_ds=rdata.select_part(encoded, "val"),
        keep=[encoded],
    )


# --------------------------------------------------------------------------- on the workers


def _arrays(obj) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(obj, dict):
        return obj["x"], obj["val"]
    from ray.data.block import BlockAccessor

    cols = BlockAccessor.for_block(obj).to_numpy(["x", "val"])
    return cols["x"], cols["val"]


def fetch_share(pieces: Pieces, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """This worker's contiguous share of the samples (rows ``[rank * n / world, (rank + 1) * n / world)``
    of the pieces in order): fetched once, as one ``x`` array and its validation mask."""
    import ray

    n = pieces.total
    lo, hi = rank * n // world, (rank + 1) * n // world
    xs, vals, offset = [], [], 0
    for ref, count in zip(pieces.refs, pieces.counts):
        a, b = max(lo, offset), min(hi, offset + count)
        if a < b:
            x, val = _arrays(ray.get(ref))
            xs.append(x[a - offset : b - offset])
            vals.append(np.asarray(val[a - offset : b - offset], dtype=bool))
        offset += count
    if not xs:
        return np.empty((0,), np.float32), np.empty(0, bool)
    return np.concatenate(xs).astype(np.float32, copy=False), np.concatenate(vals)
