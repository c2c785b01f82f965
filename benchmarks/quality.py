#!/usr/bin/env python
"""Detection-quality benchmark of unusual's detectors on real, labelled data.

Suites (see benchmarks/README.md for the protocol of each):

- ``tabular``: the ODDS sets, semi-supervised (fit on 70 % of the normal rows,
  test on the other normals plus every anomaly), our ``ae`` / ``vae`` against
  PyOD's AutoEncoder, VAE and IsolationForest, over several seeds.
- ``smd``: Server Machine Dataset, one model per machine, our ``lstm`` (and
  ``ae`` / IsolationForest as non-sequence baselines); ROC-AUC, PR-AUC and F1
  with and without point adjustment.
- ``nslkdd``: NSL-KDD (20 % train file) with its categorical columns, our
  ``ae`` (and IsolationForest on one-hot features), semi-supervised split.
- ``timeseries``: every shared time-series set (SMD, NAB, SMAP, MSL, ASD), our ``lstm`` beside TSB-AD's
  own LSTMAD, CNN, PCA, KMeansAD and IForest, scored with TSB-AD's VUS-PR / VUS-ROC first
  (``benchmarks/timeseries.py`` has the protocol; ``--per-set N`` for a shorter run).
- ``tabular-unsupervised``: ADBench's unsupervised protocol on every shared
  tabular set (the ODDS sets, the ADBench ``.npz`` sets and NSL-KDD): a
  stratified 70 / 30 split of ALL rows per seed, so the training split is
  contaminated with its share of the anomalies; fit on the 70 %, score the
  30 %. Our ``ae`` / ``vae`` with their defaults beside PyOD's AutoEncoder, VAE,
  IForest, PCA, ECOD, KNN and MCD (PyOD defaults; NSL-KDD's categorical columns
  one-hot encoded for PyOD, given as they are to ours). Means are reported over
  all sets and apart over the sets with more than 15 % anomalies and the rest.
  ``--max-rows N`` subsamples each set (stratified, seeded) to N rows before the
  split.

Each run replaces the suites it ran in the JSON / markdown and keeps the others
from the file it writes to (each suite block records its own commit, time and
command), so running one suite does not erase the other suites' results.

Writes a JSON record (default ``benchmarks/results/quality.json``) and prints
markdown tables, also written next to the JSON as ``.md``.

    python benchmarks/quality.py                          # everything, defaults
    python benchmarks/quality.py --suites tabular --methods ours --seeds 0,1
    python benchmarks/quality.py --suites smd --params-lstm '{"epochs": 20}'
    python benchmarks/quality.py --suites timeseries --per-set 6
    python benchmarks/quality.py --self-check             # metric helpers only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO / ".." / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quality.json"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import timeseries  # noqa: E402
from harness import environment, loadavg  # noqa: E402
from timeseries import ANCHORS, SETS  # noqa: E402
from timeseries import markdown_table as _table  # noqa: E402
from unusual.models.metrics import (  # noqa: E402  (after the sys.path set-up above)
    best_f1,
    best_f1_pa,
    label_segments,
    point_adjust,
    prf,
    ranking_metrics,
)
from unusual.models.vus import series_period, vus  # noqa: E402

SUITES = ("tabular", "smd", "nslkdd", "tabular-unsupervised", "timeseries")
OURS = ("ae", "vae", "lstm")
PYOD = ("pyod_ae", "pyod_vae", "iforest", "pca", "ecod", "knn", "mcd")
TSB = tuple(ANCHORS)
ALL_METHODS = OURS + PYOD + TSB
SUITE_METHODS = {
    "tabular": ("ae", "vae", "pyod_ae", "pyod_vae", "iforest"),
    "smd": ("lstm", "ae", "iforest"),
    "nslkdd": ("ae", "vae", "iforest"),
    "tabular-unsupervised": ("ae", "vae", "pyod_ae", "pyod_vae", "iforest", "pca", "ecod", "knn", "mcd"),
    "timeseries": ("lstm", *TSB),
}
METHOD_LABELS = {
    "ae": "ours ae",
    "vae": "ours vae",
    "lstm": "ours lstm",
    "pyod_ae": "PyOD AutoEncoder",
    "pyod_vae": "PyOD VAE",
    "iforest": "PyOD IForest",
    "pca": "PyOD PCA",
    "ecod": "PyOD ECOD",
    "knn": "PyOD KNN",
    "mcd": "PyOD MCD",
    "tsb_lstmad": "TSB-AD LSTMAD",
    "tsb_cnn": "TSB-AD CNN",
    "tsb_pca": "TSB-AD PCA",
    "tsb_kmeansad": "TSB-AD KMeansAD",
    "tsb_iforest": "TSB-AD IForest",
}
TRAIN_FRACTION = 0.7
UNSUPERVISED_TRAIN_FRACTION = 0.7  # ADBench: stratified 70 / 30 split of all rows
HIGH_CONTAMINATION = 0.15  # tabular-unsupervised: sets with a larger anomaly share are averaged apart
# tabular-unsupervised: the pseudo-datasets of its summary (means over groups of sets) and their labels
UNSUPERVISED_GROUPS = {
    "average": "mean over all sets",
    "average_high_contamination": "mean over high-contamination sets (>15 % anomalies)",
    "average_rest": "mean over the rest",
}

log = logging.getLogger("quality")


# =========================================================================== metrics
# The helpers (label_segments, point_adjust, prf, best_f1, best_f1_pa,
# ranking_metrics) live in models/metrics.py, shared with `unusual evaluate`.


def self_check() -> None:
    """Checks of the metric helpers against hand-computed and brute-force answers."""
    from sklearn.metrics import precision_recall_curve

    # Hand example: two segments [1,4) and [6,8); the first is hit once, the second missed.
    label = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0])
    pred = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1])
    assert label_segments(label).tolist() == [[1, 4], [6, 8]]
    assert point_adjust(pred, label).astype(int).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 1]
    m = prf(point_adjust(pred, label), label)  # TP 3, FP 1, FN 2
    assert (m["precision"], m["recall"]) == (0.75, 0.6) and abs(m["f1"] - 2 / 3) < 1e-12, m
    m = prf(pred, label)  # TP 1, FP 1, FN 4
    assert (m["precision"], m["recall"]) == (0.5, 0.2), m
    # Segments touching both ends of the series.
    assert label_segments([1, 1, 0, 1]).tolist() == [[0, 2], [3, 4]]
    assert point_adjust([0, 1, 0, 0], [1, 1, 0, 1]).astype(int).tolist() == [1, 1, 0, 0]

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(5, 60))
        lab = (rng.random(n) < rng.uniform(0.05, 0.5)).astype(int)
        if trial % 3 == 0:  # longer runs, like SMD
            lab = np.repeat(lab[: max(1, n // 5)], 5)[:n]
            n = lab.size
        if lab.sum() == 0:
            lab[int(rng.integers(n))] = 1
        sc = np.round(rng.normal(size=n) + lab * rng.uniform(0, 2), 1)  # ties on purpose
        brute = max(prf(point_adjust(sc >= t, lab), lab)["f1"] for t in np.unique(sc))
        assert abs(best_f1_pa(sc, lab)["f1"] - brute) < 1e-12, (trial, brute, best_f1_pa(sc, lab))
        brute = max(prf(sc >= t, lab)["f1"] for t in np.unique(sc))
        assert abs(best_f1(sc, lab)["f1"] - brute) < 1e-12
        p, r, _ = precision_recall_curve(lab, sc)
        f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
        assert abs(best_f1(sc, lab)["f1"] - f.max()) < 1e-9
        t = best_f1_pa(sc, lab)["threshold"]
        assert abs(prf(point_adjust(sc >= t, lab), lab)["f1"] - best_f1_pa(sc, lab)["f1"]) < 1e-12
    print("self-check passed: label_segments, point_adjust, prf, best_f1, best_f1_pa")


# =========================================================================== data


def semi_supervised_split(y: np.ndarray, seed: int, frac: float = TRAIN_FRACTION):
    """Train on a random ``frac`` of the normal rows; test on the other normals plus all anomalies."""
    y = np.asarray(y).astype(int)
    normal = np.flatnonzero(y == 0)
    perm = np.random.default_rng(seed).permutation(normal)
    n_train = int(round(frac * normal.size))
    train = np.sort(perm[:n_train])
    test = np.sort(np.concatenate([perm[n_train:], np.flatnonzero(y == 1)]))
    return train, test


def stratified_split(y: np.ndarray, seed: int, frac: float = UNSUPERVISED_TRAIN_FRACTION):
    """ADBench's unsupervised protocol: a stratified random ``frac`` of all rows (anomalies included) to
    train on, the rest to test on; both keep the data set's contamination."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, test = train_test_split(idx, train_size=frac, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def stratified_subsample(y: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Positions of a stratified, seeded subsample of at most ``n`` rows (all rows if ``n`` is None)."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return np.sort(keep)


def load_odds(data_dir: Path) -> dict:
    import scipy.io

    out = {}
    for path in sorted((data_dir / "tabular" / "odds").glob("*.mat")):
        m = scipy.io.loadmat(path)
        out[path.stem] = (np.asarray(m["X"], dtype=np.float64), np.asarray(m["y"]).ravel().astype(int))
    return out


def load_adbench(data_dir: Path) -> dict:
    """ADBench's classical sets, ``tabular/adbench/<k>_<name>.npz`` with keys ``X`` and ``y``, named
    by the file stem without its numeric prefix (``22_magic.gamma.npz`` -> ``magic.gamma``)."""
    out = {}
    for path in sorted((data_dir / "tabular" / "adbench").glob("*.npz")):
        prefix, sep, name = path.stem.partition("_")
        if not (sep and prefix.isdigit() and name):
            name = path.stem
        if name in out:
            raise SystemExit(f"two ADBench files map to the data set name {name!r} (last: {path})")
        with np.load(path, allow_pickle=True) as d:
            out[name] = (np.asarray(d["X"], dtype=np.float64), np.asarray(d["y"]).ravel().astype(int))
    return out


def load_smd(data_dir: Path) -> dict:
    out = {}
    for path in sorted((data_dir / "timeseries" / "smd").glob("machine-*.npz")):
        d = np.load(path)
        out[path.stem] = (
            np.asarray(d["train"], dtype=np.float64),
            np.asarray(d["test"], dtype=np.float64),
            np.asarray(d["test_label"]).astype(int),
        )
    return out


def load_nslkdd(data_dir: Path):
    import pandas as pd

    root = data_dir / "network" / "nsl_kdd"
    names = []
    with open(root / "field_names.csv") as f:
        for line in f:
            line = line.strip()
            if line:
                names.append(line.split(",")[0].strip())
    names += ["label", "difficulty"]
    df = pd.read_csv(root / "KDDTrain+_20Percent.txt", header=None, names=names)
    if df.shape[1] != 43 or df["label"].isna().any():
        raise SystemExit(f"unexpected NSL-KDD layout: {df.shape} with columns {names}")
    y = (df["label"] != "normal").to_numpy().astype(int)
    X = df.drop(columns=["label", "difficulty"])
    for c in ("protocol_type", "service", "flag"):
        X[c] = X[c].astype(str)
    return X, y


# =========================================================================== methods


class MethodError(Exception):
    pass


def our_params(args, kind: str, seed: int, clean: bool = False) -> dict:
    """Our parameters: ``--params-<kind>``, the seed and, on a semi-supervised split (training rows all
    normal), ``clean=True``, the documented switch for clean training data (README: Data with anomalies)."""
    switch = {"clean": True} if clean and kind in ("ae", "vae") else {}
    return {**switch, **getattr(args, f"params_{kind}"), "seed": seed}


def run_ours(kind: str, params: dict, X_train, X_test) -> dict:
    from unusual.models import Detector

    det = Detector(kind, **params)
    t0 = time.perf_counter()
    det.fit(X_train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = det.score(X_test)
    score_s = time.perf_counter() - t0
    hist = det.history_
    info = {
        "epochs_run": len(hist.get("train_loss", [])),
        "best_epoch": hist.get("best_epoch"),
        "stopped_early": hist.get("stopped_early"),
        "final_train_loss": (hist.get("train_loss") or [None])[-1],
        "best_val_loss": min(hist["val_loss"]) if hist.get("val_loss") else None,
        "threshold": float(det.threshold_),
    }
    return {"scores": scores, "fit_s": fit_s, "score_s": score_s, "info": info, "detector": det}


def run_pyod(method: str, seed: int, X_train: np.ndarray, X_test: np.ndarray) -> dict:
    if method == "pyod_ae":
        from pyod.models.auto_encoder import AutoEncoder

        # PyOD seeds python/numpy/torch in __init__, so build it right before fit.
        model = AutoEncoder(random_state=seed, verbose=0)
    elif method == "pyod_vae":
        from pyod.models.vae import VAE

        model = VAE(random_state=seed, verbose=0)
    elif method == "iforest":
        from pyod.models.iforest import IForest

        model = IForest(random_state=seed)
    elif method == "pca":
        from pyod.models.pca import PCA

        model = PCA(random_state=seed)
    elif method == "ecod":
        from pyod.models.ecod import ECOD

        model = ECOD()
    elif method == "knn":
        from pyod.models.knn import KNN

        model = KNN()
    elif method == "mcd":
        from pyod.models.mcd import MCD

        # can fail on a singular covariance (one-hot or constant columns): recorded as that run's error
        model = MCD(random_state=seed)
    else:
        raise MethodError(f"unknown PyOD method {method}")
    t0 = time.perf_counter()
    model.fit(X_train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model.decision_function(X_test)
    score_s = time.perf_counter() - t0
    return {"scores": np.asarray(scores, dtype=np.float64), "fit_s": fit_s, "score_s": score_s, "info": {}}


def run_method(args, method: str, seed: int, X_train, X_test, clean: bool = False) -> dict:
    if method in OURS:
        return run_ours(method, our_params(args, method, seed, clean), X_train, X_test)
    return run_pyod(method, seed, X_train, X_test)


def finite_check(scores: np.ndarray) -> dict:
    bad = int((~np.isfinite(scores)).sum())
    return {"nonfinite_scores": bad}


def safe_scores(scores: np.ndarray) -> np.ndarray:
    """Non-finite scores rank as most anomalous (+inf / NaN) or least (-inf) for the metrics."""
    s = np.asarray(scores, dtype=np.float64).copy()
    finite = s[np.isfinite(s)]
    hi = finite.max() + 1 if finite.size else 1.0
    lo = finite.min() - 1 if finite.size else 0.0
    s[np.isnan(s) | (s == np.inf)] = hi
    s[s == -np.inf] = lo
    return s


def record_failure(rec: dict, e: BaseException) -> dict:
    rec["error"] = f"{type(e).__name__}: {e}"
    rec["traceback"] = traceback.format_exc()
    log.error("  %s seed %s on %s failed: %s", rec["method"], rec["seed"], rec["dataset"], rec["error"])
    return rec


# =========================================================================== suites


def suite_tabular(args, data_dir: Path, methods: list[str]) -> list[dict]:
    sets = load_odds(data_dir)
    if not sets:
        raise SystemExit(f"no ODDS .mat files under {data_dir / 'tabular' / 'odds'}")
    runs = []
    for name, (X, y) in sets.items():
        if args.datasets and name not in args.datasets:
            continue
        log.info("tabular %s: %d rows x %d cols, %d anomalies", name, *X.shape, int(y.sum()))
        for seed in args.seeds:
            tr, te = semi_supervised_split(y, seed)
            for method in methods:
                rec = {
                    "suite": "tabular",
                    "dataset": name,
                    "method": method,
                    "seed": seed,
                    "n_train": int(tr.size),
                    "n_test": int(te.size),
                    "n_test_anomalies": int(y[te].sum()),
                }
                try:
                    out = run_method(args, method, seed, X[tr], X[te], clean=True)
                    rec.update(finite_check(out["scores"]))
                    rec.update(ranking_metrics(y[te], safe_scores(out["scores"])))
                    rec.update(fit_s=out["fit_s"], score_s=out["score_s"], info=out["info"])
                    log.info(
                        "  %-8s seed %d  roc %.4f  pr %.4f  fit %.1fs",
                        method,
                        seed,
                        rec["roc_auc"],
                        rec["pr_auc"],
                        rec["fit_s"],
                    )
                except Exception as e:  # noqa: BLE001 - record and go on with the next run
                    record_failure(rec, e)
                runs.append(rec)
    return runs


def smd_record(name, method, seed, scores, label, fit_s, score_s, info, pred=None, vus_window=100) -> dict:
    rec = {"suite": "smd", "dataset": name, "method": method, "seed": seed}
    rec.update(finite_check(scores))
    s = safe_scores(scores)
    rec.update(ranking_metrics(label, s))
    rec.update(vus(label, s, vus_window), vus_window=vus_window)
    b, bpa = best_f1(s, label), best_f1_pa(s, label)
    rec.update(best_f1=b["f1"], best_f1_pa=bpa["f1"], best_f1_detail=b, best_f1_pa_detail=bpa)
    if pred is not None:
        at, at_pa = prf(pred, label), prf(point_adjust(pred, label), label)
        rec.update(
            f1_at_threshold=at["f1"],
            f1_pa_at_threshold=at_pa["f1"],
            at_threshold_detail=at,
            at_threshold_pa_detail=at_pa,
        )
    rec.update(fit_s=fit_s, score_s=score_s, info=info)
    return rec


def suite_smd(args, data_dir: Path, methods: list[str]) -> list[dict]:
    sets = load_smd(data_dir)
    if not sets:
        raise SystemExit(f"no machine-*.npz under {data_dir / 'timeseries' / 'smd'}")
    runs = []
    for name, (train, test, label) in sets.items():
        if args.datasets and name not in args.datasets:
            continue
        log.info(
            "smd %s: train %s, test %s, %.2f%% anomalous, %d segments",
            name,
            train.shape,
            test.shape,
            100 * label.mean(),
            len(label_segments(label)),
        )
        for seed in args.smd_seeds:
            for method in methods:
                rec = {"suite": "smd", "dataset": name, "method": method, "seed": seed}
                try:
                    out = run_method(args, method, seed, train, test)
                    pred = None
                    if method in OURS:
                        det = out["detector"]
                        pred = det.predict(test)
                        manual = (out["scores"] > det.threshold_).astype(np.int64)
                        out["info"]["predict_matches_score_gt_threshold"] = bool(np.array_equal(pred, manual))
                        out["info"]["predict_rate"] = float(pred.mean())
                    rec = smd_record(
                        name,
                        method,
                        seed,
                        out["scores"],
                        label,
                        out["fit_s"],
                        out["score_s"],
                        out["info"],
                        pred,
                        vus_window=series_period(test[:, 0]),
                    )
                    log.info(
                        "  %-8s seed %d  roc %.4f  pr %.4f  F1 %.4f  F1-PA %.4f  fit %.1fs",
                        method,
                        seed,
                        rec["roc_auc"],
                        rec["pr_auc"],
                        rec["best_f1"],
                        rec["best_f1_pa"],
                        rec["fit_s"],
                    )
                except Exception as e:  # noqa: BLE001
                    record_failure(rec, e)
                runs.append(rec)
    return runs


def one_hot_like(train_df, test_df, cats: list[str]):
    """One-hot encode for the baselines, with the train-time categories (unseen -> all zeros)."""
    import pandas as pd

    tr = pd.get_dummies(train_df, columns=cats, dtype=np.float64)
    te = pd.get_dummies(test_df, columns=cats, dtype=np.float64).reindex(columns=tr.columns, fill_value=0.0)
    return tr.to_numpy(np.float64), te.to_numpy(np.float64)


def suite_nslkdd(args, data_dir: Path, methods: list[str]) -> list[dict]:
    X, y = load_nslkdd(data_dir)
    name = "nsl_kdd_train20"
    runs = []
    if args.datasets and name not in args.datasets:
        return runs
    cats = ["protocol_type", "service", "flag"]
    log.info("nslkdd: %d rows x %d cols, %d attacks", *X.shape, int(y.sum()))
    for seed in args.seeds:
        tr, te = semi_supervised_split(y, seed)
        Xtr, Xte = X.iloc[tr].reset_index(drop=True), X.iloc[te].reset_index(drop=True)
        for method in methods:
            rec = {
                "suite": "nslkdd",
                "dataset": name,
                "method": method,
                "seed": seed,
                "n_train": int(tr.size),
                "n_test": int(te.size),
                "n_test_anomalies": int(y[te].sum()),
            }
            try:
                if method in OURS:
                    out = run_method(args, method, seed, Xtr, Xte, clean=True)
                else:
                    a, b = one_hot_like(Xtr, Xte, cats)
                    out = run_method(args, method, seed, a, b)
                rec.update(finite_check(out["scores"]))
                rec.update(ranking_metrics(y[te], safe_scores(out["scores"])))
                rec.update(fit_s=out["fit_s"], score_s=out["score_s"], info=out["info"])
                log.info(
                    "  %-8s seed %d  roc %.4f  pr %.4f  fit %.1fs",
                    method,
                    seed,
                    rec["roc_auc"],
                    rec["pr_auc"],
                    rec["fit_s"],
                )
            except Exception as e:  # noqa: BLE001
                record_failure(rec, e)
            runs.append(rec)
    return runs


def suite_unsupervised(args, data_dir: Path, methods: list[str]) -> list[dict]:
    """ODDS + ADBench + NSL-KDD, ADBench's unsupervised protocol (stratified 70 / 30 split of all rows)."""
    sets: dict = dict(load_odds(data_dir))
    if not sets:
        raise SystemExit(f"no ODDS .mat files under {data_dir / 'tabular' / 'odds'}")
    for name, Xy in load_adbench(data_dir).items():
        if name in sets:
            raise SystemExit(f"ADBench set {name!r} has the name of an ODDS set")
        sets[name] = Xy
    if (data_dir / "network" / "nsl_kdd").is_dir():
        sets["nsl_kdd_train20"] = load_nslkdd(data_dir)
    cats = ["protocol_type", "service", "flag"]
    runs = []
    for name, (X, y) in sets.items():
        if args.datasets and name not in args.datasets:
            continue
        # the set's own anomaly share (before any --max-rows subsample) decides its contamination group
        n_rows, n_anomalies = int(len(y)), int(y.sum())
        keep = stratified_subsample(y, args.max_rows)
        if keep.size < len(y):
            X = X.iloc[keep].reset_index(drop=True) if hasattr(X, "iloc") else X[keep]
            y = y[keep]
        log.info("tabular-unsupervised %s: %d rows x %d cols, %d anomalies", name, *X.shape, int(y.sum()))
        for seed in args.seeds:
            tr, te = stratified_split(y, seed)
            if hasattr(X, "iloc"):
                Xtr, Xte = X.iloc[tr].reset_index(drop=True), X.iloc[te].reset_index(drop=True)
                Ptr, Pte = one_hot_like(Xtr, Xte, cats)
            else:
                Xtr, Xte = X[tr], X[te]
                Ptr, Pte = Xtr, Xte
            for method in methods:
                rec = {
                    "suite": "tabular-unsupervised",
                    "dataset": name,
                    "method": method,
                    "seed": seed,
                    "n_rows": n_rows,
                    "n_anomalies": n_anomalies,
                    "anomaly_share": n_anomalies / n_rows,
                    "n_train": int(tr.size),
                    "n_train_anomalies": int(y[tr].sum()),
                    "n_test": int(te.size),
                    "n_test_anomalies": int(y[te].sum()),
                }
                try:
                    if method in OURS:
                        out = run_method(args, method, seed, Xtr, Xte)
                    else:
                        out = run_method(args, method, seed, Ptr, Pte)
                    rec.update(finite_check(out["scores"]))
                    rec.update(ranking_metrics(y[te], safe_scores(out["scores"])))
                    rec.update(fit_s=out["fit_s"], score_s=out["score_s"], info=out["info"])
                    log.info(
                        "  %-8s seed %d  roc %.4f  pr %.4f  fit %.1fs",
                        method,
                        seed,
                        rec["roc_auc"],
                        rec["pr_auc"],
                        rec["fit_s"],
                    )
                except Exception as e:  # noqa: BLE001 - record and go on with the next run
                    record_failure(rec, e)
                runs.append(rec)
    return runs


SUITE_FUNCS = {
    "tabular": suite_tabular,
    "smd": suite_smd,
    "nslkdd": suite_nslkdd,
    "tabular-unsupervised": suite_unsupervised,
    "timeseries": timeseries.suite_timeseries,
}
SUITE_METRICS = {
    "tabular": ["roc_auc", "pr_auc", "fit_s"],
    "smd": [
        "vus_pr",
        "vus_roc",
        "roc_auc",
        "pr_auc",
        "best_f1",
        "best_f1_pa",
        "f1_at_threshold",
        "f1_pa_at_threshold",
        "fit_s",
    ],
    "nslkdd": ["roc_auc", "pr_auc", "fit_s"],
    "tabular-unsupervised": ["roc_auc", "pr_auc", "fit_s"],
    "timeseries": list(timeseries.METRICS),
}


# =========================================================================== summary


def _mean_std(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=0)), "n": int(v.size)}


def unsupervised_sets(runs: list[dict]) -> dict:
    """tabular-unsupervised: {dataset: rows, anomalies, anomaly share (of the whole set, before any
    --max-rows subsample), rows used, and whether it counts as a high-contamination set}."""
    out = {}
    for r in runs:
        if r["dataset"] in out or r.get("anomaly_share") is None:
            continue
        out[r["dataset"]] = {
            "n_rows": r["n_rows"],
            "n_anomalies": r["n_anomalies"],
            "anomaly_share": r["anomaly_share"],
            "n_rows_used": r["n_train"] + r["n_test"],
            "high_contamination": r["anomaly_share"] > HIGH_CONTAMINATION,
        }
    return {d: out[d] for d in sorted(out, key=_set_order)}


def _set_order(name: str):
    return (name.lower(), name)


def _group_mean(runs: list[dict], metrics: list[str], method: str, group: list[str]) -> dict:
    """Mean over the data sets of ``group`` within each seed, then mean and std over seeds, for one method.

    A set on which the method failed in any seed is left out (``n_sets`` < ``n_sets_total``,
    ``sets_left_out`` names them), so that every seed averages the same sets.
    """
    mine = [r for r in runs if r["method"] == method and r["dataset"] in group]
    failed = {r["dataset"] for r in mine if "error" in r}
    sets_ok = {r["dataset"] for r in mine} - failed
    ok = [r for r in mine if r["dataset"] in sets_ok]
    per_seed: dict = {k: [] for k in metrics}
    for seed in sorted({r["seed"] for r in ok}):
        rs = [r for r in ok if r["seed"] == seed]
        if {r["dataset"] for r in rs} != sets_ok:
            continue
        for k in metrics:
            vals = [r.get(k) for r in rs]
            if all(v is not None for v in vals):
                per_seed[k].append(float(np.mean(vals)))
    out = {k: _mean_std(v) for k, v in per_seed.items()}
    out.update(
        n_sets=len(sets_ok),
        n_sets_total=len(group),
        sets_left_out=sorted(set(group) - sets_ok, key=_set_order),
        errors=sum("error" in r for r in mine),
    )
    return out


def summarize(runs: list[dict], suite: str) -> dict:
    """{dataset: {method: {metric: {mean, std, n}}}} plus an 'average' pseudo-dataset.

    The average row averages over datasets within each seed, then takes mean and
    std over seeds (only seeds where the method ran on every dataset count).

    tabular-unsupervised instead has three such rows (UNSUPERVISED_GROUPS): the mean over all
    sets, over the sets with more than HIGH_CONTAMINATION anomalies and over the rest; each
    leaves out the sets where the method failed and says how many it averaged (_group_mean).
    """
    metrics = SUITE_METRICS[suite]
    ok = [r for r in runs if "error" not in r]
    datasets = sorted({r["dataset"] for r in runs}, key=_set_order)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out: dict = {}
    for d in datasets:
        out[d] = {}
        for m in methods:
            rs = [r for r in ok if r["dataset"] == d and r["method"] == m]
            errs = [r for r in runs if r["dataset"] == d and r["method"] == m and "error" in r]
            out[d][m] = {k: _mean_std([r.get(k) for r in rs]) for k in metrics}
            out[d][m]["errors"] = len(errs)
    if suite == "tabular-unsupervised":
        sets = unsupervised_sets(runs)
        high = [d for d in datasets if sets.get(d, {}).get("high_contamination")]
        groups = {
            "average": datasets,
            "average_high_contamination": high,
            "average_rest": [d for d in datasets if d not in high],
        }
        for key, group in groups.items():
            out[key] = {m: _group_mean(runs, metrics, m, group) for m in methods}
        return out
    if len(datasets) > 1:
        out["average"] = {}
        for m in methods:
            per_seed = {k: [] for k in metrics}
            for seed in sorted({r["seed"] for r in ok if r["method"] == m}):
                rs = [r for r in ok if r["method"] == m and r["seed"] == seed]
                if {r["dataset"] for r in rs} != set(datasets):
                    continue
                for k in metrics:
                    vals = [r.get(k) for r in rs]
                    if all(v is not None for v in vals):
                        per_seed[k].append(float(np.mean(vals)))
            out["average"][m] = {k: _mean_std(v) for k, v in per_seed.items()}
    return out


def _cell(s: dict, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "—"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def _unsupervised_tables(summ: dict, sets: dict, methods: list[str]) -> str:
    """tabular-unsupervised's tables: each set with its anomaly share, then the mean over all sets,
    over the high-contamination sets and over the rest (UNSUPERVISED_GROUPS)."""
    datasets = sorted((d for d in summ if d not in UNSUPERVISED_GROUPS), key=_set_order)
    groups = [g for g in UNSUPERVISED_GROUPS if g in summ]
    parts = []
    for metric, label in (
        ("roc_auc", "ROC-AUC"),
        ("pr_auc", "PR-AUC (average precision)"),
        ("fit_s", "fit seconds"),
    ):
        digits = 1 if metric == "fit_s" else 3
        rows = []
        for d in datasets:
            share = sets.get(d, {}).get("anomaly_share")
            row = [d, "—" if share is None else f"{100 * share:.1f} %"]
            for m in methods:
                s = summ[d].get(m, {})
                cell = _cell(s.get(metric, {}), digits)
                if s.get("errors"):
                    cell += f" ({s['errors']} err)"
                row.append(cell)
            rows.append(row)
        for g in groups:
            n_total = max((s.get("n_sets_total", 0) for s in summ[g].values()), default=0)
            row = [f"**{UNSUPERVISED_GROUPS[g]}**", f"{n_total} set{'s' if n_total != 1 else ''}"]
            for m in methods:
                s = summ[g].get(m, {})
                cell = _cell(s.get(metric, {}), digits)
                if s.get("n_sets", n_total) < n_total:
                    cell += f" ({s['n_sets']} of {n_total} sets)"
                row.append(cell)
            rows.append(row)
        parts.append(f"\n{label}\n\n" + _table(["dataset", "anomalies", *[METHOD_LABELS[m] for m in methods]], rows))
    high = [d for d in datasets if sets.get(d, {}).get("high_contamination")]
    rest = [d for d in datasets if d not in high]
    parts.append(
        f"\nanomalies = the set's share of anomalous rows. High-contamination sets (>{100 * HIGH_CONTAMINATION:.0f} % "
        f"anomalies): {', '.join(high) or 'none'}; the rest: {', '.join(rest) or 'none'}. Each mean row averages "
        "the sets within each seed, then takes mean ± std over seeds; a set on which a method failed "
        "(err) is left out of that method's means, which then say over how many sets they are."
    )
    return "\n".join(parts)


def markdown(result: dict) -> str:
    parts = []
    for suite, block in result["suites"].items():
        summ = block["summary"]
        if not summ:
            continue
        if suite == "timeseries":
            parts.append(timeseries.markdown(block, METHOD_LABELS))
            parts.append(f"\nSuite wall time: {block['seconds']:.0f} s\n")
            continue
        methods = list(dict.fromkeys(m for d in summ.values() for m in d))
        datasets = list(summ)
        n_seeds = len(block["seeds"])
        if suite in ("tabular", "nslkdd", "tabular-unsupervised"):
            # tabular-unsupervised blocks written since the ADBench sets came in carry "sets" (anomaly
            # shares) and the group means; older blocks kept from an earlier file render as they did
            sets = block.get("sets") if suite == "tabular-unsupervised" else None
            title = {
                "tabular": "Tabular (ODDS), semi-supervised (ours with clean=True, the switch for clean training data)",
                "nslkdd": "NSL-KDD (KDDTrain+_20Percent), semi-supervised (ours with clean=True)",
                "tabular-unsupervised": "Tabular (ODDS + NSL-KDD), unsupervised (stratified 60 / 40 split of all rows, "
                "anomalies in the training split)",
            }[suite]
            if sets:
                f = round(100 * block.get("train_fraction", UNSUPERVISED_TRAIN_FRACTION))
                title = (
                    f"Tabular (ODDS + ADBench + NSL-KDD), unsupervised (stratified {f} / {100 - f} split of all "
                    "rows, anomalies in the training split)"
                )
            parts.append(f"### {title}: mean ± std over {n_seeds} seed(s)")
            if block.get("run"):
                r = block["run"]
                parts.append(
                    f"\nRun: commit {str(r.get('git_commit'))[:12]}, {r.get('timestamp')}: `{r.get('command')}`"
                )
            if block.get("max_rows"):
                parts.append(f"\nEach data set subsampled (stratified) to at most {block['max_rows']} rows.")
            if sets:
                parts.append(_unsupervised_tables(summ, sets, methods))
                parts.append(f"\nSuite wall time: {block['seconds']:.0f} s\n")
                continue
            for metric, label in (
                ("roc_auc", "ROC-AUC"),
                ("pr_auc", "PR-AUC (average precision)"),
                ("fit_s", "fit seconds"),
            ):
                rows = []
                for d in datasets:
                    row = [f"**{d}**" if d == "average" else d]
                    for m in methods:
                        s = summ[d].get(m, {})
                        cell = _cell(s.get(metric, {}), 1 if metric == "fit_s" else 3)
                        if s.get("errors"):
                            cell += f" ({s['errors']} err)"
                        row.append(cell)
                    rows.append(row)
                parts.append(f"\n{label}\n\n" + _table(["dataset", *[METHOD_LABELS[m] for m in methods]], rows))
        else:
            parts.append(f"### SMD: {n_seeds} seed(s) per machine" + (" (mean ± std)" if n_seeds > 1 else ""))
            if block.get("run"):
                r = block["run"]
                parts.append(
                    f"\nRun: commit {str(r.get('git_commit'))[:12]}, {r.get('timestamp')}: `{r.get('command')}`"
                )
            cols = [
                ("vus_pr", "VUS-PR"),
                ("vus_roc", "VUS-ROC"),
                ("roc_auc", "ROC-AUC"),
                ("pr_auc", "PR-AUC"),
                ("best_f1", "best F1"),
                ("best_f1_pa", "best F1 (PA)"),
                ("f1_at_threshold", "F1 @thr"),
                ("f1_pa_at_threshold", "F1 @thr (PA)"),
                ("fit_s", "fit s"),
            ]
            rows = []
            for d in datasets:
                for m in methods:
                    s = summ[d].get(m, {})
                    row = [f"**{d}**" if d == "average" else d, METHOD_LABELS[m]]
                    row += [_cell(s.get(k, {}), 1 if k == "fit_s" else 3) for k, _ in cols]
                    if s.get("errors"):
                        row[-1] += f" ({s['errors']} err)"
                    rows.append(row)
            parts.append("\n" + _table(["machine", "method", *[c for _, c in cols]], rows))
            parts.append(
                "\nPA = point adjustment (inflates scores; unadjusted figures are the honest ones). "
                "best F1 = oracle threshold on the test labels; @thr = the model's own fitted "
                "threshold (det.predict); IForest has no calibrated threshold here."
            )
        parts.append(f"\nSuite wall time: {block['seconds']:.0f} s\n")
    return "\n".join(parts)


# =========================================================================== environment, CLI


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _json_dict(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"epochs\": 20}'")
    return d


def parse_methods(spec: str | None) -> list[str]:
    if not spec:
        return list(ALL_METHODS)
    out = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        group = {"ours": OURS, "pyod": PYOD, "tsb": TSB, "baselines": PYOD + TSB, "all": ALL_METHODS}.get(tok)
        if group is None and tok not in ALL_METHODS:
            raise SystemExit(f"unknown method {tok!r}; choose from {', '.join(ALL_METHODS)} or ours / pyod / tsb / all")
        out += list(group or [tok])
    return list(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See benchmarks/README.md for the protocols.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="root of the shared data sets (default: <repo>/../shared/data)",
    )
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma list of {', '.join(SUITES)} (default: all)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of methods (" + ", ".join(ALL_METHODS) + ") or groups ours / pyod / all; "
        "each suite runs the ones that apply to it (default: all)",
    )
    p.add_argument(
        "--datasets", default=None, help="comma list of dataset names to keep (e.g. cardio,machine-1-2,nsl_kdd_train20)"
    )
    p.add_argument("--seeds", type=_csv_ints, default=[0, 1, 2, 3, 4], help="seeds for tabular and nslkdd")
    p.add_argument("--smd-seeds", type=_csv_ints, default=[0], help="seeds of ours for smd and timeseries (default: 0)")
    p.add_argument(
        "--ts-sets",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(SETS),
        help=f"timeseries only: comma list of {', '.join(SETS)} (default: all)",
    )
    p.add_argument(
        "--per-set",
        type=int,
        default=None,
        help="timeseries only: at most N series per set, evenly spaced over the sorted names (default: all)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="timeseries only: series run in this many processes at once, each with --threads torch threads "
        "(default 1; on N free cores, N workers of 1 thread finish N times sooner)",
    )
    p.add_argument(
        "--rerun-anchors", action="store_true", help="timeseries only: recompute the TSB-AD anchors' cached metrics"
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="tabular-unsupervised only: subsample each data set (stratified, seed 0) to at most this many rows",
    )
    for kind in OURS:
        p.add_argument(
            f"--params-{kind}",
            type=_json_dict,
            default={},
            help=f"JSON object of Detector('{kind}') parameter overrides, e.g. '{{\"epochs\": 20}}' "
            "(seed always comes from the seed loop)",
        )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every method (default 1: the models are small, and more "
        "threads than free cores slows PyTorch down many times over)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path (markdown goes next to it)")
    p.add_argument("--self-check", action="store_true", help="only verify the metric helpers and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="less progress logging")
    return p


def previous_suites(path: Path, running: list[str]) -> dict:
    """The suites of an earlier result at ``path`` that this run does not rerun, each with the
    provenance of the run that produced it (so one suite can be rerun without erasing the others)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    kept = {}
    for name, block in (old.get("suites") or {}).items():
        if name in running:
            continue
        block = dict(block)
        block.setdefault("run", {k: old.get(k) for k in ("timestamp", "git_commit", "git_dirty_files", "command")})
        kept[name] = block
    if kept:
        log.info("keeping earlier results of suite(s) %s from %s", ", ".join(kept), path)
    return kept


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1; got {args.workers}")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # the library logs every epoch at INFO; keep our own progress lines only
    logging.getLogger("unusual").setLevel(logging.WARNING)
    if args.self_check:
        self_check()
        return 0
    data_dir = args.data_dir.resolve()
    if not data_dir.is_dir():
        raise SystemExit(
            f"data directory {data_dir} does not exist. The benchmark needs the shared data sets "
            "(tabular/odds, timeseries/smd, network/nsl_kdd); pass --data-dir PATH."
        )
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    for s in suites:
        if s not in SUITES:
            raise SystemExit(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    methods = parse_methods(args.methods)
    args.datasets = [d.strip() for d in args.datasets.split(",")] if args.datasets else None
    self_check()  # cheap; never publish numbers from broken metrics
    import torch

    torch.set_num_threads(args.threads)

    result = {
        "benchmark": "unusual quality",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "argv": sys.argv,
        **environment(
            ("models", "numpy", "torch", "pyod", "sklearn", "scipy", "pandas", "pyarrow", "polars"),
            torch_threads=torch.get_num_threads(),
            cuda_available=torch.cuda.is_available(),
        ),
        "data_dir": str(data_dir),
        "protocol": {
            "train_fraction_of_normals": TRAIN_FRACTION,
            "seeds": args.seeds,
            "smd_seeds": args.smd_seeds,
            "torch_threads": args.threads,
            "workers": args.workers,
        },
        "params": {
            "ours": {k: {**getattr(args, f"params_{k}"), "seed": "<seed>"} for k in OURS},
            "pyod_ae": "pyod.models.auto_encoder.AutoEncoder(random_state=seed, verbose=0), other args default",
            "pyod_vae": "pyod.models.vae.VAE(random_state=seed, verbose=0), other args default",
            "iforest": "pyod.models.iforest.IForest(random_state=seed), other args default",
            "pca": "pyod.models.pca.PCA(random_state=seed), other args default",
            "ecod": "pyod.models.ecod.ECOD(), args default",
            "knn": "pyod.models.knn.KNN(), args default",
            "mcd": "pyod.models.mcd.MCD(random_state=seed), other args default",
        },
        "load_average_start": loadavg(),
        "suites": {},
    }
    kept = previous_suites(args.out, suites)
    t_all = time.perf_counter()
    for suite in suites:
        suite_methods = [m for m in methods if m in SUITE_METHODS[suite]]
        if not suite_methods:
            log.warning("suite %s: none of the selected methods apply; skipped", suite)
            continue
        log.info("=== suite %s: methods %s", suite, ", ".join(suite_methods))
        t0 = time.perf_counter()
        runs = SUITE_FUNCS[suite](args, data_dir, suite_methods)
        seconds = time.perf_counter() - t0
        result["suites"][suite] = {
            "methods": suite_methods,
            "seeds": args.smd_seeds if suite in ("smd", "timeseries") else args.seeds,
            "seconds": seconds,
            "load_average_end": loadavg(),
            "run": {k: result[k] for k in ("timestamp", "git_commit", "git_dirty_files", "command")},
            "summary": timeseries.summarize(runs) if suite == "timeseries" else summarize(runs, suite),
            "runs": runs,
        }
        if suite == "timeseries":
            result["suites"][suite].update(sets=args.ts_sets, per_set=args.per_set, tsb_ad=timeseries.tsb_version())
        if suite == "tabular-unsupervised":
            blk = result["suites"][suite]
            blk.update(
                max_rows=args.max_rows,
                train_fraction=UNSUPERVISED_TRAIN_FRACTION,
                high_contamination_share=HIGH_CONTAMINATION,
                sets=unsupervised_sets(runs),  # per set: rows, anomalies, anomaly share, group
            )
            blk["runs"] = blk.pop("runs")  # the long list last
        result["total_seconds"] = time.perf_counter() - t_all
        merged = {**kept, **result["suites"]}
        result["suites"] = {k: merged[k] for k in SUITES if k in merged}
        write_json(args.out, result)  # after every suite, so a long run keeps partial results
        log.info("=== suite %s done in %.0f s", suite, seconds)
    md = markdown(result)
    header = (
        f"Quality benchmark — commit {str(result['git_commit'])[:12]}"
        f"{' (dirty tree)' if result['git_dirty_files'] else ''}, {result['timestamp']}, "
        f"{result['machine']['cpu_count']} CPU(s), total {result.get('total_seconds', 0):.0f} s\n\n"
    )
    args.out.with_suffix(".md").write_text(header + md + "\n")
    print(header + md)
    n_err = sum("error" in r for b in result["suites"].values() for r in b["runs"])
    if n_err:
        log.error("%d run(s) failed; see 'error' / 'traceback' in %s", n_err, args.out)
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
