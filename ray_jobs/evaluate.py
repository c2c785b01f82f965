"""Evaluation of batch-scoring output against labels, at scale.

    unusual evaluate --scores s3://bucket/scores/ --label-column label
    python -m unusual.ray_jobs.evaluate --scores ... --label-column label     (the same code path)

The scores are the Parquet files the batch scoring job writes (``anomaly_score``,
``is_anomaly``, ``top_features``, ``model_version`` and the kept columns, one
of them the label); any path under the URI whose component starts with ``_`` or
``.`` (``_unusual/``, ``_quarantine/``, ``_evaluation/``) is not data.

Nothing is collected on the driver but per-block summaries:

1. Each block is summarised (row and label counts, a reservoir sample and the
   min / max of the scores, the model's flagged / unflagged score range, the
   model versions); the summaries are merged on the driver one by one. The bin
   edges are the sample's quantiles, so the bins follow heavy-tailed scores;
   when the sample holds every score the edges are the distinct scores and
   every metric is exact.
2. Each block becomes a :class:`unusual.models.metrics.ScoreHistogram` over those
   edges (positives and negatives per bin, the confusion counts of
   ``is_anomaly``); the histograms are added up as they arrive and give
   ROC-AUC, PR-AUC (average precision), the best F1 over the bin edges and
   precision / recall / F1 at the model's threshold.
3. With a time column, step 2 runs per group instead: rows are grouped by
   entity (one group without an entity column) and sorted by time, and every
   contiguous run of positive labels (a segment) gets its maximum score
   (:func:`unusual.models.metrics.adjusted_scores`); the histograms of these scores,
   with the model's flags point-adjusted, give the ``pa_*`` metrics. Rows
   without a label are left out before the runs are found.

The metrics are written as ``metrics.json`` and a self-contained
``report.html`` (inline SVG, no scripts) to ``--output`` (default
``<scores>/_evaluation``).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import pickle
import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..models.errors import SchemaError
from ..models.features import _NumStats
from ..models.metrics import ScoreHistogram, adjusted_scores, label_segments, point_adjust, quantile_edges
from ..runtime import progress
from .data import DataError, list_parquet_files, storage_errors
from .local_io import filesystem

SCORE, FLAG, VERSION = "anomaly_score", "is_anomaly", "model_version"
JOB_FILE = "_unusual/job.json"


@dataclass
class EvaluateJob:
    scores: str
    label_column: str
    output: str | None = None  # default <scores>/_evaluation
    entity_column: str | None = None
    time_column: str | None = None  # given: point-adjusted metrics too
    bins: int = 16384
    address: str | None = None

    def __post_init__(self):
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2; got {self.bins}")
        if self.entity_column and not self.time_column:
            raise ValueError(
                f"entity column {self.entity_column!r} needs a time column: point-adjusted metrics "
                "order each entity's rows by time"
            )

    @property
    def output_uri(self) -> str:
        return self.output or f"{self.scores.rstrip('/')}/_evaluation"


# --------------------------------------------------------------------------- input


def list_score_files(uri: str) -> tuple[list[str], pa.fs.FileSystem]:
    """The data files of batch-scoring output (``_unusual/``, ``_quarantine/`` are not data)."""
    return list_parquet_files(uri)


def _check_schema(uri: str, files: list[str], pafs, job: EvaluateJob) -> list[str]:
    """The columns to read, checked on every file's footer; raises naming the column."""
    needed: list[str] = []
    first = None
    for f in files:
        try:
            schema = pq.read_schema(f, filesystem=pafs)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read the Parquet footer of {f}: {e}") from None
        if first is None:
            first = (f, schema)
            names = schema.names
            cols = ", ".join(names)
            for c in (SCORE, FLAG):
                if c not in names:
                    raise SchemaError(
                        f"the data at {uri} is not batch-scoring output: it has no {c!r} column; columns: {cols}",
                        column=c,
                    )
            for what, c in (
                ("label", job.label_column),
                ("entity", job.entity_column),
                ("time", job.time_column),
            ):
                if c and c not in names:
                    raise SchemaError(f"{what} column {c!r} is not in the scores at {uri}; columns: {cols}", column=c)
            t = schema.field(job.label_column).type
            if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
                raise SchemaError(
                    f"label column {job.label_column!r} has type {t}; expected bool, integer or float "
                    "(positive = true / non-zero)",
                    column=job.label_column,
                )
            optional = [VERSION] if VERSION in names else []
            needed = list(dict.fromkeys([SCORE, FLAG, job.label_column, *optional]))
            needed += [c for c in (job.entity_column, job.time_column) if c and c not in needed]
            continue
        for c in needed:
            if c not in schema.names or not schema.field(c).type.equals(first[1].field(c).type):
                got = str(schema.field(c).type) if c in schema.names else "no such column"
                raise DataError(
                    f"score files disagree on column {c!r}: {first[0]} has {first[1].field(c).type} but {f} has {got}"
                )
    return needed


def _floats(col) -> np.ndarray:
    col = pc.cast(col, pa.float64())
    return np.asarray(pc.fill_null(col, pa.scalar(math.nan, pa.float64())).to_numpy(zero_copy_only=False), np.float64)


def _labels(col) -> tuple[np.ndarray, np.ndarray]:
    """(has a label, is positive) per row: positive = true / non-zero; null or NaN = no label."""
    if pa.types.is_boolean(col.type):
        valid = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), bool)
        pos = np.asarray(pc.fill_null(col, False).to_numpy(zero_copy_only=False), bool)
        return valid, pos & valid
    v = _floats(col)
    valid = ~np.isnan(v)
    return valid, valid & (v != 0)


def _rows(batch: pa.Table, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(score, is positive, is_anomaly, has a label, has a score) per row."""
    score = _floats(batch.column(SCORE))
    valid, pos = _labels(batch.column(label))
    flag = np.asarray(pc.fill_null(batch.column(FLAG), False).to_numpy(zero_copy_only=False), bool)
    return score, pos, flag, valid, ~np.isnan(score)


# --------------------------------------------------------------------------- pass 1: summaries


@dataclass
class _Summary:
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
    stats: _NumStats = field(default_factory=_NumStats)

    def merge(self, o: _Summary, rng: np.random.Generator) -> _Summary:
        return _Summary(
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
            self.stats.merge(o.stats, rng),
        )


def _block_summary(batch: pa.Table, label: str) -> dict:
    score, pos, flag, valid, scored = _rows(batch, label)
    use = valid & scored
    s = score[use]
    out = _Summary(
        rows=batch.num_rows,
        no_label=int((~valid).sum()),
        no_score=int((~scored).sum()),
        positives=int(pos[use].sum()),
        negatives=int((~pos[use]).sum()),
        posinf=int(np.isposinf(s).sum()),
        neginf=int(np.isneginf(s).sum()),
        stats=_NumStats.of(s, np.random.default_rng(0)),
    )
    if (flag & scored).any():
        out.flag_min = float(score[flag & scored].min())
    if (~flag & scored).any():
        out.unflag_max = float(score[~flag & scored].max())
    if VERSION in batch.column_names:
        out.versions = {v for v in pc.unique(batch.column(VERSION)).to_pylist() if v is not None}
    return {"summary": np.array([pickle.dumps(out)], dtype=object)}


def _merged(ds, keys: tuple[str, ...], merge) -> list:
    """The pickled per-block results in columns ``keys``, each merged on the driver as they arrive."""
    acc: list = [None] * len(keys)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i, key in enumerate(keys):
            for blob in batch[key]:
                part = pickle.loads(blob)
                acc[i] = part if acc[i] is None else merge(acc[i], part)
    return acc


def _edges(summary: _Summary, bins: int) -> tuple[np.ndarray, bool]:
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


def _block_histogram(batch: pa.Table, label: str, edges: np.ndarray) -> dict:
    score, pos, flag, valid, scored = _rows(batch, label)
    use = valid & scored
    h = ScoreHistogram.of(score[use], pos[use], edges, pred=flag[use])
    return {"hist": np.array([pickle.dumps(h)], dtype=object)}


def _series_rows(batch: pa.Table, label: str, entity: str | None, time: str) -> pa.Table:
    """The labelled, scored rows, with only what point adjustment needs (less to shuffle)."""
    score, pos, flag, valid, scored = _rows(batch, label)
    use = np.flatnonzero(valid & scored)
    cols = {c: batch.column(c).take(pa.array(use)) for c in (entity, time) if c}
    return pa.table({**cols, SCORE: score[use], "__label__": pos[use], FLAG: flag[use]})


def _group_histogram(group: pa.Table, entity: str | None, time: str, edges: np.ndarray) -> dict:
    """The histograms of one group of :func:`_series_rows`, as scored and point-adjusted:
    each entity's rows sorted by time, each labelled segment's scores replaced by
    the segment maximum, and the model's flags point-adjusted."""
    keys = [(entity, "ascending")] if entity else []
    order = pc.sort_indices(group, sort_keys=[*keys, (time, "ascending")])  # stable
    group = group.take(order)
    score = group.column(SCORE).to_numpy()
    pos = np.asarray(group.column("__label__").to_numpy(zero_copy_only=False), bool)
    flag = np.asarray(group.column(FLAG).to_numpy(zero_copy_only=False), bool)
    bounds = [0, group.num_rows]
    if entity and group.num_rows:
        # Ray hands over one entity per group; still, each entity is its own series, never joined to the next
        ent = group.column(entity).combine_chunks()
        codes = pc.dictionary_encode(ent, null_encoding="encode").indices.to_numpy(zero_copy_only=False)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1, [len(codes)]])
    adj, pa_flag, segments = np.empty_like(score), np.empty_like(flag), 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        adj[a:b] = adjusted_scores(score[a:b], pos[a:b])
        pa_flag[a:b] = point_adjust(flag[a:b], pos[a:b])
        segments += len(label_segments(pos[a:b]))
    h = ScoreHistogram.of(adj, pos, edges, pred=pa_flag)
    h.segments = segments
    raw = ScoreHistogram.of(score, pos, edges, pred=flag)
    return {"hist": np.array([pickle.dumps(raw)], dtype=object), "pa_hist": np.array([pickle.dumps(h)], dtype=object)}


# --------------------------------------------------------------------------- the job


def _job_threshold(uri: str) -> float | None:
    """The threshold the scoring job recorded in ``_unusual/job.json``, if any."""
    _, path, fs = filesystem(uri)
    p = f"{path.rstrip('/')}/{JOB_FILE}"
    try:
        if not fs.isfile(p):
            return None
        with fs.open(p, "r") as f:
            t = json.load(f).get("threshold")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(t, dict):
        t = t.get("value")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _finite(v.item())
    return v


def _metrics_of(h: ScoreHistogram, prefix: str = "") -> dict:
    at = h.at_threshold()
    best = h.best_f1()
    out = {
        f"{prefix}roc_auc": h.roc_auc(),
        f"{prefix}pr_auc": h.average_precision(),
        f"{prefix}precision": at["precision"],
        f"{prefix}recall": at["recall"],
        f"{prefix}f1": at["f1"],
    }
    if not prefix:
        out.update(tp=at["tp"], fp=at["fp"], fn=at["fn"], tn=at["tn"])
    out[f"{prefix}best_f1"] = best["f1"]
    out[f"{prefix}best_f1_threshold"] = best["threshold"]
    return out


def run(job: EvaluateJob) -> dict:
    """Evaluate the scores at ``job.scores``; writes ``metrics.json`` and ``report.html``
    to the output and returns the metrics."""
    from ..runtime import ensure_ray

    files, pafs = list_score_files(job.scores)
    columns = _check_schema(job.scores, files, pafs, job)
    ray = ensure_ray(job.address)
    say = progress
    ds = ray.data.read_parquet(files, filesystem=pafs, columns=columns)
    label = job.label_column

    say(f"summarising {len(files)} score file(s) at {job.scores} …")
    rng = np.random.default_rng(0)
    summaries = ds.map_batches(_block_summary, batch_format="pyarrow", batch_size=None, fn_kwargs={"label": label})
    summary = _merged(summaries, ("summary",), lambda a, b: a.merge(b, rng))[0] or _Summary()
    if summary.rows == 0:
        raise DataError(f"the scores at {job.scores} have no rows")
    labelled = summary.rows - summary.no_label
    if labelled == 0:
        raise DataError(
            f"label column {label!r} is null in all {summary.rows:,} rows at {job.scores}: nothing to evaluate"
        )
    if summary.positives + summary.negatives == 0:
        raise DataError(f"none of the {labelled:,} labelled rows at {job.scores} has an anomaly score")
    if summary.positives == 0 or summary.negatives == 0:
        raise DataError(
            f"label column {label!r} has only one class: {summary.positives:,} positive and "
            f"{summary.negatives:,} negative labelled rows at {job.scores}; ROC-AUC, PR-AUC and F1 need both"
        )
    edges, exact = _edges(summary, job.bins)

    pa_hist = None
    if not job.time_column:
        say(f"histogram of {summary.positives + summary.negatives:,} labelled scores over {edges.size:,} bins …")
        hists = ds.map_batches(
            _block_histogram, batch_format="pyarrow", batch_size=None, fn_kwargs={"label": label, "edges": edges}
        )
        (hist,) = _merged(hists, ("hist",), ScoreHistogram.merge)
    else:
        # one pass gives both histograms: as scored and point-adjusted
        say(
            f"histograms of {summary.positives + summary.negatives:,} labelled scores over {edges.size:,} bins, "
            f"as scored and point-adjusted: rows by {job.entity_column or 'one series'}, ordered by {job.time_column} …"
        )
        entity = job.entity_column
        rows = ds.map_batches(
            _series_rows,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"label": label, "entity": entity, "time": job.time_column},
        )
        # Without an entity column the whole series is one group (one task, like LSTM windowing in training).
        partitions = min(200, max(2 * int(ray.cluster_resources().get("CPU", 1)), len(files)))
        groups = rows.groupby(entity, num_partitions=partitions if entity else None).map_groups(
            _group_histogram,
            batch_format="pyarrow",
            fn_kwargs={"entity": entity, "time": job.time_column, "edges": edges},
        )
        hist, pa_hist = _merged(groups, ("hist", "pa_hist"), ScoreHistogram.merge)

    threshold, source = _job_threshold(job.scores), "job.json"
    if threshold is None and summary.flag_min < math.inf:
        threshold, source = summary.flag_min, "smallest flagged score"
    elif threshold is None:
        source = None
    metrics = {
        "scores": job.scores,
        "label_column": label,
        "rows": summary.rows,
        "rows_without_label": summary.no_label,
        "rows_without_score": summary.no_score,
        "positives": summary.positives,
        "negatives": summary.negatives,
        "threshold": threshold,
        "threshold_source": source,
        **_metrics_of(hist),
        "bins": int(edges.size),
        "exact": exact,
        "model_versions": sorted(summary.versions),
    }
    if pa_hist is not None:
        metrics.update(_metrics_of(pa_hist, "pa_"))
        metrics["segments"] = pa_hist.segments
        metrics["entity_column"] = job.entity_column
        metrics["time_column"] = job.time_column

    metrics = {k: _finite(v) for k, v in metrics.items()}
    write_outputs(job.output_uri, metrics, hist, pa_hist)
    return metrics


def write_outputs(output: str, metrics: dict, hist: ScoreHistogram, pa_hist: ScoreHistogram | None = None) -> None:
    """``metrics.json`` and ``report.html`` under the output URI (local or fsspec)."""
    _, path, fs = filesystem(output)
    root = path.rstrip("/")
    with storage_errors(output, "writing"):
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/metrics.json", "w") as f:
            f.write(json.dumps(metrics, indent=1, allow_nan=False) + "\n")
        with fs.open(f"{root}/report.html", "w") as f:
            f.write(report_html(metrics, hist, pa_hist))


# --------------------------------------------------------------------------- report

_POS, _NEG, _PA = "#d62728", "#1f77b4", "#ff7f0e"
_W, _H, _M = 460, 300, 48  # plot size and margin (px)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "–"
    return str(v)


def _axes(title: str, xlabel: str, ylabel: str, xticks, yticks, legend) -> list[str]:
    """SVG frame, ticks, labels and a legend above the plot; ticks are (position in px, text),
    the legend (name, colour)."""
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W + 2 * _M}" height="{_H + 2 * _M}" '
        f'viewBox="0 0 {_W + 2 * _M} {_H + 2 * _M}" font-family="sans-serif" font-size="11">',
        f'<text x="{_M + _W / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{_M}" y="{_M}" width="{_W}" height="{_H}" fill="none" stroke="#444"/>',
        f'<text x="{_M + _W / 2}" y="{_H + 2 * _M - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
        f'<text x="14" y="{_M + _H / 2}" text-anchor="middle" transform="rotate(-90 14 {_M + _H / 2})">'
        f"{html.escape(ylabel)}</text>",
    ]
    x = _M
    for name, colour in legend:
        out.append(f'<rect x="{x}" y="{_M - 18}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{_M - 9}" fill="{colour}">{html.escape(name)}</text>')
        x += 28 + 7 * len(name)
    for x, t in xticks:
        out.append(f'<line x1="{x:.1f}" y1="{_M + _H}" x2="{x:.1f}" y2="{_M + _H + 4}" stroke="#444"/>')
        out.append(f'<text x="{x:.1f}" y="{_M + _H + 16}" text-anchor="middle">{html.escape(t)}</text>')
    for y, t in yticks:
        out.append(f'<line x1="{_M - 4}" y1="{y:.1f}" x2="{_M}" y2="{y:.1f}" stroke="#444"/>')
        out.append(f'<text x="{_M - 6}" y="{y + 4:.1f}" text-anchor="end">{html.escape(t)}</text>')
    return out


def _unit_ticks():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    return [(_M + t * _W, f"{t:g}") for t in ts], [(_M + _H - t * _H, f"{t:g}") for t in ts]


def _curve_svg(title: str, xlabel: str, ylabel: str, curves, diagonal: bool = False) -> str:
    """Curves in the unit square: (name, x, y, colour)."""
    xt, yt = _unit_ticks()
    out = _axes(title, xlabel, ylabel, xt, yt, [(name, colour) for name, _, _, colour in curves])
    if diagonal:
        out.append(f'<line x1="{_M}" y1="{_M + _H}" x2="{_M + _W}" y2="{_M}" stroke="#aaa" stroke-dasharray="4 3"/>')
    for _, x, y, colour in curves:
        pts = " ".join(f"{_M + a * _W:.1f},{_M + _H - b * _H:.1f}" for a, b in zip(x, y))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
    out.append("</svg>")
    return "\n".join(out)


def _density_svg(hist: ScoreHistogram, threshold: float | None) -> str:
    """Overlaid step histograms of the scores of each label, with the threshold."""
    d = hist.density(60)
    edges, pos, neg = d["edges"], np.asarray(d["positive"]), np.asarray(d["negative"])
    g, log = len(pos), d["scale"] == "log"
    top = max(float(pos.max(initial=0)), float(neg.max(initial=0)), 1e-12) * 1.05
    step = _W / g
    xticks = [(_M + j * step, f"{edges[j]:.3g}") for j in range(0, g + 1, max(g // 5, 1))]
    yticks = [(_M + _H - t * _H, f"{t * top:.2g}") for t in (0.0, 0.5, 1.0)]
    title = f"score distribution per label ({'log' if log else 'linear'} axis)"
    legend = [("label negative", _NEG), ("label positive", _POS)]
    out = _axes(title, "anomaly score", "fraction of the label's rows", xticks, yticks, legend)
    for values, colour in ((neg, _NEG), (pos, _POS)):
        pts = [f"{_M:.1f},{_M + _H:.1f}"]
        for j, v in enumerate(values):
            y = _M + _H - v / top * _H
            pts += [f"{_M + j * step:.1f},{y:.1f}", f"{_M + (j + 1) * step:.1f},{y:.1f}"]
        pts.append(f"{_M + _W:.1f},{_M + _H:.1f}")
        style = f'fill="{colour}" fill-opacity="0.35" stroke="{colour}" stroke-width="1"'
        out.append(f'<polygon points="{" ".join(pts)}" {style}/>')
    if threshold is not None and math.isfinite(threshold):
        lo, hi = edges[0], edges[-1]
        if log:
            frac = (math.log(threshold) - math.log(lo)) / (math.log(hi) - math.log(lo)) if threshold > 0 else 0.0
        else:
            frac = (threshold - lo) / (hi - lo)
        x = _M + min(max(frac, 0.0), 1.0) * _W
        out.append(f'<line x1="{x:.1f}" y1="{_M}" x2="{x:.1f}" y2="{_M + _H}" stroke="#000" stroke-dasharray="5 3"/>')
        anchor = "end" if frac > 0.7 else "start"
        tx = x - 4 if anchor == "end" else x + 4
        out.append(f'<text x="{tx:.1f}" y="{_M + 14}" text-anchor="{anchor}">threshold {threshold:.4g}</text>')
    out.append("</svg>")
    return "\n".join(out)


def report_html(metrics: dict, hist: ScoreHistogram, pa_hist: ScoreHistogram | None = None) -> str:
    """A self-contained HTML report: the metrics, the score distribution per label
    with the threshold, and the PR and ROC curves (point-adjusted ones too)."""
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in metrics.items())
    pr = [("as scored", *hist.pr_curve(), _NEG)]
    roc = [("as scored", *hist.roc_curve(), _NEG)]
    if pa_hist is not None:
        pr.append(("point-adjusted", *pa_hist.pr_curve(), _PA))
        roc.append(("point-adjusted", *pa_hist.roc_curve(), _PA))
    exact = "exact" if metrics.get("exact") else f"from {metrics.get('bins')} score bins"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>unusual evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 24px; }}
th, td {{ text-align: left; padding: 3px 12px; border-bottom: 1px solid #ddd; font-size: 13px; }}
th {{ font-weight: normal; color: #555; }}
.plots svg {{ margin: 0 12px 12px 0; }}
</style></head><body>
<h1>unusual evaluation</h1>
<p>Scores at <code>{html.escape(str(metrics.get("scores")))}</code>, labels from
<code>{html.escape(str(metrics.get("label_column")))}</code>; metrics {html.escape(exact)}.</p>
<table>
{rows}
</table>
<div class="plots">
{_density_svg(hist, metrics.get("threshold"))}
{_curve_svg("precision-recall", "recall", "precision", pr)}
{_curve_svg("ROC", "false positive rate", "true positive rate", roc, diagonal=True)}
</div>
</body></html>
"""


# --------------------------------------------------------------------------- CLI


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scores", required=True, help="batch-scoring output: Parquet folder or prefix (local, s3://, gs://)"
    )
    p.add_argument("--label-column", required=True, help="column of true labels (positive = true / non-zero)")
    p.add_argument("--output", help="where metrics.json and report.html go (default: <scores>/_evaluation)")
    p.add_argument("--entity-column", help="series id column, for point-adjusted metrics (needs --time-column)")
    p.add_argument("--time-column", help="order of rows within a series; given, point-adjusted metrics too")
    p.add_argument("--bins", type=int, default=16384, help="score bins when the scores are too many to be exact")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")


def job_from_args(args) -> EvaluateJob:
    return EvaluateJob(
        scores=args.scores,
        label_column=args.label_column,
        output=args.output,
        entity_column=args.entity_column,
        time_column=args.time_column,
        bins=args.bins,
        address=args.address,
    )


def cmd_evaluate(args) -> int:
    job = job_from_args(args)
    metrics = run(job)
    out = job.output_uri.rstrip("/")
    print(json.dumps(metrics, indent=1))
    progress(f"metrics written to {out}/metrics.json; report: {out}/report.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
