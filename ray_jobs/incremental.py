"""Incremental scoring of a partitioned dataset: ``unusual score --incremental``.

A team lands a partition every hour or day (``s3://b/events/dt=2026-12-07/hour=13/…``) and runs the same
command on a schedule; each run scores what this model version has not scored yet::

    <output>/model_version=<v>/<partition>/part-….parquet      the scored rows, under the input's partition path
    <output>/model_version=<v>/<partition>/_quarantine/…       the rows that could not be scored, with the reason
    <output>/_unusual/ledger/<v>/<key>-<digest>.json           the record of each committed partition
    <output>/_unusual/runs/<v>/run.json, job.json              the run in flight: its partitions and plan
    <output>/_unusual/metrics.prom                             the last run's anomaly-rate watch (Prometheus)

- **What is new.** One recursive listing of ``--data`` (sizes and ETags, or modification times on local
  disks) groups the Parquet files by partition folder; a partition's *digest* is the hash of its files'
  names, sizes and ETags. One listing of the ledger gives each committed partition's digest (it is in
  the record's name), so planning reads no record and no footer of what is already scored: a partition
  is pending when it has no record, or a record of another digest (a file was added, removed or
  rewritten: it is scored again and the change is reported).
- **Exactly once.** A run first clears the output folders of its partitions (a changed one loses its
  record first), writes ``run.json``, then scores all their files in one job (the plan, units and
  actors of ``unusual score``). A partition is committed, its record written in one PUT, only when all
  its parts are complete and its rows in = scored + quarantined. A run that crashes is resumed by the
  next one (the same plan: complete units are kept); if its partitions changed meanwhile, it is
  dropped and they are scored afresh. So every input row ends scored once per model version.
- **The watch.** Each partition's record holds rows, anomalies, the anomaly rate and score quantiles, and
  the anomaly-rate watch (:mod:`unusual.ray_jobs.rate_watch`): an alarm is one line on stderr, a field of
  the record and the summary, and a sample of ``unusual_partition_rate_alarm`` in ``metrics.prom``.

A new model version scores into its own ``model_version=`` folder with its own ledger. Sequence families
need each entity's rows across partitions together; incremental scoring is for row families.
"""

from __future__ import annotations

import collections
import hashlib
import json
import operator
import re
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from ..config import PARTITION_FILTER, ScoreJob
from ..models.errors import UnusualError
from ..runtime import progress
from .lakehouse import is_table_uri, table_snapshot
from .local_io import DataError, filesystem, storage_errors
from .score_plan import BundleInfo, ScorePlan, plan
from .storage import COUNTS, JOB_DIR, QUARANTINE_DIR, SPEC_FILE, Output, complete_units, footer_json, part_files

LEDGER, RUNS, RUN_FILE, METRICS_FILE, TABLE_FILE = "ledger", "runs", "run.json", "metrics.prom", "table.json"
QUANTILES = (0.5, 0.9, 0.99, 0.999)
_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "==": operator.eq, "=": operator.eq,
        ">": operator.gt, "<": operator.lt}  # fmt: skip


# --------------------------------------------------------------------------- what the input holds


class InputFile(BaseModel):
    """A Parquet file of the input as listed: its path (relative to ``--data``), size and version tag."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    etag: str | None = None  # object stores
    mtime: str | None = None  # local disks (and stores without ETags)

    def changed_from(self, old: InputFile) -> str:
        """How this file differs from ``old`` (the same path), in words."""
        if self.size != old.size:
            return f"size {old.size:,} -> {self.size:,} bytes"
        return f"rewritten ({'ETag' if self.etag else 'modified'} {old.etag or old.mtime} -> {self.etag or self.mtime})"


class Partition(BaseModel):
    """A partition folder of the input (relative to ``--data``; "" for files at its top) and its files."""

    name: str
    files: list[InputFile]

    @property
    def digest(self) -> str:
        text = "\n".join(f"{f.path}|{f.size}|{f.etag or f.mtime}" for f in sorted(self.files, key=lambda f: f.path))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def key(self) -> str:
        return partition_key(self.name)

    def values(self) -> dict[str, str]:
        """Its Hive keys: ``dt=2026-12-07/hour=13`` -> {"dt": "2026-12-07", "hour": "13"}."""
        return dict(p.split("=", 1) for p in self.name.split("/") if "=" in p)


def partition_key(name: str) -> str:
    """The ledger's key of a partition (its records are ``<key>-<digest>.json``)."""
    return hashlib.sha256(name.encode()).hexdigest()[:20]


def parse_filters(filters: list[str]) -> list[tuple[str, str, str]]:
    """``--partition-filter`` items (checked by ScoreJob) as (key, operator, value)."""
    return [PARTITION_FILTER.match(f).groups() for f in filters]


def _holds(values: dict[str, str], key: str, op: str, value: str) -> bool:
    if key not in values:
        return False
    a, b = values[key], value
    try:
        a, b = float(a), float(b)  # numbers compare as numbers, dates and the rest as text
    except ValueError:
        pass
    return _OPS[op](a, b)


def list_partitions(data: str, filters: list[tuple[str, str, str]]) -> dict[str, Partition]:
    """The input's Parquet files grouped by partition folder, in one recursive listing."""
    _, path, fs = filesystem(data)
    root = path.rstrip("/")
    with storage_errors(data):
        fs.invalidate_cache()
        found = fs.find(root, detail=True)
    groups: dict[str, list[InputFile]] = {}
    for p, info in sorted(found.items()):
        rel = p[len(root) + 1 :]
        if not rel.endswith(".parquet") or any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        etag = info.get("ETag") or info.get("etag")
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        f = InputFile(path=rel, size=int(info.get("size") or 0), etag=str(etag).strip('"') if etag else None,
                      mtime=None if etag else str(mtime))
        groups.setdefault(rel.rpartition("/")[0], []).append(f)
    parts = {name: Partition(name=name, files=files) for name, files in groups.items()}
    if not parts:
        raise DataError(f"no Parquet files at {data}")
    return {n: p for n, p in parts.items() if all(_holds(p.values(), *f) for f in filters)}


# --------------------------------------------------------------------------- the record


class FileRecord(BaseModel):
    """One input file of a committed partition: what it was when scored, and its rows."""

    path: str
    size: int
    etag: str | None = None
    mtime: str | None = None
    rows_in: int
    rows_scored: int
    rows_quarantined: int


class PartitionRecord(BaseModel):
    """A committed partition (``_unusual/ledger/<version>/<key>-<digest>.json``)."""

    partition: str
    key: str
    digest: str
    model_version: str
    run_id: str
    committed_at: str
    output: str  # the folder of its parts
    files: list[FileRecord]
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    anomalies: int
    anomaly_rate: float | None
    score_quantiles: dict[str, float]
    quarantine_reasons: dict[str, int] = {}  # the most frequent reasons, with their row counts
    watch: dict | None = None  # unusual.ray_jobs.rate_watch.RateCheck, as JSON


class RunRecord(BaseModel):
    """The run in flight (``_unusual/runs/<version>/run.json``): its partitions (name -> digest) and files."""

    run_id: str
    model_version: str
    started_at: str
    partitions: dict[str, str]
    files: list[str]  # storage paths, in plan order
    out_dirs: list[str]  # per file: its partition, the folder of its parts
    storage: str | None = None  # a table's files: a URI of their store (ScorePlan.storage)


class Ledger:
    """The output's records: listed once per run (names only), read only where a partition changed."""

    def __init__(self, out: Output, version: str):
        self.out, self.version = out, version
        self.folder = (JOB_DIR, LEDGER, version)
        names = [r.rsplit("/", 1)[-1] for r in Output(out.uri + "/" + "/".join(self.folder)).listing()]
        self.entries: dict[str, list[str]] = {}  # key -> digests committed (one, unless a crash left two)
        for n in names:
            m = re.fullmatch(r"([0-9a-f]{20})-([0-9a-f]{20})\.json", n)
            if m:
                self.entries.setdefault(m.group(1), []).append(m.group(2))

    def committed(self, p: Partition) -> bool:
        return self.has(p.key, p.digest)

    def has(self, key: str, digest: str) -> bool:
        return digest in self.entries.get(key, [])

    def record(self, key: str, digest: str) -> PartitionRecord | None:
        doc = self.out.read_json(*self.folder, f"{key}-{digest}.json")
        return PartitionRecord.model_validate(doc) if doc else None

    def commit(self, rec: PartitionRecord) -> None:
        self.out.write_json(rec.model_dump(mode="json"), *self.folder, f"{rec.key}-{rec.digest}.json")
        self.drop(rec.key, keep=rec.digest)
        self.entries[rec.key] = [rec.digest]

    def drop(self, key: str, keep: str | None = None) -> None:
        """Uncommit ``key`` (all its records but ``keep``'s)."""
        old = [d for d in self.entries.get(key, []) if d != keep]
        self.out.remove(["/".join([*self.folder, f"{key}-{d}.json"]) for d in old])
        self.entries[key] = [keep] if keep else []


# --------------------------------------------------------------------------- the run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if name else root


def _clear(folder: Output) -> None:
    """Remove the parts (and quarantine parts) directly in a partition's output folder; nested partitions'
    folders are theirs."""
    listing = folder.listing()
    parts = [rel for ps in (part_files(listing), part_files(listing, QUARANTINE_DIR)) for rs in ps.values()
             for *_, rel in rs]
    folder.remove(parts + [r for r in listing if "/" not in r and r.startswith(".tmp-")])


class IncrementalRun:
    """One invocation: list, plan what is pending, resume or start a run, score it, commit its partitions."""

    def __init__(self, job: ScoreJob, bundle: BundleInfo):
        self.job, self.bundle, self.version = job, bundle, bundle.version
        self.out = Output(job.output)
        self.root = f"{self.out.uri}/model_version={self.version}"
        self.run_dir = (JOB_DIR, RUNS, self.version)
        self.table = is_table_uri(job.data)
        self.storage: str | None = None
        with storage_errors(job.output, "checking"):
            self.ledger = Ledger(self.out, self.version)
            self.run = self.read_run()
        with storage_errors(job.data):
            if self.table:
                self.data_path, self.inputs = "", self.table_inputs()
            else:
                self.data_path = filesystem(job.data)[1].rstrip("/")
                self.inputs = list_partitions(job.data, parse_filters(job.partition_filter))

    def full(self, f: InputFile) -> str:
        """A listed file's storage path."""
        return f"{self.data_path}/{f.path}" if self.data_path else f.path

    # ----------------------------------------------------------------- a table's watermark
    def read_run(self) -> RunRecord | None:
        doc = self.out.read_json(*self.run_dir, RUN_FILE)
        return RunRecord.model_validate(doc) if doc else None

    def table_inputs(self) -> dict[str, Partition]:
        """A table's rows appended after the last version this model version scored, as one partition named
        by the version they reach, ``table_version=<v>`` (a Delta version, an Iceberg snapshot id)."""
        pointer = self.out.read_json(*self.ledger.folder, TABLE_FILE) or {}
        since = pointer.get("version")
        if self.run is not None:  # a crash after the commit of its table partition, before the pointer moved
            done = [n for n, d in self.run.partitions.items() if self.ledger.has(partition_key(n), d)]
            since = int(done[0].partition("=")[2]) if done else since
        snap = table_snapshot(self.job.data, since=since)
        if not snap.files:
            return {}
        self.storage, name = snap.files[0].path, f"table_version={snap.version}"
        return {name: Partition(name=name, files=[InputFile(path=filesystem(f.path)[1], size=f.size)
                                                  for f in snap.files])}

    # ----------------------------------------------------------------- planning
    def in_flight(self) -> RunRecord | None:
        """The run a crash left, resumed when all its partitions are as it planned them (its plan, and so the
        names of the parts already written, is then the same). Else it is dropped: the output of its
        partitions not committed is cleared (they are pending again), what it committed stays."""
        rec = self.run
        if rec is None:
            return None
        moved = [n for n, d in rec.partitions.items() if n not in self.inputs or self.inputs[n].digest != d]
        if not moved:
            progress(f"resuming run {rec.run_id} of {rec.started_at}: {len(rec.partitions)} partition(s)")
            return rec
        progress(f"dropping run {rec.run_id}: {len(moved)} of its partitions changed since (first: {moved[0]!r})")
        for n, d in rec.partitions.items():
            if not self.ledger.has(partition_key(n), d):
                _clear(Output(_join(self.root, n)))
            elif self.table:  # committed before the crash: the next rows start after it
                self.move_watermark(n)
        self.out.remove(["/".join([*self.run_dir, RUN_FILE])])
        return None

    def move_watermark(self, name: str) -> None:
        """A table's rows up to version ``table_version=<v>`` are scored: the next run lists those after it."""
        self.out.write_json({"version": int(name.partition("=")[2]), "table": self.job.data},
                            *self.ledger.folder, TABLE_FILE)

    def pending(self, done: set[str]) -> list[Partition]:
        todo = [p for n, p in sorted(self.inputs.items()) if n not in done
                and (self.job.rescore or not self.ledger.committed(p))]
        changed = [p for p in todo if self.ledger.entries.get(p.key) and not self.ledger.committed(p)]
        for p in changed[:10]:
            progress(f"partition {p.name or '(top)'} changed since it was scored: {self.changes(p)}; scoring it again")
        if len(changed) > 10:
            progress(f"… and {len(changed) - 10} more changed partition(s)")
        self.changed = len(changed)
        return todo

    def changes(self, p: Partition) -> str:
        """What differs in ``p`` from its committed record, in words (``--rescore``: nothing may)."""
        old = next((r for d in self.ledger.entries.get(p.key, []) if (r := self.ledger.record(p.key, d))), None)
        if old is None:
            return "its record is unreadable"
        before = {f.path: InputFile(path=f.path, size=f.size, etag=f.etag, mtime=f.mtime) for f in old.files}
        now = {f.path: f for f in p.files}
        what = [f"{k} is new" for k in now.keys() - before.keys()]
        what += [f"{k} was removed" for k in before.keys() - now.keys()]
        what += [f"{k}: {now[k].changed_from(before[k])}" for k in now.keys() & before.keys() if now[k] != before[k]]
        return ", ".join(sorted(what)[:5]) or "no file changed (--rescore)"

    def start(self, todo: list[Partition]) -> RunRecord:
        """Uncommit and clear the partitions' outputs, then record the run (so a crash resumes it)."""
        for p in todo:
            self.ledger.drop(p.key)
            _clear(Output(_join(self.root, p.name)))
        files = [(self.full(f), p.name) for p in todo for f in p.files]
        rec = RunRecord(run_id=uuid.uuid4().hex[:12], model_version=self.version, started_at=_now(),
                        partitions={p.name: p.digest for p in todo}, files=[f for f, _ in files],
                        out_dirs=[d for _, d in files], storage=self.storage)
        self.out.write_json(rec.model_dump(mode="json"), *self.run_dir, RUN_FILE)
        return rec

    # ----------------------------------------------------------------- scoring and committing
    def score(self, rec: RunRecord, resumed: bool) -> list[PartitionRecord]:
        """Score the run's files in one job (complete units of a resumed run kept; a new run's folders were
        cleared by :meth:`start`), then commit each partition not committed yet."""
        from ..runtime import ensure_ray
        from .score import clean, execute

        sub = self.job.model_copy(update={"output": self.root, "incremental": False})
        with storage_errors(self.job.data):
            spec = plan(sub, self.bundle, files=rec.files, out_dirs=rec.out_dirs, storage=rec.storage)
        with storage_errors(self.job.output, "writing"):
            # the plan of the last run beside the scores, where unusual evaluate looks for the model
            Output(self.root).write_json(spec.model_dump(mode="json"), JOB_DIR, SPEC_FILE)
            done = set().union(*(clean(Output(_join(self.root, n))) for n in rec.partitions)) if resumed else set()
        pending = [u for u in range(spec.out_units) if u not in done]
        progress(
            f"scoring {sum(spec.file_rows):,} rows of {len(rec.partitions)} partition(s), {len(spec.files)} file(s), "
            f"with model {self.version} -> {self.root}"
            + (f" (resuming: {len(done)} of {spec.out_units} units already complete)" if done else "")
        )
        if pending:
            ensure_ray(self.job.address)
            execute(sub, spec, pending)
        records = []
        with storage_errors(self.job.output, "writing"):
            for name in rec.partitions:
                p = self.inputs.get(name)
                if p is not None and (not self.ledger.committed(p) or self.job.rescore):
                    records.append(self.commit(p, spec, rec.run_id))
                if self.table:
                    self.move_watermark(name)
            self.out.remove(["/".join([*self.run_dir, RUN_FILE])])
        return records

    def commit(self, p: Partition, spec: ScorePlan, run_id: str) -> PartitionRecord:
        """Count the partition's parts from their footers, check rows in = scored + quarantined, watch its
        anomaly rate and write its record (the commit)."""
        from .rate_watch import check_rate
        from .score import quarantine_reasons

        folder = Output(_join(self.root, p.name))
        mine = [u for u in range(spec.out_units) if spec.out_dirs[spec.units[u].file] == p.name]
        listing = folder.listing()
        parts = part_files(listing)
        qrels = [rel for u, rs in part_files(listing, QUARANTINE_DIR).items() if u in mine for *_, rel in rs]
        complete = complete_units(parts)
        missing = [u for u in mine if u not in complete]
        if missing:
            raise DataError(f"partition {p.name!r} ended with {len(missing)} incomplete unit(s); run it again")
        rels = {u: [rel for *_, rel in parts.get(u, [])] for u in mine}
        metas = dict(zip([r for u in mine for r in rels[u]], map(footer_json, folder.footers(
            [r for u in mine for r in rels[u]]))))
        per_file: dict[int, dict] = {}
        for u in mine:
            acc = per_file.setdefault(spec.units[u].file, dict.fromkeys(COUNTS, 0))
            for r in rels[u]:
                for k in COUNTS:
                    acc[k] += int(metas[r].get(k, 0))
        files = self.file_records(p, spec, per_file)
        tot = {k: sum(c[k] for c in per_file.values()) for k in COUNTS}
        rows_in = sum(f.rows_in for f in files)
        if tot["scored"] + tot["quarantined"] != rows_in:
            raise DataError(f"partition {p.name!r}: {rows_in:,} rows in, {tot['scored']:,} scored + "
                            f"{tot['quarantined']:,} quarantined")
        watch = None  # a threshold record without its contamination (written by hand) cannot be watched
        if self.bundle.contamination:
            watch = check_rate(p.name, self.version, tot["scored"], tot["anomalies"], self.bundle.contamination,
                               self.bundle.n_calibration, self.job.watch_alpha)
        rec = PartitionRecord(
            partition=p.name, key=p.key, digest=p.digest, model_version=self.version, run_id=run_id,
            committed_at=_now(), output=folder.uri, files=files, rows_in=rows_in, rows_scored=tot["scored"],
            rows_quarantined=tot["quarantined"], anomalies=tot["anomalies"],
            anomaly_rate=tot["anomalies"] / tot["scored"] if tot["scored"] else None,
            score_quantiles=self.quantiles(folder, [r for r in metas if metas[r].get("scored")]),
            quarantine_reasons=quarantine_reasons(folder, qrels),
            watch=watch and watch.model_dump(mode="json"),
        )
        self.ledger.commit(rec)
        if watch and watch.alarm:
            progress(watch.line())
        return rec

    def file_records(self, p: Partition, spec: ScorePlan, per_file: dict[int, dict]) -> list[FileRecord]:
        by_path = {self.full(f): f for f in p.files}
        out = []
        for i, path in enumerate(spec.files):
            if path in by_path and spec.out_dirs[i] == p.name:
                f, c = by_path[path], per_file.get(i, dict.fromkeys(COUNTS, 0))
                out.append(FileRecord(path=f.path, size=f.size, etag=f.etag, mtime=f.mtime, rows_in=spec.file_rows[i],
                                      rows_scored=c["scored"], rows_quarantined=c["quarantined"]))
        return out

    @staticmethod
    def quantiles(folder: Output, rels: list[str]) -> dict[str, float]:
        """Score quantiles of the partition's scored rows (its parts' ``anomaly_score`` column)."""
        from .eval_stats import SCORE  # imports ray.data (~0.7 s): not for a run that finds nothing new

        cols = [pq.read_table(folder.join(r), columns=[SCORE], filesystem=folder.pafs).column(0) for r in rels]
        scores = np.concatenate([c.to_numpy() for c in cols]) if cols else np.empty(0)
        scores = scores[np.isfinite(scores)]
        if not scores.size:
            return {}
        return {f"q{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(scores, QUANTILES))}


def run(job: ScoreJob) -> dict:
    """``unusual score --incremental``: score the partitions this model version has not scored; the summary."""
    from .rate_watch import prometheus_text
    from .score import resolved

    t0 = time.perf_counter()
    job = resolved(job)
    bundle = BundleInfo.read(job.checkpoint)
    if bundle.sequence:
        raise UnusualError(
            f"--incremental scores row models; a {bundle.kind!r} model scores each entity's rows as one sequence, "
            "which partitions cut: score a whole range with unusual score instead"
        )
    if is_table_uri(job.data) and (job.rescore or job.partition_filter):
        flag = "--rescore" if job.rescore else "--partition-filter"
        raise UnusualError(
            f"--incremental on a table scores the rows appended since the last run; {flag} applies to partition "
            "folders: to score a whole table again, give another --output"
        )
    inc = IncrementalRun(job, bundle)
    with storage_errors(job.output, "checking"):
        resumed = inc.in_flight()
    records: list[PartitionRecord] = []
    if resumed is not None:
        records += inc.score(resumed, resumed=True)
    todo = inc.pending({r.partition for r in records})
    skipped = len(inc.inputs) - len(todo) - len(records)
    progress(f"{len(inc.inputs)} partition(s) at {job.data}: {len(todo)} to score ({inc.changed} changed), "
             f"{skipped} already scored by {bundle.version}")
    if todo:
        with storage_errors(job.output, "writing"):
            rec = inc.start(todo)
        records += inc.score(rec, resumed=False)
    if records:
        with storage_errors(job.output, "writing"):
            checks = [_check(r) for r in records if r.watch]
            inc.out.write_bytes(prometheus_text(checks).encode(), JOB_DIR, METRICS_FILE)
    return summary(job, bundle, inc, records, skipped, resumed is not None, time.perf_counter() - t0)


def _check(rec: PartitionRecord):
    from .rate_watch import RateCheck

    return RateCheck.model_validate(rec.watch)


def summary(job: ScoreJob, bundle: BundleInfo, inc: IncrementalRun, records: list[PartitionRecord], skipped: int,
            resumed: bool, seconds: float) -> dict:
    tot = {k: sum(getattr(r, k) for r in records) for k in ("rows_in", "rows_scored", "rows_quarantined", "anomalies")}
    alarms = [_check(r) for r in records if r.watch and r.watch.get("alarm")]
    return {
        "output": job.output,
        "scores": inc.root,
        "model_version": bundle.version,
        "partitions_listed": len(inc.inputs),
        "partitions_scored": len(records),
        "partitions_changed": inc.changed,
        "partitions_already_scored": skipped,
        "resumed_run": resumed,
        **tot,
        "anomaly_rate": tot["anomalies"] / tot["rows_scored"] if tot["rows_scored"] else None,
        "rate_alarms": [a.line() for a in alarms],
        "partitions": [
            {"partition": r.partition, "rows_in": r.rows_in, "rows_scored": r.rows_scored,
             "rows_quarantined": r.rows_quarantined, "anomaly_rate": r.anomaly_rate,
             "alarm": (r.watch or {}).get("alarm")}
            for r in records
        ],
        "quarantine": ", ".join(f"{r.output}/{QUARANTINE_DIR}" for r in records if r.rows_quarantined) or None,
        "quarantine_reasons": dict(sum((collections.Counter(r.quarantine_reasons) for r in records),
                                       collections.Counter()).most_common(5)),
        "ledger": f"{inc.out.uri}/{JOB_DIR}/{LEDGER}/{bundle.version}",
        "seconds": round(seconds, 3),
        "rows_per_s": round(tot["rows_in"] / max(seconds, 1e-9), 1),
    }


def partition_rates(scores: str, most: int = 2000) -> list[dict] | None:
    """The anomaly rate of each committed partition of an incremental output's ``model_version=<v>`` folder,
    from its ledger (None for scores that are not such a folder): what the report charts."""
    base, _, folder = scores.rstrip("/").rpartition("/")
    if not folder.startswith("model_version=") or not base:
        return None
    version = folder.partition("=")[2]
    ledger = Output(f"{base}/{JOB_DIR}/{LEDGER}/{version}")
    names = [r for r in ledger.listing() if r.endswith(".json") and "-" in r][-most:]
    docs = [PartitionRecord.model_validate(json.loads(ledger.fs.cat_file(ledger.join(r)))) for r in names]
    return sorted(
        ({"partition": d.partition, "rows_scored": d.rows_scored, "anomaly_rate": d.anomaly_rate,
          "expected_rate": (d.watch or {}).get("expected_rate"), "alarm": (d.watch or {}).get("alarm")}
         for d in docs),
        key=lambda r: r["partition"],
    )
