"""A model replica's request handling without Serve, on a real bundle: the batch of requests that
arrived together (one model call, each request its own rows, a swap mid-batch), the fast path of
JSON bodies of numbers (the same answer as the general path, and no answer of its own for anything
else), and the JSON edge cases found by the HTTP fuzz test."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from unusual.models import Detector, Scorer
from unusual.ray_jobs import sample_data
from unusual.serving import handling
from unusual.serving.codec import RequestError, body_to_table, numeric_rows


class Sink:
    """``ray.serve.metrics`` stand-in that keeps what is observed (the replica's metrics outside Serve)."""

    seen: list = []

    class Counter:
        def __init__(self, name, *_, **__):
            self.name = name

        def inc(self, value=1, tags=None):
            Sink.seen.append((self.name, value))

    class Histogram(Counter):
        def observe(self, value, tags=None):
            Sink.seen.append((self.name, value))


@pytest.fixture(scope="module")
def cardio():
    return sample_data.load("cardio").drop_columns(["label"])


@pytest.fixture(scope="module")
def scorers(cardio, tmp_path_factory):
    root = tmp_path_factory.mktemp("handling")
    out = []
    for seed in (0, 1):
        Detector("ae", epochs=1, seed=seed).fit(cardio.slice(0, 600)).save(root / f"ae{seed}")
        out.append(Scorer(str(root / f"ae{seed}"), stream=False))
    return out


def _metrics():
    Sink.seen.clear()
    return handling.ModelMetrics(Sink, "ae")


def test_a_batch_is_one_model_call_per_scorer_and_each_request_gets_its_rows(scorers, cardio):
    a, b = scorers
    xs = [a.transform(cardio.slice(10 * i, i + 1)) for i in range(4)]
    metrics = _metrics()
    out = handling.score_batch([(a, xs[0]), (a, xs[1]), (b, xs[2]), (a, xs[3])], metrics)
    assert [n for name, n in Sink.seen if name == "unusual_batch_rows"] == [1 + 2 + 4, 3]  # a's call, then b's
    for (scores, terms), x, scorer in zip(out, xs, (a, a, b, a)):
        want_scores, want_terms = scorer.score_matrix(x)
        assert scores.shape == (len(x),) and terms.shape == want_terms.shape
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-7)
    assert handling.batch_rows([(a, xs[0]), (b, xs[3])]) == 5


def _general(scorer, body: bytes, ctype: str = "application/json") -> handling.Answer:
    async def batched(s, x):
        return handling.score_batch([(s, x)], _metrics())[0]

    async def score(table):
        return await handling.score_table("ae", scorer, table, batched, _metrics())

    return asyncio.run(handling.score_request(body, ctype, name="ae", max_rows=100, score=score))


def _fast(scorer, body: bytes, ctype: str = "application/json") -> handling.Answer | None:
    async def batched(s, x):
        return handling.score_batch([(s, x)], _metrics())[0]

    return asyncio.run(handling.fast_json(body, ctype, name="ae", scorer=scorer, max_rows=100, batched=batched,
                                          metrics=_metrics()))


def _without_seconds(r: handling.Answer) -> tuple:
    doc = json.loads(r.body)
    doc.pop("seconds")
    return r.status, doc, r.media_type, r.headers


def test_the_fast_path_answers_json_rows_of_numbers_as_the_general_path_does(scorers, cardio):
    scorer = scorers[0]
    rows = cardio.slice(0, 7).to_pylist()
    shuffled = [dict(reversed(list(r.items()))) for r in rows]  # any key order
    ints = [{k: int(v) for k, v in r.items()} for r in rows]  # JSON integers
    for body in ({"rows": rows[:1]}, {"rows": rows}, {"rows": shuffled}, {"rows": ints}, {"rows": rows, "x": 1}):
        raw = json.dumps(body).encode()
        fast, general = _fast(scorer, raw), _general(scorer, raw)
        assert fast is not None and fast.status == general.status == 200
        assert _without_seconds(fast) == _without_seconds(general)
    flagged = _fast(scorer, json.dumps({"rows": [{k: 1e9 for k in rows[0]}]}).encode())
    assert json.loads(flagged.body)["rows"][0]["is_anomaly"] is True


@pytest.mark.parametrize(
    "change,status,message",
    [
        (lambda r: {**r, "f00": "1.5"}, 422, "column 'f00' has type string, expected a numeric type"),
        (lambda r: {**r, "f00": None}, 422, "column 'f00' has type null, expected a numeric type"),
        (lambda r: {**r, "f00": True}, 200, None),  # the general path takes a bool for 1 (as Arrow does)
        (lambda r: {k: v for k, v in r.items() if k != "f00"}, 422, "missing column(s) ['f00']"),
        (lambda r: {**r, "id": 3}, 422, "unexpected column(s) ['id']"),
    ],
)
def test_anything_else_is_left_to_the_general_path(scorers, cardio, change, status, message):
    scorer = scorers[0]
    body = json.dumps({"rows": [change(cardio.slice(0, 1).to_pylist()[0])]}).encode()
    assert _fast(scorer, body) is None
    r = _general(scorer, body)
    assert r.status == status, r
    assert message is None or json.loads(r.body)["error"].startswith(message), r


def test_numeric_rows_takes_only_rows_of_exactly_the_columns_as_numbers():
    names = ["a", "b"]
    assert numeric_rows(b'{"rows":[{"b":1,"a":2.5}]}', names, 10).tolist() == [[2.5, 1.0]]
    for body in (b'{"rows":[{"a":NaN,"b":1}]}', b'{"rows":[]}', b'{"rows":[{"a":1}]}', b'[1]', b"\xff", b"{",
                 b'{"rows":[{"a":1,"b":' + b"9" * 400 + b"}]}", b'{"rows":[{"a":1,"b":2},{"a":1,"b":2}]}'):
        assert numeric_rows(body, names, 1) is None, body
    assert numeric_rows(b'{"rows":[{"a":1,"b":2},{"a":1,"b":2}]}', names, 2).shape == (2, 2)


def test_json_integers_beyond_int64_are_floats_and_beyond_float64_a_422():
    """Found by the HTTP fuzz test in CI: {"x": 9223372036854775808} was a 500 (Arrow's int64 overflow)."""
    table, _ = body_to_table(b'{"rows":[{"a":null,"x":9223372036854775808},{"a":1,"x":2}]}', "application/json")
    assert table.column("x").to_pylist() == [9223372036854775808.0, 2.0]
    with pytest.raises(RequestError) as e:
        body_to_table(b'{"rows":[{"x":' + b"9" * 400 + b"}]}", "application/json")
    assert e.value.status == 422 and str(e.value) == "column 'x' holds a number too large for a float64"
