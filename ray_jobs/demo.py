"""``unusual demo``: the three model families on shipped real data, end to end.

Tabular (AE, VAE): ODDS cardio; fit on 70 % of the normal rows, score the rest
plus every anomaly. Sequence (LSTM): the NAB EC2 request-latency series; fit
on its first half, score the whole series, evaluate on the second half. Each
model is saved as a bundle, loaded back and scored through the Scorer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from models import Detector, Scorer
from models.metrics import roc_auc
from ray_jobs import sample_data


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _report(name: str, out: pa.Table, labels: np.ndarray, seconds: float, threshold: float) -> dict:
    scores = out.column("anomaly_score").to_numpy()
    flagged = out.column("is_anomaly").to_numpy(zero_copy_only=False)
    tp = int((flagged & labels).sum())
    row = {
        "model": name,
        "rows": len(scores),
        "roc_auc": round(roc_auc(labels, scores), 4),
        "flagged": int(flagged.sum()),
        "precision": round(tp / max(flagged.sum(), 1), 3),
        "recall": round(tp / max(labels.sum(), 1), 3),
        "threshold": round(threshold, 4),
        "fit_s": round(seconds, 1),
    }
    top = out.column("top_features")[int(np.argmax(scores))].as_py()
    row["top_row_features"] = ", ".join(f"{t['feature']} ({t['contribution']:.3g})" for t in top)
    return row


def run_demo(workdir: str, quick: bool = False) -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    epochs = {"epochs": 5} if quick else {}
    rows = []

    cardio = sample_data.load("cardio")
    labels = cardio.column("label").to_numpy()
    rng = np.random.default_rng(0)
    normal = np.flatnonzero(~labels)
    train_idx = np.sort(rng.choice(normal, int(0.7 * normal.size), replace=False))
    test_idx = np.setdiff1d(np.arange(cardio.num_rows), train_idx)
    features = cardio.drop_columns(["label"])
    for kind in ("ae", "vae"):
        _say(f"[{kind}] fitting on {train_idx.size:,} normal cardio rows …")
        t0 = time.perf_counter()
        det = Detector(kind, **epochs).fit(features.take(train_idx))
        seconds = time.perf_counter() - t0
        uri = str(work / f"{kind}-cardio")
        version = det.save(uri, overwrite=True)
        scorer = Scorer(uri)
        out = scorer.score_table(features.take(test_idx))
        rows.append(_report(f"{kind} (cardio)", out, labels[test_idx], seconds, scorer.threshold))
        _say(f"[{kind}] saved {version} to {uri}")

    series = sample_data.load("nab_ec2_request_latency")
    labels = series.column("label").to_numpy()
    half = series.num_rows // 2
    data = series.drop_columns(["label"])
    _say(f"[lstm] fitting on the first {half:,} points of NAB ec2_request_latency …")
    t0 = time.perf_counter()
    det = Detector("lstm", time_column="timestamp", **epochs).fit(data.slice(0, half))
    seconds = time.perf_counter() - t0
    uri = str(work / "lstm-nab-ec2")
    version = det.save(uri, overwrite=True)
    scorer = Scorer(uri)
    out = scorer.score_table(data).slice(half)
    rows.append(_report("lstm (NAB ec2)", out, labels[half:], seconds, scorer.threshold))
    _say(f"[lstm] saved {version} to {uri}")

    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in keys))
    print(f"\nbundles in {work.resolve()} (inspect with: unusual info {work / 'ae-cardio'})")
    return 0
