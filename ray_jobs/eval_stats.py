"""The evaluation's statistics of scored data, summarised per block and merged with Ray Data's
aggregation API (:class:`unusual.ray_jobs.aggregates.MergeAggregate`).

1. :func:`summarise`: one :class:`ScoreSummary` of every row (counts, a reservoir sample
   and the range of the scores, the model's flagged / unflagged score range, the model
   versions, how often each feature is among the rows' ``top_features``: :class:`TopFeatures`);
   :func:`bin_edges` puts the histogram bins at the sample's quantiles.
2. :func:`histogram`: one :class:`unusual.models.metrics.ScoreHistogram` of the labelled
   scores over those edges.
3. :func:`series_histograms`: the same as scored and point-adjusted. Rows are grouped by
   entity (one group without an entity column, one task) and sorted by time; each
   contiguous run of positive labels gets its maximum score
   (:func:`unusual.models.metrics.adjusted_scores`) and the model's flags are
   point-adjusted. The groups' rows, with their adjusted scores and flags, are then
   histogrammed and merged like any other rows. Each entity's series with both classes also
   gets its VUS-PR and VUS-ROC (:func:`unusual.models.vus.vus`); their sums and count are merged
   (:class:`VusSums`) into TSB-AD's mean over series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..models.columns import as_float
from ..models.metrics import ScoreHistogram, adjusted_scores, label_segments, point_adjust, quantile_edges
from ..models.stats import NumStats
from ..models.tables import TOP_FEATURE_TYPE
from ..models.vus import vus
from .aggregates import MergeAggregate, aggregate, merged

SCORE, FLAG, VERSION, TOP = "anomaly_score", "is_anomaly", "model_version", "top_features"
# columns of the labelled series rows (point adjustment)
LABEL = "__label__"


def _bools(col) -> np.ndarray:
    return np.asarray(pc.fill_null(col, False).to_numpy(zero_copy_only=False), bool)


def _labels(col) -> tuple[np.ndarray, np.ndarray]:
    """(has a label, is positive) per row: positive = true / non-zero; null or NaN = no label."""
    if pa.types.is_boolean(col.type):
        valid = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), bool)
        return valid, _bools(col) & valid
    v = as_float(col)
    valid = ~np.isnan(v)
    return valid, valid & (v != 0)


def _rows(batch: pa.Table, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(score, is positive, is_anomaly, has a label, has a score) per row."""
    score = as_float(batch.column(SCORE))
    valid, pos = _labels(batch.column(label))
    return score, pos, _bools(batch.column(FLAG)), valid, ~np.isnan(score)


# --------------------------------------------------------------------------- pass 1: the summary


@dataclass
class TopFeatures:
    """Mergeable counts of the features the scorer named in the rows' ``top_features`` (their
    top-k attributions): per feature, the rows it is among the top-k of, the sum of its
    contributions there and the flagged rows among them."""

    rows: int = 0  # rows with top features
    flagged: int = 0  # of which the model flagged
    counts: dict = field(default_factory=dict)  # feature -> (rows, contribution sum, flagged rows)

    @classmethod
    def of(cls, col, flag: np.ndarray) -> TopFeatures:
        """The counts of one block's ``top_features`` column, ``flag`` its rows' ``is_anomaly``."""
        listed = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), bool)
        lengths = np.asarray(pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False), np.int64)
        flat = pc.list_flatten(col)
        entries = pa.table(
            {
                "feature": pc.struct_field(flat, "feature"),
                "contribution": pc.struct_field(flat, "contribution"),
                "flagged": np.repeat(flag.astype(np.int64), lengths),
            }
        )
        g = entries.group_by("feature").aggregate([("flagged", "count"), ("contribution", "sum"), ("flagged", "sum")])
        cols = (g.column(k).to_pylist() for k in ("feature", "flagged_count", "contribution_sum", "flagged_sum"))
        counts = {name: (n, c or 0.0, f) for name, n, c, f in zip(*cols) if name is not None}
        return cls(int(listed.sum()), int((listed & flag).sum()), counts)

    def merge(self, o: TopFeatures) -> TopFeatures:
        counts = dict(self.counts)
        for name, (n, c, f) in o.counts.items():
            n0, c0, f0 = counts.get(name, (0, 0.0, 0))
            counts[name] = (n0 + n, c0 + c, f0 + f)
        return TopFeatures(self.rows + o.rows, self.flagged + o.flagged, counts)

    def ranked(self, n: int = 10) -> list[dict]:
        """The ``n`` features with the largest contribution to the scores, summed over every row
        they are among the top-k of: the feature, those rows (count and share), the flagged rows
        among them (count and share of the flagged rows) and the mean contribution."""
        order = sorted(self.counts.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))
        return [
            {
                "feature": name,
                "rows": rows,
                "share": rows / self.rows if self.rows else math.nan,
                "flagged": flagged,
                "flagged_share": flagged / self.flagged if self.flagged else math.nan,
                "mean_contribution": total / rows if rows else math.nan,
            }
            for name, (rows, total, flagged) in order[:n]
        ]


@dataclass
class ScoreSummary:
    """Mergeable counts of scored rows and statistics of their labelled scores."""

    rows: int = 0
    no_label: int = 0
    no_score: int = 0
    positives: int = 0
    negatives: int = 0
    posinf: int = 0
    neginf: int = 0
    flag_min: float = math.inf  # smallest score the model flagged
    unflag_max: float = -math.inf  # largest score it did not
    versions: set = field(default_factory=set)
    stats: NumStats = field(default_factory=NumStats)  # of the finite labelled scores
    top: TopFeatures = field(default_factory=TopFeatures)  # of every row's top_features

    @classmethod
    def of(cls, batch: pa.Table, label: str) -> ScoreSummary:
        score, pos, flag, valid, scored = _rows(batch, label)
        use = valid & scored
        s = score[use]
        out = cls(
            rows=batch.num_rows,
            no_label=int((~valid).sum()),
            no_score=int((~scored).sum()),
            positives=int(pos[use].sum()),
            negatives=int((~pos[use]).sum()),
            posinf=int(np.isposinf(s).sum()),
            neginf=int(np.isneginf(s).sum()),
            stats=NumStats.of(s, np.random.default_rng(0)),
        )
        if (flag & scored).any():
            out.flag_min = float(score[flag & scored].min())
        if (~flag & scored).any():
            out.unflag_max = float(score[~flag & scored].max())
        if VERSION in batch.column_names:
            out.versions = {v for v in pc.unique(batch.column(VERSION)).to_pylist() if v is not None}
        if TOP in batch.column_names and batch.schema.field(TOP).type.equals(TOP_FEATURE_TYPE):
            out.top = TopFeatures.of(batch.column(TOP), flag)
        return out

    def merge(self, o: ScoreSummary) -> ScoreSummary:
        return ScoreSummary(
            self.rows + o.rows,
            self.no_label + o.no_label,
            self.no_score + o.no_score,
            self.positives + o.positives,
            self.negatives + o.negatives,
            self.posinf + o.posinf,
            self.neginf + o.neginf,
            min(self.flag_min, o.flag_min),
            max(self.unflag_max, o.unflag_max),
            self.versions | o.versions,
            self.stats.merge(o.stats),
            self.top.merge(o.top),
        )


def summarise(ds, label: str) -> ScoreSummary:
    """The :class:`ScoreSummary` of a Ray Dataset of scores (an empty one without rows)."""
    return merged(ds, partial(ScoreSummary.of, label=label)) or ScoreSummary()


def bin_edges(summary: ScoreSummary, bins: int) -> tuple[np.ndarray, bool]:
    """Bin edges from the merged sample; exact when the sample holds every finite score."""
    st = summary.stats
    exact = st.count == st.sample.size
    if st.count == 0:
        base = np.empty(0)
    elif exact:
        base = np.unique(st.sample)
    else:
        base = quantile_edges(st.sample, bins, st.min, st.max)
    parts = [[-math.inf]] if summary.neginf else []
    parts += [base]
    parts += [[math.inf]] if summary.posinf else []
    return np.concatenate(parts).astype(np.float64), bool(exact)


# --------------------------------------------------------------------------- pass 2: histograms


def _block_histogram(batch: pa.Table, label: str, edges: np.ndarray) -> ScoreHistogram:
    score, pos, flag, valid, scored = _rows(batch, label)
    use = valid & scored
    return ScoreHistogram.of(score[use], pos[use], edges, pred=flag[use])


def histogram(ds, label: str, edges: np.ndarray) -> ScoreHistogram:
    """The histogram of the labelled scores of a Ray Dataset of scores."""
    return merged(ds, partial(_block_histogram, label=label, edges=edges))


def _series_rows(batch: pa.Table, label: str, entity: str | None, time: str) -> pa.Table:
    """The labelled, scored rows, with only what point adjustment needs (less to shuffle)."""
    score, pos, flag, valid, scored = _rows(batch, label)
    use = np.flatnonzero(valid & scored)
    cols = {c: batch.column(c).take(pa.array(use)) for c in (entity, time) if c}
    return pa.table({**cols, SCORE: score[use], LABEL: pos[use], FLAG: flag[use]})


def _point_adjusted(group: pa.Table, entity: str | None, time: str, edges: np.ndarray, vus_window: int) -> pa.Table:
    """One group of :func:`_series_rows` (each entity's rows sorted by time) -> one row holding its two
    histograms, as scored and point-adjusted, and its :class:`VusSums`, as plain numbers
    (:func:`_histogram_row`): what leaves the group task is two histograms and three numbers, never its rows."""
    keys = [(entity, "ascending")] if entity else []
    order = pc.sort_indices(group, sort_keys=[*keys, (time, "ascending")])  # stable
    group = group.take(order)
    score = as_float(group.column(SCORE))
    pos = _bools(group.column(LABEL))
    flag = _bools(group.column(FLAG))
    bounds = [0, group.num_rows]
    if entity and group.num_rows:
        # Ray hands over one entity per group; still, each entity is its own series, never joined to the next
        ent = group.column(entity).combine_chunks()
        codes = pc.dictionary_encode(ent, null_encoding="encode").indices.to_numpy(zero_copy_only=False)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1, [len(codes)]])
    adj, pa_flag = np.empty_like(score), np.empty_like(flag)
    segments = 0
    sums = VusSums()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            adj[a:b] = adjusted_scores(score[a:b], pos[a:b])
            pa_flag[a:b] = point_adjust(flag[a:b], pos[a:b])
            segments += len(label_segments(pos[a:b]))
            sums = sums.merge(VusSums.of(pos[a:b], score[a:b], vus_window))
    raw = ScoreHistogram.of(score, pos, edges, flag)
    adjusted = ScoreHistogram.of(adj, pos, edges, pa_flag)
    adjusted.segments = segments
    return pa.table({**_histogram_row(raw, "raw_"), **_histogram_row(adjusted, "pa_"), **sums.row()})


_VUS_COLUMNS = ("vus_pr_sum", "vus_roc_sum", "vus_series")


@dataclass
class VusSums:
    """Mergeable sums of the VUS-PR and VUS-ROC of entity series (TSB-AD reports their mean over series).
    A series counts when it has both classes: without an anomaly the surfaces are undefined, and
    without a normal row so is the false-positive rate of VUS-ROC."""

    pr: float = 0.0
    roc: float = 0.0
    series: int = 0

    @classmethod
    def of(cls, label: np.ndarray, score: np.ndarray, window: int) -> VusSums:
        """One series' VUS (its rows in time order), or nothing when it lacks a class."""
        if label.all() or not label.any():
            return cls()
        v = vus(label, score, window=window)
        return cls(v["vus_pr"], v["vus_roc"], 1)

    def merge(self, o: VusSums) -> VusSums:
        return VusSums(self.pr + o.pr, self.roc + o.roc, self.series + o.series)

    def row(self) -> dict:
        """As one row of numeric columns, beside :func:`_histogram_row`'s."""
        pr, roc, series = _VUS_COLUMNS
        return {
            pr: pa.array([self.pr], pa.float64()),
            roc: pa.array([self.roc], pa.float64()),
            series: pa.array([self.series], pa.int64()),
        }

    @classmethod
    def of_rows(cls, block: pa.Table) -> VusSums:
        """The sum of the :meth:`row` rows of a block."""
        total = [pc.sum(block.column(c)).as_py() if block.num_rows else None for c in _VUS_COLUMNS]
        return cls(float(total[0] or 0.0), float(total[1] or 0.0), int(total[2] or 0))

    def means(self) -> tuple[float, float]:
        """(VUS-PR, VUS-ROC) averaged over the series; NaN without one."""
        if not self.series:
            return math.nan, math.nan
        return self.pr / self.series, self.roc / self.series


_BIN_COUNTS = ("pos", "neg")
_TOTALS = ("tp", "fp", "fn", "tn", "segments")


def _histogram_row(h: ScoreHistogram, prefix: str) -> dict:
    """A histogram as one row of numeric columns (its bins as lists), to travel between Ray tasks."""
    row = {f"{prefix}{k}": pa.array([getattr(h, k)], pa.list_(pa.int64())) for k in _BIN_COUNTS}
    return row | {f"{prefix}{k}": pa.array([int(getattr(h, k))], pa.int64()) for k in _TOTALS}


def _histogram_of_rows(block: pa.Table, prefix: str, edges: np.ndarray) -> ScoreHistogram:
    """The sum of the :func:`_histogram_row` rows of a block."""
    h = ScoreHistogram.empty(edges)
    if block.num_rows:
        for k in _BIN_COUNTS:
            flat = pc.list_flatten(block.column(f"{prefix}{k}")).to_numpy(zero_copy_only=False)
            setattr(h, k, flat.reshape(block.num_rows, edges.size).sum(axis=0).astype(np.int64))
        for k in _TOTALS:
            setattr(h, k, int(pc.sum(block.column(f"{prefix}{k}")).as_py() or 0))
    return h


def series_histograms(
    ds,
    label: str,
    entity: str | None,
    time: str,
    edges: np.ndarray,
    partitions: int | None = None,
    vus_window: int = 100,
) -> tuple[ScoreHistogram, ScoreHistogram, VusSums]:
    """The histograms of the labelled scores, as scored and point-adjusted per entity in time order, and
    the sums of the entity series' VUS with a buffer of up to ``vus_window`` rows
    (``partitions``: of the shuffle by entity)."""
    kwargs = {"label": label, "entity": entity, "time": time}
    rows = ds.map_batches(_series_rows, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs)
    # Without an entity column the whole series is one group (one task, like LSTM windowing in training).
    groups = rows.groupby(entity, num_partitions=partitions if entity else None).map_groups(
        _point_adjusted,
        batch_format="pyarrow",
        fn_kwargs={"entity": entity, "time": time, "edges": edges, "vus_window": vus_window},
    )
    out = aggregate(
        groups,
        MergeAggregate("hist", partial(_histogram_of_rows, prefix="raw_", edges=edges)),
        MergeAggregate("pa_hist", partial(_histogram_of_rows, prefix="pa_", edges=edges)),
        MergeAggregate("vus", VusSums.of_rows),
    )
    return out["hist"], out["pa_hist"], out["vus"] or VusSums()
