"""Streaming over real HTTP on a local Serve: ``POST /v1/models/<name>/stream`` of a causal LSTM.

In order: the order and input rules on one replica; scaling out to two replicas keeps most entities on
their replica (the others warm up again); real series streamed one reading per request over two
replicas equal the batch scores; a replica killed under streaming load fails no request, and the
entities it held warm up, then score again; past ``stream_entities`` the least recently sent entities
are evicted, and Prometheus counts them."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import requests
from test_serve import _replica_pids
from unusual.models import Detector
from unusual.ray_jobs import sample_data

from unusual.runtime import free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SERIES = ("nab_ec2_request_latency", "nab_machine_temperature")
WINDOW = 8
APP, DEPLOYMENT = "st-lstm", "stream-lstm"
LIMIT = 400  # entities per stream replica: the tests before the last hold fewer


def nab(start: int, stop: int, names=SERIES) -> pa.Table:
    parts = []
    for host, name in zip(names, SERIES):
        t = sample_data.load(name).drop_columns(["label"]).slice(start, stop - start)
        parts.append(t.append_column("host", pa.array([host] * t.num_rows)))
    return pa.concat_tables(parts)


def as_json(table: pa.Table) -> list[dict]:
    return [{**r, "timestamp": r["timestamp"].isoformat()} for r in table.to_pylist()]


@pytest.fixture(scope="module")
def det():
    return Detector("lstm", entity_column="host", time_column="timestamp", window=WINDOW, epochs=1,
                    score_lookahead=0, seed=0, verbose=False).fit(nab(0, 600))


@pytest.fixture(scope="module")
def url(ray_cluster, det, tmp_path_factory):
    from ray import serve
    from unusual.serving.app import start

    from unusual.config import ServeConfig

    path = str(tmp_path_factory.mktemp("stream") / "lstm")
    det.save(path)
    settings = ServeConfig(models={"lstm": path}, num_cpus=0.1, min_replicas=1, max_replicas=2,
                           target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=600,
                           max_body_bytes=2_000_000, max_rows=4_000, stream_entities=LIMIT)
    url = start(settings, port=free_port(), name="st", route_prefix="/", ready_timeout=180)
    try:
        yield url
    finally:
        serve.shutdown()


def stream(url: str, rows: list[dict] | None = None, history: list[dict] | None = None, **extra) -> requests.Response:
    body = {**({"rows": rows} if rows is not None else {}), **({"history": history} if history else {}), **extra}
    return requests.post(f"{url}/v1/models/lstm/stream", json=body, timeout=60)


def running() -> int:
    from ray import serve

    d = serve.status().applications[APP].deployments[DEPLOYMENT]
    return d.replica_states.get("RUNNING", 0)


# --------------------------------------------------------------------------- one replica


def test_order_and_input_rules(url, det):
    need = det.scorer_.bundle.module.context_length  # the forecasting LSTM: the window and the reading
    host = nab(1000, 1030, names=("rules", "other"))
    rows = as_json(host.slice(0, 12))  # 12 readings of entity "rules"
    first = stream(url, rows)
    assert first.status_code == 200, first.text
    statuses = [r["status"] for r in first.json()["rows"]]
    assert statuses == ["warming"] * (need - 1) + ["scored"] * (13 - need)
    assert first.json()["rows"][0]["message"] == f"warming: 1 of the {need} rows a score needs; {need - 1} more"
    last = rows[-1]
    # an earlier reading: 409 naming the entity and both times; nothing changes
    late = stream(url, [rows[3]])
    assert late.status_code == 409, late.text
    assert late.json()["error"] == (f"late: entity 'rules' reading at {rows[3]['timestamp']} is not after its last "
                                    f"reading at {last['timestamp']}; refused")
    # with late=score: scored against the entity's rows, not kept
    scored_late = stream(url, [rows[3]], late="score")
    assert scored_late.status_code == 200, scored_late.text
    assert [(x["status"], x["score"] is None) for x in scored_late.json()["rows"]] == [("late", False)]
    # the last reading sent again (a retry): its answer again
    again = stream(url, [last])
    assert again.status_code == 200 and again.json()["rows"][0]["status"] == "repeat"
    assert again.json()["rows"][0]["score"] == first.json()["rows"][-1]["score"]
    # the next reading is scored: state was not changed by any of them
    nxt = stream(url, as_json(host.slice(12, 1)))
    assert nxt.status_code == 200 and nxt.json()["rows"][0]["status"] == "scored"
    assert nxt.json()["rows"][0]["have"] == need
    # missing fields: 422 naming them
    no_entity = stream(url, [{k: v for k, v in last.items() if k != "host"}])
    assert (no_entity.status_code, no_entity.json()["error"]) == (422, "rows need the entity column 'host'")
    no_time = stream(url, [{k: v for k, v in last.items() if k != "timestamp"}])
    assert no_time.status_code == 422 and "'timestamp'" in no_time.json()["error"], no_time.text
    null_entity = stream(url, [{**last, "host": None}])
    assert null_entity.status_code == 422 and "'host'" in null_entity.json()["error"]
    assert stream(url, [], late="x").status_code == 422
    bad_late = stream(url, [last], late="later")
    assert (bad_late.status_code, bad_late.json()["error"]) == (422, "late must be one of ['refuse', 'score']; "
                                                                     "got 'later'")
    # limits: 413 for too many rows or bytes
    many = stream(url, as_json(nab(0, 2001, names=("big", "big2"))))
    assert many.status_code == 413 and "4,002 rows is over the limit of 4,000" in many.json()["error"]
    huge = requests.post(f"{url}/v1/models/lstm/stream", data=b"{" + b" " * 2_100_000 + b"}", timeout=60)
    assert huge.status_code == 413
    # Arrow in, Arrow out, with the version in the headers
    sink = io.BytesIO()
    table = host.slice(13, 3)
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    arrow = requests.post(f"{url}/v1/models/lstm/stream", data=sink.getvalue(),
                          headers={"Content-Type": "application/vnd.apache.arrow.stream"}, timeout=60)
    assert arrow.status_code == 200 and arrow.headers["X-Model-Version"]
    out = ipc.open_stream(pa.BufferReader(arrow.content)).read_all()
    assert out.column("status").to_pylist() == ["scored"] * 3


def test_history_ends_the_warm_up_at_once(url, det):
    t = nab(2000, 2012, names=("warm", "warm2"))
    first = t.slice(0, 12)
    r = stream(url, as_json(first.slice(WINDOW + 2, 1)), history=as_json(first.slice(0, WINDOW + 2)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["history"] == {"kept": WINDOW + 2, "late": 0}
    (row,) = body["rows"]
    assert row["status"] == "scored"
    want = det.score_table(first.slice(0, WINDOW + 3)).column("anomaly_score")[-1].as_py()
    assert row["score"] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- scaling out


def _warm(url: str, names: list[str], base: pa.Table) -> None:
    """Each entity warmed with ``base`` (a window and two rows of one series): all but its last row as
    history, the last one a reading that must be scored."""
    history, readings = [], []
    for n in names:
        rows = as_json(base.append_column("host", pa.array([n] * base.num_rows)))
        history += rows[:-1]
        readings.append(rows[-1])
    r = stream(url, readings, history=history)
    assert r.status_code == 200, r.text
    assert {x["status"] for x in r.json()["rows"]} == {"scored"}


def _one(table: pa.Table, i: int, entity: str) -> dict:
    return as_json(table.slice(i, 1).append_column("host", pa.array([entity])))[0]


def test_scaling_out_keeps_most_entities_on_their_replica(url):
    assert running() == 1
    names = [f"e{i}" for i in range(300)]
    series = sample_data.load(SERIES[0]).drop_columns(["label"]).slice(3000, WINDOW + 3)
    _warm(url, names, series.slice(0, WINDOW + 2))
    stop, codes = threading.Event(), []

    def load(k: int):  # other entities, one reading per request, until a second replica runs
        t = sample_data.load(SERIES[1]).drop_columns(["label"]).slice(0, 3000)
        rows = as_json(t.append_column("host", pa.array([f"load{k}"] * t.num_rows)))
        for row in rows:
            if stop.is_set():
                return
            try:
                codes.append(stream(url, [row]).status_code)
            except requests.RequestException as e:
                codes.append(repr(e))

    pool = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(6)]
    for t in pool:
        t.start()
    deadline = time.time() + 120
    while time.time() < deadline and running() < 2:
        time.sleep(0.5)
    time.sleep(3)  # every entry replica's router has the new ring
    stop.set()
    for t in pool:
        t.join()
    assert running() == 2, "did not scale to 2 replicas under streaming load"
    assert codes and set(codes) == {200}, [c for c in codes if c != 200][:3]
    r = stream(url, [_one(series, WINDOW + 2, n) for n in names])
    assert r.status_code == 200, r.text
    status = [x["status"] for x in r.json()["rows"]]
    stayed = status.count("scored") / len(names)
    assert set(status) <= {"scored", "warming"}
    assert all(x["have"] == 1 for x in r.json()["rows"] if x["status"] == "warming")  # moved: warming again
    assert 0.4 <= stayed < 1.0, f"{stayed:.0%} of the entities stayed on their replica"


# --------------------------------------------------------------------------- two replicas


def test_streaming_equals_batch_on_real_series(url, det):
    assert running() == 2
    names = ("eq-a", "eq-b")
    t = nab(2500, 2500 + WINDOW + 60, names=names)
    want = det.score_table(t).column("anomaly_score").to_numpy()
    rows = as_json(t)
    n = t.num_rows // 2
    got = {}
    for i in range(n):  # the two series take turns, one reading per request
        for r in (i, n + i):
            res = stream(url, [rows[r]])
            assert res.status_code == 200, res.text
            got[r] = res.json()["rows"][0]
    for r in range(t.num_rows):
        k = r % n
        if k < WINDOW:
            assert got[r]["status"] == "warming" and got[r]["have"] == k + 1
        else:
            assert got[r]["status"] == "scored", got[r]
            assert got[r]["score"] == pytest.approx(want[r], rel=1e-5, abs=1e-8)
            assert got[r]["is_anomaly"] == bool(want[r] > det.threshold_)


def test_a_replica_killed_under_streaming_load_fails_no_request(url):
    """Two replicas; clients stream their entities one reading per request; one replica is SIGKILLed.
    Every request is answered (a connection closed without an answer is sent again, as HTTP lets a
    client do; the reading it carried is then answered ``repeat`` or scored); the entities the killed
    replica held report ``warming`` for at most a window of readings, then score again."""
    pids = _replica_pids(APP, DEPLOYMENT)
    assert len(pids) == 2
    t = sample_data.load(SERIES[1]).drop_columns(["label"]).slice(4000, 1000)
    stop, answers, failures, resent = threading.Event(), [], [], []
    clients = [[f"k{c}-{j}" for j in range(5)] for c in range(6)]
    _warm(url, [e for mine in clients for e in mine], t.slice(0, WINDOW + 2))
    at = [WINDOW + 2] * len(clients)  # each client's next row

    def send(session, c: int) -> None:
        body = [_one(t, at[c], e) for e in clients[c]]
        for attempt in (0, 1):
            try:
                r = session.post(f"{url}/v1/models/lstm/stream", json={"rows": body}, timeout=60)
            except requests.ConnectionError as e:  # closed without an answer: sent again (idempotent)
                if attempt == 0:
                    resent.append(repr(e))
                    continue
                failures.append(repr(e))
                break
            if r.status_code != 200:
                failures.append((r.status_code, r.text[:300]))
            else:
                answers.append((time.time(), c, [x["status"] for x in r.json()["rows"]]))
            break
        at[c] += 1

    def client(c: int):
        session = requests.Session()
        while not stop.is_set() and at[c] < t.num_rows - 20:
            send(session, c)

    pool = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(len(clients))]
    for th in pool:
        th.start()
    time.sleep(3)
    killed = time.time()
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline and len(_replica_pids(APP, DEPLOYMENT)) < 2:
        time.sleep(0.5)
    time.sleep(3)
    stop.set()
    for th in pool:
        th.join()
    assert not failures, f"{len(failures)} requests failed: {failures[:3]}"
    before = [s for when, _, ss in answers if when <= killed for s in ss]
    after = [s for when, _, ss in answers if when > killed for s in ss]
    assert before and set(before) <= {"scored"}
    assert "warming" in after, "no entity warmed up again after its replica was killed"
    need = WINDOW + 1
    session = requests.Session()
    for _ in range(need):  # a window more of readings: every entity scores again
        for c in range(len(clients)):
            send(session, c)
    assert not failures, failures[:3]
    final = [ss for _, c, ss in answers[-len(clients):]]
    assert all(set(ss) == {"scored"} for ss in final), final
    warming = after.count("warming")
    print(f"readings without a full-window score after the kill: {warming} of {len(after)}; resent {len(resent)}")
    # each entity warms at most twice: on the survivor, and on the replacement when it joins the ring
    assert warming <= 2 * sum(map(len, clients)) * need


def test_entities_past_the_limit_evict_the_least_recently_sent(url):
    import ray

    series = sample_data.load(SERIES[0]).drop_columns(["label"]).slice(3500, WINDOW + 3)
    _warm(url, ["old"], series.slice(0, WINDOW + 2))  # a full window, then 3 x LIMIT newer entities
    newer = [f"new{i}" for i in range(3 * LIMIT)]  # each replica gets more than LIMIT of them
    r = stream(url, history=[_one(series, 0, n) for n in newer])
    assert r.status_code == 200 and r.json()["history"] == {"kept": len(newer), "late": 0}, r.text[:300]
    (row,) = stream(url, [_one(series, WINDOW + 2, "old")]).json()["rows"]
    assert (row["status"], row["have"]) == ("warming", 1), row  # evicted: its rows are gone
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        held = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                if x.startswith("ray_unusual_stream_entities{") and 'model="lstm"' in x]
        evicted = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                   if x.startswith("ray_unusual_stream_evictions_total{") and 'model="lstm"' in x]
        if held and sum(evicted) >= len(newer) - 2 * LIMIT:
            break
        time.sleep(2)
    assert held and max(held) <= LIMIT, held
    assert sum(evicted) >= len(newer) - 2 * LIMIT, evicted  # the new ones alone overflow two replicas
