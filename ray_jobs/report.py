"""The evaluation's self-contained HTML report: the metrics, the score distribution per label
with the threshold, and the PR and ROC curves (as scored and point-adjusted), as inline SVG
(no scripts, nothing fetched)."""

from __future__ import annotations

import html
import math

import numpy as np

from ..models.metrics import ScoreHistogram

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
