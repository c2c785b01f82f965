"""Mergeable statistics reduced with Ray Data's aggregation API.

The jobs summarise data block by block into objects with ``merge(other) -> merged``
(:class:`unusual.models.stats.NumStats` and ``FeatureStats``,
:class:`unusual.models.metrics.ScoreHistogram`, the evaluation's
:class:`unusual.ray_jobs.eval_stats.ScoreSummary`) and need the merge of them all.
:class:`MergeAggregate` is that reduction as an ``AggregateFnV2``: Ray Data summarises
each block where it lies (``aggregate_block``), combines the partial results in its
aggregation tasks (``combine``) and hands the driver one object: the driver never sees
the rows, nor one summary per block.

    stats = merged(ds, summarise)                                  # one pass, one object
    out = aggregate(ds, MergeAggregate("a", f), MergeAggregate("b", g))  # several in one pass: out["a"], out["b"]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
from ray.data.aggregate import AggregateFnV2
from ray.data.block import Block, BlockAccessor


def _no_accumulator() -> None:
    return None


def merge_pair(a: Any, b: Any) -> Any:
    """``a.merge(b)``: the default combination of two partial results."""
    return a.merge(b)


class MergeAggregate(AggregateFnV2):
    """Reduce a dataset to one mergeable object.

    ``summarise(block)`` turns one block (a ``pyarrow.Table``) into a partial result;
    partial results are combined with ``merge(a, b)`` (default ``a.merge(b)``), which
    must be associative: Ray Data combines them in whatever order blocks finish. The
    functions travel to Ray tasks, so they are module-level functions or
    ``functools.partial`` of them. An empty dataset (or one of empty blocks only)
    aggregates to ``None``.
    """

    def __init__(
        self,
        name: str,
        summarise: Callable[[pa.Table], Any],
        merge: Callable[[Any, Any], Any] = merge_pair,
    ):
        self._summarise = summarise
        self._merge = merge
        # ignore_nulls: None is the empty accumulator, never combined
        super().__init__(name, zero_factory=_no_accumulator, on=None, ignore_nulls=True)

    def aggregate_block(self, block: Block) -> Any:
        return self._summarise(BlockAccessor.for_block(block).to_arrow())

    def combine(self, current_accumulator: Any, new: Any) -> Any:
        return self._merge(current_accumulator, new)


def aggregate(ds, *aggs: MergeAggregate) -> dict[str, Any]:
    """Several :class:`MergeAggregate` in one pass over the Ray Dataset ``ds``: their results by name."""
    out = ds.aggregate(*aggs) or {}
    return {agg.name: out.get(agg.name) for agg in aggs}


def merged(ds, summarise: Callable[[pa.Table], Any], merge: Callable[[Any, Any], Any] = merge_pair) -> Any:
    """The merge of ``summarise(block)`` over every block of ``ds`` (``None`` without rows)."""
    return aggregate(ds, MergeAggregate("merged", summarise, merge))["merged"]
