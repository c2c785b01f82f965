"""Planning a batch-scoring job on the driver: what to read, in which units, with how many scorers.

- :class:`BundleInfo`: what the driver needs of a bundle, read without PyTorch;
- :class:`ScorePlan` of :class:`ReadUnit` s, made by :func:`plan`: the job's plan (``_unusual/job.json``):
  the input files, checked against the bundle from their footers, cut into *units* of whole row groups
  (``unit_rows``); for sequence families the number of entity *buckets*
  (``bucket_rows``); the output schema;
- :func:`entity_buckets`: the stable bucket of each row, from its entity;
- :func:`read_mode` and :func:`plan_actors`: who reads the Parquet, and the
  scorers' count and resources, checked against the cluster.

Whether a model scores sequences is the registry's word (``family(kind).sequence``).
Imports PyTorch never, and Ray only inside :func:`plan_actors`.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from ..config import ScoreJob
from ..models.errors import SchemaError
from ..models.registry import family
from ..models.tables import OUTPUT_SCHEMA
from .lakehouse import is_table_uri
from .local_io import DataError, filesystem, list_parquet_files, read_footers

SPEC_VERSION = 1  # job.json's format: a run resumes only a job of the same format
# Internal columns carried from the read to the writer: the output unit, the row in it, the entity bucket.
UNIT, ROW, BUCKET = "__unusual_unit__", "__unusual_row__", "__unusual_bucket__"
DEFAULT_BATCH_ROWS = 131_072  # rows per scoring call when read tasks feed the actors
GPU_ACTORS_PER_GPU = 4  # scoring actors sharing one GPU by default (measured: benchmarks/gpu_paths.py)


@dataclass
class BundleInfo:
    """What the driver needs of a bundle, read without PyTorch (hash checked)."""

    kind: str
    version: str
    threshold: float
    schema: object  # unusual.models.features.FeatureSchema
    entity_column: str | None
    time_column: str | None
    contamination: float | None = None  # the threshold's target rate on data like the training data
    n_calibration: int | None = None  # the scores the threshold was fit on

    @classmethod
    def read(cls, uri: str) -> BundleInfo:
        from ..models.bundle import read_bundle
        from ..models.features import FeatureSchema

        m, _ = read_bundle(uri)
        cfg = m.family_config
        return cls(
            m.kind,
            m.model_version,
            m.threshold.value,
            FeatureSchema.from_dict(m.features),
            cfg.get("entity_column"),
            cfg.get("time_column"),
            m.threshold.contamination,
            m.threshold.n_scores,
        )

    @property
    def sequence(self) -> bool:
        return family(self.kind).sequence


class ReadUnit(BaseModel):
    """A run of whole row groups ``rg = (first, stop)`` of input file ``file``: ``rows`` rows, the first
    of them row ``base`` of the file. ``quarantine``: why the file cannot be scored (its rows are
    copied to the quarantine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: int
    rg: tuple[int, int]
    base: int
    rows: int
    quarantine: str | None = None


class ScorePlan(BaseModel):
    """A batch-scoring job's plan (``_unusual/job.json``), made on the driver by :func:`plan` and read by
    every scoring actor and task: the bundle, the input files and their read units, the columns read
    and kept, the output units (the read units, or the entity buckets of a sequence model) and their
    schema. Small: it travels with each actor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = SPEC_VERSION
    checkpoint: str
    model_version: str
    kind: str
    threshold: float
    data: str
    files: list[str]
    file_rows: list[int]
    columns: list[str]  # read from every file: features, entity / time, kept columns
    keep_columns: list[str]
    entity_column: str | None
    time_column: str | None
    rows_in: int
    units: list[ReadUnit]
    buckets: int  # entity buckets (sequence models); 0 for tabular ones
    out_units: int
    quarantine_units: dict[int, int]  # output unit -> the read unit of an unscorable file it copies
    output_schema: str  # base64 of the Arrow schema of every output part
    top_k: int
    # Per input file, the folder under the output its parts go to (``--incremental``: the file's partition,
    # tabular families only); empty: every part at the top of the output.
    out_dirs: list[str] = []
    storage: str | None = None  # a URI of the files' store, where ``data`` names no folder (a Delta / Iceberg table)

    @property
    def files_uri(self) -> str:
        """What :func:`~unusual.ray_jobs.local_io.filesystem` opens the files with."""
        return self.storage or self.data

    @property
    def sequence(self) -> bool:
        """Whether the job scores sequences (whole entity buckets) rather than rows."""
        return family(self.kind).sequence

    def folder(self, out_unit: int) -> tuple[str, ...]:
        """The folder (path parts under the output) of an output unit's parts: its file's ``out_dirs``
        entry (a tabular plan's output units are its read units)."""
        if not self.out_dirs:
            return ()
        return tuple(p for p in self.out_dirs[self.units[out_unit].file].split("/") if p)

    def schema(self) -> pa.Schema:
        """The schema of every output part (keep columns typed as in the input)."""
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.output_schema)))

    def same_job(self, other: ScorePlan) -> bool:
        """Whether ``other`` plans the same output (so one run may resume the other)."""
        keys = ("format", "model_version", "files", "file_rows", "columns", "keep_columns", "output_schema",
                "units", "buckets", "out_units", "top_k", "out_dirs")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _check_file(schema: pa.Schema, bundle_schema, needed: list[str]) -> str | None:
    """Why this file's rows cannot be scored, or None."""
    missing = [c for c in needed if c not in schema.names]
    if missing:
        return f"missing column(s) {missing}"
    empty = pa.table({c: pa.array([], schema.field(c).type) for c in needed})
    try:
        bundle_schema.validate(empty, allowed_extra=tuple(needed))
    except SchemaError as e:
        return str(e)
    return None


def _units_of(i: int, meta, unit_rows: int, quarantine: str | None) -> list[ReadUnit]:
    """File ``i`` cut into runs of whole row groups of about ``unit_rows`` rows."""
    units, base, rows, start_rg, start_row = [], 0, 0, 0, 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        if rows and rows + n > unit_rows:
            units.append(ReadUnit(file=i, rg=(start_rg, rg), base=start_row, rows=rows, quarantine=quarantine))
            start_rg, start_row, rows = rg, base, 0
        rows += n
        base += n
    if rows:
        units.append(ReadUnit(file=i, rg=(start_rg, meta.num_row_groups), base=start_row, rows=rows,
                              quarantine=quarantine))
    return units


def plan(job: ScoreJob, bundle: BundleInfo, files: list[str] | None = None, out_dirs: list[str] | None = None,
         storage: str | None = None) -> ScorePlan:
    """The job's plan: files (all of ``job.data``, or ``files`` of it, in the store of ``storage``), units of
    work and columns, and where each file's parts go (``out_dirs``, see :class:`ScorePlan`). Small; made on
    the driver."""
    files, pafs, storage = _input_files(job.data, files, storage)
    metas = read_footers(files, pafs)
    entity, time_col = bundle.entity_column, bundle.time_column
    sequence = bundle.sequence
    features = [c.name for c in bundle.schema.columns]
    keep = list(job.keep_columns)
    if sequence:  # entity and time identify a sequence row: kept by default
        keep = [c for c in (entity, time_col) if c and c not in keep] + keep
    needed = list(dict.fromkeys([*features, *(c for c in (entity, time_col) if c), *keep]))
    units, bad, first_bad = [], {}, None
    rows_in = sum(m.num_rows for m in metas)
    unit_rows = job.unit_rows or unit_size(rows_in)
    for i, (f, meta) in enumerate(zip(files, metas)):
        schema = meta.schema.to_arrow_schema()
        for c in keep:
            if c not in schema.names:
                raise SchemaError(f"--keep-columns {c!r} is not a column of {f}; it has {schema.names}", c)
        reason = _check_file(schema, bundle.schema, needed)
        if reason:
            bad[i] = reason
            first_bad = first_bad or (f, reason)
        units += _units_of(i, meta, unit_rows, reason)
    if first_bad and len(bad) == len(files):
        raise SchemaError(f"no file can be scored by this model: {first_bad[0]}: {first_bad[1]}")
    good = next(m.schema.to_arrow_schema() for i, m in enumerate(metas) if i not in bad)
    out_fields = [good.field(c) for c in keep] + list(OUTPUT_SCHEMA)
    buckets = (max(1, math.ceil(rows_in / job.bucket_rows)) if entity else 1) if sequence else 0
    bad_units = [i for i, u in enumerate(units) if u.quarantine is not None]
    # Output units: the read units (tabular) or the entity buckets (sequences); the units of unscorable
    # files are copied to the quarantine as their own output units.
    quarantine = {(buckets + j if sequence else u): u for j, u in enumerate(bad_units)}
    return ScorePlan(
        checkpoint=job.checkpoint,
        model_version=bundle.version,
        kind=bundle.kind,
        threshold=bundle.threshold,
        data=job.data,
        files=files,
        file_rows=[m.num_rows for m in metas],
        columns=needed,
        keep_columns=keep,
        entity_column=entity,
        time_column=time_col,
        rows_in=rows_in,
        units=units,
        buckets=buckets,
        out_units=buckets + len(bad_units) if sequence else len(units),
        quarantine_units=quarantine,
        output_schema=base64.b64encode(pa.schema(out_fields).serialize().to_pybytes()).decode(),
        top_k=job.top_k,
        out_dirs=out_dirs or [],
        storage=storage,
    )


def _input_files(data: str, files: list[str] | None, storage: str | None) -> tuple[list[str], object, str | None]:
    """The files to score (those given, a table's, or the Parquet files at ``data``), the Arrow filesystem
    that opens them and the URI of their store where ``data`` is not one (a table)."""
    if files is None and is_table_uri(data):
        files, storage = table_files(data)
    if files is None:
        files, pafs = list_parquet_files(data)
        return files, pafs, storage
    return files, filesystem(storage or data)[0], storage


def table_files(uri: str, since: int | None = None) -> tuple[list[str], str | None]:
    """A Delta / Iceberg table's data files (storage paths) at its current version, or those appended
    after version ``since``, and a URI of their store (None when there are none)."""
    from .lakehouse import table_snapshot

    snap = table_snapshot(uri, since=since)
    if not snap.files and since is None:
        raise DataError(f"no data files in {uri} at version {snap.version}")
    return [filesystem(f.path)[1] for f in snap.files], (snap.files[0].path if snap.files else None)


def unit_size(rows: int) -> int:
    """Default rows per unit: about 64 units, so the work spreads evenly over
    the scorers, between 100,000 and 1,000,000 rows (whole row groups).
    Depends on the data only, so a rerun plans the same units."""
    return min(1_000_000, max(100_000, rows // 64))


def entity_buckets(table: pa.Table, entity: str | None, buckets: int) -> np.ndarray:
    """A stable bucket per row from its entity value (crc32 of its text)."""
    n = table.num_rows
    if entity is None or buckets == 1:
        return np.zeros(n, np.int32)
    col = table.column(entity)
    uniq = pc.unique(col)
    codes = np.array([zlib.crc32(str(v).encode()) % buckets for v in uniq.to_pylist()], np.int32)
    return codes[pc.index_in(col, value_set=uniq).to_numpy(zero_copy_only=False)]


# --------------------------------------------------------------------------- resources


def read_mode(job: ScoreJob, kind: str) -> str:
    """``actors``: each CPU actor streams its units from storage itself (no
    data through the object store); ``tasks``: Ray Data read tasks feed the
    actors (GPU actors, so CPUs decode while GPUs score) or, for sequence
    families, the group-by of entity buckets (each entity's rows must meet).

    Two paths for tabular data because the one Ray Data path costs CPUs 1.77x:
    2M rows on 2 cores, 207k rows/s (actors) against 117k (read tasks + actor
    pool), half the CPU seconds and 1.45 against 2.23 GiB peak
    (benchmarks/score_throughput.py, runners unusual / unusual-tasks)."""
    if family(kind).sequence:
        return "tasks"
    if job.read != "auto":
        return job.read
    return "tasks" if job.use_gpu else "actors"


def plan_actors(job: ScoreJob, mode: str) -> dict:
    """Scorer count and resources, checked against the cluster. With read
    tasks, the scorers leave them room (on 2 cores: 2 x 0.75 CPU, reads at
    0.25 CPU each)."""
    import ray

    from ..runtime import ResourceError

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    free = float(ray.available_resources().get("CPU", 0))
    if job.use_gpu:
        if gpus < 1:
            raise ResourceError("--use-gpu needs a GPU; the cluster has 0")
        # Several actors share each GPU: one actor's host-side work (decoding the
        # block, top-k features, writing Parquet) leaves a GPU mostly idle.
        whole = int(gpus)
        n = job.concurrency or whole * max(1, min(GPU_ACTORS_PER_GPU, int((cpus - 1) // whole)))
        per_gpu = 1.0 if n <= whole else math.floor(whole / n * 10_000) / 10_000
        if per_gpu < 0.01:
            raise ResourceError(f"--concurrency {n} GPU actors would get under 1 % of a GPU each ({gpus:g} GPUs)")
        return {"concurrency": n, "num_cpus": 1.0 if cpus >= n + 1 else 0.5, "num_gpus": per_gpu, "threads": 1}
    read_reserve = 0.5 if mode == "tasks" else 0.0
    if cpus < 1:
        raise ResourceError(f"the cluster has {cpus:g} CPUs; scoring needs at least 1")
    # Size from what is free now (a shared cluster may be serving too), never above the total.
    budget = min(cpus, free) if free >= 0.5 else cpus
    n = job.concurrency or max(1, int(budget))
    per = math.floor(max(budget - read_reserve, 0.25 * n) / n * 100) / 100
    if per < 0.1:
        raise ResourceError(f"--concurrency {n} actors do not fit in {cpus:g} CPUs alongside the read tasks")
    return {"concurrency": n, "num_cpus": per, "num_gpus": 0, "threads": max(1, int(round(per)))}
