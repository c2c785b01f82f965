"""Cluster-wide batch scoring: Parquet on object storage -> Ray Data -> Scorer actors -> Parquet.

    unusual score --checkpoint s3://b/models/ae --data s3://b/events/ --output s3://b/scores/ae \\
        --keep-columns event_id,label
    python -m unusual.ray_jobs.score ...                                  (the same code path)

How it works

1. The input shards are listed and their Parquet footers read (in threads):
   every file's schema is checked against the bundle, and the files are cut
   into *units* (runs of row groups, about ``unit_rows`` rows each). A file
   whose schema cannot be scored (a missing or ill-typed column) is not
   fatal: its rows go to the quarantine with the reason, unless every file is
   bad, which is an error naming the column.
2. Ray Data reads the units in streaming read tasks (only the columns the
   model and ``--keep-columns`` need) and feeds an actor pool of
   :class:`ScoreActor`. Each actor loads the bundle once and scores batches
   through :class:`models.Scorer` (``errors="mask"``), the same class the
   in-memory API and the Serve endpoint use.
3. Sequence models (LSTM) need each entity's rows together and in time
   order: rows are hashed by entity into *buckets*, grouped per bucket with
   Ray Data's ``groupby`` and scored bucket by bucket, so the scores equal
   ``Detector.score`` on the same data whatever the block size.
4. Each actor writes its own output: ``part-UUUUUU-SSSSSSSSSS-EEEEEEEEEE-of-TTTTTTTTTT.parquet``
   holds the scored rows among rows S..E of unit U (which has T rows), and
   ``_quarantine/`` the rows of that range that could not be scored, with the
   reason, the source file and the row number in it. Names are deterministic
   and each file appears whole or not at all (a temporary name renamed on
   local disks; a single object PUT on S3), the output part last.
5. Rerunning a job that crashed resumes: the job spec in
   ``_unusual/job.json`` must match (same bundle version, same files, same
   columns); units whose parts cover all their rows are kept, the parts of
   incomplete units are deleted and those units scored again. So the output
   ends complete and without duplicates.
6. At the end every part is counted from its footer: rows in = rows scored +
   rows quarantined is checked, and ``_unusual/summary.json`` is written.

Memory is bounded by the block and batch sizes and Ray Data's streaming
backpressure, not by the data size: the driver holds the plan and the counts,
never rows.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import sys
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..models.errors import SchemaError, UnusualError
from ..runtime import progress

log = logging.getLogger("unusual")

JOB_DIR = "_unusual"
QUARANTINE_DIR = "_quarantine"
SPEC_FILE = "job.json"
SUMMARY_FILE = "summary.json"
SPEC_VERSION = 1
OUTPUT_COLUMNS = ("anomaly_score", "is_anomaly", "top_features", "model_version")
# Internal columns carried from the read to the writer.
UNIT, ROW, BUCKET = "__unusual_unit__", "__unusual_row__", "__unusual_bucket__"
PART_RE = re.compile(r"part-(\d{6})-(\d{10})-(\d{10})-of-(\d{10})\.parquet$")


def part_name(unit: int, start: int, stop: int, total: int) -> str:
    return f"part-{unit:06d}-{start:010d}-{stop:010d}-of-{total:010d}.parquet"


@dataclass
class ScoreJob:
    checkpoint: str
    data: str
    output: str
    keep_columns: list[str] = field(default_factory=list)
    batch_size: int | None = None  # rows per Scorer call; default 131072 (LSTM: whole buckets)
    concurrency: int | None = None  # scoring actors; default from the cluster's CPUs / GPUs
    use_gpu: bool = False
    unit_rows: int | None = None  # rows per unit of work and output part; default: see unit_size()
    block_rows: int = 65_536  # rows per block read
    bucket_rows: int = 500_000  # LSTM: target rows per entity bucket
    top_k: int = 3
    overwrite: bool = False
    address: str | None = None
    read: str = "auto"  # auto | actors | tasks: who reads the Parquet (see read_mode)
    fail_after_parts: int | None = None  # testing: a scoring actor raises after writing this many parts

    def __post_init__(self):
        for name in ("batch_size", "concurrency", "unit_rows", "block_rows", "bucket_rows"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1; got {v}")
        if self.read not in ("auto", "actors", "tasks"):
            raise ValueError(f"read must be auto, actors or tasks; got {self.read!r}")
        clash = sorted(set(self.keep_columns) & {*OUTPUT_COLUMNS, "error"})
        if clash:
            raise ValueError(f"--keep-columns {clash} would clash with the output columns {list(OUTPUT_COLUMNS)}")


# --------------------------------------------------------------------------- planning


def _footers(files: list[str], pafs) -> list[pq.FileMetaData]:
    from .data import DataError

    def read(f):
        try:
            return pq.read_metadata(f, filesystem=pafs)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read the Parquet footer of {f}: {e}") from None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, files))


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


@dataclass
class BundleInfo:
    """What the driver needs of a bundle, read without PyTorch (hash checked)."""

    kind: str
    version: str
    threshold: float
    schema: object  # unusual.models.features.FeatureSchema
    entity_column: str | None
    time_column: str | None

    @classmethod
    def read(cls, uri: str) -> BundleInfo:
        from ..models.bundle import read_bundle
        from ..models.features import FeatureSchema

        m, _ = read_bundle(uri)
        cfg = m.get("model_config", {})
        return cls(
            m["kind"],
            m["model_version"],
            float(m["threshold"]["value"]),
            FeatureSchema.from_dict(m["features"]),
            cfg.get("entity_column"),
            cfg.get("time_column"),
        )


def plan(job: ScoreJob, bundle: BundleInfo) -> dict:
    """The job spec: files, units of work and columns. Small; lives on the driver."""
    from ..models.tables import TOP_FEATURE_TYPE
    from .data import list_parquet_files

    files, pafs = list_parquet_files(job.data)
    metas = _footers(files, pafs)
    entity, time_col = bundle.entity_column, bundle.time_column
    features = [c.name for c in bundle.schema.columns]
    keep = list(job.keep_columns)
    if bundle.kind == "lstm":  # entity and time identify a sequence row: kept by default
        keep = [c for c in (entity, time_col) if c and c not in keep] + keep
    needed = list(dict.fromkeys([*features, *(c for c in (entity, time_col) if c), *keep]))
    units, bad_files, first_bad = [], [], None
    unit_rows = job.unit_rows or unit_size(sum(m.num_rows for m in metas))
    for i, (f, meta) in enumerate(zip(files, metas)):
        schema = meta.schema.to_arrow_schema()
        for c in keep:
            if c not in schema.names:
                raise SchemaError(f"--keep-columns {c!r} is not a column of {f}; it has {schema.names}", c)
        reason = _check_file(schema, bundle.schema, needed)
        if reason:
            bad_files.append({"file": i, "reason": reason})
            first_bad = first_bad or (f, reason)
        base, rg, rows = 0, 0, 0
        start_rg, start_row = 0, 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if rows and rows + n > unit_rows:
                units.append({"file": i, "rg": [start_rg, rg], "base": start_row, "rows": rows})
                start_rg, start_row, rows = rg, base, 0
            rows += n
            base += n
        if rows:
            units.append({"file": i, "rg": [start_rg, meta.num_row_groups], "base": start_row, "rows": rows})
    if first_bad and len(bad_files) == len(files):
        raise SchemaError(f"no file can be scored by this model: {first_bad[0]}: {first_bad[1]}")
    bad = {b["file"]: b["reason"] for b in bad_files}
    for u in units:
        if u["file"] in bad:
            u["quarantine"] = bad[u["file"]]
    rows_in = sum(m.num_rows for m in metas)
    good = next(m.schema.to_arrow_schema() for i, m in enumerate(metas) if i not in bad)
    out_fields = [good.field(c) for c in keep] + [
        pa.field("anomaly_score", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("top_features", TOP_FEATURE_TYPE),
        pa.field("model_version", pa.string()),
    ]
    sequence = bundle.kind == "lstm"
    buckets = (max(1, math.ceil(rows_in / job.bucket_rows)) if entity else 1) if sequence else 0
    bad_units = [i for i, u in enumerate(units) if "quarantine" in u]
    # Output units: the read units (tabular) or the entity buckets (sequences);
    # the units of unscorable files are copied to the quarantine as their own
    # output units.
    quarantine = {(buckets + j if sequence else u): u for j, u in enumerate(bad_units)}
    return {
        "format": SPEC_VERSION,
        "checkpoint": job.checkpoint,
        "model_version": bundle.version,
        "kind": bundle.kind,
        "threshold": bundle.threshold,
        "data": job.data,
        "files": files,
        "file_rows": [m.num_rows for m in metas],
        "columns": needed,
        "keep_columns": keep,
        "entity_column": entity,
        "time_column": time_col,
        "rows_in": rows_in,
        "units": units,
        "buckets": buckets,
        "out_units": buckets + len(bad_units) if sequence else len(units),
        "quarantine_units": {str(k): v for k, v in quarantine.items()},
        "output_schema": base64.b64encode(pa.schema(out_fields).serialize().to_pybytes()).decode(),
        "top_k": job.top_k,
    }


def output_schema(spec: dict) -> pa.Schema:
    """The schema of every output part (keep columns typed as in the input)."""
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(spec["output_schema"])))


def unit_size(rows: int) -> int:
    """Default rows per unit: about 64 units, so the work spreads evenly over
    the scorers, between 100,000 and 1,000,000 rows (whole row groups).
    Depends on the data only, so a rerun plans the same units."""
    return min(1_000_000, max(100_000, rows // 64))


def _same_job(a: dict, b: dict) -> bool:
    keys = ("format", "model_version", "files", "file_rows", "columns", "units", "buckets", "out_units", "top_k")
    return all(a.get(k) == b.get(k) for k in keys)


# --------------------------------------------------------------------------- output storage


class Output:
    """The output prefix: deterministic part names, atomic writes, listing."""

    def __init__(self, uri: str):
        from .local_io import filesystem

        self.uri = uri.rstrip("/")
        self.pafs, path, self.fs = filesystem(self.uri)
        self.path = path.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def open_atomic(self, *parts: str) -> AtomicFile:
        """A file that appears whole at ``parts`` on commit, or not at all."""
        return AtomicFile(self, self.join(*parts))

    def write_table(self, table: pa.Table, *parts: str) -> None:
        f = self.open_atomic(*parts)
        try:
            pq.write_table(table, f.file)
        except BaseException:
            f.abort()
            raise
        f.commit()

    def write_json(self, obj: dict, *parts: str) -> None:
        target = self.join(*parts)
        data = json.dumps(obj, indent=1, default=float).encode()
        if self.local:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def read_json(self, *parts: str) -> dict | None:
        target = self.join(*parts)
        if not self.fs.exists(target):
            return None
        return json.loads(self.fs.cat_file(target))

    def listing(self) -> list[str]:
        """Every file under the prefix (relative paths), empty when absent."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path):
            return []
        return sorted(p[len(self.path) + 1 :] for p in self.fs.find(self.path))

    def remove(self, rel: list[str]) -> None:
        if rel:
            self.fs.rm([self.join(r) for r in rel])


class AtomicFile:
    """Written whole or not at all: on local disks a temporary name renamed on
    commit; on object storage one upload that only becomes visible when it
    completes (an aborted or interrupted multipart upload leaves nothing)."""

    def __init__(self, out: Output, target: str):
        self.out, self.target = out, target
        if out.local:
            folder = target.rsplit("/", 1)[0]
            out.fs.makedirs(folder, exist_ok=True)
            self.tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
            self.file = open(self.tmp, "wb")
        else:
            self.file = out.fs.open(target, "wb")

    def commit(self) -> None:
        self.file.close()
        if self.out.local:
            os.replace(self.tmp, self.target)

    def abort(self) -> None:
        if self.out.local:
            self.file.close()
            os.remove(self.tmp)
        elif hasattr(self.file, "discard"):
            self.file.discard()  # s3fs: abort the multipart upload


def _parts(listing: list[str], prefix: str = "") -> dict[int, list[tuple[int, int, int, str]]]:
    """unit -> [(start, stop, total, relative path)] of the part files in a folder."""
    out: dict[int, list] = {}
    for rel in listing:
        if prefix:
            if not rel.startswith(prefix + "/"):
                continue
            name = rel[len(prefix) + 1 :]
        else:
            name = rel
        if "/" in name:
            continue
        m = PART_RE.fullmatch(name)
        if m:
            u, s, e, t = map(int, m.groups())
            out.setdefault(u, []).append((s, e, t, rel))
    return out


def complete_units(parts: dict[int, list]) -> set[int]:
    """Units whose parts tile [0, total) exactly."""
    done = set()
    for u, ps in parts.items():
        ps = sorted(ps)
        total = ps[0][2]
        pos = 0
        for s, e, t, _ in ps:
            if s != pos or t != total or e < s:
                break
            pos = e
        else:
            if pos == total:
                done.add(u)
    return done


# --------------------------------------------------------------------------- Ray tasks


def _read_units(
    batch: dict, data: str, columns: list[str], block_rows: int, buckets: int, entity: str | None, todo: list | None
):
    """Read task: yield the rows of each unit, tagged with (unit, row in unit)
    and, for sequences, the entity bucket (only rows of the ``todo`` buckets)."""
    from .local_io import filesystem

    pafs, _, _ = filesystem(data)
    for unit, path, rg0, rg1 in zip(batch["unit"], batch["path"], batch["rg0"], batch["rg1"]):
        for t in unit_blocks(pafs, path, int(unit), int(rg0), int(rg1), columns, block_rows):
            if buckets:
                b = entity_buckets(t, entity, buckets)
                t = t.append_column(BUCKET, pa.array(b))
                if todo is not None:
                    t = t.filter(pa.array(np.isin(b, todo)))
            yield t


def unit_blocks(pafs, path: str, unit: int, rg0: int, rg1: int, columns: list[str], block_rows: int, prefetch=False):
    """A unit's rows as tables of at most ``block_rows``, tagged with (unit, row in unit);
    with ``prefetch``, the next block is read in a thread (Arrow decodes without the GIL)."""
    pf = pq.ParquetFile(path, filesystem=pafs)
    blocks = pf.iter_batches(batch_size=block_rows, row_groups=range(rg0, rg1), columns=columns)
    row = 0
    for rb in _prefetch(blocks) if prefetch else blocks:
        n = rb.num_rows
        t = pa.Table.from_batches([rb])
        t = t.append_column(UNIT, pa.array(np.full(n, unit, np.int32)))
        t = t.append_column(ROW, pa.array(np.arange(row, row + n, dtype=np.int64)))
        row += n
        yield t


def entity_buckets(table: pa.Table, entity: str | None, buckets: int) -> np.ndarray:
    """A stable bucket per row from its entity value (crc32 of its text)."""
    n = table.num_rows
    if entity is None or buckets == 1:
        return np.zeros(n, np.int32)
    col = table.column(entity)
    uniq = pc.unique(col)
    codes = np.array([zlib.crc32(str(v).encode()) % buckets for v in uniq.to_pylist()], np.int32)
    return codes[pc.index_in(col, value_set=uniq).to_numpy(zero_copy_only=False)]


class _PartWriter:
    """Opens the parts of output units; knows the output schema and the plan."""

    def __init__(self, spec: dict, output: str):
        self.spec = spec
        self.units = spec["units"]
        self.files = spec["files"]
        self.keep = spec["keep_columns"]
        self.schema = output_schema(spec)
        self.out = Output(output)

    def part(self, unit: int, start: int, stop: int, total: int) -> Part:
        return Part(self, part_name(unit, start, stop, total), stop - start)

    def write(self, batch: pa.Table, scored: pa.Table, unit: int, start: int, stop: int, total: int) -> dict:
        part = self.part(unit, start, stop, total)
        try:
            part.add(batch, scored)
        except BaseException:
            part.abort()
            raise
        return part.commit() | {"unit": unit}

    def write_empty(self, unit: int, meta: dict) -> None:
        empty = self.schema.empty_table().replace_schema_metadata({b"unusual": json.dumps(meta).encode()})
        self.out.write_table(empty, part_name(unit, 0, meta["rows"], meta["rows"]))


class Part:
    """One output part, streamed batch by batch, and its quarantine part.

    Committed in that order (quarantine, then output), so a part that exists
    always has its quarantine rows in place; its counts go into the footer.
    """

    def __init__(self, writer: _PartWriter, name: str, rows: int):
        self.w, self.name = writer, name
        self.meta = {"rows": rows, "scored": 0, "quarantined": 0, "anomalies": 0}
        self.file = writer.out.open_atomic(name)
        self.pq = pq.ParquetWriter(self.file.file, writer.schema)
        self.qfile = self.qpq = None

    def add(self, batch: pa.Table, scored: pa.Table) -> None:
        """Rows of ``batch`` (with the internal unit / row columns) and their scores."""
        err = scored.column("error")
        nbad = len(err) - err.null_count
        cols = [batch.column(c) for c in self.w.keep] + [scored.column(c) for c in OUTPUT_COLUMNS]
        out = pa.Table.from_arrays(cols, schema=self.w.schema)
        if nbad:
            bad = np.asarray(err.is_valid().to_numpy(zero_copy_only=False), bool)
            idx = pa.array(np.flatnonzero(bad))
            q = batch.select(self.w.spec["columns"]).take(idx)
            src = [self.w.units[int(u)] for u in batch.column(UNIT).take(idx).to_numpy()]
            rows = batch.column(ROW).take(idx).to_numpy()
            q = q.append_column("source_file", pa.array([self.w.files[u["file"]] for u in src], pa.string()))
            q = q.append_column("source_row", pa.array(np.array([u["base"] for u in src], np.int64) + rows))
            q = q.append_column("error", err.take(idx))
            if self.qpq is None:
                self.qfile = self.w.out.open_atomic(QUARANTINE_DIR, self.name)
                self.qpq = pq.ParquetWriter(self.qfile.file, q.schema)
            self.qpq.write_table(q)
            out = out.filter(pa.array(~bad))
        self.pq.write_table(out)
        self.meta["scored"] += out.num_rows
        self.meta["quarantined"] += nbad
        self.meta["anomalies"] += int(pc.sum(out.column("is_anomaly")).as_py() or 0)

    def commit(self) -> dict:
        if self.meta["scored"] + self.meta["quarantined"] != self.meta["rows"]:
            self.abort()
            raise RuntimeError(f"part {self.name} got {self.meta} rows; expected {self.meta['rows']}")
        if self.qpq is not None:
            self.qpq.close()
            self.qfile.commit()
        self.pq.add_key_value_metadata({"unusual": json.dumps(self.meta)})
        self.pq.close()
        self.file.commit()
        return dict(self.meta)

    def abort(self) -> None:
        for f in (self.file, self.qfile):
            if f is not None:
                try:
                    f.abort()
                except OSError:
                    pass


class ScoreActor:
    """One per actor: loads the bundle once, scores batches, writes their parts.

    Returns one small row of counts per part written, the only thing that
    travels back to the driver.
    """

    def __init__(
        self, spec: dict, output: str, device: str, threads: int, fail_after_parts: int | None, block_rows: int = 65536
    ):
        import torch

        from ..models import Scorer
        from .local_io import filesystem

        torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.writer = _PartWriter(spec, output)
        self.scorer = Scorer(
            spec["checkpoint"],
            device=device,
            top_k=spec["top_k"],
            passthrough=(*spec["columns"], UNIT, ROW, BUCKET),
            errors="mask",
            stream=False,
        )
        if self.scorer.version != spec["model_version"]:
            raise UnusualError(
                f"the bundle at {spec['checkpoint']} changed since the job started: "
                f"{self.scorer.version} != {spec['model_version']}"
            )
        self.fail_after = fail_after_parts
        self.written = 0
        self.block_rows = block_rows
        self.data_fs = filesystem(spec["data"])[0]

    def __call__(self, batch: pa.Table) -> dict:
        """Units to read and score (tabular on CPUs), a batch of rows read by Ray
        Data tasks (tabular on GPUs), or a whole entity bucket (sequences)."""
        if self.scorer.sequence:
            return self._bucket(batch)
        if "path" in batch.column_names:
            return _stats_batch([self._unit(*row.values()) for row in batch.to_pylist()])
        scored = self.scorer.score_table(batch)
        units = batch.column(UNIT).to_numpy()
        rows = batch.column(ROW).to_numpy()
        # A batch may span units; write one part per contiguous range of a unit.
        cut = np.flatnonzero((np.diff(units) != 0) | (np.diff(rows) != 1)) + 1
        stats = []
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(units)]):
            u, n = int(units[a]), int(b - a)
            total = self.spec["units"][u]["rows"]
            start, stop = int(rows[a]), int(rows[b - 1]) + 1
            stats.append(self._write(batch.slice(a, n), scored.slice(a, n), u, start, stop, total))
        return _stats_batch(stats)

    def _unit(self, unit: int, path: str, rg0: int, rg1: int) -> dict:
        """Stream one unit's row groups from storage into one part: reading the
        next block (a thread; Arrow decodes without the GIL) overlaps scoring."""
        total = self.spec["units"][unit]["rows"]
        columns = self.spec["columns"]
        part = self.writer.part(unit, 0, total, total)
        try:
            for t in unit_blocks(self.data_fs, path, unit, rg0, rg1, columns, self.block_rows, prefetch=True):
                part.add(t, self.scorer.score_table(t))
            meta = part.commit()
        except BaseException:
            part.abort()
            raise
        self._count()
        return meta | {"unit": unit}

    def _count(self) -> None:
        self.written += 1
        if self.fail_after is not None and self.written >= self.fail_after:
            raise RuntimeError(f"fault injection: scoring actor fails after {self.written} part(s)")

    def _bucket(self, group: pa.Table) -> dict:
        """Rows in entity, time, then input order, so ties keep the file order."""
        ent, tm = self.spec["entity_column"], self.spec["time_column"]
        keys = [(c, "ascending") for c in (ent, tm, UNIT, ROW) if c]
        group = group.take(pc.sort_indices(group, sort_keys=keys))
        self.scorer.reset()
        scored = self.scorer.score_table(group)
        bucket, n = int(group.column(BUCKET)[0].as_py()), group.num_rows
        return _stats_batch([self._write(group, scored, bucket, 0, n, n)])

    def _write(self, batch, scored, unit, start, stop, total) -> dict:
        meta = self.writer.write(batch, scored, unit, start, stop, total)
        self._count()
        return meta


def _prefetch(iterable, depth: int = 2):
    """Iterate in a background thread, ``depth`` items ahead."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterable:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


_SCORERS: dict = {}


def _score_bucket(group: pa.Table, actor_kwargs: dict) -> dict:
    """map_groups task: one whole bucket, scored by this process's cached scorer."""
    key = json.dumps([actor_kwargs["spec"]["model_version"], actor_kwargs["output"]])
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = ScoreActor(**actor_kwargs)
    return _SCORERS[key](group)


def _stats_batch(stats: list[dict]) -> dict:
    keys = ("unit", "rows", "scored", "quarantined", "anomalies")
    return {k: np.array([s[k] for s in stats], np.int64) for k in keys}


def _quarantine_units(batch: dict, spec: dict, output: str) -> dict:
    """Whole units of files that cannot be scored, copied to the quarantine
    with the reason; their output part is empty."""
    from .local_io import filesystem

    pafs, _, _ = filesystem(spec["data"])
    writer = _PartWriter(spec, output)
    stats = []
    for out_id in batch["unit"]:
        unit = spec["units"][spec["quarantine_units"][str(int(out_id))]]
        path = spec["files"][unit["file"]]
        t = pq.ParquetFile(path, filesystem=pafs).read_row_groups(range(*unit["rg"]))
        n = t.num_rows
        t = t.append_column("source_file", pa.array([path] * n, pa.string()))
        t = t.append_column("source_row", pa.array(np.arange(unit["base"], unit["base"] + n, dtype=np.int64)))
        t = t.append_column("error", pa.array([unit["quarantine"]] * n, pa.string()))
        writer.out.write_table(t, QUARANTINE_DIR, part_name(int(out_id), 0, n, n))
        meta = {"rows": n, "scored": 0, "quarantined": n, "anomalies": 0}
        writer.write_empty(int(out_id), meta)
        stats.append(meta | {"unit": int(out_id)})
    return _stats_batch(stats)


# --------------------------------------------------------------------------- resources


def read_mode(job: ScoreJob, kind: str) -> str:
    """``actors``: each CPU actor streams its units from storage itself (no
    data through the object store); ``tasks``: Ray Data read tasks feed the
    actors (GPU actors, so CPUs decode while GPUs score) or the LSTM's
    group-by."""
    if kind == "lstm":
        return "tasks"
    if job.read != "auto":
        return job.read
    return "tasks" if job.use_gpu else "actors"


GPU_ACTORS_PER_GPU = 4  # scoring actors sharing one GPU by default (measured: benchmarks/gpu_paths.py)


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


# --------------------------------------------------------------------------- the job


def run(job: ScoreJob) -> dict:
    """Score ``job.data`` into ``job.output``; returns the summary."""
    from ..runtime import ensure_ray
    from .data import storage_errors

    t0 = time.perf_counter()
    bundle = BundleInfo.read(job.checkpoint)
    out = Output(job.output)
    with storage_errors(job.output, "checking"):
        existing = out.listing()
        if existing and job.overwrite:
            out.fs.rm(out.path, recursive=True)
            existing = []
        spec_old = out.read_json(JOB_DIR, SPEC_FILE) if existing else None
    if existing and spec_old is None:
        raise UnusualError(
            f"{job.output} already holds files that unusual score did not write; "
            "choose an empty --output or pass --overwrite"
        )
    with storage_errors(job.data):
        spec = plan(job, bundle)
    if spec_old is not None and not _same_job(spec_old, spec):
        raise UnusualError(
            f"{job.output} holds the output of a different scoring job "
            f"(model {spec_old.get('model_version')} on {spec_old.get('data')}); "
            "pass --overwrite to replace it, or choose another --output"
        )
    with storage_errors(job.output, "writing"):
        if spec_old is None:
            out.write_json(spec, JOB_DIR, SPEC_FILE)
        done = _clean(out)
    pending = [u for u in range(spec["out_units"]) if u not in done]
    progress(
        f"scoring {spec['rows_in']:,} rows in {len(spec['files'])} file(s) with model "
        f"{spec['model_version']} -> {job.output}"
        + (f" (resuming: {len(done)} of {spec['out_units']} units already complete)" if done else "")
    )
    if pending:
        ensure_ray(job.address)
        _execute(job, spec, pending)
    summary = summarize(out, spec, time.perf_counter() - t0, resumed=len(done))
    with storage_errors(job.output, "writing"):
        out.write_json(summary, JOB_DIR, SUMMARY_FILE)
    return summary


def _clean(out: Output) -> set[int]:
    """Delete what an interrupted run left half done; return the complete units."""
    listing = out.listing()
    parts, qparts = _parts(listing), _parts(listing, QUARANTINE_DIR)
    done = complete_units(parts)
    stale = [p for ps in (parts, qparts) for u, rs in ps.items() if u not in done for *_, p in rs]
    stale += [r for r in listing if r.rsplit("/", 1)[-1].startswith(".tmp-")]
    if stale:
        log.info("removing %d part(s) of incomplete units", len(stale))
    out.remove(stale)
    return done


def _execute(job: ScoreJob, spec: dict, pending: list[int]) -> None:
    import ray

    mode = read_mode(job, spec["kind"])
    res = plan_actors(job, mode)
    units = spec["units"]
    sequence = spec["kind"] == "lstm"
    bad = [u for u in pending if str(u) in spec["quarantine_units"]]
    gpu = f" + {res['num_gpus']:g} GPU" if res["num_gpus"] else ""
    if sequence:
        todo = [u for u in pending if u < spec["buckets"]]
        read = [i for i, u in enumerate(units) if "quarantine" not in u] if todo else []
    else:
        todo, read = None, [u for u in pending if str(u) not in spec["quarantine_units"]]
    progress(
        f"{len(pending)} unit(s) to do with {res['concurrency']} scoring "
        f"{'task' if sequence else 'actor'}(s) x {res['num_cpus']} CPU{gpu}"
        f"{', reading in Ray Data tasks' if mode == 'tasks' else ', each reading its units'}"
        + (f"; {len(bad)} unit(s) of unscorable files go to the quarantine" if bad else "")
    )
    if bad:
        ray.data.from_items([{"unit": u} for u in bad]).map_batches(
            _quarantine_units, batch_size=1, num_cpus=0.25, fn_kwargs={"spec": spec, "output": job.output}
        ).materialize()
    if not read:
        return
    items = [
        {"unit": u, "path": spec["files"][units[u]["file"]], "rg0": units[u]["rg"][0], "rg1": units[u]["rg"][1]}
        for u in read
    ]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if mode == "tasks":
        ds = ds.map_batches(
            _read_units,
            batch_size=1,
            num_cpus=0.25,
            fn_kwargs={
                "data": spec["data"],
                "columns": spec["columns"],
                "block_rows": job.block_rows,
                "buckets": spec["buckets"],
                "entity": spec["entity_column"],
                "todo": todo if todo is not None and len(todo) < spec["buckets"] else None,
            },
        )
    actor_kwargs = {
        "spec": spec,
        "output": job.output,
        "device": "cuda" if job.use_gpu else "cpu",
        "threads": res["threads"],
        "fail_after_parts": job.fail_after_parts,
        "block_rows": job.block_rows,
    }
    resources = {"num_cpus": res["num_cpus"], "num_gpus": res["num_gpus"] or None, "batch_format": "pyarrow"}
    if sequence:
        # Tasks, not an actor pool: actors holding the CPUs would starve the
        # groupby's shuffle on a small cluster. Each worker process still
        # loads the bundle once (cached per process).
        ds = ds.groupby(BUCKET).map_groups(_score_bucket, fn_kwargs={"actor_kwargs": actor_kwargs}, **resources)
    else:
        ds = ds.map_batches(
            ScoreActor,
            batch_size=(job.batch_size or 131_072) if mode == "tasks" else 1,
            compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
            fn_constructor_kwargs=actor_kwargs,
            **resources,
        )
    seen = set()
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        seen.update(int(u) for u in b["unit"])
    if sequence:  # buckets no entity hashed to: an empty part marks them done
        writer = _PartWriter(spec, job.output)
        for u in todo:
            if u not in seen:
                writer.write_empty(u, {"rows": 0, "scored": 0, "quarantined": 0, "anomalies": 0})


def summarize(out: Output, spec: dict, seconds: float, resumed: int = 0) -> dict:
    """Count every part from its footer and check rows in = scored + quarantined."""
    from .data import DataError

    listing = out.listing()
    parts = _parts(listing)
    done = complete_units(parts)
    missing = [u for u in range(spec["out_units"]) if u not in done]
    if missing:
        raise DataError(f"scoring ended with {len(missing)} incomplete unit(s) (first: {missing[0]}); run it again")
    files = [p for ps in parts.values() for *_, p in ps]

    def meta(rel):
        md = pq.read_metadata(out.join(rel), filesystem=out.pafs).metadata or {}
        return json.loads(md.get(b"unusual", b"{}"))

    with ThreadPoolExecutor(max_workers=16) as pool:
        metas = list(pool.map(meta, files))
    tot = {k: sum(int(m.get(k, 0)) for m in metas) for k in ("rows", "scored", "quarantined", "anomalies")}
    if tot["rows"] != spec["rows_in"] or tot["scored"] + tot["quarantined"] != spec["rows_in"]:
        raise DataError(
            f"row count check failed: {spec['rows_in']:,} rows in, {tot['scored']:,} scored + "
            f"{tot['quarantined']:,} quarantined"
        )
    qfiles = [p for ps in _parts(listing, QUARANTINE_DIR).values() for *_, p in ps]
    return {
        "output": out.uri,
        "model_version": spec["model_version"],
        "threshold": spec["threshold"],
        "rows_in": spec["rows_in"],
        "rows_scored": tot["scored"],
        "rows_quarantined": tot["quarantined"],
        "anomalies": tot["anomalies"],
        "anomaly_rate": tot["anomalies"] / tot["scored"] if tot["scored"] else None,
        "files_in": len(spec["files"]),
        "parts": len(files),
        "quarantine_parts": len(qfiles),
        "quarantine": f"{out.uri}/{QUARANTINE_DIR}" if qfiles else None,
        "units": spec["out_units"],
        "units_resumed": resumed,
        "seconds": round(seconds, 3),
        "rows_per_s": round(spec["rows_in"] / max(seconds, 1e-9), 1),
    }


# --------------------------------------------------------------------------- CLI


def add_score_args(p: argparse.ArgumentParser) -> None:
    from ..cli import _csv

    p.add_argument("--checkpoint", required=True, help="bundle URI written by unusual train / fit")
    p.add_argument("--data", required=True, help="Parquet file, folder or prefix of shards (local, s3://, gs://)")
    p.add_argument("--output", required=True, help="output prefix for the scored Parquet parts")
    p.add_argument(
        "--keep-columns", type=_csv, default=[], help="comma-separated input columns copied to the output (ids, labels)"
    )
    p.add_argument("--batch-size", type=int, help="rows per scoring call (default 131072; LSTM scores whole buckets)")
    p.add_argument(
        "--concurrency", type=int, help="scoring actors (default: one per CPU; with --use-gpu, four sharing each GPU)"
    )
    p.add_argument("--use-gpu", action="store_true", help="score on GPU actors (a share of a GPU each)")
    p.add_argument(
        "--unit-rows", type=int, help="rows per unit of work and output part (default: rows/64, within 1e5..1e6)"
    )
    p.add_argument("--top-k", type=int, default=3, help="contributing features reported per row (default 3)")
    p.add_argument("--overwrite", action="store_true", help="delete whatever is at --output first")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")


def cmd_score(args) -> int:
    job = ScoreJob(
        checkpoint=args.checkpoint,
        data=args.data,
        output=args.output,
        keep_columns=args.keep_columns,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        use_gpu=args.use_gpu,
        unit_rows=args.unit_rows,
        top_k=args.top_k,
        overwrite=args.overwrite,
        address=args.address,
    )
    print(json.dumps(run(job), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["score", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
