"""Streaming scoring of a sequence model without Serve (unusual.serving.stream): real series streamed
one reading at a time, or many entities per call, answer exactly the causal batch score of each row;
warm-up, late readings, refused calls, eviction, idle expiry and the memory an entity costs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from unusual.models import Detector, SchemaError
from unusual.ray_jobs.sample_data import load
from unusual.serving.stream import StreamAnswer, StreamError, StreamState

torch.set_num_threads(1)  # tiny models: faster on one thread than two fighting for two cores

SERIES = ("nab_ec2_request_latency", "nab_machine_temperature")  # the demo's two hosts
WINDOW = 16
TINY = {"entity_column": "host", "time_column": "timestamp", "window": WINDOW, "hidden": 16, "seed": 0,
        "verbose": False}
SMD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "timeseries" / "smd"
SMD_MACHINES = ("machine-1-2", "machine-2-1")


def nab(start: int, stop: int) -> pa.Table:
    """Rows start..stop of both NAB series, one after the other: host, timestamp, value."""
    parts = []
    for name in SERIES:
        t = load(name).drop_columns(["label"]).slice(start, stop - start)
        parts.append(t.append_column("host", pa.array([name] * t.num_rows)))
    return pa.concat_tables(parts)


def interleaved(table: pa.Table, key: str = "host") -> list[int]:
    """Row numbers taking each entity's next row in turn (the entities' rows are each in time order)."""
    per = [np.flatnonzero(pc.equal(table.column(key), v).to_numpy(zero_copy_only=False))
           for v in pc.unique(table.column(key)).to_pylist()]
    return [int(r) for i in range(max(map(len, per))) for p in per if i < len(p) for r in [p[i]]]


def snapshot(state: StreamState) -> tuple:
    snap = state.snapshot()
    return ({k: (c, t, rows.tobytes()) for k, (c, t, rows) in snap.items()}, list(snap), state.evictions,
            state.memory_bytes())


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def causal():
    """A causal LSTM (``score_lookahead=0``) on the first 1,500 rows of each series, and 300 later rows
    of each (the model flags rows of the second in them) with their batch scores."""
    det = Detector("lstm", epochs=2, score_lookahead=0, **TINY).fit(nab(0, 1500))
    test = nab(2200, 2500)
    return det, test, det.score_table(test)


@pytest.fixture(scope="module")
def streamed(causal):
    """Both series streamed one reading at a time, taking turns: each row's answer (by row number)."""
    det, test, _ = causal
    state = StreamState(det.scorer_)
    got, t0 = {}, time.perf_counter()
    for r in interleaved(test):
        (got[r],) = state.score(test.slice(r, 1)).rows
    return got, (time.perf_counter() - t0) / test.num_rows, state


def test_one_reading_at_a_time_gives_each_row_its_causal_batch_score(causal, streamed):
    det, test, batch = causal
    got, per_reading, state = streamed
    need = WINDOW + 1  # forecast: the window and the row itself
    assert state.need == need and state.entities == 2
    want = batch.column("anomaly_score").to_numpy()
    flags = batch.column("is_anomaly").to_pylist()
    tops = batch.column("top_features").to_pylist()
    hosts = np.array(test.column("host").to_pylist())
    position = {int(r): i for h in SERIES for i, r in enumerate(np.flatnonzero(hosts == h))}  # in its series
    scored = [r for r, a in got.items() if a.status == "scored"]
    for r, a in got.items():
        i = position[r]
        if i < need - 1:  # exactly the first need - 1 readings of each entity warm up
            assert (a.status, a.score, a.have, a.need) == ("warming", None, i + 1, need), r
            assert f"{need - i - 1} more" in a.message
        else:
            assert (a.status, a.have, a.need, a.message) == ("scored", need, need, None), r
    assert len(scored) == test.num_rows - 2 * (need - 1)
    s = np.array([got[r].score for r in scored])
    diff = np.abs(s - want[scored])
    print(f"\n{len(scored)} streamed scores vs batch: max abs diff {diff.max():.3g}, max rel "
          f"{(diff / np.abs(want[scored])).max():.3g}; {per_reading * 1e3:.2f} ms per reading")
    np.testing.assert_allclose(s, want[scored], rtol=1e-5, atol=1e-9)
    assert [got[r].is_anomaly for r in scored] == [flags[r] for r in scored]
    assert any(flags[r] for r in scored)  # the anomalies are in the stream
    for r in scored:
        assert [f["feature"] for f in got[r].top_features] == [f["feature"] for f in tops[r]]
    assert got[scored[0]].entity in SERIES and got[scored[0]].time == test.column("timestamp")[scored[0]].as_py()


def test_a_call_of_many_entities_scores_in_one_model_call(causal, monkeypatch):
    det, test, batch = causal
    want = batch.column("anomaly_score").to_numpy()
    state = StreamState(det.scorer_)
    module = det.scorer_.bundle.module
    calls = []
    real = module.score_terms
    monkeypatch.setattr(module, "score_terms", lambda x: calls.append(tuple(x.shape)) or real(x))
    rows = np.array(interleaved(test))
    rng = np.random.default_rng(0)
    scored = {}
    for chunk in np.array_split(rows, 15):  # 40 readings, 20 of each entity, sent in no order
        chunk = rng.permutation(chunk)
        before = len(calls)
        answer = state.score(test.take(pa.array(chunk)))
        assert len(calls) - before == (1 if answer.count("scored") else 0)
        scored.update({int(r): a.score for r, a in zip(chunk, answer.rows) if a.status == "scored"})
        assert [a.time for a in answer.rows] == test.column("timestamp").take(pa.array(chunk)).to_pylist()
    assert calls[0] == (2 * 20 - 2 * WINDOW, WINDOW + 1, 1)  # the first call: each entity's 4 rows past warm-up
    assert len(scored) == test.num_rows - 2 * WINDOW
    keys = np.array(sorted(scored))
    np.testing.assert_allclose([scored[r] for r in keys], want[keys], rtol=1e-5, atol=1e-9)


def test_warm_history_ends_the_warm_up_at_once(causal):
    det, test, batch = causal
    want = batch.column("anomaly_score").to_numpy()
    hosts = np.array(test.column("host").to_pylist())
    first = np.concatenate([np.flatnonzero(hosts == h)[:WINDOW] for h in SERIES])
    state = StreamState(det.scorer_)
    kept = state.warm(test.take(pa.array(first)))
    assert {a.status for a in kept.rows} == {"kept"} and all(a.score is None for a in kept.rows)
    assert max(a.have for a in kept.rows) == WINDOW  # one short of a score
    rest = np.setdiff1d(np.arange(test.num_rows), first)
    answer = state.score(test.take(pa.array(rest)))
    assert answer.count("scored") == rest.size
    np.testing.assert_allclose([a.score for a in answer.rows], want[rest], rtol=1e-5, atol=1e-9)


def test_a_lookahead_bundle_streams_the_trailing_score_the_newest_row_gets_in_batch():
    """With a look-ahead, batch averages each row with the rows after it; a stream answers a row's
    score when it arrives: what batch gives the last row of a series that ends at it."""
    det = Detector("lstm", epochs=1, score_steps=8, **TINY).fit(nab(0, 800))  # look-ahead: 8 (score_steps)
    assert det.bundle_.model_config.score_lookahead == 8
    series = nab(1900, 1960).filter(pc.equal(pc.field("host"), SERIES[1]))
    state = StreamState(det.scorer_)
    got = [state.score(series.slice(i, 1)).rows[0] for i in range(series.num_rows)]
    prefix = np.array([det.score(series.slice(0, i + 1))[-1] for i in range(WINDOW, series.num_rows)])
    stream = np.array([a.score for a in got[WINDOW:]])
    np.testing.assert_allclose(stream, prefix, rtol=1e-5, atol=1e-9)
    centred = det.score(series)[WINDOW:]
    assert not np.allclose(stream[:-8], centred[:-8], rtol=1e-3)  # the look-ahead's scores are not causal


def test_late_readings_are_refused_and_change_nothing(causal):
    det, test, _ = causal
    state = StreamState(det.scorer_)
    host = test.filter(pc.equal(pc.field("host"), SERIES[0]))
    kept = state.score(host.slice(0, 30)).rows[-1]
    before = snapshot(state)
    last, earlier = host.column("timestamp")[29].as_py(), host.column("timestamp")[3].as_py()
    other = host.slice(29, 1).set_column(1, "value", pa.array([host.column("value")[29].as_py() + 1.0]))
    for reading in (other, host.slice(3, 1)):  # the last time again with another value, an earlier one
        (a,) = state.score(reading).rows
        assert (a.status, a.score) == ("late", None)
        t = reading.column("timestamp")[0].as_py()
        assert a.message.startswith(f"late: entity {SERIES[0]!r} reading at {t.isoformat()} "
                                    f"is not after its last reading at {last.isoformat()}")
        assert a.message.endswith("refused") and a.have == WINDOW + 1
        assert snapshot(state) == before
    # the last reading sent again as it was (a retry whose answer was lost): its answer again, nothing changes
    (again,) = state.score(host.slice(29, 1)).rows
    assert (again.status, again.score, again.is_anomaly) == ("repeat", kept.score, kept.is_anomaly)
    assert snapshot(state) == before
    assert earlier < last
    # late="score": scored against the entity's rows as they are, not kept
    (a,) = state.score(host.slice(3, 1), late="score").rows
    assert a.status == "late" and a.score is not None and "not kept" in a.message
    assert snapshot(state) == before
    young = StreamState(det.scorer_)
    young.score(host.slice(0, 5))
    (w,) = young.score(host.slice(3, 1), late="score").rows  # late, and too few rows for a score
    assert (w.status, w.score, w.have) == ("late", None, 6) and "not scored" in w.message  # 5 rows and itself
    ahead = host.slice(3, 1).set_column(0, "timestamp", host.slice(30, 1).column("timestamp"))
    twin = StreamState(det.scorer_)
    twin.score(host.slice(0, 30))
    assert twin.score(ahead).rows[0].score == pytest.approx(a.score, rel=1e-6)  # the same row, on time


def test_readings_of_one_call_are_taken_in_time_order(causal):
    det, test, _ = causal
    host = test.filter(pc.equal(pc.field("host"), SERIES[1])).slice(0, 40)
    state = StreamState(det.scorer_)
    state.score(host.slice(0, 30))
    mixed = pa.concat_tables([host.slice(31, 1), host.slice(30, 1), host.slice(30, 1)])  # later, earlier, again
    a, b, c = state.score(mixed).rows
    assert (a.status, b.status, c.status) == ("scored", "scored", "late")
    # taken in time order, the second copy of row 30 comes after the first (not after row 31)
    assert c.message.endswith(f"its last reading at {host.column('timestamp')[30].as_py().isoformat()}; refused")
    twin = StreamState(det.scorer_)
    twin.score(host.slice(0, 30))
    assert [x.score for x in twin.score(host.slice(30, 2)).rows] == [b.score, a.score]
    assert state.snapshot()[SERIES[1]][0] == 32


@pytest.mark.parametrize("column, value, message", [
    ("host", None, "entity column 'host' has no value at row 1 (1 row(s) in all); every reading needs its entity"),
    ("timestamp", None, "time column 'timestamp' has no value at row 1 (1 row(s) in all)"),
])
def test_a_reading_without_entity_or_time_refuses_the_call(causal, column, value, message):
    det, test, _ = causal
    state = StreamState(det.scorer_)
    state.score(test.slice(0, 20))
    before = snapshot(state)
    rows = test.slice(20, 3)
    values = rows.column(column).to_pylist()
    values[1] = value
    bad = rows.set_column(rows.column_names.index(column), column, pa.array(values, rows.schema.field(column).type))
    with pytest.raises(StreamError, match=re.escape(message)) as e:
        state.score(bad)
    assert isinstance(e.value, ValueError) and e.value.column == column and e.value.rows == [1]
    assert snapshot(state) == before


def test_missing_columns_and_bad_values_refuse_the_call(causal):
    det, test, _ = causal
    state = StreamState(det.scorer_)
    state.score(test.slice(0, 20))
    before = snapshot(state)
    with pytest.raises(StreamError, match="readings need the entity column 'host'"):
        state.score(test.slice(20, 2).drop_columns(["host"]))
    with pytest.raises(SchemaError, match="'value' has NaN/inf/null at row 1"):
        state.score(test.slice(20, 2).set_column(1, "value", pa.array([1.0, float("nan")])))
    with pytest.raises(StreamError, match="cannot be ordered after its last time"):
        state.score(test.slice(20, 1).set_column(0, "timestamp", pa.array(["soon"])))
    with pytest.raises(ValueError, match="late must be one of"):
        state.score(test.slice(20, 1), late="drop")
    assert snapshot(state) == before
    assert state.score(test.slice(0, 0)).rows == []


def named(test: pa.Table, rows, names) -> pa.Table:
    """Rows of the test table as readings of the entities ``names``."""
    t = test.take(pa.array(rows))
    return t.set_column(t.column_names.index("host"), "host", pa.array(names))


def test_least_recently_sent_entities_are_evicted_past_max_entities(causal):
    det, test, _ = causal
    state = StreamState(det.scorer_, max_entities=2)
    state.score(named(test, range(17), ["a"] * 17))
    state.score(named(test, range(17), ["b"] * 17))
    (late,) = state.score(named(test, [0], ["a"])).rows  # refused: does not make "a" recent
    assert late.status == "late"
    state.score(named(test, [17], ["b"]))
    assert (state.entities, state.evictions) == (2, 0)
    (c,) = state.score(named(test, [0], ["c"])).rows
    assert c.status == "warming" and (state.entities, state.evictions) == (2, 1)
    assert set(state.snapshot()) == {"b", "c"}  # "a" was the least recently sent
    (a,) = state.score(named(test, [18], ["a"])).rows  # comes back warming
    assert (a.status, a.have) == ("warming", 1) and set(state.snapshot()) == {"c", "a"}
    many = state.score(named(test, range(5), list("vwxyz")))  # more new entities than room in one call
    assert many.count("warming") == 5 and set(state.snapshot()) == {"y", "z"} and state.evictions == 7


def test_idle_entities_are_dropped_and_the_pool_shrinks(causal):
    det, test, _ = causal
    clock = Clock()
    state = StreamState(det.scorer_, idle_seconds=60, clock=clock)
    names = [f"e{i}" for i in range(200)]
    state.warm(named(test, np.repeat(np.arange(WINDOW), 200), names * WINDOW))
    assert state.entities == 200
    big = state.memory_bytes()
    clock.now += 30
    state.score(named(test, [WINDOW], ["e0"]))  # e0 is scored and stays fresh
    clock.now += 40  # the others: 70 s idle
    assert state.entities == 200  # dropped lazily, on a call
    (a,) = state.score(named(test, [WINDOW], ["e1"])).rows
    assert (a.status, a.have) == ("warming", 1)  # came back warming
    assert set(state.snapshot()) == {"e0", "e1"} and state.evictions == state.expired == 199
    assert state.memory_bytes() < big / 10
    clock.now += 61
    assert state.expire() == 2 and state.entities == 0


def check_memory(det, test: pa.Table, key: str, entities: int = 300) -> float:
    state = StreamState(det.scorer_)
    rows = np.arange(WINDOW + 5)
    state.warm(named_as(test, key, np.repeat(rows, entities), [f"e{i}" for i in range(entities)] * len(rows)))
    ring = WINDOW * state.width * 4  # the rows kept: the window before the next reading, float32
    per = state.memory_bytes() / state.entities
    assert state.entities == entities and ring <= per <= 2 * ring + 512, (per, ring)
    return per


def named_as(test: pa.Table, key: str, rows, names) -> pa.Table:
    t = test.take(pa.array(rows))
    return t.set_column(t.column_names.index(key), key, pa.array(names))


def test_an_entity_costs_about_its_window(causal):
    det, test, _ = causal
    per = check_memory(det, test, "host")
    print(f"\nNAB (1 feature): {per:.0f} bytes per entity")


@pytest.fixture(scope="module")
def smd():
    """Two SMD machines (38 metrics) as two entities with an integer time: a tiny LSTM, 200 test rows each."""
    if not SMD.is_dir():
        pytest.skip(f"no SMD data at {SMD}")
    train, test = [], []
    for m in SMD_MACHINES:
        d = np.load(SMD / f"{m}.npz")
        for part, rows in ((train, d["train"][:800]), (test, d["test"][1000:1200])):
            cols = {f"m{j}": rows[:, j] for j in range(rows.shape[1])}
            part.append(pa.table({"host": [m] * len(rows), "timestamp": np.arange(len(rows)), **cols}))
    det = Detector("lstm", epochs=1, score_lookahead=0, **TINY).fit(pa.concat_tables(train))
    return det, pa.concat_tables(test)


def test_smd_machines_stream_their_causal_batch_scores_and_cost_their_window(smd):
    det, test = smd
    want = det.score(test)
    state = StreamState(det.scorer_)
    rows = np.array(interleaved(test))
    got = {}
    for chunk in np.array_split(rows, 40):  # 10 readings a call, both machines
        got.update({int(r): a for r, a in zip(chunk, state.score(test.take(pa.array(chunk))).rows)})
    scored = np.array(sorted(r for r, a in got.items() if a.status == "scored"))
    assert len(scored) == test.num_rows - 2 * WINDOW and state.width == 38
    s = np.array([got[r].score for r in scored])
    diff = np.abs(s - want[scored])
    print(f"\nSMD: max abs diff {diff.max():.3g}, max rel {(diff / np.abs(want[scored])).max():.3g}")
    np.testing.assert_allclose(s, want[scored], rtol=1e-5, atol=1e-9)
    per = check_memory(det, test, "host")
    print(f"SMD (38 features): {per:.0f} bytes per entity, ring {WINDOW * 38 * 4}")


def test_answers_as_json_and_table(streamed):
    got, _, state = streamed
    answer = StreamAnswer([got[0], got[len(got) - 1]], state.scorer.version, state.scorer.threshold)
    doc = json.loads(json.dumps(answer.to_json()))
    assert doc["model_version"] == state.scorer.version and len(doc["rows"]) == 2
    assert doc["rows"][0]["status"] == "warming" and doc["rows"][0]["time"] == got[0].time.isoformat()
    assert doc["rows"][1]["status"] == "scored" and doc["rows"][1]["top_features"][0]["feature"] == "value"
    table = answer.to_table()
    assert table.column_names == ["entity", "time", "status", "anomaly_score", "is_anomaly", "top_features",
                                  "have", "need", "message"]
    assert table.column("anomaly_score").null_count == 1 and pa.types.is_timestamp(table.schema.field("time").type)
    assert table.schema.metadata[b"model_version"] == state.scorer.version.encode()


def test_row_models_are_refused():
    from unusual.ray_jobs.sample_data import load as sample

    ae = Detector("ae", epochs=1, hidden=[8], verbose=False).fit(sample("cardio").drop_columns(["label"]).slice(0, 300))
    with pytest.raises(ValueError, match="scores rows on their own"):
        StreamState(ae.scorer_)
