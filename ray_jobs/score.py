"""Cluster-wide batch scoring: Parquet on object storage -> Ray (Data) -> Scorer actors -> Parquet.

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
2. Scoring actors (:class:`~unusual.ray_jobs.score_actors.ScoreActor`) each load the
   bundle once and score through :class:`unusual.models.Scorer` (``errors="mask"``),
   the same class the in-memory API and the Serve endpoint use. On CPUs (the
   default) they are plain Ray actors that stream the units the driver hands them
   straight from storage (only the columns the model and ``--keep-columns``
   need), no rows through the object store; on GPUs (or ``--read tasks``) Ray
   Data reads the units in streaming read tasks and feeds an actor pool.
3. Sequence families (the registry says which) need each entity's rows together and in time
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

Memory is bounded by the block and batch sizes (and Ray Data's streaming
backpressure where it reads), not by the data size: the driver holds the plan and the counts,
never rows.

The modules: ``storage`` (the output's layout, atomic writes, footers),
``score_plan`` (the spec, units, buckets, actor sizing), ``score_actors``
(what runs in Ray: reading, scoring, writing parts) and this one, the driver
(resume or clean, execute, summarize; ``command`` and ``main``).
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time

from ..config import ScoreJob, main_for
from ..models.errors import UnusualError
from ..runtime import progress
from .local_io import DataError, storage_errors
from .score_actors import PartWriter, ScoreActor, quarantine_units, read_units, score_bucket
from .score_plan import BUCKET, DEFAULT_BATCH_ROWS, BundleInfo, ScorePlan, plan, plan_actors, read_mode
from .storage import (
    COUNTS,
    JOB_DIR,
    QUARANTINE_DIR,
    SPEC_FILE,
    SUMMARY_FILE,
    Output,
    complete_units,
    footer_json,
    is_temporary,
    part_files,
)

__all__ = ["QUARANTINE_DIR", "ScoreJob", "command", "main", "plan", "plan_actors", "run", "summarize"]

log = logging.getLogger("unusual")


def run(job: ScoreJob) -> dict:
    """Score ``job.data`` into ``job.output``; returns the summary."""
    from ..runtime import ensure_ray

    t0 = time.perf_counter()
    job = resolved(job)
    bundle = BundleInfo.read(job.checkpoint)
    out = Output(job.output)
    with storage_errors(job.output, "checking"):
        existing = out.listing()
        if existing and job.overwrite:
            out.remove_all()
            existing = []
        spec_old = previous_plan(out) if existing else None
    if existing and spec_old is None:
        raise UnusualError(
            f"{job.output} already holds files that unusual score did not write; "
            "choose an empty --output or pass --overwrite"
        )
    with storage_errors(job.data):
        spec = plan(job, bundle)
    if spec_old is not None and not (isinstance(spec_old, ScorePlan) and spec_old.same_job(spec)):
        what = (f"model {spec_old.model_version} on {spec_old.data}" if isinstance(spec_old, ScorePlan)
                else f"a plan this version cannot read: {spec_old}")
        raise UnusualError(
            f"{job.output} holds the output of a different scoring job ({what}); "
            "pass --overwrite to replace it, or choose another --output"
        )
    with storage_errors(job.output, "writing"):
        if spec_old is None:
            out.write_json(spec.model_dump(mode="json"), JOB_DIR, SPEC_FILE)
        done = clean(out)
    pending = [u for u in range(spec.out_units) if u not in done]
    progress(
        f"scoring {spec.rows_in:,} rows in {len(spec.files)} file(s) with model "
        f"{spec.model_version} -> {job.output}"
        + (f" (resuming: {len(done)} of {spec.out_units} units already complete)" if done else "")
    )
    phases = {"plan": time.perf_counter() - t0}
    lost = 0
    if pending:
        t = time.perf_counter()
        ensure_ray(job.address)
        phases["ray"] = time.perf_counter() - t
        t = time.perf_counter()
        lost = execute(job, spec, pending)
        phases["scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = summarize(out, spec, time.perf_counter() - t0, resumed=len(done))
    phases["summary"] = time.perf_counter() - t
    # Where the seconds went: planning, connecting to (or starting) Ray, scoring (scorers starting
    # included), counting the parts.
    summary["phase_seconds"] = {k: round(v, 3) for k, v in phases.items()}
    summary["actors_lost"] = lost  # scoring actors that died (with their node) and were replaced
    with storage_errors(job.output, "writing"):
        out.write_json(summary, JOB_DIR, SUMMARY_FILE)
    return summary


def resolved(job: ScoreJob) -> ScoreJob:
    """``job`` with an MLflow model URI as its bundle's location: resolved here, where the job runs."""
    from ..config import ConfigError
    from ..tracking import resolve_checkpoint

    try:
        return job.model_copy(update={"checkpoint": resolve_checkpoint(job.checkpoint)})
    except UnusualError as e:
        raise ConfigError(f"--checkpoint: {e}") from None


def previous_plan(out: Output) -> ScorePlan | str | None:
    """The plan of the job whose output ``out`` holds (None: none there; a string: why it cannot be read)."""
    doc = out.read_json(JOB_DIR, SPEC_FILE)
    if doc is None:
        return None
    try:
        return ScorePlan.model_validate(doc)
    except ValueError as e:
        return f"{JOB_DIR}/{SPEC_FILE}: {str(e).splitlines()[0]}"


def clean(out: Output) -> set[int]:
    """Delete what an interrupted run left half done; return the complete units."""
    listing = out.listing()
    parts, qparts = part_files(listing), part_files(listing, QUARANTINE_DIR)
    done = complete_units(parts)
    stale = [p for ps in (parts, qparts) for u, rs in ps.items() if u not in done for *_, p in rs]
    stale += [r for r in listing if is_temporary(r)]
    if stale:
        log.info("removing %d part(s) of incomplete units", len(stale))
    out.remove(stale)
    return done


def execute(job: ScoreJob, spec: ScorePlan, pending: list[int]) -> int:
    """Score the ``pending`` output units on the cluster: plain actors that read their
    units (tabular on CPUs), or Ray Data read tasks feeding an actor pool (GPUs) or a
    group-by of entity buckets (sequences). Returns the scoring actors lost (plain actors;
    Ray Data replaces its own)."""
    import ray

    mode = read_mode(job, spec.kind)
    res = plan_actors(job, mode)
    units = spec.units
    sequence = spec.sequence
    bad = [u for u in pending if u in spec.quarantine_units]
    gpu = f" + {res['num_gpus']:g} GPU" if res["num_gpus"] else ""
    if sequence:
        todo = [u for u in pending if u < spec.buckets]
        read = [i for i, u in enumerate(units) if u.quarantine is None] if todo else []
    else:
        todo, read = None, [u for u in pending if u not in spec.quarantine_units]
    progress(
        f"{len(pending)} unit(s) to do with {res['concurrency']} scoring "
        f"{'task' if sequence else 'actor'}(s) x {res['num_cpus']} CPU{gpu}"
        f"{', reading in Ray Data tasks' if mode == 'tasks' else ', each reading its units'}"
        + (f"; {len(bad)} unit(s) of unscorable files go to the quarantine" if bad else "")
    )
    if bad:
        ray.data.from_items([{"unit": u} for u in bad]).map_batches(
            quarantine_units, batch_size=1, num_cpus=0.25, fn_kwargs={"spec": spec, "output": job.output}
        ).materialize()
    if not read:
        return 0
    items = [{"unit": u, "path": spec.files[units[u].file], "rg0": units[u].rg[0], "rg1": units[u].rg[1]} for u in read]
    actor_kwargs = {"job": job, "spec": spec, "threads": res["threads"]}
    if mode == "actors":
        return score_units(items, actor_kwargs, res)
    score_read_tasks(job, spec, items, todo, actor_kwargs, res)
    return 0


def score_read_tasks(job: ScoreJob, spec: ScorePlan, items: list[dict], todo: list | None, actor_kwargs: dict,
                     res: dict) -> None:
    """Ray Data read tasks feed an actor pool (tabular, on GPUs) or a group-by of entity buckets
    (sequences; the buckets no entity hashed to get an empty part, so they are done too)."""
    import ray

    sequence = spec.sequence
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_units,
        batch_size=1,
        num_cpus=0.25,
        fn_kwargs={
            "data": spec.files_uri,
            "columns": spec.columns,
            "block_rows": job.block_rows,
            "buckets": spec.buckets,
            "entity": spec.entity_column,
            "todo": todo if todo is not None and len(todo) < spec.buckets else None,
        },
    )
    resources = {"num_cpus": res["num_cpus"], "num_gpus": res["num_gpus"] or None, "batch_format": "pyarrow"}
    if sequence:
        # Tasks, not an actor pool: actors holding the CPUs would starve the
        # groupby's shuffle on a small cluster. Each worker process still
        # loads the bundle once (cached per process).
        ds = ds.groupby(BUCKET).map_groups(score_bucket, fn_kwargs=actor_kwargs, **resources)
    else:
        ds = ds.map_batches(
            ScoreActor,
            batch_size=job.batch_size or DEFAULT_BATCH_ROWS,
            compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
            fn_constructor_kwargs=actor_kwargs,
            **resources,
        )
    seen = set()
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        seen.update(int(u) for u in b["unit"])
    if sequence:  # buckets no entity hashed to: an empty part marks them done
        writer = PartWriter(spec, job.output)
        for u in todo:
            if u not in seen:
                writer.write_empty(u, dict.fromkeys(COUNTS, 0))


def score_units(items: list[dict], actor_kwargs: dict, res: dict, queued: int = 2) -> int:
    """Each actor streams whole units from storage into their parts (``read_mode`` "actors");
    returns how many actors were lost on the way.

    Plain Ray actors, not Ray Data's actor pool: they start on the workers Ray keeps idle
    after it starts, seconds before a pool's actors would (in new processes) on a small
    cluster. The driver hands out units as they finish, ``queued`` per actor so that none
    waits for its next one; an error in a unit ends the job (a rerun resumes).

    An actor that dies (its process, or its node with it) is not restarted in place by Ray:
    its units go back to the queue for the actors still alive (parts are written whole or not
    at all under deterministic names, so a unit scored again rewrites the same part), and a
    replacement is asked for that gets units once it has started. A replacement that cannot be
    placed (the node is gone and none came in its place) holds no units, so the survivors finish
    the job; Ray's own restart would queue the lost units on an actor that never starts, or fail
    them as "temporarily unavailable". Up to 2 losses per actor, as ``max_restarts=2`` allowed.
    """
    import ray

    cls = ray.remote(ScoreActor).options(
        num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_restarts=0, max_task_retries=0
    )
    pool = _UnitPool(cls, actor_kwargs, items, min(res["concurrency"], len(items)), queued)
    try:
        pool.run()
    finally:
        for a in pool.actors:
            ray.kill(a)
    return len(pool.lost)


class _UnitPool:
    """The driver's side of :func:`score_units`: the queue of units, the actors, the calls in flight."""

    def __init__(self, cls, actor_kwargs: dict, items: list[dict], n: int, queued: int):
        self.cls, self.actor_kwargs, self.queued = cls, actor_kwargs, queued
        self.todo = collections.deque(items)
        self.actors = [cls.remote(**actor_kwargs) for _ in range(n)]
        self.max_lost = 2 * len(self.actors)
        self.running: dict = {}  # unit call -> (actor, unit)
        self.starting: dict = {}  # replacement's readiness -> replacement
        self.lost: set = set()

    def run(self) -> None:
        import ray

        for _ in range(self.queued):
            for a in self.actors:
                self.give(a)
        while self.running or (self.todo and self.starting):
            [ref], _ = ray.wait([*self.running, *self.starting], num_returns=1)
            if ref in self.starting:
                self.started(ref)
            else:
                self.finished(ref)

    def give(self, actor) -> None:
        if self.todo:
            u = self.todo.popleft()
            self.running[actor.unit.remote(u["unit"], u["path"], u["rg0"], u["rg1"])] = (actor, u)

    def started(self, ref) -> None:
        """A replacement is up (it gets its units), or it died on the way (replaced again)."""
        import ray
        from ray.exceptions import RayActorError

        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as e:
            if e.actor_init_failed:
                raise
            self.replace(actor, e)
            return
        for _ in range(self.queued):
            self.give(actor)

    def finished(self, ref) -> None:
        """A unit's call ended: the actor gets the next unit, or it was lost with the unit (which goes back
        to an idle survivor at once)."""
        import ray
        from ray.exceptions import RayActorError

        actor, u = self.running.pop(ref)
        try:
            ray.get(ref)  # raises the unit's error
        except RayActorError as e:
            if e.actor_init_failed:
                raise
            self.todo.appendleft(u)
            if actor not in self.lost:
                self.replace(actor, e)
            busy = {a for a, _ in self.running.values()} | self.lost | set(self.starting.values())
            for a in [a for a in self.actors if a not in busy]:
                self.give(a)  # an idle survivor takes the unit back at once
            return
        self.give(actor)

    def replace(self, actor, error) -> None:
        import ray

        self.lost.add(actor)
        if len(self.lost) > self.max_lost:
            raise error
        progress(f"a scoring actor was lost ({type(error).__name__}); its units go to the others, a replacement starts")
        ray.kill(actor, no_restart=True)  # an unreachable one may still be running: stop it for good
        new = self.cls.remote(**self.actor_kwargs)
        self.actors.append(new)
        self.starting[new.__ray_ready__.remote()] = new


def summarize(out: Output, spec: ScorePlan, seconds: float, resumed: int = 0) -> dict:
    """Count every part from its footer and check rows in = scored + quarantined."""

    listing = out.listing()
    # What an actor lost mid-part (its node died) left behind; every writer of this job has stopped.
    out.remove([r for r in listing if is_temporary(r)])
    parts = part_files(listing)
    done = complete_units(parts)
    missing = [u for u in range(spec.out_units) if u not in done]
    if missing:
        raise DataError(f"scoring ended with {len(missing)} incomplete unit(s) (first: {missing[0]}); run it again")
    files = [p for ps in parts.values() for *_, p in ps]
    metas = [footer_json(m) for m in out.footers(files)]
    tot = {k: sum(int(m.get(k, 0)) for m in metas) for k in COUNTS}
    if tot["rows"] != spec.rows_in or tot["scored"] + tot["quarantined"] != spec.rows_in:
        raise DataError(
            f"row count check failed: {spec.rows_in:,} rows in, {tot['scored']:,} scored + "
            f"{tot['quarantined']:,} quarantined"
        )
    qfiles = [p for ps in part_files(listing, QUARANTINE_DIR).values() for *_, p in ps]
    reasons = quarantine_reasons(out, qfiles)
    return {
        "output": out.uri,
        "model_version": spec.model_version,
        "threshold": spec.threshold,
        "rows_in": spec.rows_in,
        "rows_scored": tot["scored"],
        "rows_quarantined": tot["quarantined"],
        "anomalies": tot["anomalies"],
        "anomaly_rate": tot["anomalies"] / tot["scored"] if tot["scored"] else None,
        "files_in": len(spec.files),
        "parts": len(files),
        "quarantine_parts": len(qfiles),
        "quarantine": f"{out.uri}/{QUARANTINE_DIR}" if qfiles else None,
        "quarantine_reasons": reasons,
        "units": spec.out_units,
        "units_resumed": resumed,
        "seconds": round(seconds, 3),
        "rows_per_s": round(spec.rows_in / max(seconds, 1e-9), 1),
    }


def quarantine_reasons(out: Output, qfiles: list[str], top: int = 5) -> dict[str, int]:
    """The most frequent reasons in the quarantine parts (their ``error`` column, read alone), with their
    row counts: what a partly quarantined run says on the terminal and in its summary."""
    import polars as pl
    import pyarrow.parquet as pq

    if not qfiles:
        return {}
    errors = pl.concat(
        [pl.from_arrow(pq.read_table(out.join(rel), columns=["error"], filesystem=out.pafs)) for rel in qfiles]
    )
    counts = (
        errors.select(pl.col("error").cast(pl.Utf8).fill_null("None"))
        .group_by("error")
        .len()
        .sort(["len", "error"], descending=[True, False])
        .head(top)
    )
    return dict(zip(counts["error"].to_list(), counts["len"].to_list()))


# --------------------------------------------------------------------------- entrypoints


def command(job: ScoreJob) -> int:
    """``unusual score``: run the job, print its summary (JSON) on stdout; on a partly quarantined run, a
    line on stderr says how many rows were not scored and why. ``--incremental``: :mod:`.incremental`."""
    if job.incremental:
        from .incremental import run as run_incremental

        summary = run_incremental(job)
    else:
        summary = run(job)
    if summary["rows_quarantined"]:
        why = "; ".join(f"{reason} ({n:,} rows)" for reason, n in summary["quarantine_reasons"].items())
        progress(
            f"{summary['rows_quarantined']:,} of {summary['rows_in']:,} rows quarantined, not scored: {why}; "
            f"the rows and their reasons are in {summary['quarantine']}"
        )
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m unusual.ray_jobs.score``: the flags of ``unusual score``."""
    return main_for("score", command, argv)


if __name__ == "__main__":
    sys.exit(main())
