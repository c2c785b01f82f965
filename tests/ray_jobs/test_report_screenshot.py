"""The evaluation report as a reader sees it.

A tiny autoencoder is fit on the shipped ``cardio`` sample, its scores (with the scorer's
``top_features``) are evaluated by the evaluation's own code without Ray (the block summary,
bin edges and histogram the job merges, then :func:`evaluation_metrics` and :func:`model_card`
reading the saved bundle's manifest), and the report is built from them. One feature and the
label column have names with markup in them, which must come out as text.

The HTML is checked as text (every metric of ``metrics.json`` with its label, nothing
executable, nothing fetched) and as pixels: headless Chromium renders it at 1280 px and at a
phone's 400 px, and Pillow checks that the page is not blank, that each of the three charts drew
its curves, and that nothing sticks out to the right at 400 px (a deliberately overflowing copy
must fail that same check). The screenshots are kept under pytest's ``tmp_path``.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from unusual.models import Detector
from unusual.models.metrics import ScoreHistogram, adjusted_scores, label_segments, point_adjust
from unusual.ray_jobs import sample_data
from unusual.ray_jobs.eval_stats import ScoreSummary, VusSums, bin_edges
from unusual.ray_jobs.evaluate import EvaluateJob, ScoredBy, evaluation_metrics, model_card
from unusual.ray_jobs.report import METRIC_LABELS, report_html
from unusual.ray_jobs.report_charts import ADJUSTED, ANOMALY, NORMAL, _pr_points

EVIL_FEATURE = '<script>alert("f00")</script>'
EVIL_LABEL = "<i>label</i>"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _chromium() -> str | None:
    found = shutil.which("chromium-headless-shell")
    candidates = ("/usr/lib/chromium/chromium-headless-shell", "/usr/lib/chromium/headless_shell")
    return found or next((p for p in candidates if os.access(p, os.X_OK)), None)


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless Chromium: install the Debian package chromium-headless-shell (apt-get install "
    "chromium-headless-shell) to run the report's screenshot test",
)


# --------------------------------------------------------------------------- the evaluation


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """(metrics, histogram, model card, scores, labels, flags) of a tiny AE evaluated on cardio."""
    cardio = sample_data.load("cardio")
    names = [EVIL_FEATURE if c == "f00" else EVIL_LABEL if c == "label" else c for c in cardio.column_names]
    data = cardio.rename_columns(names)
    det = Detector("ae", epochs=2, hidden=[16], exclude=[EVIL_LABEL], verbose=False).fit(data)
    bundle = str(tmp_path_factory.mktemp("bundle") / "ae")
    det.save(bundle)
    scored = det.score_table(data).append_column(EVIL_LABEL, data.column(EVIL_LABEL))

    # what the evaluation job merges over the blocks, here over the one block
    summary = ScoreSummary.of(scored, EVIL_LABEL)
    edges, exact = bin_edges(summary, 1000)
    score = scored.column("anomaly_score").to_numpy()
    label = scored.column(EVIL_LABEL).to_numpy(zero_copy_only=False)
    flag = scored.column("is_anomaly").to_numpy(zero_copy_only=False)
    hist = ScoreHistogram.of(score, label, edges, pred=flag)
    # what the scoring job records in _unusual/job.json
    spec = ScoredBy(
        checkpoint=bundle,
        model_version=det.version,
        kind="ae",
        threshold=det.threshold_,
        data="unusual.ray_jobs.sample_data cardio",
    )
    job = EvaluateJob(scores="file:///scores/cardio", label_column=EVIL_LABEL)
    metrics = evaluation_metrics(job, summary, edges, exact, hist, None, spec)
    return metrics, hist, model_card(spec, summary), (score, label, flag, edges, spec, summary)


@pytest.fixture(scope="module")
def report(evaluation) -> str:
    metrics, hist, card, _ = evaluation
    return report_html(metrics, hist, None, card)


# --------------------------------------------------------------------------- the HTML


class _Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


def _assert_inert(page: str) -> None:
    """No script, no event handlers, nothing fetched; the CSP that says so is there."""
    tags = _tags(page)
    names = {t for t, _ in tags}
    assert not names & {"script", "iframe", "object", "embed", "link", "img", "base", "form"}, names
    for tag, attrs in tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        assert "src" not in attrs, (tag, attrs)
        for a in ("href", "xlink:href"):
            assert attrs.get(a) is None or attrs[a].startswith("#"), (tag, attrs)  # in-page references only
    assert ("meta", {"http-equiv": "Content-Security-Policy", "content": CSP}) in tags
    assert "javascript:" not in page.lower()


def _metric_rows(page: str) -> dict[str, tuple[str, str]]:
    """The all-metrics table: key -> (label, value) as text."""
    section = page[page.index("<h2>All metrics</h2>") :]
    out = {}
    for row in re.findall(r"<tr><td>(.*?)<br><code>(.*?)</code></td><td[^>]*>(.*?)</td></tr>", section):
        label, key, value = (html.unescape(x) for x in row)
        out[key] = (label, value)
    return out


def _assert_value(value: str, v) -> None:
    if v is None:
        assert value == "–"
    elif isinstance(v, bool):
        assert value == ("yes" if v else "no")
    elif isinstance(v, int):
        assert int(value.replace(",", "")) == v
    elif isinstance(v, float):
        assert float(value) == pytest.approx(v, rel=1e-3)
    elif isinstance(v, list):
        assert value == ", ".join(v)
    else:
        assert value == v


def _point_adjusted(evaluation) -> tuple[dict, ScoreHistogram, ScoreHistogram, object]:
    """The same scores taken as one series in row order, point-adjusted by the project's functions, with
    their VUS."""
    _, hist, card, (score, label, flag, edges, spec, summary) = evaluation
    pa_hist = ScoreHistogram.of(adjusted_scores(score, label), label, edges, pred=point_adjust(flag, label))
    pa_hist.segments = len(label_segments(label))
    job = EvaluateJob(scores="file:///scores/cardio", label_column=EVIL_LABEL, time_column="row")
    vus = VusSums.of(np.asarray(label, bool), score, job.vus_window)
    metrics = evaluation_metrics(job, summary, edges, True, hist, pa_hist, spec, vus)
    return metrics, hist, pa_hist, card


def test_every_metric_is_in_the_report_with_its_label(evaluation, report):
    metrics, *_ = evaluation
    pa_metrics, hist, pa_hist, card = _point_adjusted(evaluation)
    pa_report = report_html(pa_metrics, hist, pa_hist, card)
    for m, page in ((metrics, report), (pa_metrics, pa_report)):
        rows = _metric_rows(page)
        assert list(rows) == list(m)  # every metric, in metrics.json's order
        for key, v in m.items():
            assert key in METRIC_LABELS, f"metric {key!r} has no human label"
            label, value = rows[key]
            assert label == METRIC_LABELS[key]
            _assert_value(value, v)
        _assert_inert(page)
    assert {k for k in pa_metrics if k.startswith("pa_") and "threshold" not in k} == {
        k for k in pa_metrics if "inflated" in METRIC_LABELS[k]
    }
    assert "Time series, point-adjusted (inflated)" in pa_report and "PA-F1" in pa_report
    # VUS, range-based, beside them and not marked inflated; only with a time column
    assert {k for k in pa_metrics if k.startswith("vus_")} == {"vus_pr", "vus_roc", "vus_window", "vus_series"}
    assert pa_metrics["vus_series"] == 1 and 0 < pa_metrics["vus_pr"] <= 1 and 0 < pa_metrics["vus_roc"] <= 1
    assert '<div class="k">VUS-PR (time series)</div>' in pa_report and "VUS-ROC" in pa_report
    assert "compare models on VUS-PR" in pa_report and "VUS" not in report
    assert pa_report.count("<svg") == 3 and "point-adjusted (AUC" in pa_report


def test_headline_card_and_escaping(evaluation, report):
    metrics, _, card, (*_, spec, summary) = evaluation
    _assert_inert(report)
    # the names with markup are text
    assert "<i>" not in report and "<script" not in report.lower()
    assert html.escape(EVIL_FEATURE) in report and html.escape(EVIL_LABEL) in report
    # the headline: model, data, the five numbers in words
    assert f"<code>{spec.model_version}</code>" in report and "autoencoder (ae)" in report
    for name in ("ROC-AUC", "AUC-PR (average precision)", "F1 at the threshold", "Precision", "Recall"):
        assert f'<div class="k">{name}</div>' in report
    assert f'<div class="v">{metrics["roc_auc"]:.4g}</div>' in report
    assert f'<div class="v">{100 * metrics["recall"]:.1f}%</div>' in report
    # confusion matrix, threshold and how it was fit
    assert f"<strong>{metrics['tp']:,}</strong>" in report and f"<strong>{metrics['tn']:,}</strong>" in report
    assert "0.99 quantile of " in report and "<code>contamination=0.01</code>" in report
    # the model card, from the bundle's manifest
    assert card.manifest is not None and card.manifest.model_version == spec.model_version
    assert "21 (21 numeric)<details>" in report and "1,831 (1,556 to train on, 275 to validate)" in report
    assert "<th>epochs</th><td>2</td>" in report and "<th>hidden</th><td>16</td>" in report
    top = summary.top.ranked()
    assert len(top) == 10 and card.top_features == top and card.top_rows == 1831
    assert f"<code>{html.escape(top[0]['feature'])}</code>" in report
    # charts: three inline SVGs with text as text, the same bytes each time
    assert report.count("<svg") == report.count('class="chart"') == 3
    assert "<dc:date>" not in report and report == report_html(*evaluation[:2], None, evaluation[2])


def test_pr_curve_starts_at_the_first_anomaly_caught():
    """No vertical jump at recall 0: the highest score is a normal row, yet the curve starts at recall
    0 with the precision of the first threshold that catches an anomaly, and the area under its
    steps is the average precision."""
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    labels = np.array([0, 1, 0, 1, 1, 0, 0, 0], bool)
    h = ScoreHistogram.of(scores, labels, np.unique(scores))
    r, p = _pr_points(h)
    assert (r[0], p[0]) == (0.0, 0.5) and (r[1], p[1]) == (pytest.approx(1 / 3), 0.5)
    assert np.all(np.diff(r) >= 0)
    assert np.sum(np.diff(r) * p[1:]) == pytest.approx(h.average_precision())


# --------------------------------------------------------------------------- the pixels


def _render(page: Path, png: Path, width: int, height: int) -> np.ndarray:
    """A screenshot of the page in a ``width`` x ``height`` window, as an RGB array."""
    from PIL import Image

    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={png.parent / ('profile-' + png.stem)}",
        f"--window-size={width},{height}",
        f"--screenshot={png}",
        page.as_uri(),
    ]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)
    print(f"screenshot: {png}")
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _ink(shot: np.ndarray) -> np.ndarray:
    """Pixels that are not the white background."""
    return (shot < 245).any(axis=2)


def _colour(shot: np.ndarray, hex_colour: str, tolerance: int = 40) -> np.ndarray:
    """Pixels within ``tolerance`` of a chart colour."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.int16)
    return (np.abs(shot - rgb) <= tolerance).all(axis=2)


def _overflows(shot: np.ndarray, margin: int = 8) -> bool:
    """Whether anything is drawn in the rightmost ``margin`` columns: the page has a 16 px padding,
    so only content wider than the window gets there (and is cut off)."""
    return bool(_ink(shot)[:, -margin:].any())


@needs_chromium
def test_screenshots(report, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report, encoding="utf-8")
    _assert_inert(report)

    wide = _render(page, tmp_path / "report-1280.png", 1280, 2400)
    assert wide.shape == (2400, 1280, 3)
    assert _ink(wide).mean() > 0.03, "the page is (nearly) blank"
    # the three charts side by side, each with its curves in the chart colours
    blue, red = _colour(wide, NORMAL), _colour(wide, ANOMALY)
    assert blue.sum() > 1500 and red.sum() > 300, (blue.sum(), red.sum())
    assert not _colour(wide, ADJUSTED).any()  # no point-adjusted curves without a time column
    cols = np.flatnonzero(blue.any(axis=0))
    thirds = np.array_split(np.arange(cols.min(), cols.max() + 1), 3)
    per_chart = [int(blue[:, t].sum()) for t in thirds]
    assert min(per_chart) > 150, per_chart  # ROC, PR and the distribution each drew
    rows = np.flatnonzero(blue.any(axis=1))
    assert rows.max() - rows.min() > 150  # curves over the height of a chart, not a stray line

    phone = _render(page, tmp_path / "report-400.png", 400, 9000)
    ink = _ink(phone)
    assert not ink[-200:].any(), "the page is taller than the window: the check below would not see it all"
    assert not _overflows(phone), "something is wider than a 400 px screen"
    assert _colour(phone, NORMAL).sum() > 800 and _colour(phone, ANOMALY).sum() > 150

    # the same check fails on a page that does overflow
    wider = report.replace("</head>", "<style>.charts{min-width:700px}</style></head>")
    bad = tmp_path / "overflowing.html"
    bad.write_text(wider, encoding="utf-8")
    assert _overflows(_render(bad, tmp_path / "overflowing-400.png", 400, 9000))
