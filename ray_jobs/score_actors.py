"""The work of a batch-scoring job inside Ray: reading units, scoring them, writing their parts.

- :func:`read_units`: the Ray Data read task (rows of units, tagged with their
  unit, row and, for sequence families, entity bucket);
- :func:`unit_blocks`: a unit's rows in blocks, optionally read ahead in a thread;
- :class:`PartWriter` and :class:`Part`: one output part and its quarantine
  part, streamed and committed (quarantine first, then the part, its counts in
  the footer);
- :class:`ScoreActor`: loads the bundle once and scores units it reads itself,
  batches read by tasks, or whole entity buckets (:func:`score_bucket`);
- :func:`quarantine_units`: the units of files that cannot be scored, copied
  to the quarantine with the reason.

Each returns one small row of counts per part written, the only thing that
travels back to the driver. PyTorch is imported in :class:`ScoreActor` only.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import ScoreJob
from ..models.errors import UnusualError
from ..models.tables import OUTPUT_COLUMNS, parquet_options
from .local_io import filesystem
from .score_plan import BUCKET, ROW, UNIT, ScorePlan, entity_buckets
from .storage import COUNTS, QUARANTINE_DIR, Output, part_name


def read_units(
    batch: dict, data: str, columns: list[str], block_rows: int, buckets: int, entity: str | None, todo: list | None
):
    """Read task: yield the rows of each unit, tagged with (unit, row in unit)
    and, for sequences, the entity bucket (only rows of the ``todo`` buckets)."""

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
    for rb in prefetch_iter(blocks) if prefetch else blocks:
        n = rb.num_rows
        t = pa.Table.from_batches([rb])
        t = t.append_column(UNIT, pa.array(np.full(n, unit, np.int32)))
        t = t.append_column(ROW, pa.array(np.arange(row, row + n, dtype=np.int64)))
        row += n
        yield t


def prefetch_iter(iterable, depth: int = 2):
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


def stats_batch(stats: list[dict]) -> dict:
    """Counts of parts written, as the batch a Ray Data map returns."""
    return {k: np.array([s[k] for s in stats], np.int64) for k in ("unit", *COUNTS)}


# --------------------------------------------------------------------------- writing parts


class PartWriter:
    """Opens the parts of output units; knows the output schema and the plan."""

    def __init__(self, spec: ScorePlan, output: str):
        self.spec = spec
        self.units = spec.units
        self.files = spec.files
        self.keep = spec.keep_columns
        self.schema = spec.schema()
        self.options = parquet_options(self.schema)
        self.out = Output(output)

    def part(self, unit: int, start: int, stop: int, total: int) -> Part:
        return Part(self, self.spec.folder(unit), part_name(unit, start, stop, total), stop - start)

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
        self.out.write_table(empty, *self.spec.folder(unit), part_name(unit, 0, meta["rows"], meta["rows"]))


class Part:
    """One output part, streamed batch by batch, and its quarantine part.

    Committed in that order (quarantine, then output), so a part that exists
    always has its quarantine rows in place; its counts go into the footer.
    """

    def __init__(self, writer: PartWriter, folder: tuple[str, ...], name: str, rows: int):
        self.w, self.folder, self.name = writer, folder, name
        self.meta = {"rows": rows, "scored": 0, "quarantined": 0, "anomalies": 0}
        self.file = writer.out.open_atomic(*folder, name)
        self.pq = pq.ParquetWriter(self.file.file, writer.schema, **writer.options)
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
            q = batch.select(self.w.spec.columns).take(idx)
            src = [self.w.units[int(u)] for u in batch.column(UNIT).take(idx).to_numpy()]
            rows = batch.column(ROW).take(idx).to_numpy()
            q = q.append_column("source_file", pa.array([self.w.files[u.file] for u in src], pa.string()))
            q = q.append_column("source_row", pa.array(np.array([u.base for u in src], np.int64) + rows))
            q = q.append_column("error", err.take(idx))
            if self.qpq is None:
                self.qfile = self.w.out.open_atomic(*self.folder, QUARANTINE_DIR, self.name)
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


# --------------------------------------------------------------------------- scoring


class ScoreActor:
    """One per actor: loads the bundle once, scores batches, writes their parts.

    Returns one small row of counts per part written, the only thing that
    travels back to the driver.
    """

    def __init__(self, job: ScoreJob, spec: ScorePlan, threads: int):
        """``job`` is the job's config as the user gave it, ``spec`` its plan (``_unusual/job.json``)."""
        import torch

        from ..models import Scorer

        torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.writer = PartWriter(spec, job.output)
        self.scorer = Scorer(
            spec.checkpoint,
            device="cuda" if job.use_gpu else "cpu",
            top_k=spec.top_k,
            passthrough=(*spec.columns, UNIT, ROW, BUCKET),
            errors="mask",
            stream=False,
        )
        if self.scorer.version != spec.model_version:
            raise UnusualError(
                f"the bundle at {spec.checkpoint} changed since the job started: "
                f"{self.scorer.version} != {spec.model_version}"
            )
        self.fail_after = job.fail_after_parts
        self.written = 0
        self.block_rows = job.block_rows
        self.data_fs = filesystem(spec.files_uri)[0]

    def __call__(self, batch: pa.Table) -> dict:
        """A batch of rows read by Ray Data tasks (tabular on GPUs), or a whole entity bucket (sequences)."""
        if self.scorer.sequence:
            return self._bucket(batch)
        scored = self.scorer.score_table(batch)
        units = batch.column(UNIT).to_numpy()
        rows = batch.column(ROW).to_numpy()
        # A batch may span units; write one part per contiguous range of a unit.
        cut = np.flatnonzero((np.diff(units) != 0) | (np.diff(rows) != 1)) + 1
        stats = []
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(units)]):
            u, n = int(units[a]), int(b - a)
            total = self.spec.units[u].rows
            start, stop = int(rows[a]), int(rows[b - 1]) + 1
            stats.append(self._write(batch.slice(a, n), scored.slice(a, n), u, start, stop, total))
        return stats_batch(stats)

    def unit(self, unit: int, path: str, rg0: int, rg1: int) -> dict:
        """Stream one unit's row groups from storage into one part (the "actors" read mode):
        reading the next block (a thread; Arrow decodes without the GIL) overlaps scoring."""
        total = self.spec.units[unit].rows
        columns = self.spec.columns
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
        ent, tm = self.spec.entity_column, self.spec.time_column
        keys = [(c, "ascending") for c in (ent, tm, UNIT, ROW) if c]
        group = group.take(pc.sort_indices(group, sort_keys=keys))
        self.scorer.reset()
        scored = self.scorer.score_table(group)
        bucket, n = int(group.column(BUCKET)[0].as_py()), group.num_rows
        return stats_batch([self._write(group, scored, bucket, 0, n, n)])

    def _write(self, batch, scored, unit, start, stop, total) -> dict:
        meta = self.writer.write(batch, scored, unit, start, stop, total)
        self._count()
        return meta


_SCORERS: dict = {}


def score_bucket(group: pa.Table, job: ScoreJob, spec: ScorePlan, threads: int) -> dict:
    """map_groups task: one whole bucket, scored by this process's cached scorer."""
    key = json.dumps([spec.model_version, job.output])
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = ScoreActor(job, spec, threads)
    return _SCORERS[key](group)


def quarantine_units(batch: dict, spec: ScorePlan, output: str) -> dict:
    """Whole units of files that cannot be scored, copied to the quarantine
    with the reason; their output part is empty."""

    pafs, _, _ = filesystem(spec.files_uri)
    writer = PartWriter(spec, output)
    stats = []
    for out_id in batch["unit"]:
        unit = spec.units[spec.quarantine_units[int(out_id)]]
        path = spec.files[unit.file]
        t = pq.ParquetFile(path, filesystem=pafs).read_row_groups(range(*unit.rg))
        n = t.num_rows
        t = t.append_column("source_file", pa.array([path] * n, pa.string()))
        t = t.append_column("source_row", pa.array(np.arange(unit.base, unit.base + n, dtype=np.int64)))
        t = t.append_column("error", pa.array([unit.quarantine] * n, pa.string()))
        writer.out.write_table(t, *spec.folder(int(out_id)), QUARANTINE_DIR, part_name(int(out_id), 0, n, n))
        meta = {"rows": n, "scored": 0, "quarantined": n, "anomalies": 0}
        writer.write_empty(int(out_id), meta)
        stats.append(meta | {"unit": int(out_id)})
    return stats_batch(stats)
