"""A whole node lost mid-job, on a real two-node Ray cluster on this machine.

Each scenario runs in its own process (``faultkit.py``), which starts a ``ray.cluster_utils.Cluster``
(a head and a worker node, 1 CPU each, each with its own raylet, object store and worker processes),
runs the real job against it and SIGKILLs every process of the worker node
(``remove_node(allow_graceful=False)``) once the job has made progress: parts written by a scoring
actor there, or a checkpoint persisted with a training worker there. The session's own local Ray
(``ray_cluster``) is never touched. Ray's temporary folder is a short one removed afterwards (its
socket paths must fit in 108 bytes); the jobs' own temporary files go under ``tmp_path``.

- Scoring: the lost actor's units go to the actor left on the head (no node replaces the lost one):
  every row is scored exactly once, none is quarantined, no temporary file is left in the output.
- Training: a fresh node joins (as an autoscaler would add one); the worker group restarts from the
  last checkpoint, the epochs continue where it left off, and the bundle loads and scores.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from unusual.models import Detector, Scorer
from unusual.models.metrics import roc_auc
from unusual.ray_jobs import sample_data

FAULTKIT = Path(__file__).with_name("faultkit.py")
TIMEOUT_S = 150


def scenario(name: str, tmp_path: Path) -> dict:
    """Run one faultkit scenario in its own process group; its JSON result."""
    ray_tmp = tempfile.mkdtemp(prefix="uf-")  # short: Ray's sockets live under it
    job_tmp = tmp_path / "tmp"
    job_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "UNUSUAL_"))}
    # Token authentication, as Ray 2.60 clusters have by default, with a token of this run only
    # (nothing written to ~/.ray).
    env.update(
        RAY_TMPDIR=ray_tmp,
        TMPDIR=str(job_tmp),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, str(FAULTKIT), name, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario's own process group: its driver and Ray nodes
        out, err = proc.communicate()
        pytest.fail(f"the {name} scenario did not finish within {TIMEOUT_S} s:\n{err[-4000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"the {name} scenario failed:\n{err[-6000:]}"
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"no result from the {name} scenario:\n{out[-2000:]}\n{err[-4000:]}"
    result = json.loads(lines[-1])
    print(json.dumps({k: v for k, v in result.items() if k not in ("summary", "val_loss")}, indent=1))
    print(err[-3000:])
    return result


@pytest.mark.slow
def test_batch_scoring_survives_losing_a_node(tmp_path):
    r = scenario("score", tmp_path)
    rows, s = r["rows"], r["summary"]
    assert rows == 73_240 and r["units"] == 76
    # The node died mid-run, with one of the two scoring actors and units in flight on it.
    assert 3 <= r["progress_at_kill"]["parts_written"] < r["units"]
    assert s["actors_lost"] >= 1 and r["scoring_actors_started"] >= 3  # 2 at the start + a replacement
    # The job succeeded (its own check: rows in = scored + quarantined), nothing quarantined.
    assert s["rows_in"] == s["rows_scored"] == rows
    assert s["rows_quarantined"] == 0 and s["quarantine"] is None
    # Every id exactly once in the output: no row lost with the node, none written twice.
    out = tmp_path / "scores"
    ids = pq.read_table(out, columns=["id"]).column("id").to_numpy()
    assert len(ids) == rows
    assert np.array_equal(np.sort(ids), np.arange(rows))
    assert s["parts"] == r["units"]  # one whole part per unit, the lost actor's half-written one redone
    assert not list(out.rglob(".tmp-*"))  # nor its temporary file left behind


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint_after_losing_a_node(tmp_path):
    r = scenario("train", tmp_path)
    epochs = r["epochs"]
    assert r["num_workers"] == 2 and r["resources_per_worker"] == {"CPU": 1.0}  # one worker per node
    # Killed once Ray Train had registered a checkpoint (of epoch c), before the end; a fresh node
    # joined after the loss.
    c = r["progress_at_kill"]["checkpoint_epoch"]
    assert 0 <= c < epochs - 1
    assert r["node_workers"] >= 1  # the train worker's process (and the node's idle workers) died with it
    assert r["replacement_added_at_s"] > r["killed_at_s"]
    # Restarted once, from its last checkpoint, not from scratch (as test_train's killed worker):
    # at least at epoch c + 1 (a later checkpoint may have been registered before the kill landed).
    first, resumed = r["started_at_epoch"]
    assert first == 0 and c + 1 <= resumed < epochs
    # The history carries on across the restart: every epoch once.
    assert r["epochs_run"] == epochs and len(r["val_loss"]) == epochs
    assert r["val_loss"][-1] < r["val_loss"][0]
    # The bundle loads and scores, in memory and through the Scorer.
    det = Detector.load(r["bundle"])
    assert det.version == r["model_version"]
    cardio = sample_data.load("cardio")
    x = cardio.drop_columns(["label"])
    scores = det.score(x)
    assert np.isfinite(scores).all() and np.array_equal(scores, Scorer(r["bundle"]).scores(x))
    assert roc_auc(cardio.column("label").to_numpy(), scores) > 0.80
