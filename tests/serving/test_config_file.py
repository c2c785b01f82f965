"""The shipped Serve config file (``serving/serve_config.yaml``), its checkpoints pointed at test
bundles, deployed for real: with ``serve deploy`` on the suite's shared Ray, and with ``serve run`` on a
Ray of its own with the other proxy (the shared Ray runs Serve's fast path where HAProxy exists; the
``serve run`` one the default proxy, and the other way round). Both must answer as ``unusual serve``
does and as the batch job scores; a new checkpoint deployed again is loaded in place, under load, with
no failed request.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from loadkit import swap_under_load
from unusual.models import Detector
from unusual.ray_jobs import sample_data

from unusual.runtime import free_port

pytestmark = pytest.mark.slow
SHIPPED = Path(__file__).resolve().parents[2] / "serving" / "serve_config.yaml"
SERVE = str(Path(sys.executable).with_name("serve"))
ROWS = 60


@pytest.fixture(scope="module")
def rows() -> pa.Table:
    return sample_data.load("cardio").drop_columns(["label"]).slice(0, ROWS)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    """A tiny bundle for each model the shipped file serves, and a second ae (the swap)."""
    cardio = sample_data.load("cardio").drop_columns(["label"])
    parts = []
    for name in ("nab_ec2_request_latency", "nab_machine_temperature"):
        t = sample_data.load(name).slice(0, 400).drop_columns(["label"])
        parts.append(t.append_column("host", pa.array([name] * t.num_rows)))
    root = tmp_path_factory.mktemp("config-bundles")
    dets = {
        "ae": Detector("ae", epochs=2, seed=0).fit(cardio),
        "ae2": Detector("ae", epochs=2, seed=1).fit(cardio),
        "vae": Detector("vae", epochs=2, seed=0).fit(cardio),
        "lstm": Detector("lstm", entity_column="host", time_column="timestamp", window=8, epochs=1)
        .fit(pa.concat_tables(parts)),
    }
    out = {}
    for name, det in dets.items():
        det.save(root / name)
        out[name] = (str(root / name), det.version)
    return out


def shipped(bundles: dict, port: int) -> dict:
    """The shipped config, each model's checkpoint pointed at its test bundle, on ``port``."""
    doc = yaml.safe_load(SHIPPED.read_text())
    doc["http_options"]["port"] = port
    served = []
    for app in doc["applications"]:
        for d in app.get("deployments", []):
            d["user_config"]["checkpoint"] = bundles[app["args"]["model"]][0]
            served.append(app["args"]["model"])
    assert sorted(served) == ["ae", "lstm", "vae"]
    return doc


def write(doc: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def wait_ready(url: str, timeout: float = 240, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc is None or proc.poll() is None, f"serve run exited with {proc.returncode}"
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} was not ready in {timeout} s")


def answers(url: str, rows: pa.Table) -> dict:
    """What an endpoint answers for ``rows``: per-model scores (JSON and Arrow), the default route's, the
    listing, a bad request's answer."""
    body = {"rows": rows.to_pylist()}
    out = {}
    for model in ("ae", "vae"):
        r = requests.post(f"{url}/v1/models/{model}/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out[model] = r.json()
    r = requests.post(f"{url}/v1/score", json={"rows": rows.slice(0, 5).to_pylist()}, timeout=60)
    assert r.status_code == 200, r.text
    out["default"] = r.json()
    listing = requests.get(f"{url}/v1/models", timeout=30).json()
    out["listing"] = {m["name"]: m["model_version"] for m in listing["models"]}
    out["default_model"] = listing["default"]
    bad = requests.post(f"{url}/v1/models/ae/score", json={"rows": [{"nope": 1}]}, timeout=30)
    out["bad"] = (bad.status_code, bad.json())
    out["stream"] = streamed(url)
    return out


def streamed(url: str) -> list:
    """The lstm's streaming answers: two hosts' readings, one request each, then a late one (409)."""
    t = sample_data.load("nab_ec2_request_latency").drop_columns(["label"]).slice(500, 12)
    out = []
    for host in ("h1", "h2"):
        rows = [{**r, "timestamp": r["timestamp"].isoformat(), "host": host} for r in t.to_pylist()]
        for body in (rows[:11], rows[11:], rows[3:4]):
            r = requests.post(f"{url}/v1/models/lstm/stream", json={"rows": body}, timeout=60)
            assert r.status_code in (200, 409), r.text
            out.append((r.status_code, [(x["status"], x["score"]) for x in r.json()["rows"]]))
    assert out[2][0] == 409 and out[1][1][0][0] == "scored"
    return out


def assert_same(got: dict, want: dict) -> None:
    for model in ("ae", "vae"):
        g, w = got[model], want[model]
        assert g["model_version"] == w["model_version"]
        np.testing.assert_allclose(
            [r["anomaly_score"] for r in g["rows"]], [r["anomaly_score"] for r in w["rows"]], rtol=1e-5, atol=1e-7
        )
        assert [r["is_anomaly"] for r in g["rows"]] == [r["is_anomaly"] for r in w["rows"]]
        assert [r["top_features"] for r in g["rows"]] == [r["top_features"] for r in w["rows"]]
    assert got["default"]["model"] == want["default"]["model"] == "ae"
    assert got["listing"] == want["listing"] and got["default_model"] == want["default_model"]
    assert got["bad"] == want["bad"] and got["bad"][0] == 422
    for (code, rows), (want_code, want_rows) in zip(got["stream"], want["stream"], strict=True):
        assert code == want_code and [s for s, _ in rows] == [s for s, _ in want_rows]
        np.testing.assert_allclose([np.nan if x is None else x for _, x in rows],
                                   [np.nan if x is None else x for _, x in want_rows], rtol=1e-5)


@pytest.fixture(scope="module")
def reference(ray_cluster, bundles, rows, tmp_path_factory) -> dict:
    """``unusual serve``'s answers (its applications deployed with ``start``, then removed) and the batch
    job's scores for the same rows."""
    from ray import serve
    from unusual.ray_jobs.score import ScoreJob, run
    from unusual.serving.app import start

    from unusual.config import ServeConfig

    root = tmp_path_factory.mktemp("config-reference")
    data = root / "rows.parquet"
    pq.write_table(rows.append_column("id", pa.array(range(rows.num_rows))), data)
    batch = {}
    for model in ("ae", "vae"):
        run(ScoreJob(checkpoint=bundles[model][0], data=str(data), output=str(root / model), keep_columns=["id"]))
        t = pq.read_table(root / model).sort_by("id")
        batch[model] = t.column("anomaly_score").to_numpy()
    port = free_port()
    models = {m: bundles[m][0] for m in ("ae", "vae", "lstm")}
    url = start(ServeConfig(models=models, default_model="ae", num_cpus=0.2), port=port, ready_timeout=180)
    try:
        return {"serve": answers(url, rows), "batch": batch}
    finally:
        serve.shutdown()


def _dashboard() -> str:
    from ray._private.worker import get_dashboard_url  # tests may; the package may not

    return f"http://{get_dashboard_url()}"


def _replica_actors(app: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")}


def deploy(path: str) -> None:
    r = subprocess.run([SERVE, "deploy", path, "-a", _dashboard()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_deploy_of_the_shipped_file_answers_as_unusual_serve_and_swaps_in_place(
    ray_cluster, bundles, rows, reference, tmp_path
):
    from ray import serve

    port = free_port()
    doc = shipped(bundles, port)
    deploy(write(doc, tmp_path / "serve.yaml"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        got = answers(url, rows)
        assert_same(got, reference["serve"])
        for model in ("ae", "vae"):
            np.testing.assert_allclose([r["anomaly_score"] for r in got[model]["rows"]], reference["batch"][model],
                                       rtol=1e-5, atol=1e-7)
        # A new checkpoint for ae, deployed again under load: loaded in place, no request fails.
        before = _replica_actors("unusual-ae") | _replica_actors("unusual")
        swapped = copy.deepcopy(doc)
        swapped["applications"][0]["deployments"][0]["user_config"]["checkpoint"] = bundles["ae2"][0]
        swap_under_load(url, "/v1/models/ae/score", rows.slice(0, 3).to_pylist(),
                        lambda: deploy(write(swapped, tmp_path / "swapped.yaml")), bundles["ae"][1], bundles["ae2"][1],
                        threads=3, one_replica=False)  # the shipped file autoscales ae up to 4 replicas
        # Reconfigured, not replaced: every replica from before still serves (autoscaling may have added one).
        assert before <= _replica_actors("unusual-ae") | _replica_actors("unusual")
    finally:
        serve.shutdown()


def test_serve_run_of_the_shipped_file_on_the_other_proxy_answers_as_unusual_serve(bundles, rows, reference,
                                                                                    tmp_path):
    from unusual.serving import fastpath

    fast = not fastpath.is_on()
    if fast and fastpath.haproxy_binary() is None:
        pytest.skip("no HAProxy binary: the shared Ray already runs Serve's default proxy")
    port = free_port()
    path = write(shipped(bundles, port), tmp_path / "serve.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", fastpath.OWNER_ENV))}
    if fast:
        folder = tmp_path / "hap"
        folder.mkdir()
        env.update(fastpath.fast_env(str(folder)))
    else:
        env.update({k: "0" for k in fastpath.SWITCHES})
    env["RAY_ADDRESS"] = "local"  # a Ray of its own, never the suite's
    log = open(tmp_path / "serve-run.log", "w")
    proc = subprocess.Popen([SERVE, "run", path], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc)
        assert_same(answers(url, rows), reference["serve"])
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- serve run:\n{(tmp_path / 'serve-run.log').read_text()[-3000:]}") from None
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and its Ray down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
