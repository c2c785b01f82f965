"""End-to-end check of the deployable system, as an operator would run it.

    .venv/bin/python .ci/e2e.py

0. ``unusual demo --quick`` (the quick start's command, with its own S3 endpoint and Ray): it must
   finish with online scores equal to batch scores and leave no temporary folder;
1. a local S3 endpoint seeded with the shipped sample data (infra/local_s3.py);
2. ``ray start --head`` (token authentication, as Ray >= 2.60 sets up);
3. ``ray job submit`` of the training job, then of the batch scoring job and
   the evaluation job, all against the S3 endpoint (and again: no temporary folder left);
4. the Serve application (``unusual serve --address``) on that cluster, and a
   real request whose scores must equal the batch job's for the same rows; then the same
   applications from a Serve config file (``unusual serve --print-config``, ``serve deploy``),
   checked the same way;
5. the cluster is stopped (the ``ray start --block`` process this script
   started is terminated, which stops every Ray process it launched) and the
   S3 endpoint with it. Exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from unusual.serving import fastpath

from unusual.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "s3://unusual/e2e/models/ae"
SCORES = "s3://unusual/e2e/scores/ae"
DATA = "s3://unusual/sample/cardio"


def temp_dirs() -> set[str]:
    """unusual's folders in the temporary folder (every job removes its own)."""
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith("unusual-") and os.path.isdir(os.path.join(tmp, n))}


def step(msg: str) -> None:
    print(f"\n[e2e] {msg}", flush=True)


def run(cmd: list[str], env: dict, timeout: float = 900) -> str:
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        print(p.stdout[-4000:], p.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"[e2e] failed (exit {p.returncode}): {' '.join(cmd)}")
    return p.stdout


def wait_http(url: str, seconds: float, ok: tuple[int, ...] = (200,)) -> None:
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=5).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit(f"[e2e] {url} did not answer 200 within {seconds:.0f} s")


def stop(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def main() -> int:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    s3_port, gcs_port, dash_port, serve_port, config_port = (free_port() for _ in range(5))
    procs: list[subprocess.Popen] = []
    cleanup: list = []
    before = temp_dirs()
    step("unusual demo --quick (its own local S3 and Ray)")
    out = run([str(BIN / "unusual"), "demo", "--quick", "--workdir", str(ROOT / "artifacts" / "e2e-demo")], env)
    assert "scores equal to the batch scores" in out, out[-2000:]
    left = temp_dirs() - before
    assert not left, f"the demo left temporary folders behind: {sorted(left)}"
    try:
        step("local S3 endpoint with the sample data")
        s3 = subprocess.Popen(
            [sys.executable, "infra/local_s3.py", "--port", str(s3_port), "--seed-sample-data"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        procs.append(s3)
        for line in s3.stdout:
            if line.startswith("export "):
                k, v = line[len("export ") :].strip().split("=", 1)
                env[k] = v
            if line.startswith("# bucket"):
                break
        assert env.get("AWS_ENDPOINT_URL"), "the S3 endpoint printed no AWS_ENDPOINT_URL"

        step("ray start --head (Serve's fast path: HAProxy + throughput-optimized, as the README says)")
        hap = tempfile.mkdtemp(prefix="unusual-hap-e2e-")  # HAProxy's sockets: a short path
        cleanup.append(lambda: (fastpath.reap(hap), shutil.rmtree(hap, ignore_errors=True)))
        if fastpath.haproxy_binary():
            env.update(fastpath.fast_env(hap))
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
             "--dashboard-port", str(dash_port), "--include-dashboard", "true", "--disable-usage-stats"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        procs.append(head)
        dashboard = f"http://127.0.0.1:{dash_port}"
        wait_http(f"{dashboard}/api/version", 120, ok=(200, 401))  # 401: up, and asking for the token
        submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", "python", "-m"]

        before = temp_dirs()
        step("ray job submit: training (Ray Train)")
        run([*submit, "unusual.ray_jobs.train", "--model", "ae", "--data", DATA, "--exclude", "label",
             "--epochs", "5", "--output", MODEL, "--overwrite"], env)
        step("ray job submit: batch scoring")
        run([*submit, "unusual.ray_jobs.score", "--checkpoint", MODEL, "--data", DATA, "--output", SCORES,
             "--keep-columns", "label", "--overwrite"], env)
        step("ray job submit: evaluation")
        out = run([*submit, "unusual.ray_jobs.evaluate", "--scores", SCORES, "--label-column", "label"], env)
        print(out[-1500:])
        left = temp_dirs() - before
        assert not left, f"the jobs left temporary folders behind: {sorted(left)}"

        step("the Serve application on the cluster")
        serve = subprocess.Popen(
            [str(BIN / "unusual"), "serve", "--checkpoint", f"ae={MODEL}", "--port", str(serve_port),
             "--address", f"127.0.0.1:{gcs_port}"],
            cwd=ROOT, env=env, start_new_session=True,
        )
        procs.append(serve)
        url = f"http://127.0.0.1:{serve_port}"
        wait_http(f"{url}/readyz", 180)
        check_online_equals_batch(url, env)
        stop(serve)  # it shuts its applications down (serve.shutdown) on SIGTERM
        procs.remove(serve)

        step("the same applications from a Serve config file: unusual serve --print-config, serve deploy")
        config = ROOT / "artifacts" / "e2e-serve.yaml"
        config.write_text(run([str(BIN / "unusual"), "serve", "--print-config", "--checkpoint", f"ae={MODEL}",
                               "--port", str(config_port)], env))
        run([str(BIN / "serve"), "deploy", str(config), "--address", dashboard], env)
        url = f"http://127.0.0.1:{config_port}"
        wait_http(f"{url}/readyz", 180)
        check_online_equals_batch(url, env)
        run([str(BIN / "serve"), "shutdown", "--address", dashboard, "--yes"], env)
        print("\n[e2e] all steps passed", flush=True)
        return 0
    finally:
        step("stopping Serve, the Ray cluster and the S3 endpoint")
        for p in reversed(procs):
            stop(p)
        for fn in cleanup:
            fn()


def check_online_equals_batch(url: str, env: dict) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    import requests

    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    from unusual.ray_jobs import sample_data
    from unusual.ray_jobs.local_io import filesystem

    cardio = sample_data.load("cardio")
    rows = cardio.slice(0, 20)
    r = requests.post(f"{url}/v1/score", json={"rows": rows.drop_columns(["label"]).to_pylist()}, timeout=60)
    if r.status_code != 200:
        raise SystemExit(f"[e2e] /v1/score answered {r.status_code}: {r.text[:500]}")
    online = np.array([x["anomaly_score"] for x in r.json()["rows"]])
    pafs, path, fs = filesystem(SCORES)
    files = sorted(p for p in fs.find(path) if "/_" not in p[len(path) :] and p.endswith(".parquet"))
    batch = np.concatenate([pq.read_table(f, filesystem=pafs).column("anomaly_score").to_numpy() for f in files])
    # The sample shards keep the file order, so the first 20 batch rows are cardio's first 20 rows.
    if not np.allclose(online, batch[:20], rtol=1e-6, atol=1e-9):
        raise SystemExit(f"[e2e] online scores differ from batch scores: {online[:3]} vs {batch[:3]}")
    print(json.dumps({"online_rows": len(online), "model_version": r.json()["model_version"], "equal": True}))


if __name__ == "__main__":
    sys.exit(main())
