"""Node-loss scenarios on a real two-node Ray cluster on this machine, one per process.

    python tests/ray_jobs/faultkit.py score WORKDIR
    python tests/ray_jobs/faultkit.py train WORKDIR

Each scenario starts its own ``ray.cluster_utils.Cluster`` (a head and a worker node, each with its
own raylet, object store and worker processes), runs a real job against it, SIGKILLs the worker
node's processes (``remove_node(allow_graceful=False)``) once the job has made progress, and
prints one JSON line of what it saw on stdout. The cluster is always shut down. It runs apart
from the test session because that session holds its own local Ray; the caller passes a
``RAY_TMPDIR`` (short: Ray's socket paths must stay under 108 bytes) and a ``TMPDIR`` it removes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

POLL_S = 0.05
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[faultkit] {msg}", file=sys.stderr, flush=True)


def start_cluster(head_cpus: float, worker_cpus: float):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": head_cpus, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=worker_cpus)
    cluster.wait_for_nodes()
    return cluster, worker


def actors_on(node_id: str, class_name: str) -> list[dict]:
    """The live actors of ``class_name`` on ``node_id`` (from the GCS; no dashboard needed)."""
    import ray

    return [
        a
        for a in ray._private.state.actors().values()
        if class_name in a["ActorClassName"] and a["State"] == "ALIVE" and a["Address"]["NodeID"] == node_id
    ]


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc): a raylet's worker processes and theirs."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_node(cluster, node) -> dict:
    """Lose ``node`` as a machine is lost: its raylet, object store and agents SIGKILLed
    (``remove_node(allow_graceful=False)``), and every worker process the raylet started with
    them (a worker whose raylet is gone may otherwise finish what it is running)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    workers = descendants(raylet)
    cluster.remove_node(node, allow_graceful=False)
    survivors = [p for p in workers if alive(p)]
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"node_workers": len(workers), "workers_outliving_raylet": len(survivors)}


def wait_for(what: str, check, timeout: float, running):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not running():
            raise RuntimeError(f"the job ended before {what}")
        got = check()
        if got:
            return got
        time.sleep(POLL_S)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


def run_with_kill(job_fn, cluster, node, ready, what: str, replace: dict | None = None, timeout: float = 120):
    """Run ``job_fn`` (a job's driver) in a thread; once ``ready()`` says it has made progress,
    SIGKILL ``node``'s processes and, with ``replace``, add a fresh node once the old one is gone,
    as an autoscaler would. Nodes are started and killed from the main thread (Ray's node
    processes install signal handlers). Returns the job's result, its wall time and what
    happened when."""
    out: dict = {}

    def target():
        try:
            out["result"] = job_fn()
        except BaseException as e:  # raised below, in the main thread
            out["error"] = e

    t0 = time.monotonic()
    job = threading.Thread(target=target, name="job", daemon=True)
    job.start()
    info: dict = {}
    try:
        info["progress_at_kill"] = wait_for(what, ready, timeout, job.is_alive)
        info["killed_at_s"] = round(time.monotonic() - t0, 2)
        info.update(kill_node(cluster, node))
        log(f"worker node killed at {info['killed_at_s']} s ({info})")
        if replace is not None:
            cluster.add_node(**replace)
            info["replacement_added_at_s"] = round(time.monotonic() - t0, 2)
            log(f"replacement node added at {info['replacement_added_at_s']} s")
    finally:
        job.join()
    if "error" in out:
        raise out["error"]
    return out["result"], time.monotonic() - t0, info


# --------------------------------------------------------------------------- scenarios


def cardio_rows(repeat: int) -> pa.Table:
    from unusual.ray_jobs import sample_data

    t = sample_data.load("cardio")
    t = pa.concat_tables([t] * repeat)
    return t.append_column("id", pa.array(np.arange(t.num_rows, dtype=np.int64)))


def scenario_score(work: Path) -> dict:
    """Batch scoring with one scoring actor per node; the worker node dies after some parts."""
    from unusual.models import Detector
    from unusual.ray_jobs.score import ScoreJob, run

    repeat, files, row_group = 40, 4, 1000  # 73,240 rows in 76 units of 1,000 (the last of each file shorter)
    table = cardio_rows(repeat)
    data = work / "data"
    data.mkdir()
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), data / f"part-{i:03d}.parquet", row_group_size=row_group)
    det = Detector("ae", exclude=["label", "id"], epochs=2, hidden=[16, 8], seed=0).fit(table.slice(0, 1831))
    bundle = str(work / "bundle")
    det.save(bundle)
    out = work / "scores"
    times = {"data_and_bundle_s": time.monotonic() - T0}

    cluster, worker = start_cluster(1, 1)
    times["cluster_s"] = time.monotonic() - T0 - sum(times.values())
    try:
        job = ScoreJob(
            checkpoint=bundle,
            data=str(data),
            output=str(out),
            keep_columns=["id"],
            unit_rows=row_group,
            block_rows=250,
            address=cluster.address,
        )
        node_id = worker.node_id

        def ready():
            # Scoring has begun (parts on disk) and the worker node holds a live scoring actor.
            parts = len(list(out.glob("part-*.parquet"))) if out.exists() else 0
            return parts >= 3 and actors_on(node_id, "ScoreActor") and {"parts_written": parts}

        summary, wall, info = run_with_kill(
            lambda: run(job), cluster, worker, ready, "3 parts with a scoring actor on the worker node"
        )
        import ray

        # Every scoring actor the job started: one per node, plus the replacements of lost ones.
        actors = [a for a in ray._private.state.actors().values() if "ScoreActor" in a["ActorClassName"]]
    finally:
        import ray

        t = time.monotonic()
        ray.shutdown()
        cluster.shutdown()
        times["shutdown_s"] = time.monotonic() - t
    got = pq.read_table(out, columns=["id"]).column("id").to_numpy()
    return {
        "rows": table.num_rows,
        "units": summary["units"],
        "summary": summary,
        "ids_out": int(got.size),
        "ids_unique": int(np.unique(got).size),
        "ids_match": bool(np.array_equal(np.sort(got), np.arange(table.num_rows))),
        "tmp_left": sorted(p.name for p in out.rglob(".tmp-*")),
        "scoring_actors_started": len(actors),
        "wall_s": round(wall, 2),
        **info,
        **{k: round(v, 2) for k, v in times.items()},
    }


def scenario_train(work: Path) -> dict:
    """DDP training with one worker per node, a checkpoint each epoch; the worker node dies
    after the first checkpoints and a fresh node joins in its place."""
    import pyarrow.compute as pc
    from unusual.ray_jobs.train import TrainJob, run

    epochs = 6
    table = cardio_rows(5).drop_columns(["id"])
    table = table.filter(pc.invert(table.column("label")))  # trained on the normal rows: 8,275
    data = work / "data"
    data.mkdir()
    pq.write_table(table, data / "part-000.parquet")
    storage = work / "runs"
    times = {"data_s": time.monotonic() - T0}

    cluster, worker = start_cluster(1, 1)
    times["cluster_s"] = time.monotonic() - T0 - sum(times.values())
    try:
        job = TrainJob(
            data=str(data),
            output=str(work / "bundle"),
            model="ae",
            params={"exclude": ["label"], "epochs": epochs, "patience": epochs, "hidden": [32, 16]},
            num_workers=2,
            checkpoint_every=1,
            max_failures=2,
            storage=str(storage),
            run_name="node-loss",
            keep_checkpoints=True,
            address=cluster.address,
        )
        node_id = worker.node_id

        snapshot = storage / "node-loss" / "checkpoint_manager_snapshot.json"

        def ready():
            # Ray Train's controller has registered a checkpoint (its snapshot in the run storage names
            # it; a checkpoint folder on disk alone is not enough: one the controller has not collected
            # yet is not restored) and a training worker runs on the worker node.
            try:
                latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
            except (OSError, ValueError, KeyError):
                return None
            epoch = latest and latest["metrics"]["epoch"]
            return latest and actors_on(node_id, "RayTrainWorker") and {"checkpoint_epoch": epoch}

        manifest, wall, info = run_with_kill(
            lambda: run(job),
            cluster,
            worker,
            ready,
            "a checkpoint with a training worker on the worker node",
            replace={"num_cpus": 1},
        )
    finally:
        import ray

        t = time.monotonic()
        ray.shutdown()
        cluster.shutdown()
        times["shutdown_s"] = time.monotonic() - t
    t = manifest.training
    return {
        "rows": table.num_rows,
        "epochs": epochs,
        "bundle": str(work / "bundle"),
        "started_at_epoch": t.started_at_epoch,
        "epochs_run": len(t.val_loss),
        "val_loss": t.val_loss,
        "num_workers": t.num_workers,
        "resources_per_worker": t.resources_per_worker,
        "model_version": manifest.model_version,
        "wall_s": round(wall, 2),
        **info,
        **{k: round(v, 2) for k, v in times.items()},
    }


SCENARIOS = {"score": scenario_score, "train": scenario_train}


def main() -> int:
    name, work = sys.argv[1], Path(sys.argv[2])
    from unusual.runtime import set_verbose

    set_verbose(False)
    result = SCENARIOS[name](work)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
