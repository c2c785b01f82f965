"""The Serve application over real HTTP on a local Ray: every model kind, bulk
formats, batching, bad requests, authentication, a model swap under load and
autoscaling from 1 to 2 replicas and back.

Online scores are compared with the in-memory ``Detector`` on the same rows:
the endpoint, the batch job and the Python API share one ``Scorer``.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loadkit import load, swap_under_load
from unusual.models import Detector
from unusual.ray_jobs import sample_data

from unusual.runtime import free_port as _free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cardio() -> pa.Table:
    t = sample_data.load("cardio")
    return t.drop_columns(["label"])


@pytest.fixture(scope="module")
def series() -> pa.Table:
    parts = []
    for name in ("nab_ec2_request_latency", "nab_machine_temperature"):
        t = sample_data.load(name).slice(0, 600).drop_columns(["label"])
        parts.append(t.append_column("host", pa.array([name] * t.num_rows)))
    return pa.concat_tables(parts)


@pytest.fixture(scope="module")
def bundles(cardio, series, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-bundles")
    dets = {
        "ae": Detector("ae", epochs=3, seed=0).fit(cardio),
        "ae2": Detector("ae", epochs=3, seed=1).fit(cardio),
        "vae": Detector("vae", epochs=2, seed=0).fit(cardio),
        "lstm": Detector("lstm", entity_column="host", time_column="timestamp", window=8, epochs=1).fit(series),
    }
    uris = {}
    for name, det in dets.items():
        uris[name] = str(root / name)
        det.save(uris[name])
    return dets, uris


@pytest.fixture(scope="module")
def server(ray_cluster, bundles):
    from ray import serve
    from unusual.serving.app import start

    from unusual.config import ServeConfig

    dets, uris = bundles
    port = _free_port()
    settings = ServeConfig(
        models={"ae": uris["ae"], "vae": uris["vae"], "lstm": uris["lstm"]},
        default_model="ae",
        max_body_bytes=1_000_000,
        num_cpus=0.2,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=3,
    )
    url = start(settings, port=port, ready_timeout=120)
    assert url == f"http://127.0.0.1:{port}"
    try:
        yield url, settings
    finally:
        serve.shutdown()


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def test_health_readiness_and_model_listing(server, bundles):
    url, _ = server
    dets, _ = bundles
    assert requests.get(f"{url}/healthz").json() == {"status": "ok"}
    assert requests.get(f"{url}/readyz").json()["status"] == "ready"
    listing = requests.get(f"{url}/v1/models").json()
    assert listing.get("default") == "ae", listing
    versions = {m["name"]: m["model_version"] for m in listing["models"]}
    assert versions == {"ae": dets["ae"].version, "vae": dets["vae"].version, "lstm": dets["lstm"].version}
    lstm = next(m for m in listing["models"] if m["name"] == "lstm")
    assert (lstm["window"], lstm["score_lookahead"]) == (8, 4)  # the look-ahead: score_steps, half the window
    assert requests.get(f"{url}/openapi.json").json()["info"]["version"] == "v1"


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_extreme_finite_values_are_flagged_online(server, bundles, cardio, kind):
    url, _ = server
    det = bundles[0][kind]
    rows = _rows(cardio.slice(0, 4))
    for row, value in zip(rows, (1e30, -1e30, 1e308, float(np.finfo(np.float64).max))):
        row["f02"] = value
    r = requests.post(f"{url}/v1/models/{kind}/score", json={"rows": rows})
    assert r.status_code == 200, r.text
    out = r.json()["rows"]
    assert all(o["is_anomaly"] is True and o["anomaly_score"] > 1000 * det.threshold_ for o in out), out
    assert [o["top_features"][0]["feature"] for o in out] == ["f02"] * 4


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_json_scores_equal_in_memory_scores(server, bundles, cardio, kind):
    url, _ = server
    det = bundles[0][kind]
    rows = cardio.slice(0, 40)
    path = "/v1/score" if kind == "ae" else f"/v1/models/{kind}/score"
    r = requests.post(f"{url}{path}", json={"rows": _rows(rows)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == det.version == r.headers["X-Model-Version"]
    assert body["threshold"] == pytest.approx(det.threshold_)
    got = np.array([x["anomaly_score"] for x in body["rows"]])
    np.testing.assert_allclose(got, det.score(rows), rtol=1e-6, atol=1e-9)
    assert [x["is_anomaly"] for x in body["rows"]] == list(det.score(rows) > det.threshold_)
    assert len(body["rows"][0]["top_features"]) == 3


def test_lstm_request_carries_each_entitys_window(server, bundles, series):
    url, _ = server
    det = bundles[0]["lstm"]
    # the last 20 rows of each entity, interleaved: scored per entity in time order
    window = pa.concat_tables([series.slice(580, 20), series.slice(1180, 20)])
    window = window.take(pa.array(np.random.default_rng(0).permutation(window.num_rows)))
    rows = [{**r, "timestamp": r["timestamp"].isoformat()} for r in _rows(window)]
    r = requests.post(f"{url}/v1/models/lstm/score", json={"rows": rows})
    assert r.status_code == 200, r.text
    got = np.array([x["anomaly_score"] for x in r.json()["rows"]])
    np.testing.assert_allclose(got, det.score(window), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("fmt,rows", [("arrow", 1000), ("parquet", 1000), ("arrow", 4500)])
def test_bulk_arrow_and_parquet_bodies(server, bundles, cardio, fmt, rows):
    """4,500 rows: past handling.THREAD_ROWS, scored in a thread beside the replica's event loop."""
    url, _ = server
    det = bundles[0]["ae"]
    table = pa.concat_tables([cardio] * (rows // cardio.num_rows + 1)).slice(0, rows)
    sink = io.BytesIO()
    if fmt == "arrow":
        with ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        ctype = "application/vnd.apache.arrow.stream"
    else:
        pq.write_table(table, sink)
        ctype = "application/vnd.apache.parquet"
    r = requests.post(f"{url}/v1/models/ae/score", data=sink.getvalue(), headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(ctype)
    out = ipc.open_stream(r.content).read_all() if fmt == "arrow" else pq.read_table(io.BytesIO(r.content))
    assert out.num_rows == rows and r.headers["X-Model-Version"] == det.version
    np.testing.assert_allclose(out.column("anomaly_score").to_numpy(), det.score(table), rtol=1e-6, atol=1e-9)


def test_concurrent_single_rows_are_batched_and_each_gets_its_own_score(server, bundles, cardio):
    url, _ = server
    det = bundles[0]["ae"]
    rows = _rows(cardio.slice(100, 48))
    expected = det.score(cardio.slice(100, 48))
    got = [None] * len(rows)

    def one(i):
        got[i] = requests.post(f"{url}/v1/score", json={"rows": [rows[i]]}).json()["rows"][0]["anomaly_score"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("route", ["/v1/score", "/v1/models/ae/score"])  # through the gateway, and one hop
def test_bad_requests_get_a_4xx_naming_the_field(server, cardio, route):
    url, _ = server
    good = _rows(cardio.slice(0, 3))

    def post(body=None, data=None, headers=None, path=route):
        r = requests.post(f"{url}{path}", json=body, data=data, headers=headers, timeout=30)
        return r.status_code, r.json()["error"]

    assert post(data=b'{"rows": [', headers={"Content-Type": "application/json"})[0] == 400
    assert post({"row": good}) == (422, 'the body must be a JSON object with a "rows" field: {"rows": [{...}, ...]}')
    assert post({"rows": []}) == (422, '"rows" is empty: send at least one row')
    code, msg = post({"rows": [{k: v for k, v in good[0].items() if k != "f03"}]})
    assert code == 422 and "missing column(s) ['f03']" in msg
    code, msg = post({"rows": [{**good[0], "customer": 7}]})
    assert code == 422 and "unexpected column(s) ['customer']" in msg
    code, msg = post({"rows": [{**good[0], "f05": "high"}]})
    assert code == 422 and "column 'f05' has type string" in msg
    code, msg = post({"rows": [good[0], {**good[1], "f05": None}]})
    assert code == 422 and "column 'f05' has NaN/inf/null at row 1" in msg
    nan_body = b'{"rows": [{"f00": NaN}]}'
    assert post(data=nan_body, headers={"Content-Type": "application/json"})[0] == 422
    assert post({"rows": [{**good[0], "f05": [1, 2]}]}) == (
        422,
        "column 'f05' holds nested values; send numbers or strings",
    )
    code, msg = post(data=b"x" * 1_200_000, headers={"Content-Type": "application/json"})
    assert code == 413 and "over the limit of 1,000,000 bytes" in msg
    code, msg = post({"rows": good}, path="/v1/models/nope/score")
    assert code == 404 and "no model named 'nope'" in msg
    code, msg = post(data=b"abc", headers={"Content-Type": "text/csv"})
    assert code == 415 and "unsupported Content-Type 'text/csv'" in msg
    deep = b"[" * 5000 + b"]" * 5000
    assert post(data=deep, headers={"Content-Type": "application/json"}) == (
        400, "malformed JSON: nested deeper than the parser allows")


def test_bearer_token(ray_cluster, server, bundles, cardio):
    from ray import serve
    from unusual.serving.app import remove, start

    from unusual.config import ServeConfig

    url, _ = server
    settings = ServeConfig(models={"ae": bundles[1]["ae"]}, auth_token="s3cret", num_cpus=0.1, max_replicas=1)
    port = int(url.rsplit(":", 1)[1])
    assert start(settings, port=port, name="secured", route_prefix="/secured", ready_timeout=60) == f"{url}/secured"
    rows = {"rows": _rows(cardio.slice(0, 2))}
    r = requests.post(f"{url}/secured/v1/score", json=rows)
    assert r.status_code == 401 and "bearer token" in r.json()["error"]
    r = requests.post(f"{url}/secured/v1/score", json=rows, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    r = requests.post(f"{url}/secured/v1/models/ae/score", json=rows)  # the model's own route checks it too
    assert r.status_code == 401 and "bearer token" in r.json()["error"]
    r = requests.get(f"{url}/secured/v1/models/ae/", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json()["model_version"] == bundles[0]["ae"].version
    remove(settings, "secured")
    assert "secured" not in serve.status().applications and "secured-ae" not in serve.status().applications


# A persistent connection closed before any byte of the answer, or (seen once in 2,507 requests when a replica
# was killed) right after the answer's headers, before any byte of its body: either way the client has no answer.
def _replicas(prefix: str) -> set[str]:
    """The named replica actors of the applications whose name starts with ``prefix``."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{prefix}")}


def test_model_swap_under_load_fails_no_request(server, bundles, cardio):
    from unusual.serving.app import start

    from unusual.config import ServeConfig

    url, settings = server
    dets, uris = bundles
    untouched = _replicas("unusual#") | _replicas("unusual-vae#")  # the gateway and the other model
    assert untouched
    swapped = ServeConfig.model_validate({**settings.model_dump(), "models": {**settings.models, "ae": uris["ae2"]}})
    swap_under_load(url, "/v1/score", _rows(cardio.slice(0, 5)),
                    lambda: start(swapped, port=int(url.rsplit(":", 1)[1])), dets["ae"].version, dets["ae2"].version,
                    timeout=60, one_replica=lambda: _running("unusual-ae", "model-ae") == 1)
    # The new checkpoint is loaded in place: the gateway and the other model were not restarted.
    assert _replicas("unusual#") | _replicas("unusual-vae#") == untouched


def _running(app: str, deployment: str) -> int:
    from ray import serve

    d = serve.status().applications[app].deployments[deployment]
    return int(d.replica_states.get("RUNNING", 0))


def test_autoscaling_from_one_to_two_replicas_and_back(server, cardio):
    url, _ = server
    assert _running("unusual-vae", "model-vae") == 1
    stop, results = threading.Event(), []

    # Bulk Arrow bodies, encoded once: the replica does the work, not the client (single JSON rows on the fast
    # path are answered faster than 8 Python threads send them, and never queue up at the replica).
    sink = io.BytesIO()
    table = pa.concat_tables([cardio] * 2).slice(0, 3000)
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    body, headers = sink.getvalue(), {"Content-Type": "application/vnd.apache.arrow.stream"}

    def worker():
        while not stop.is_set():
            r = requests.post(f"{url}/v1/models/vae/score", data=body, headers=headers, timeout=60)
            results.append(r.status_code)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in pool:
        t.start()
    deadline, peak = time.time() + 90, 1
    while time.time() < deadline and peak < 2:
        peak = max(peak, _running("unusual-vae", "model-vae"))
        time.sleep(0.5)
    stop.set()
    for t in pool:
        t.join()
    assert peak == 2, "did not scale to 2 replicas under load"
    assert results and set(results) == {200}
    deadline = time.time() + 90
    while time.time() < deadline and _running("unusual-vae", "model-vae") > 1:
        time.sleep(1)
    assert _running("unusual-vae", "model-vae") == 1, "did not scale back to 1 replica"


def test_batch_job_route_is_off_without_a_token_and_uri_prefixes(server, tmp_path):
    url, _ = server
    r = requests.post(f"{url}/v1/jobs", json={"model": "vae", "data": str(tmp_path), "output": str(tmp_path / "o")})
    assert r.status_code == 403 and r.json()["error"].startswith("POST /v1/jobs is off: a job reads and writes")


def test_batch_job_route_submits_a_scoring_job_under_its_prefixes(server, bundles, cardio, tmp_path):
    from unusual.serving.app import remove, start

    from unusual.config import ServeConfig

    url, _ = server
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = ServeConfig(models={"vae": bundles[1]["vae"]}, auth_token="j0bs", jobs_uri_prefixes=[str(allowed)],
                           num_cpus=0.1, max_replicas=1)
    port = int(url.rsplit(":", 1)[1])
    jobs = start(settings, port=port, name="jobs", route_prefix="/jobs", ready_timeout=120)
    auth = {"Authorization": "Bearer j0bs"}
    try:
        data = allowed / "data.parquet"
        pq.write_table(cardio.append_column("id", pa.array(np.arange(cardio.num_rows))), data)
        out = allowed / "scores"
        body = {"model": "vae", "data": str(data), "output": str(out), "keep_columns": ["id"]}
        assert requests.post(f"{jobs}/v1/jobs", json=body).status_code == 401
        for field, uri in (("data", str(tmp_path / "other.parquet")), ("output", f"{allowed}-x/out"),
                           ("output", f"{allowed}/../escaped")):
            r = requests.post(f"{jobs}/v1/jobs", json={**body, field: uri}, headers=auth)
            assert r.status_code == 403, r.text
            assert r.json()["error"] == f"field {field!r}: {uri!r} is outside the allowed URI prefixes {[str(allowed)]}"
        r = requests.post(f"{jobs}/v1/jobs", json=body, headers=auth)
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["model_version"] == bundles[0]["vae"].version
        deadline, status = time.time() + 180, None
        while time.time() < deadline:
            status = requests.get(f"{jobs}/v1/jobs/{job['job_id']}", headers=auth).json()["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        assert status == "SUCCEEDED", requests.get(f"{jobs}/v1/jobs/{job['job_id']}", headers=auth).json()
        assert pq.read_table(out).num_rows == cardio.num_rows
        assert requests.get(f"{jobs}/v1/jobs/raysubmit_nope", headers=auth).status_code == 404
        r = requests.post(f"{jobs}/v1/jobs", json={"model": "vae", "output": str(out)}, headers=auth)
        assert r.status_code == 422 and r.json()["error"] == "field 'data': Field required"
        r = requests.post(f"{jobs}/v1/jobs", json={**body, "model": ["vae"]}, headers=auth)
        assert r.status_code == 422 and r.json()["error"].startswith("field 'model': no model named ['vae']; models: [")
    finally:
        remove(settings, "jobs")


def test_the_token_is_in_no_deployment_argument():
    """The replicas get the token's digest: their arguments are kept by Serve's controller and shown
    for config-file applications by the dashboard. A config file may hold the digest itself."""
    from unusual.serving.app import applications, build
    from unusual.serving.handling import token_digest

    from unusual.config import ServeConfig

    settings = ServeConfig(models={"ae": "/nowhere/ae", "vae": "/nowhere/vae"}, auth_token="s3cret-t0ken")
    bound = [t.target._bound_deployment for t in applications(settings, "tok", "/tok")]
    bound.append(build(settings)._bound_deployment)
    args = repr([b._replica_config.init_args for b in bound])
    assert "s3cret-t0ken" not in args and args.count(token_digest("s3cret-t0ken")) == len(bound)


def test_prometheus_metrics_count_rows_by_model_version(server, bundles, cardio):
    import ray

    url, _ = server
    requests.post(f"{url}/v1/models/vae/score", json={"rows": _rows(cardio.slice(0, 7))})
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "unusual_rows_scored" in text and bundles[0]["vae"].version in text:
            break
        time.sleep(2)
    assert "unusual_rows_scored" in text and "unusual_anomaly_score_bucket" in text
    assert f'model_version="{bundles[0]["vae"].version}"' in text


def test_build_app_binds_one_application_with_a_single_http_ingress():
    """``serve run unusual.serving.app:build_app models=…``: the gateway in front of the model
    deployments, which have no routes of their own (Serve allows one FastAPI ingress per application)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as serve_build
    from unusual.serving.app import build_app

    from unusual.config import ConfigError, ServeConfig

    built = build_app({"models": "ae=/x,vae=/y", "default_model": "ae"})  # binds; nothing is loaded
    assert type(built).__name__ == "Application"
    app = serve_build(built, name="unusual")
    app.validate_single_fastapi_ingress()  # what failed every config deploy
    # each model once, and its stream state once (the gateway's /stream reaches it): no renamed twin
    assert sorted(d.name for d in app.deployments) == ["gateway", "model-ae", "model-vae", "stream-ae", "stream-vae"]
    with pytest.raises(ValueError) as e:
        build_app({"models": "ae=/x", "replicas": 3})
    assert str(e.value) == f"unknown argument 'replicas'; known: {sorted(ServeConfig.model_fields)}"
    with pytest.raises(ConfigError) as e:  # validation reads no bundle: only the command line names a bare URI
        build_app({"models": "/x"})
    assert str(e.value) == "--checkpoint: '/x' has no name: give it as NAME=URI"
    # As `serve run … key=value` calls it: Serve validates the strings with ServeConfig (the annotation).
    built = call_user_app_builder_with_args_if_necessary(build_app, {"models": "ae=/x", "max_batch_size": "8"})
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match=r"(?s)replicas\n.*Extra inputs are not permitted"):
        call_user_app_builder_with_args_if_necessary(build_app, {"models": "ae=/x", "replicas": "3"})


def test_gpu_replicas_share_gpus_and_impossible_placements_are_refused(ray_cluster, bundles, capsys):
    """Each replica takes a share of a GPU (0.25 by default), so two models fit one GPU;
    a placement the cluster can never make is an error at once, not a replica pending forever
    (a whole GPU per replica left the second model waiting on a 1-GPU machine)."""
    from unusual.serving.app import check_cluster, replica_resources

    from unusual.cli import main
    from unusual.config import ServeConfig
    from unusual.runtime import ResourceError

    _, uris = bundles
    two = {"ae": uris["ae"], "vae": uris["vae"]}
    s = ServeConfig(models=two, use_gpu=True)
    assert replica_resources(s) == {"num_cpus": 0.25, "num_gpus": 0.25}
    assert replica_resources(ServeConfig(models=two)) == {"num_cpus": 0.25, "num_gpus": 0}
    check_cluster(s, {"CPU": 2.0, "GPU": 1.0})  # 2 x 0.25 GPU fit one GPU
    whole = ServeConfig(models=two, use_gpu=True, gpus_per_replica=1.0)
    with pytest.raises(ResourceError) as e:
        check_cluster(whole, {"CPU": 16.0, "GPU": 1.0})
    assert str(e.value) == (
        "2 model(s) x 1 replica(s) x 1 GPU need 2 GPU(s); the cluster has 1. "
        "Use a smaller --gpus-per-replica, fewer models or fewer --min-replicas"
    )
    with pytest.raises(ValueError) as e:
        ServeConfig.validated({"models": two, "use_gpu": True, "gpus_per_replica": 1.5})
    assert str(e.value) == "--gpus-per-replica: Input should be less than or equal to 1; got 1.5"
    # The CLI refuses before starting Serve (the test cluster has no GPU).
    assert main(["serve", "--checkpoint", f"ae={uris['ae']}", "--use-gpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "unusual serve: error: 1 model(s) x 1 replica(s) x 0.25 GPU need 0.25 GPU(s); the cluster has 0. "
        "Use a smaller --gpus-per-replica, fewer models or fewer --min-replicas"
    )


# --------------------------------------------------------------------------- ports and replica loss


def test_a_busy_port_is_refused_in_one_line(server, bundles, tmp_path):
    """A second `unusual serve` on the port of a running one (its HAProxy or Serve proxy listens
    there with SO_REUSEPORT: without the check both would share it), or on a port another program
    holds: one line naming the port and --port, exit 2, before any Ray starts."""
    import os
    import subprocess
    import sys

    from unusual.serving.app import PortInUse, start

    from unusual.config import ServeConfig

    url, settings = server
    port = int(url.rsplit(":", 1)[1])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cli = [sys.executable, "-m", "unusual.cli", "serve", "--checkpoint", f"ae={bundles[1]['ae']}"]
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        for busy in (port, foreign.getsockname()[1]):
            p = subprocess.run([*cli, "--port", str(busy)], env=env, capture_output=True, text=True, timeout=120)
            assert p.returncode == 2, p.stderr
            assert p.stderr.strip() == (
                f"unusual serve: error: port {busy} on 127.0.0.1 is in use (Address already in use): another "
                "server (perhaps another unusual serve) listens there; stop it or choose another port with --port"
            )
    # In a cluster whose Serve already listens on one port, asking for another is refused too
    # (Serve would keep its port and print that it ignores the new one).
    other = _free_port()
    with pytest.raises(PortInUse) as e:
        start(ServeConfig(models={"ae": bundles[1]["ae"]}), port=other, name="elsewhere", route_prefix="/elsewhere")
    assert str(e.value) == (
        f"Serve already runs in this cluster on port {port}; it cannot move to {other}: "
        f"use --port {port}, or stop it first (serve shutdown)"
    )


def _replica_pids(app: str, deployment: str) -> list[int]:
    """The processes of the running replicas of ``app``'s ``deployment`` (by their Ray process title)."""
    import os

    title = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].endswith(title):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_a_replica_killed_under_load_fails_no_request(server, bundles, cardio):
    """Two replicas of a model under load on its one-hop route; one is SIGKILLed: HAProxy sends the
    requests it had read again to the other (scoring is pure), new ones go there, Serve starts a new
    one. The few it had not read yet come back as a connection closed without an answer, which the
    clients send again (see :func:`_load`); none fails."""
    import os
    import signal

    from ray import serve
    from unusual.serving.app import remove, start
    from unusual.serving.fastpath import is_on

    from unusual.config import ServeConfig

    if not is_on():
        pytest.skip("replica loss without failed requests needs the fast path (HAProxy retries)")
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    settings = ServeConfig(models={"ae": bundles[1]["ae"]}, num_cpus=0.1, min_replicas=2, max_replicas=2)
    start(settings, port=port, name="spare", route_prefix="/spare", ready_timeout=120)
    deadline = time.time() + 60
    while time.time() < deadline and len(_replica_pids("spare-ae", "model-ae")) < 2:
        time.sleep(0.5)
    pids = _replica_pids("spare-ae", "model-ae")
    assert len(pids) == 2
    stop, results, resent = threading.Event(), [], []
    pool = load(url, _rows(cardio.slice(0, 5)), stop, results, path="/spare/v1/models/ae/score", resent=resent)
    try:
        time.sleep(2)
        before = len(results)
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(5)
        after = len(results) - before
    finally:
        stop.set()
        for t in pool:
            t.join()
    try:
        assert before > 0 and after > 0, (before, after)
        failed = [r for r in results if r[0] != 200]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
        assert len(resent) <= 6, f"{len(resent)} requests closed without an answer: {resent[:3]}"
    finally:
        remove(settings, "spare")
        assert "spare-ae" not in serve.status().applications


# --------------------------------------------------------------------------- fuzzing

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
_CTYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "", "text/plain",
                           "application/vnd.apache.arrow.stream", "application/vnd.apache.parquet",
                           "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])


def _bodies(cardio: pa.Table):
    row = _rows(cardio.slice(0, 1))[0]
    names = list(row)
    rows_like = st.fixed_dictionaries({"rows": st.lists(
        st.dictionaries(st.sampled_from(names + ["zz", ""]), _JSON, max_size=len(names) + 1), max_size=4)})
    mutated = st.fixed_dictionaries({"rows": st.lists(st.builds(
        lambda k, v: {**row, k: v}, st.sampled_from(names), _JSON), min_size=1, max_size=3)})
    as_json = st.one_of(_JSON, rows_like, mutated).map(lambda d: json.dumps(d).encode())
    return st.one_of(as_json, st.binary(max_size=300),
                     st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n),
                     st.integers(1, 20_000).map(lambda n: b'{"rows":' + b"[" * n))


def _readings(series: pa.Table):
    """Streaming bodies: readings and history of two hosts, some fields replaced by fuzz, times in any order."""
    rows = [{**r, "timestamp": r["timestamp"].isoformat()} for r in _rows(series.slice(0, 30))]
    reading = st.sampled_from(rows)
    broken = st.builds(lambda r, k, v: {**r, k: v}, reading, st.sampled_from(["host", "timestamp", "value", "zz"]),
                       _JSON)
    some = st.lists(st.one_of(reading, broken), max_size=12)
    doc = st.fixed_dictionaries({"rows": some}, optional={"history": some, "late": st.sampled_from(
        ["refuse", "score", "x", None, 3])})
    return doc.map(lambda d: json.dumps(d).encode())


@pytest.mark.parametrize("path", ["/v1/models/ae/score", "/v1/score", "/v1/models/lstm/score", "/v1/jobs",
                                  "/v1/models/lstm/stream", "/v1/models/ae/stream"])
def test_fuzzed_bodies_and_content_types_never_get_a_5xx_or_hang(server, cardio, series, path):
    url, _ = server
    session = requests.Session()
    seen = {}
    bodies = st.one_of(_bodies(cardio), _readings(series)) if path.endswith("/stream") else _bodies(cardio)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, ctype=_CTYPES, extra=st.dictionaries(
        st.sampled_from(["Content-Encoding", "Authorization", "X-Foo", "Accept"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20), max_size=2))
    def check(body, ctype, extra):
        headers = {"Content-Type": ctype, **extra}
        t0 = time.perf_counter()
        try:
            r = session.post(f"{url}{path}", data=body, headers=headers, timeout=20)
        except requests.exceptions.InvalidHeader:  # the client itself refuses to send it: nothing reached us
            return
        except requests.RequestException as e:
            assert "Content-Encoding" in extra, repr(e)
            return
        took = time.perf_counter() - t0
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:300], body[:200], headers)
        assert took < 10, took
        if r.status_code >= 400:
            assert "error" in r.json() or r.status_code in (404, 405), r.text[:300]

    check()
    assert seen, "no request was sent"
