"""`unusual serve` as a user runs it: a process that starts its own Ray and Serve, answers on its
port, and stops within 10 s when signalled, leaving no process, port or temporary folder behind.

The worst case is signalled: SIGTERM to the whole process group (systemd's default, `kill -- -PGID`),
which reaches Ray's own processes too, so Serve's controller cannot shut down gracefully."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from unusual.models import Detector
from unusual.ray_jobs import sample_data
from unusual.serving.fastpath import processes_using

from unusual.runtime import free_port as _free_port

STOP_SECONDS = 10


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_unusual_serve_answers_then_stops_within_10_s_of_a_group_sigterm(tmp_path):
    cardio = sample_data.load("cardio").drop_columns(["label"])
    bundle = str(tmp_path / "ae")
    det = Detector("ae", epochs=1, seed=0).fit(cardio)
    det.save(bundle)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "unusual.cli", "serve", "--checkpoint", f"ae={bundle}", "--port", str(port),
           "--num-cpus", "0.2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline, ready = time.time() + 180, False
        while time.time() < deadline and proc.poll() is None and not ready:
            try:
                ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            except requests.RequestException:
                time.sleep(0.5)
        assert ready, proc.stderr.read() if proc.poll() is not None else "not ready in 180 s"
        rows = {"rows": cardio.slice(0, 2).to_pylist()}
        r = requests.post(f"http://127.0.0.1:{port}/v1/models/ae/score", json=rows, timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == det.version
        folders = glob.glob(f"/tmp/unusual-hap-{proc.pid}-*")
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert took <= STOP_SECONDS, f"stopped in {took:.1f} s"
    summary = json.loads(out)
    assert summary["url"] == f"http://127.0.0.1:{port}" and summary["models"] == {"ae": bundle}
    lines = err.strip().splitlines()
    assert lines[-1].startswith("[unusual] stopped in "), err
    listeners = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout if _listening(port) else ""
    assert not _listening(port), f"something still listens on {port}: {listeners}\n{err}"
    if summary["fast_path"]:
        assert lines[0].startswith("[unusual] fast path: HAProxy"), err
        assert len(folders) == 1, folders  # its HAProxy folder existed while it ran ...
        # ... and is gone, with its HAProxy and every process of its Ray (they carry its paths in their
        # environment: one that outlived the raylet wrote HAProxy files there again, after the removal).
        assert not processes_using(folders[0], environ=True)
        time.sleep(2)
        assert not os.path.exists(folders[0])
    assert not glob.glob(f"/tmp/unusual-*-{proc.pid}-*")
