"""The report's charts (matplotlib, Agg, inline SVG) and the value formatting they share with its
sections (:mod:`.report`).

Text stays text, no dates or random ids: the same evaluation draws the same SVG. Figures use
constrained layout, so labels never overlap the ticks, and scale with their container.
"""

from __future__ import annotations

import html
import io
import math
import re

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..models.metrics import ScoreHistogram

# chart colours, used nowhere else on the page (the screenshot test looks for them)
NORMAL, ANOMALY, ADJUSTED = "#1f77b4", "#d62728", "#ff7f0e"
_RC = {
    "svg.fonttype": "none",  # text as <text>, in the page's font
    "svg.hashsalt": "unusual-report",  # deterministic ids
    "font.size": 10,
    "font.family": "sans-serif",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
}


def _e(v) -> str:
    return html.escape(str(v))


def _fmt(v) -> str:
    """A value as text: counts with thousands separators, floats to 4 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v) or "–"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "–"
    return str(v)


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------- charts


def _svg(fig: Figure, title: str) -> str:
    """The figure as inline SVG that scales with its container (``svg.chart``), without the XML
    prologue, dates or random ids."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    head, rest = svg.split(">", 1)
    head = re.sub(r'\s(width|height)="[^"]*"', "", head)
    return f'{head} class="chart" role="img" aria-label="{_e(title)}">{rest.strip()}'


def _figure() -> tuple[Figure, object]:
    """A figure on the Agg canvas (no display, no pyplot state) with constrained layout, so that
    labels never overlap the ticks."""
    fig = Figure(figsize=(4.6, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _unit_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_yticks(np.linspace(0, 1, 6))


def _pr_points(h: ScoreHistogram) -> tuple[np.ndarray, np.ndarray]:
    """The PR curve from the highest threshold down, as steps whose area is the average precision:
    the thresholds that catch no anomaly are dropped (their precision says nothing), and the curve
    starts at recall 0 with the precision of the first threshold that catches one."""
    recall, precision = h.pr_curve()
    keep = recall > 0
    recall, precision = recall[keep], precision[keep]
    if recall.size == 0:
        return recall, precision
    return np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision])


def _roc_chart(metrics: dict, hist: ScoreHistogram, pa_hist: ScoreHistogram | None = None) -> str:
    """The ROC curve (and the point-adjusted one), with the model's operating point."""
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="chance")
    ax.plot(*hist.roc_curve(), color=NORMAL, lw=2, label=f"as scored (AUC {_fmt(metrics.get('roc_auc'))})")
    if pa_hist is not None:
        auc = _fmt(metrics.get("pa_roc_auc"))
        ax.plot(*pa_hist.roc_curve(), color=ADJUSTED, lw=1.6, label=f"point-adjusted (AUC {auc})")
    fpr = _ratio(metrics.get("fp"), (metrics.get("fp") or 0) + (metrics.get("tn") or 0))
    tpr = metrics.get("recall")
    if fpr is not None and tpr is not None:
        ax.plot([fpr], [tpr], "o", color="#222", ms=6, label="at the threshold")
    _unit_axes(ax, "ROC curve", "false positive rate (normal rows flagged)", "true positive rate (recall)")
    ax.legend(loc="lower right", fontsize=8.5)
    return _svg(fig, "ROC curve")


def _pr_chart(metrics: dict, hist: ScoreHistogram, pa_hist: ScoreHistogram | None = None) -> str:
    """The precision-recall curve as steps (the area under them is the average precision), with the
    share of anomalies (a random ranking's precision) and the model's operating point."""
    fig, ax = _figure()
    base = _ratio(metrics.get("positives"), (metrics.get("positives") or 0) + (metrics.get("negatives") or 0))
    if base is not None:
        ax.axhline(base, color="#999", ls="--", lw=1, label=f"random ({base:.3g})")
    r, p = _pr_points(hist)
    ax.plot(r, p, color=NORMAL, lw=2, drawstyle="steps-pre", label=f"as scored (AP {_fmt(metrics.get('pr_auc'))})")
    if pa_hist is not None:
        r, p = _pr_points(pa_hist)
        ap = _fmt(metrics.get("pa_pr_auc"))
        ax.plot(r, p, color=ADJUSTED, lw=1.6, drawstyle="steps-pre", label=f"point-adjusted (AP {ap})")
    if metrics.get("recall") is not None and metrics.get("precision") is not None:
        ax.plot([metrics["recall"]], [metrics["precision"]], "o", color="#222", ms=6, label="at the threshold")
    _unit_axes(ax, "Precision-recall curve", "recall (anomalies caught)", "precision (flags that are right)")
    ax.legend(loc="best", fontsize=8.5)
    return _svg(fig, "Precision-recall curve")


def _distribution_chart(hist: ScoreHistogram, threshold: float | None) -> str:
    """The score distribution of normal and anomalous rows (each as a share of its class) with the
    threshold; a log axis for scores spanning decades (:meth:`ScoreHistogram.density`)."""
    d = hist.density(60)
    edges = np.asarray(d["edges"])
    fig, ax = _figure()
    for values, colour, name in ((d["negative"], NORMAL, "normal rows"), (d["positive"], ANOMALY, "anomalies")):
        ax.stairs(values, edges, fill=True, color=colour, alpha=0.3, lw=0)
        ax.stairs(values, edges, color=colour, lw=1.8, label=name)
    if d["scale"] == "log":
        ax.set_xscale("log")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="#222", ls="--", lw=1.4, label=f"threshold {threshold:.4g}")
        lo, hi = min(edges[0], threshold), max(edges[-1], threshold)
        if d["scale"] == "log":
            ax.set_xlim(lo / 1.1 if lo > 0 else edges[0], hi * 1.1)
        else:
            pad = 0.02 * (hi - lo)
            ax.set_xlim(lo - pad, hi + pad)
    ax.set(title="Score distribution", xlabel="anomaly score", ylabel="share of the class's rows")
    ax.set_ylim(bottom=0)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8.5)
    return _svg(fig, "Score distribution of normal rows and anomalies")


def _rate_chart(rates: list[dict]) -> str:
    """The anomaly rate of each partition an incremental run committed, in partition order, with the rate
    the threshold's calibration expects and the partitions the watch raised an alarm on."""
    fig, ax = _figure()
    x = np.arange(len(rates))
    y = np.array([np.nan if r["anomaly_rate"] is None else 100 * r["anomaly_rate"] for r in rates])
    ax.plot(x, y, "-o", color=NORMAL, lw=1.4, ms=3 if len(rates) > 60 else 5, label="flagged rows")
    alarm = np.array([bool(r.get("alarm")) for r in rates])
    if alarm.any():
        ax.plot(x[alarm], y[alarm], "o", color=ANOMALY, ms=8, label="rate watch alarm")
    expected = next((r["expected_rate"] for r in rates if r.get("expected_rate") is not None), None)
    if expected is not None:
        ax.axhline(100 * expected, color="#999", ls="--", lw=1, label=f"expected ({_pct(expected)})")
    step = max(1, len(rates) // 8)
    ax.set_xticks(x[::step], [r["partition"] for r in rates][::step], rotation=30, ha="right", fontsize=7)
    ax.set(title="Anomaly rate by partition", ylabel="rows flagged (%)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=8.5)
    return _svg(fig, "Anomaly rate by partition")


def charts(metrics: dict, hist: ScoreHistogram, pa_hist: ScoreHistogram | None) -> str:
    with matplotlib.rc_context(_RC):  # the settings apply when the artists are made and when saved
        figures = [
            (
                _roc_chart(metrics, hist, pa_hist),
                "How many anomalies are caught (up) for how many normal rows are flagged (right) as the threshold "
                "moves; the dot is the model's threshold.",
            ),
            (
                _pr_chart(metrics, hist, pa_hist),
                "Of the rows flagged, the share that are anomalies (up), against the share of the anomalies "
                "caught (right); the dot is the model's threshold.",
            ),
            (
                _distribution_chart(hist, metrics.get("threshold")),
                "Scores of normal rows and of anomalies, each as a share of its own class; rows right of the "
                "dashed line are flagged.",
            ),
        ]
        if metrics.get("partition_rates"):
            figures.append((
                _rate_chart(metrics["partition_rates"]),
                "The share of each partition's rows the model flagged, partition by partition, from the incremental "
                "runs' records; red: the anomaly-rate watch raised an alarm.",
            ))
    body = "".join(f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>" for svg, caption in figures)
    return f'<section><h2>Charts</h2><div class="charts">{body}</div></section>'
