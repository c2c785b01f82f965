"""The replica's batching without Serve: requests that arrive together share one model call, a request
alone is scored at once, a failed call answers each of its requests, bulk bodies go to a thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pyarrow as pa
import pytest
from unusual.serving.handling import Batcher


def _table(rows: int, start: float = 0.0) -> pa.Table:
    return pa.table({"x": [start + i for i in range(rows)]})


class Recorder:
    def __init__(self, fail: bool = False):
        self.calls: list[list[int]] = []
        self.threads: list[str] = []
        self.fail = fail

    def many(self, tables):
        self.calls.append([t.num_rows for t in tables])
        if self.fail:
            raise RuntimeError("the model failed")
        return [t.append_column("score", pa.array([v * 2 for v in t.column("x").to_pylist()])) for t in tables]

    def one(self, table):
        self.threads.append(threading.current_thread().name)
        return self.many([table])[0]


def test_requests_that_arrive_together_share_one_call_and_each_gets_its_rows():
    rec = Recorder()
    batcher = Batcher(rec.many, rec.one, max_batch_size=64)

    async def main():
        return await asyncio.gather(*(batcher(_table(i + 1, start=100 * i)) for i in range(10)))

    outs = asyncio.run(main())
    assert rec.calls == [list(range(1, 11))]
    for i, out in enumerate(outs):
        assert out.column("x").to_pylist() == [100 * i + j for j in range(i + 1)]
        assert out.column("score").to_pylist() == [2 * (100 * i + j) for j in range(i + 1)]


def test_max_batch_size_splits_calls_and_a_lone_request_does_not_wait():
    rec = Recorder()
    batcher = Batcher(rec.many, rec.one, max_batch_size=4)

    async def main():
        await asyncio.gather(*(batcher(_table(1)) for _ in range(10)))
        t0 = time.perf_counter()
        await batcher(_table(1))
        return time.perf_counter() - t0

    alone = asyncio.run(main())
    assert rec.calls == [[1] * 4, [1] * 4, [1] * 2, [1]]
    assert alone < 0.05  # no batching window: one turn of the event loop


def test_a_failed_call_answers_each_request_with_its_error():
    rec = Recorder(fail=True)
    batcher = Batcher(rec.many, rec.one, max_batch_size=64)

    async def main():
        return await asyncio.gather(*(batcher(_table(2)) for _ in range(3)))

    outs = asyncio.run(main())
    assert len(outs) == 3 and all(isinstance(o, RuntimeError) and str(o) == "the model failed" for o in outs)


def test_a_bulk_body_is_scored_in_a_thread_beside_the_batches():
    rec = Recorder()
    batcher = Batcher(rec.many, rec.one, max_batch_size=64, thread_rows=100)

    async def main():
        return await asyncio.gather(batcher(_table(150)), batcher(_table(3)))

    big, small = asyncio.run(main())
    assert big.num_rows == 150 and small.num_rows == 3
    assert rec.threads and rec.threads[0] != threading.main_thread().name
    assert sorted(rec.calls) == [[3], [150]]


def test_json_integers_beyond_int64_are_floats_and_beyond_float64_a_422():
    """Found by the HTTP fuzz test in CI: {"x": 9223372036854775808} was a 500 (Arrow's int64 overflow)."""
    from unusual.serving.codec import RequestError, body_to_table

    table, _ = body_to_table(b'{"rows":[{"a":null,"x":9223372036854775808},{"a":1,"x":2}]}', "application/json")
    assert table.column("x").to_pylist() == [9223372036854775808.0, 2.0]
    with pytest.raises(RequestError) as e:
        body_to_table(b'{"rows":[{"x":' + b"9" * 400 + b"}]}", "application/json")
    assert e.value.status == 422 and str(e.value) == "column 'x' holds a number too large for a float64"
