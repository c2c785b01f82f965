"""The ``timeseries`` suite of ``quality.py``: every labelled series of the shared time-series sets, measured the
field's way (TSB-AD's VUS-PR first), our ``lstm`` beside five of TSB-AD's own models. Protocol and results:
benchmarks/README.md, "timeseries"."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from harness import RESULTS, write_result
from unusual.models.metrics import best_f1, best_f1_pa, ranking_metrics
from unusual.models.vus import series_period, vus

log = logging.getLogger("quality")
SETS = ("smd", "nab", "smap", "msl", "asd")
ANCHORS = {"tsb_lstmad": ("LSTMAD", True), "tsb_cnn": ("CNN", True), "tsb_pca": ("PCA", False),  # (model, semi-
           "tsb_kmeansad": ("KMeansAD", False), "tsb_iforest": ("IForest", False)}  # supervised?) in TSB-AD
METRICS = {"vus_pr": "VUS-PR", "vus_roc": "VUS-ROC", "pr_auc": "AUC-PR", "roc_auc": "ROC-AUC",
           "f1": "F1 (best, unadjusted)", "pa_f1": "PA-F1 (inflated)"}
NAB_PROBATION = 0.15
# The anchors' metrics, which do not change when our model does:
# {"<method>|<TSB-AD settings>|tsb-ad <version>": {series: [*METRICS, vus_window, seconds]}}
CACHE, CACHED = RESULTS / "timeseries_anchors.json", (*METRICS, "vus_window", "seconds")


@dataclass
class Series:
    set: str
    name: str
    train: np.ndarray
    test: np.ndarray
    label: np.ndarray
    key = property(lambda self: f"{self.set}/{self.name}")


def _evenly(names, k: int | None) -> list[str]:
    names = sorted(names)
    return [names[i] for i in (np.linspace(0, len(names) - 1, k).round().astype(int) if k and k < len(names)
                               else range(len(names)))]


def _npz(folder: Path, pattern: str, set_name: str, per_set) -> list[Series]:
    """One file per entity (SMD machines, ASD), or one per part keyed by channel (SMAP, MSL: ``pattern`` "SMAP_")."""
    if pattern.endswith("_"):
        paths = [folder / f"{pattern}{part}.npz" for part in ("train", "test", "test_label")]
        if not all(p.exists() for p in paths):
            return []
        with np.load(paths[0]) as tr, np.load(paths[1]) as te, np.load(paths[2]) as lb:
            return [Series(set_name, n, tr[n], te[n], lb[n].astype(np.int64)) for n in _evenly(te.files, per_set)]
    files, out = {p.stem: p for p in folder.glob(pattern)}, []
    for name in _evenly(files, per_set):
        with np.load(files[name], allow_pickle=False) as d:
            out.append(Series(set_name, name, d["train"], d["test"], d["test_label"].astype(np.int64)))
    return out


def _nab(folder: Path, per_set) -> list[Series]:
    """NAB has no training file: the training part is its probationary period (the first 15 %), cut at the first
    labelled window where that comes earlier."""
    import pandas as pd
    if not (folder / "combined_windows.json").exists():
        return []
    windows, out = json.loads((folder / "combined_windows.json").read_text()), []
    files = {p.stem: p for p in (folder / "realKnownCause").glob("*.csv")}
    for name in _evenly(files, per_set):
        df = pd.read_csv(files[name])
        ts, label = pd.to_datetime(df["timestamp"]), np.zeros(len(df), np.int64)
        for a, b in windows.get(f"realKnownCause/{name}.csv", []):
            label[((ts >= pd.Timestamp(a)) & (ts <= pd.Timestamp(b))).to_numpy()] = 1
        cut = max(1, min(int(NAB_PROBATION * len(df)), int(np.argmax(label)) if label.any() else len(df)))
        x = df[["value"]].to_numpy(np.float64)
        out.append(Series("nab", name, x[:cut], x[cut:], label[cut:]))
    return out


def load_series(data_dir: Path, sets=SETS, per_set: int | None = None, names=None) -> list[Series]:
    """The labelled series of ``sets``, at most ``per_set`` of each (evenly spaced over the sorted names)."""
    root = data_dir / "timeseries"
    load = {"smd": lambda: _npz(root / "smd", "machine-*.npz", "smd", per_set),
            "asd": lambda: _npz(root / "asd", "omi-*.npz", "asd", per_set),
            "smap": lambda: _npz(root / "smap_msl", "SMAP_", "smap", per_set),
            "msl": lambda: _npz(root / "smap_msl", "MSL_", "msl", per_set), "nab": lambda: _nab(root / "nab", per_set)}
    out = [s for name in sets for s in load[name]() if not names or s.name in names or s.key in names]
    return [s for s in out if s.label.any()]  # VUS is undefined without an anomaly


@cache
def tsb_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    with contextlib.suppress(PackageNotFoundError):
        return version("tsb-ad")
    return None


def anchor_key(method: str) -> str:
    from TSB_AD.HP_list import Optimal_Multi_algo_HP_dict
    hp = json.dumps(Optimal_Multi_algo_HP_dict[ANCHORS[method][0]], sort_keys=True)
    return f"{method}|{hp}|tsb-ad {tsb_version()}"


def load_cache() -> dict:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def run_anchor(method: str, s: Series) -> np.ndarray:
    """The test part's scores of a TSB-AD model with TSB-AD's settings and seed, called directly (its run_*_AD
    wrappers turn errors into a returned string); semi-supervised ones fit on the training part, the others run
    on the training and test parts back to back."""
    if not hasattr(np, "Inf"):  # tsb-ad 1.5 predates numpy 2's removal of the alias
        np.Inf = np.inf
    import random

    import torch
    from TSB_AD import model_wrapper
    from TSB_AD.HP_list import Optimal_Multi_algo_HP_dict
    model, semi = ANCHORS[method]
    random.seed(2024), np.random.seed(2024), torch.manual_seed(2024)
    fn, hp = getattr(model_wrapper, f"run_{model}"), Optimal_Multi_algo_HP_dict[model]
    train, test = s.train.astype(np.float64), s.test.astype(np.float64)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        scores = fn(train, test, **hp) if semi else fn(np.concatenate([train, test]), **hp)[len(train):]
    return np.asarray(scores, np.float64).reshape(-1)


def _compute(s: Series, method: str, seed: int, params: dict) -> dict:
    """One method on one series: its metrics (TSB-AD's conventions), or the error that stopped it."""
    rec = {"suite": "timeseries", "set": s.set, "dataset": s.key, "method": method, "seed": seed}
    try:
        t0, info = time.perf_counter(), {}
        if method in ANCHORS:
            scores = run_anchor(method, s)
        else:
            from unusual.models import Detector
            det = Detector(method, **{**params, "seed": seed}).fit(s.train.astype(np.float32))
            scores = det.score(s.test.astype(np.float32))
            info = {"epochs_run": len(det.history_.train_loss), "threshold": float(det.threshold_)}
        scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
        window = series_period(s.test[:, 0])  # the VUS window as TSB-AD sets it
        rec.update(vus(s.label, scores, window), **ranking_metrics(s.label, scores), vus_window=window,
                   f1=best_f1(scores, s.label)["f1"], pa_f1=best_f1_pa(scores, s.label)["f1"])
        rec.update(seconds=time.perf_counter() - t0, info=info)
    except Exception as e:  # noqa: BLE001
        rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    return rec


def _compute_series(s: Series, jobs: list[tuple], threads: int) -> list[dict]:
    """The (method, seed, params) of one series not in the cache, in a worker process or inline."""
    import torch
    torch.set_num_threads(threads)
    logging.getLogger("unusual").setLevel(logging.WARNING)
    return [_compute(s, *job) for job in jobs]


def suite_timeseries(args, data_dir: Path, methods: list[str]) -> list[dict]:
    series = load_series(data_dir, args.ts_sets, args.per_set, args.datasets)
    if not series:
        raise SystemExit(f"no labelled series under {data_dir / 'timeseries'}")
    if any(m in ANCHORS for m in methods) and tsb_version() is None:
        raise SystemExit("the TSB-AD anchors need tsb-ad: pip install --no-deps tsb-ad==1.5 and the 'bench' extra")
    cached, hits, todo = {} if args.rerun_anchors else load_cache(), {}, {}
    for i, s in enumerate(series):
        hits[i], todo[i] = [], []
        for method in methods:
            for seed in [2024] if method in ANCHORS else args.smd_seeds:
                if hit := method in ANCHORS and cached.get(anchor_key(method), {}).get(s.key):
                    hits[i].append({"suite": "timeseries", "set": s.set, "dataset": s.key, "method": method,
                                    "seed": seed, **dict(zip(CACHED, hit)), "info": {}, "cached": True})
                else:
                    todo[i].append((method, seed, {} if method in ANCHORS else getattr(args, f"params_{method}", {})))

    def done(i: int, computed: list[dict]) -> list[dict]:
        s, recs = series[i], sorted(hits[i] + computed, key=lambda r: methods.index(r["method"]))
        if fresh := [r for r in computed if r["method"] in ANCHORS and "error" not in r]:
            new = load_cache()  # read again before writing: other runs may share the cache
            for r in fresh:
                new.setdefault(anchor_key(r["method"]), {})[s.key] = [*map(r.get, CACHED[:-1]), round(r["seconds"], 2)]
            write_result(CACHE, {k: dict(sorted(v.items())) for k, v in sorted(new.items())}, depth=2)
        log.info("[%d/%d] %s: train %s, test %s, %.1f%% anomalous", i + 1, len(series), s.key, s.train.shape,
                 s.test.shape, 100 * s.label.mean())
        for r in recs:
            if "error" in r:
                log.error("  %-13s failed: %s", r["method"], r["error"])
            else:
                log.info("  %-13s VUS-PR %.3f  VUS-ROC %.3f  AUC-PR %.3f  ROC %.3f  %5.1fs%s", r["method"], r["vus_pr"],
                         r["vus_roc"], r["pr_auc"], r["roc_auc"], r["seconds"], " (cached)" * ("cached" in r))
        return recs

    if args.workers == 1:
        return [r for i, s in enumerate(series) for r in done(i, _compute_series(s, todo[i], args.threads))]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    log.info("%d series on %d worker processes (%d torch thread(s) each)", len(series), args.workers, args.threads)
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_compute_series, series[i], todo[i], args.threads): i for i in todo if todo[i]}
        results = {i: done(i, []) for i in todo if not todo[i]}
        results.update({futures[f]: done(futures[f], f.result()) for f in as_completed(futures)})
    return [r for i in range(len(series)) for r in results[i]]


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def summarize(runs: list[dict]) -> dict:
    """{"overall" | set: {method: {metric: mean over series (seeds averaged first), "series": n}}}, "errors".
    A method's means cover only the series where every method ran, so the columns compare like with like."""
    ok, methods = [r for r in runs if "error" not in r], list(dict.fromkeys(r["method"] for r in runs))
    common = set.intersection(*({r["dataset"] for r in ok if r["method"] == m} for m in methods)) if ok else set()
    per = {(m, d): {k: _mean(r.get(k) for r in ok if r["method"] == m and r["dataset"] == d) for k in METRICS}
           for m in methods for d in common}  # mean over seeds
    sets, out = {r["dataset"]: r["set"] for r in ok}, {}
    for group in ["overall", *[x for x in SETS if x in sets.values()]]:
        if ds := sorted(d for d in common if group == "overall" or sets[d] == group):
            out[group] = {m: {k: _mean(per[m, d][k] for d in ds) for k in METRICS} | {"series": len(ds)}
                          for m in methods}
    return {**out, "errors": {m: sum(1 for r in runs if r["method"] == m and "error" in r) for m in methods}}


def markdown(block: dict, labels: dict) -> str:
    summ, methods, r = block["summary"], block["methods"], block["run"]
    parts = ["### Time series (TSB-AD's metrics): mean over series, fit on train, score test",
             f"\nRun: commit {str(r.get('git_commit'))[:12]}, {r.get('timestamp')}: `{r.get('command')}`"]
    for metric, label in METRICS.items():
        body = []
        for group, by in ((g, b) for g, b in summ.items() if g != "errors"):
            v, best = [by[m][metric] for m in methods], max((by[m][metric] or -1) for m in methods)
            body.append([f"**{group}**" if group == "overall" else group, str(by[methods[0]]["series"])] + [
                "—" if x is None else f"**{x:.3f}**" if x == best else f"{x:.3f}" for x in v])
        parts.append(f"\n{label}\n\n" + markdown_table(["group", "series", *[labels.get(m, m) for m in methods]], body))
    if errs := {m: n for m, n in summ.get("errors", {}).items() if n}:
        parts.append("\nFailed runs (left out of the means): " + ", ".join(f"{m} {n}" for m, n in errs.items()))
    parts.append("\nVUS windows: each series' period (TSB-AD's find_length_rank on the test part's first channel). F1: "
                 "best over all thresholds on the test labels (an oracle threshold). PA-F1: point-adjusted, inflated.")
    return "\n".join(parts)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
