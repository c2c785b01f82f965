"""Evaluation of batch-scoring output against labels, at scale.

    unusual evaluate --scores s3://bucket/scores/ --label-column label
    python -m unusual.ray_jobs.evaluate --scores ... --label-column label     (the same code path)

The scores are the Parquet files the batch scoring job writes (``anomaly_score``,
``is_anomaly``, ``top_features``, ``model_version`` and the kept columns, one
of them the label); any path under the URI whose component starts with ``_`` or
``.`` (``_unusual/``, ``_quarantine/``, ``_evaluation/``) is not data.

Nothing is collected on the driver but merged summaries
(:mod:`unusual.ray_jobs.eval_stats`, reduced with Ray Data's aggregation API):

1. The scores are summarised (row and label counts, a reservoir sample and the
   min / max of the scores, the model's flagged / unflagged score range, the
   model versions). The bin edges are the sample's quantiles, so the bins follow
   heavy-tailed scores; when the sample holds every score the edges are the
   distinct scores and every metric is exact.
2. The labelled scores become a :class:`unusual.models.metrics.ScoreHistogram` over
   those edges (positives and negatives per bin, the confusion counts of
   ``is_anomaly``), which gives ROC-AUC, PR-AUC (average precision), the best F1
   over the bin edges and precision / recall / F1 at the model's threshold.
3. With a time column, step 2 runs on the point-adjusted series too: rows are
   grouped by entity (one group without an entity column) and sorted by time, and
   every contiguous run of positive labels (a segment) gets its maximum score
   (:func:`unusual.models.metrics.adjusted_scores`); the histogram of these scores,
   with the model's flags point-adjusted, gives the ``pa_*`` metrics. Rows
   without a label are left out before the runs are found.
4. In the same pass, every entity's series with both classes gets its VUS-PR and
   VUS-ROC (:func:`unusual.models.vus.vus`, TSB-AD's range-based metrics: each
   labelled segment grown by a soft buffer of up to ``--vus-window`` rows); the
   metrics are their mean over those series (``vus_series``), as TSB-AD averages
   over its series. Unlike the point-adjusted metrics they do not flatter a random
   detector: VUS-PR is the headline for time series.

The metrics are written as ``metrics.json`` and a self-contained
``report.html`` (:mod:`unusual.ray_jobs.report`: inline SVG charts, no scripts) to
``--output`` (default ``<scores>/_evaluation``). The report's model card comes from the
scoring job's spec (``_unusual/job.json``: the checkpoint, the data it scored), the
bundle's ``manifest.json`` at that checkpoint when it can be read, and the features the
rows' ``top_features`` name most.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from ..config import EvaluateJob, main_for
from ..models.bundle import read_manifest
from ..models.errors import SchemaError
from ..models.manifest import Manifest
from ..models.metrics import ScoreHistogram
from ..runtime import ensure_ray, progress
from .eval_stats import (
    FLAG,
    SCORE,
    TOP,
    VERSION,
    ScoreSummary,
    VusSums,
    bin_edges,
    histogram,
    series_histograms,
    summarise,
)
from .local_io import DataError, filesystem, list_parquet_files, read_footers, storage_errors
from .report import ModelCard, report_html
from .storage import JOB_DIR, SPEC_FILE, Output

__all__ = [
    "EvaluateJob",
    "ModelCard",
    "command",
    "evaluation_metrics",
    "list_score_files",
    "main",
    "model_card",
    "report_html",
    "run",
    "write_outputs",
]

# --------------------------------------------------------------------------- input


def list_score_files(uri: str) -> tuple[list[str], pa.fs.FileSystem]:
    """The data files of batch-scoring output (``_unusual/``, ``_quarantine/`` are not data)."""
    return list_parquet_files(uri)


def _check_schema(uri: str, files: list[str], pafs, job: EvaluateJob) -> list[str]:
    """The columns to read, checked on every file's footer; raises naming the column."""
    needed: list[str] = []
    first = None
    for f, meta in zip(files, read_footers(files, pafs)):
        schema = meta.schema.to_arrow_schema()
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
            optional = [c for c in (VERSION, TOP) if c in names]
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


# --------------------------------------------------------------------------- the job


class ScoredBy(BaseModel):
    """What the evaluation reads of the scoring job's plan (``_unusual/job.json``, a
    :class:`~unusual.ray_jobs.score_plan.ScorePlan`): the bundle, the data, the model, its threshold.
    Only these fields, each optional, so the output of another version's job still evaluates."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    checkpoint: str | None = None
    data: str | None = None
    kind: str | None = None
    model_version: str | None = None
    threshold: float | None = None


def _job_spec(uri: str) -> ScoredBy | None:
    """What the scoring job's plan says, if there is one."""
    try:
        return ScoredBy.model_validate(Output(uri).read_json(JOB_DIR, SPEC_FILE))
    except (OSError, ValueError):  # none there (None does not validate), unreadable
        return None


def _manifest(checkpoint: str | None) -> Manifest | None:
    """The bundle's manifest at ``checkpoint`` (not its weights), or None when it cannot be read:
    the report then has a shorter model card, and the evaluation goes on."""
    if not checkpoint:
        return None
    try:
        return read_manifest(checkpoint)
    except Exception as e:  # missing, moved, malformed, no credentials: any of them only shortens the report
        progress(f"no model card in the report: cannot read the bundle manifest at {checkpoint} ({e})")
        return None


def _partition_rates(scores: str) -> list[dict] | None:
    """The rate of each partition from the ledger of an incremental output (``--incremental``), or None;
    unreadable, it only shortens the report."""
    from .incremental import partition_rates

    try:
        return partition_rates(scores)
    except Exception as e:  # noqa: BLE001 - missing, moved, no credentials: the report goes on without the chart
        progress(f"no anomaly rate by partition in the report: cannot read the ledger of {scores} ({e})")
        return None


def model_card(spec: ScoredBy | None, summary: ScoreSummary) -> ModelCard:
    """What the report says about the model: the scoring job's plan, the manifest of the bundle it
    names and the features the rows' ``top_features`` name most."""
    return ModelCard(
        manifest=_manifest(spec and spec.checkpoint),
        checkpoint=spec and spec.checkpoint,
        data=spec and spec.data,
        kind=spec and spec.kind,
        top_features=summary.top.ranked(),
        top_rows=summary.top.rows,
    )


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


def evaluation_metrics(
    job: EvaluateJob,
    summary: ScoreSummary,
    edges: np.ndarray,
    exact: bool,
    hist: ScoreHistogram,
    pa_hist: ScoreHistogram | None = None,
    spec: ScoredBy | None = None,
    vus: VusSums | None = None,
) -> dict:
    """The metrics (``metrics.json``) of the merged summary, histograms and, for time series, the sums of
    the series' VUS; the threshold is the one in the scoring job's ``spec``, else the smallest score the
    model flagged."""
    threshold, source = (spec and spec.threshold), "job.json"
    if threshold is None and summary.flag_min < math.inf:
        threshold, source = summary.flag_min, "smallest flagged score"
    elif threshold is None:
        source = None
    metrics = {
        "scores": job.scores,
        "label_column": job.label_column,
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
    if vus is not None:
        metrics["vus_pr"], metrics["vus_roc"] = vus.means()
        metrics["vus_window"] = job.vus_window
        metrics["vus_series"] = vus.series
    return {k: _finite(v) for k, v in metrics.items()}


def run(job: EvaluateJob) -> dict:
    """Evaluate the scores at ``job.scores``; writes ``metrics.json`` and ``report.html``
    to the output and returns the metrics."""
    files, pafs = list_score_files(job.scores)
    columns = _check_schema(job.scores, files, pafs, job)
    ray = ensure_ray(job.address)
    ds = ray.data.read_parquet(files, filesystem=pafs, columns=columns)
    label = job.label_column

    progress(f"summarising {len(files)} score file(s) at {job.scores} …")
    summary = summarise(ds, label)
    _check_labels(summary, job)
    edges, exact = bin_edges(summary, job.bins)

    labelled = summary.positives + summary.negatives
    pa_hist = vus = None
    if not job.time_column:
        progress(f"histogram of {labelled:,} labelled scores over {edges.size:,} bins …")
        hist = histogram(ds, label, edges)
    else:
        # one pass gives both histograms: as scored and point-adjusted
        progress(
            f"histograms of {labelled:,} labelled scores over {edges.size:,} bins, as scored and point-adjusted, "
            f"and VUS (window {job.vus_window}): rows by {job.entity_column or 'one series'}, "
            f"ordered by {job.time_column} …"
        )
        partitions = min(200, max(2 * int(ray.cluster_resources().get("CPU", 1)), len(files)))
        hist, pa_hist, vus = series_histograms(
            ds, label, job.entity_column, job.time_column, edges, partitions, job.vus_window
        )

    spec = _job_spec(job.scores)
    metrics = evaluation_metrics(job, summary, edges, exact, hist, pa_hist, spec, vus)
    rates = _partition_rates(job.scores)
    if rates:
        metrics["partition_rates"] = rates
    write_outputs(job.output_uri, metrics, hist, pa_hist, model_card(spec, summary))
    return metrics


def _check_labels(summary: ScoreSummary, job: EvaluateJob) -> None:
    """Raise a :class:`DataError` unless the scores have labelled rows of both classes."""
    label = job.label_column
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


def write_outputs(
    output: str,
    metrics: dict,
    hist: ScoreHistogram,
    pa_hist: ScoreHistogram | None = None,
    card: ModelCard | None = None,
) -> None:
    """``metrics.json`` and ``report.html`` (with the model ``card``) under the output URI (local or fsspec)."""
    _, path, fs = filesystem(output)
    root = path.rstrip("/")
    with storage_errors(output, "writing"):
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/metrics.json", "w") as f:
            f.write(json.dumps(metrics, indent=1, allow_nan=False) + "\n")
        with fs.open(f"{root}/report.html", "w") as f:
            f.write(report_html(metrics, hist, pa_hist, card))


# --------------------------------------------------------------------------- entrypoints


def command(job: EvaluateJob) -> int:
    """``unusual evaluate``: run the job and print its metrics as JSON on stdout."""
    metrics = run(job)
    out = job.output_uri.rstrip("/")
    print(json.dumps(metrics, indent=1))
    progress(f"metrics written to {out}/metrics.json; report: {out}/report.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for("evaluate", command, argv)


if __name__ == "__main__":
    sys.exit(main())
