"""The evaluation's report: one self-contained HTML page a person reads.

Sections, top to bottom: the headline (model, data, rows and the five numbers that matter at
the model's threshold, in plain words; for time series VUS-PR and VUS-ROC, the range-based
metrics to compare models on, and the point-adjusted ones, marked inflated), the confusion
matrix at the threshold, the threshold and how it was chosen, the model card (from the bundle's
manifest and the rows' ``top_features``), the charts (ROC, precision-recall, the score
distribution of normal and anomalous rows with the threshold) and every metric of
``metrics.json`` with a human label.

The charts are drawn with matplotlib (Agg, no display) as inline SVG: text stays text, no dates
or random ids, so the same evaluation gives the same file. The page has no script, fetches
nothing (a Content-Security-Policy says so) and reflows down to a phone's width; every string
from the data (column names, URIs, feature names) is HTML-escaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.manifest import Manifest, ThresholdRecord
from ..models.metrics import ScoreHistogram
from ..models.registry import REGISTRY
from .report_charts import _e, _fmt, _pct, _ratio, charts

# every key of metrics.json: its label in the report (pa_*: point-adjusted, inflated; vus_*: range-based, TSB-AD's)
METRIC_LABELS = {
    "scores": "Scores evaluated",
    "label_column": "Label column",
    "rows": "Rows",
    "rows_without_label": "Rows without a label (left out)",
    "rows_without_score": "Rows without a score (left out)",
    "positives": "Anomalies (labelled positive)",
    "negatives": "Normal rows (labelled negative)",
    "threshold": "Threshold",
    "threshold_source": "Threshold taken from",
    "roc_auc": "ROC-AUC",
    "pr_auc": "AUC-PR (average precision)",
    "precision": "Precision at the threshold",
    "recall": "Recall at the threshold",
    "f1": "F1 at the threshold",
    "tp": "Anomalies flagged (true positives)",
    "fp": "False alarms (false positives)",
    "fn": "Anomalies missed (false negatives)",
    "tn": "Normal rows not flagged (true negatives)",
    "best_f1": "Best F1 at any threshold",
    "best_f1_threshold": "Threshold of the best F1",
    "bins": "Score bins",
    "exact": "Metrics exact (one bin per distinct score)",
    "model_versions": "Model versions in the scores",
    "pa_roc_auc": "PA ROC-AUC (point-adjusted, inflated)",
    "pa_pr_auc": "PA AUC-PR (point-adjusted, inflated)",
    "pa_precision": "PA precision at the threshold (point-adjusted, inflated)",
    "pa_recall": "PA recall at the threshold (point-adjusted, inflated)",
    "pa_f1": "PA-F1 at the threshold (point-adjusted, inflated)",
    "pa_best_f1": "PA best F1 at any threshold (point-adjusted, inflated)",
    "pa_best_f1_threshold": "Threshold of the PA best F1",
    "segments": "Labelled anomaly segments",
    "entity_column": "Entity column",
    "time_column": "Time column",
    "vus_pr": "VUS-PR (range-based AUC-PR, mean over series; the time-series headline)",
    "vus_roc": "VUS-ROC (range-based ROC-AUC, mean over series)",
    "vus_window": "VUS buffer window (rows)",
    "vus_series": "Series VUS is averaged over (with anomalies and normal rows)",
}

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1c1c1c;background:#fff;
margin:0 auto;padding:16px;max-width:1180px;overflow-wrap:break-word}
h1{font-size:1.5em;margin:.2em 0 .3em}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1em 0 .3em}
code{font:.9em ui-monospace,Menlo,Consolas,monospace;background:#f3f3f3;padding:0 .25em;border-radius:3px;
overflow-wrap:anywhere}
.lede{color:#444;margin:.2em 0 1em}.note{color:#555;font-size:.9em}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,190px),1fr));gap:10px}
.kpi{border:1px solid #ddd;border-radius:8px;padding:10px 12px}
.kpi .v{font-size:2.1em;font-weight:600;line-height:1.1}.kpi .k{font-weight:600}.kpi .d{color:#555;font-size:.85em}
.kpis+.kpis{margin-top:10px}.pa{margin-top:10px;padding:8px 12px;border-left:4px solid #b8860b;background:#fdf8e8}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,420px),1fr));gap:0 28px}
table{border-collapse:collapse;margin:.4em 0;max-width:100%}
th,td{text-align:left;padding:4px 10px;border-bottom:1px solid #e3e3e3;vertical-align:top}
th{font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.cm td{text-align:center;min-width:5em}.cm .good{background:#eaf6ec}.cm .bad{background:#fbeaea}
.cm small{display:block;color:#555}
dl{display:grid;grid-template-columns:minmax(7em,max-content) 1fr;gap:4px 14px;margin:.4em 0}
dt{color:#555}dd{margin:0}
details summary{cursor:pointer;color:#333}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,340px),1fr));gap:16px}
figure{margin:0}figcaption{color:#555;font-size:.85em}
svg.chart{display:block;width:100%;max-width:100%;height:auto}
.all code{font-size:.8em;color:#555}td.s{overflow-wrap:anywhere}
"""


@dataclass
class ModelCard:
    """What the report says about the model beyond the metrics: the bundle's manifest (None when it
    could not be read), where the bundle and the scored data are (from the scoring job's spec), and
    the features the rows' ``top_features`` name most
    (:meth:`unusual.ray_jobs.eval_stats.TopFeatures.ranked`, of ``top_rows`` rows)."""

    manifest: Manifest | None = None
    checkpoint: str | None = None
    data: str | None = None
    kind: str | None = None
    top_features: list[dict] = field(default_factory=list)
    top_rows: int = 0


# --------------------------------------------------------------------------- formatting


def _label(key: str) -> str:
    return METRIC_LABELS.get(key) or key.replace("_", " ").capitalize()


# --------------------------------------------------------------------------- sections


def _kpi(value: str, name: str, what: str) -> str:
    """One headline number: the value in large type, its name and what it means (HTML)."""
    return (
        f'<div class="kpi"><div class="v">{_e(value)}</div><div class="k">{_e(name)}</div>'
        f'<div class="d">{what}</div></div>'
    )


def _model_name(metrics: dict, card: ModelCard) -> tuple[str, str]:
    """(kind in words, version) from the manifest, else the scoring job's spec and the scores."""
    m = card.manifest
    kind = (m and m.kind) or card.kind
    version = (m and m.model_version) or ", ".join(metrics.get("model_versions") or []) or "unknown version"
    words = f"{REGISTRY[kind].title if kind in REGISTRY else kind} ({kind})" if kind else "model"
    return words, version


def _vus_kpis(metrics: dict) -> str:
    """VUS-PR and VUS-ROC as headline numbers, when the evaluation had a time column (HTML, else "")."""
    if "vus_pr" not in metrics:
        return ""
    window, series = _fmt(metrics.get("vus_window")), _fmt(metrics.get("vus_series"))
    pr = _kpi(
        _fmt(metrics["vus_pr"]),
        "VUS-PR (time series)",
        "Range-based AUC-PR, TSB-AD's metric: each labelled segment grown by a soft buffer of up to "
        f"{window} rows, averaged over {series} series. The headline to compare time-series models on.",
    )
    roc = _kpi(
        _fmt(metrics.get("vus_roc")),
        "VUS-ROC (time series)",
        "Range-based ROC-AUC over the same buffers (TSB-AD's metric): a high score just before or after a "
        "segment counts too; 1 = perfect.",
    )
    return f'<div class="kpis">{pr}{roc}</div>'


def _headline(metrics: dict, card: ModelCard) -> str:
    kind, version = _model_name(metrics, card)
    pos, neg = metrics.get("positives") or 0, metrics.get("negatives") or 0
    tp, fp, fn = (metrics.get(k) or 0 for k in ("tp", "fp", "fn"))
    data = f" (the scoring job read <code>{_e(card.data)}</code>)" if card.data else ""
    exact = "exact" if metrics.get("exact") else f"computed over {_fmt(metrics.get('bins'))} score bins"
    kpis = [
        _kpi(
            _fmt(metrics.get("roc_auc")),
            "ROC-AUC",
            "How well the scores rank anomalies above normal rows: "
            "the chance a random anomaly scores higher than a random normal row (0.5 = coin flip, 1 = perfect).",
        ),
        _kpi(
            _fmt(metrics.get("pr_auc")),
            "AUC-PR (average precision)",
            "Precision averaged over every recall "
            f"level; a random ranking scores the share of anomalies, {_pct(_ratio(pos, pos + neg))}.",
        ),
        _kpi(
            _fmt(metrics.get("f1")),
            "F1 at the threshold",
            "The balance of precision and recall of the "
            "model's own flags (harmonic mean; 1 = every anomaly flagged and nothing else).",
        ),
        _kpi(
            _pct(metrics.get("precision")),
            "Precision",
            f"Of the {tp + fp:,} rows the model flagged, the share that are real anomalies ({tp:,}).",
        ),
        _kpi(
            _pct(metrics.get("recall")),
            "Recall",
            f"Of the {tp + fn:,} real anomalies, the share the model flagged ({tp:,}).",
        ),
    ]
    vus = _vus_kpis(metrics)
    pa = ""
    if "pa_f1" in metrics:
        better = "VUS-PR or the unadjusted numbers above" if vus else "the unadjusted numbers above"
        pa = (
            '<p class="pa"><strong>Time series, point-adjusted (inflated):</strong> '
            f"PA-F1 {_e(_fmt(metrics['pa_f1']))}, PA ROC-AUC {_e(_fmt(metrics.get('pa_roc_auc')))}, "
            f"PA AUC-PR {_e(_fmt(metrics.get('pa_pr_auc')))} over {_e(_fmt(metrics.get('segments')))} labelled "
            "segments. Point adjustment counts a whole labelled segment as caught when any one of its rows is "
            "flagged, so these numbers flatter every model (even random scores); compare models on "
            f"{better}.</p>"
        )
    return f"""<header>
<h1>Evaluation of the {_e(kind)} <code>{_e(version)}</code></h1>
<p class="lede">{_fmt(metrics.get("rows"))} scored rows at <code>{_e(metrics.get("scores"))}</code>{data};
labels from column <code>{_e(metrics.get("label_column"))}</code>: {pos:,} anomalies
({_pct(_ratio(pos, pos + neg))}) and {neg:,} normal rows. Metrics {_e(exact)}.</p>
<div class="kpis">{"".join(kpis)}</div>
{vus}{pa}
</header>"""


def _confusion(metrics: dict) -> str:
    tp, fp, fn, tn = (metrics.get(k) or 0 for k in ("tp", "fp", "fn", "tn"))

    def row(name: str, a: int, a_what: str, b: int, b_what: str, a_good: bool) -> str:
        cls = ("good", "bad") if a_good else ("bad", "good")
        cells = "".join(
            f'<td class="{c}"><strong>{n:,}</strong><small>{_pct(_ratio(n, a + b))} {what}</small></td>'
            for n, what, c in ((a, a_what, cls[0]), (b, b_what, cls[1]))
        )
        return f'<tr><th>{name}</th>{cells}<td class="n">{a + b:,}</td></tr>'

    return f"""<section><h2>Confusion matrix at the threshold</h2>
<table class="cm">
<tr><th></th><th>flagged</th><th>not flagged</th><th class="n">total</th></tr>
{row("anomaly", tp, "caught", fn, "missed", True)}
{row("normal", fp, "false alarms", tn, "left alone", False)}
<tr><th>total</th><td>{tp + fp:,}</td><td>{fn + tn:,}</td><td class="n">{tp + fp + fn + tn:,}</td></tr>
</table>
<p class="note">Labelled rows with a score; a row is flagged when the model marked it <code>is_anomaly</code>.</p>
</section>"""


def _threshold_rule(record: ThresholdRecord) -> str:
    """How the bundle's threshold was fit, in words (its ``threshold`` record)."""
    rule, c = record.threshold, record.contamination
    n, on = record.n_scores, record.fit_on or "validation"
    of = f"{_fmt(n)} {_e(on)} scores" if n is not None else f"the {_e(on)} scores"
    if rule == "quantile" and c is not None:
        return (
            f"fit at training time as the {_fmt(1 - c)} quantile of {of}: a target false-positive rate of "
            f"{_pct(c)} on normal data (<code>threshold=quantile</code>, <code>contamination={_fmt(c)}</code>)."
        )
    if rule == "pot" and c is not None:
        return (
            f"fit at training time by peaks over threshold: a generalized Pareto tail fit to {of} above their "
            f"{_fmt(record.pot_level)} quantile, cut where the tail is exceeded with probability "
            f"{_fmt(c)} (<code>threshold=pot</code>)."
        )
    return f"fit at training time: <code>{_e(_fmt(record.model_dump(exclude_unset=True)))}</code>."


def _threshold(metrics: dict, card: ModelCard) -> str:
    t, source = metrics.get("threshold"), metrics.get("threshold_source")
    if source == "job.json":
        where = "the model's threshold, as the scoring job recorded it (<code>_unusual/job.json</code>)"
    elif source == "smallest flagged score":
        where = "not recorded with the scores: taken as the smallest score the model flagged"
    else:
        where = "unknown: the scores carry no threshold and no row was flagged"
    rule = f"<p>How it was chosen: {_threshold_rule(card.manifest.threshold)}</p>" if card.manifest else ""
    tp, fp = metrics.get("tp") or 0, metrics.get("fp") or 0
    labelled = sum(metrics.get(k) or 0 for k in ("tp", "fp", "fn", "tn"))
    best = ""
    if metrics.get("best_f1") is not None:
        best = (
            f"<p>For comparison, the best F1 at any threshold is {_e(_fmt(metrics['best_f1']))}, at a threshold of "
            f"{_e(_fmt(metrics.get('best_f1_threshold')))} (chosen with the labels, so it is optimistic).</p>"
        )
    return f"""<section><h2>Threshold</h2>
<p><strong>{_e(_fmt(t))}</strong>: {where}. Rows scoring above it are flagged: {tp + fp:,} of
{labelled:,} labelled rows ({_pct(_ratio(tp + fp, labelled))}).</p>
{rule}{best}
</section>"""


def _kv_table(d: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _features(m: Manifest) -> str:
    cols = m.features.get("columns") or []
    if not cols:
        return "–"
    kinds: dict[str, int] = {}
    for c in cols:
        kinds[c.get("kind", "?")] = kinds.get(c.get("kind", "?"), 0) + 1
    count = f"{len(cols):,} ({', '.join(f'{n:,} {_e(k)}' for k, n in kinds.items())})"
    names = ", ".join(f"<code>{_e(c.get('name'))}</code>" for c in cols)
    if len(cols) > 12:
        return f"{count}<details><summary>show all {len(cols):,} names</summary>{names}</details>"
    return f"{count}: {names}"


def _top_features(card: ModelCard) -> str:
    if not card.top_features:
        return ""
    rows = "".join(
        f"<tr><td><code>{_e(f['feature'])}</code></td><td class='n'>{_pct(f['share'])}</td>"
        f"<td class='n'>{_pct(f['flagged_share'])}</td><td class='n'>{_e(_fmt(f['mean_contribution']))}</td></tr>"
        for f in card.top_features
    )
    return f"""<h3>Features that drive the scores</h3>
<p class="note">From the scorer's per-row attributions (<code>top_features</code>) of {card.top_rows:,} rows:
the features with the largest summed contribution where they are among a row's top features.</p>
<table><tr><th>feature</th><th class="n">among the top, all rows</th><th class="n">… flagged rows</th>
<th class="n">mean contribution</th></tr>{rows}</table>"""


def _model_card(metrics: dict, card: ModelCard) -> str:
    kind, version = _model_name(metrics, card)
    m = card.manifest
    items = [("Model", f"{_e(kind)}, version <code>{_e(version)}</code>")]
    if card.checkpoint:
        items.append(("Bundle", f"<code>{_e(card.checkpoint)}</code>"))
    params = ""
    if m is None:
        note = (
            '<p class="note">The bundle\'s manifest could not be read (the scores do not say where the bundle is, '
            "or it is not reachable): the card shows only what the scores say.</p>"
        )
    else:
        note = ""
        t, cfg = m.training, m.family_config
        items.append(("Features", _features(m)))
        for what, col in (("Entity column", "entity_column"), ("Time column", "time_column")):
            if cfg.get(col):
                items.append((what, f"<code>{_e(cfg[col])}</code>"))
        if t.rows is not None:
            split = f" ({_fmt(t.train_samples)} to train on, {_fmt(t.val_samples)} to validate)"
            items.append(("Training rows", _e(_fmt(t.rows) + split)))
        if t.val_loss:
            run = f"{len(t.val_loss)} epochs, best validation loss {_fmt(min(t.val_loss))} at epoch {t.best_epoch + 1}"
            items.append(("Training run", _e(run)))
        if t.runner:
            items.append(("Trained by", f"<code>{_e(t.runner)}</code>"))
        if m.libraries:
            items.append(("Libraries", _e(_fmt(m.libraries))))
        params = (
            '<div class="cols">'
            f"<div><h3>Architecture</h3>{_kv_table(cfg)}</div>"
            f"<div><h3>Training parameters</h3>{_kv_table(t.config)}</div>"
            "</div>"
        )
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f"""<section><h2>Model card</h2>{note}
<dl>{dl}</dl>
{params}
{_top_features(card)}
</section>"""


def _all_metrics(metrics: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(_label(k))}<br><code>{_e(k)}</code></td>"
        f"<td{' class=s' if isinstance(v, str | list) else ''}>{_e(_fmt(v))}</td></tr>"
        for k, v in metrics.items()
        if k != "partition_rates"  # charted (Anomaly rate by partition)
    )
    note = ""
    if any(k.startswith("pa_") for k in metrics):
        note = (
            '<p class="note">PA: point-adjusted, computed per entity in time order; a labelled segment counts '
            "as caught when any of its rows is flagged, which inflates these metrics.</p>"
        )
    if "vus_pr" in metrics:
        note += (
            '<p class="note">VUS: the volume under the range-based PR / ROC surfaces (TSB-AD), computed per '
            "entity in time order over buffer widths 0 … <code>vus_window</code> and averaged over the series.</p>"
        )
    return f"""<section><h2>All metrics</h2>
<p class="note">Everything in <code>metrics.json</code>, next to this report.</p>{note}
<table class="all"><tr><th>metric <code>key</code></th><th>value</th></tr>{rows}</table>
</section>"""


def report_html(
    metrics: dict, hist: ScoreHistogram, pa_hist: ScoreHistogram | None = None, card: ModelCard | None = None
) -> str:
    """The report as one self-contained HTML page: ``metrics`` (``metrics.json``), the histograms of
    the labelled scores (as scored and point-adjusted) and the ``card`` of the model."""
    card = card or ModelCard()
    kind, version = _model_name(metrics, card)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Evaluation of {_e(kind)} {_e(version)}</title>
<style>{_CSS}</style></head><body>
{_headline(metrics, card)}
<div class="cols">{_confusion(metrics)}{_threshold(metrics, card)}</div>
{_model_card(metrics, card)}
{charts(metrics, hist, pa_hist)}
{_all_metrics(metrics)}
</body></html>
"""
