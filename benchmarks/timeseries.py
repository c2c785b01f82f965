"""The ``timeseries`` suite of ``benchmarks/quality.py``: every shared time-series set, measured the
field's way (TSB-AD's VUS-PR first), our ``lstm`` beside five of TSB-AD's own implementations.

Series (``../shared/data/timeseries``), each fit on its training part and scored on its test part:

- ``smd``: the SMD machines (``machine-*.npz``: train / test / test_label);
- ``asd``: the ASD entities (``omi-*.npz``, same layout);
- ``smap`` / ``msl``: every channel of ``SMAP_*.npz`` / ``MSL_*.npz`` (train, test and test labels keyed by channel);
- ``nab``: the ``realKnownCause`` series with ``combined_windows.json`` as labels; univariate, no training
  file, so the training part is NAB's own probationary period (the first 15 % of the series), cut at the
  first labelled window if that comes earlier, and the test part the rest.

``--per-set N`` keeps N series per set, evenly spaced over the sorted names (deterministic), for runs that
must fit in an hour; the default runs everything.

Anchors (``tsb_*``): TSB-AD 1.5's ``LSTMAD``, ``CNN`` (semi-supervised: fit on the training part, score the
test part) and ``PCA``, ``KMeansAD``, ``IForest`` (unsupervised in TSB-AD: run on the training and test parts
back to back, the test part's scores kept), each with TSB-AD's ``Optimal_Multi_algo_HP_dict`` settings and its
seed 2024. tsb-ad declares ``numpy<2`` but its models run on numpy 2 with one alias restored (``np.Inf``);
install it with ``pip install --no-deps tsb-ad==1.5`` next to the ``bench`` extra. The anchors'
metrics are cached in ``benchmarks/results/timeseries_anchors.json`` keyed by series, method, settings and
tsb-ad version (they do not change when our model does); ``--rerun-anchors`` recomputes them.

Metrics per series (TSB-AD's ``get_metrics`` conventions): VUS-PR and VUS-ROC with the window TSB-AD uses
(the period of the test part's first channel, ``series_period``; computed by ``unusual.models.vus``, which
tests/models/test_vus.py checks against TSB-AD's own function), AUC-PR, ROC-AUC, the best unadjusted F1 over
all thresholds and the best point-adjusted F1 (PA-F1, inflated: random scores reach high values). Means are
over series, as TSB-AD's leaderboard; per-set means are given too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from unusual.models.metrics import best_f1, best_f1_pa, ranking_metrics
from unusual.models.vus import series_period, vus

log = logging.getLogger("quality")

SETS = ("smd", "nab", "smap", "msl", "asd")
ANCHORS = {  # our method name -> (TSB-AD model, semi-supervised?)
    "tsb_lstmad": ("LSTMAD", True),
    "tsb_cnn": ("CNN", True),
    "tsb_pca": ("PCA", False),
    "tsb_kmeansad": ("KMeansAD", False),
    "tsb_iforest": ("IForest", False),
}
METRICS = ("vus_pr", "vus_roc", "pr_auc", "roc_auc", "f1", "pa_f1")
METRIC_LABELS = {
    "vus_pr": "VUS-PR",
    "vus_roc": "VUS-ROC",
    "pr_auc": "AUC-PR",
    "roc_auc": "ROC-AUC",
    "f1": "F1 (best, unadjusted)",
    "pa_f1": "PA-F1 (inflated)",
}
NAB_PROBATION = 0.15
CACHE = Path(__file__).resolve().parent / "results" / "timeseries_anchors.json"


@dataclass
class Series:
    set: str
    name: str
    train: np.ndarray
    test: np.ndarray
    label: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.set}/{self.name}"


def _evenly(names: list[str], k: int | None) -> list[str]:
    names = sorted(names)
    if not k or k >= len(names):
        return names
    return [names[i] for i in np.linspace(0, len(names) - 1, k).round().astype(int)]


def _npz_entities(folder: Path, pattern: str, set_name: str, per_set) -> list[Series]:
    files = {p.stem: p for p in folder.glob(pattern)}
    out = []
    for name in _evenly(list(files), per_set):
        with np.load(files[name], allow_pickle=False) as d:
            out.append(Series(set_name, name, d["train"], d["test"], d["test_label"].astype(np.int64)))
    return out


def _channels(folder: Path, prefix: str, per_set) -> list[Series]:
    paths = [folder / f"{prefix}_{part}.npz" for part in ("train", "test", "test_label")]
    if not all(p.exists() for p in paths):
        return []
    with np.load(paths[0]) as tr, np.load(paths[1]) as te, np.load(paths[2]) as lb:
        return [
            Series(prefix.lower(), name, tr[name], te[name], lb[name].astype(np.int64))
            for name in _evenly(list(te.files), per_set)
        ]


def _nab(folder: Path, per_set) -> list[Series]:
    import pandas as pd

    windows_file = folder / "combined_windows.json"
    if not windows_file.exists():
        return []
    windows = json.loads(windows_file.read_text())
    files = {p.stem: p for p in (folder / "realKnownCause").glob("*.csv")}
    out = []
    for name in _evenly(list(files), per_set):
        df = pd.read_csv(files[name])
        ts = pd.to_datetime(df["timestamp"])
        label = np.zeros(len(df), np.int64)
        for a, b in windows.get(f"realKnownCause/{name}.csv", []):
            label[((ts >= pd.Timestamp(a)) & (ts <= pd.Timestamp(b))).to_numpy()] = 1
        first = int(np.argmax(label)) if label.any() else len(df)
        cut = max(1, min(int(NAB_PROBATION * len(df)), first))
        x = df[["value"]].to_numpy(np.float64)
        out.append(Series("nab", name, x[:cut], x[cut:], label[cut:]))
    return out


def load_series(data_dir: Path, sets=SETS, per_set: int | None = None, names=None) -> list[Series]:
    root = data_dir / "timeseries"
    loaders = {
        "smd": lambda: _npz_entities(root / "smd", "machine-*.npz", "smd", per_set),
        "asd": lambda: _npz_entities(root / "asd", "omi-*.npz", "asd", per_set),
        "smap": lambda: _channels(root / "smap_msl", "SMAP", per_set),
        "msl": lambda: _channels(root / "smap_msl", "MSL", per_set),
        "nab": lambda: _nab(root / "nab", per_set),
    }
    out = [s for name in sets for s in loaders[name]()]
    if names:
        out = [s for s in out if s.name in names or s.key in names]
    return [s for s in out if s.label.any()]  # VUS is undefined without an anomaly


# ----------------------------------------------------------------------------- methods


def tsb_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("tsb-ad")
    except Exception:  # noqa: BLE001
        return None


def run_anchor(method: str, s: Series) -> np.ndarray:
    """The test part's scores of one TSB-AD anchor, with TSB-AD's settings and seed."""
    if not hasattr(np, "Inf"):  # tsb-ad 1.5 predates numpy 2's removal of the alias
        np.Inf = np.inf
    import random

    import torch
    from TSB_AD import model_wrapper
    from TSB_AD.HP_list import Optimal_Multi_algo_HP_dict

    model, semi = ANCHORS[method]
    random.seed(2024), np.random.seed(2024), torch.manual_seed(2024)
    hp = Optimal_Multi_algo_HP_dict[model]
    fn = getattr(model_wrapper, f"run_{model}")  # called directly: run_*_AD swallow errors into a string
    train, test = s.train.astype(np.float64), s.test.astype(np.float64)
    # TSB-AD prints progress bars and shapes; keep the benchmark's own lines readable
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if semi:
            scores = fn(train, test, **hp)
        else:
            scores = fn(np.concatenate([train, test]), **hp)[len(train) :]
    return np.asarray(scores, np.float64).reshape(-1)


def run_ours(kind: str, params: dict, s: Series) -> tuple[np.ndarray, dict]:
    from unusual.models import Detector

    det = Detector(kind, **params)
    det.fit(s.train.astype(np.float32))
    scores = det.score(s.test.astype(np.float32))
    h = det.history_
    return scores, {"epochs_run": len(h.get("train_loss", [])), "threshold": float(det.threshold_)}


def series_metrics(s: Series, scores: np.ndarray) -> dict:
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
    window = series_period(s.test[:, 0])
    out = {**vus(s.label, scores, window), **ranking_metrics(s.label, scores), "vus_window": window}
    out["f1"] = best_f1(scores, s.label)["f1"]
    out["pa_f1"] = best_f1_pa(scores, s.label)["f1"]
    return out


def _cache_key(s: Series, method: str) -> str:
    from TSB_AD.HP_list import Optimal_Multi_algo_HP_dict

    hp = Optimal_Multi_algo_HP_dict[ANCHORS[method][0]]
    return f"{s.key}|{method}|{json.dumps(hp, sort_keys=True)}|tsb-ad {tsb_version()}"


def _load_cache() -> dict:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(CACHE)


def _compute(s: Series, method: str, seed: int, params: dict) -> dict:
    """One method on one series: its metrics, or the error that stopped it (never raises)."""
    rec = {"suite": "timeseries", "set": s.set, "dataset": s.key, "method": method, "seed": seed}
    try:
        t0 = time.perf_counter()
        if method in ANCHORS:
            scores, info = run_anchor(method, s), {}
        else:
            scores, info = run_ours(method, {**params, "seed": seed}, s)
        rec.update(series_metrics(s, scores), seconds=time.perf_counter() - t0, info=info)
    except Exception as e:  # noqa: BLE001
        rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    return rec


def _compute_series(s: Series, jobs: list[tuple], threads: int) -> list[dict]:
    """Every uncached (method, seed, params) of one series, in a worker process or inline."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("unusual").setLevel(logging.WARNING)
    return [_compute(s, *job) for job in jobs]


def _log_series(i: int, n: int, s: Series, recs: list[dict]) -> None:
    pct = 100 * s.label.mean()
    log.info("[%d/%d] %s: train %s, test %s, %.1f%% anomalous", i + 1, n, s.key, s.train.shape, s.test.shape, pct)
    for rec in recs:
        if "error" in rec:
            log.error("  %-13s failed: %s", rec["method"], rec["error"])
            continue
        log.info(
            "  %-13s VUS-PR %.3f  VUS-ROC %.3f  AUC-PR %.3f  ROC %.3f  %5.1fs%s",
            rec["method"],
            rec["vus_pr"],
            rec["vus_roc"],
            rec["pr_auc"],
            rec["roc_auc"],
            rec.get("seconds", 0),
            " (cached)" if rec.get("cached") else "",
        )


def suite_timeseries(args, data_dir: Path, methods: list[str]) -> list[dict]:
    series = load_series(data_dir, args.ts_sets, args.per_set, args.datasets)
    if not series:
        raise SystemExit(f"no labelled series under {data_dir / 'timeseries'}")
    anchors = [m for m in methods if m in ANCHORS]
    if anchors and tsb_version() is None:
        raise SystemExit("the TSB-AD anchors need tsb-ad: pip install --no-deps tsb-ad==1.5 and the 'bench' extra")
    cache = {} if args.rerun_anchors else _load_cache()
    slots: list[list] = []  # per series: a cached record, or the (method, seed, params) still to run
    for s in series:
        row = []
        for method in methods:
            for seed in args.smd_seeds if method not in ANCHORS else [2024]:
                cached = cache.get(_cache_key(s, method)) if method in ANCHORS else None
                base = {"suite": "timeseries", "set": s.set, "dataset": s.key, "method": method, "seed": seed}
                params = getattr(args, f"params_{method}", {}) if method not in ANCHORS else {}
                row.append({**base, **cached, "cached": True} if cached else (method, seed, params))
        slots.append(row)

    def done(i: int, computed: list[dict]) -> list[dict]:
        it = iter(computed)
        recs = [slot if isinstance(slot, dict) else next(it) for slot in slots[i]]
        fresh = {_cache_key(series[i], r["method"]): r for r in computed if r["method"] in ANCHORS and "error" not in r}
        if fresh:  # read again before writing: other runs may share the cache
            _save_cache(_load_cache() | {k: _cache_entry(r) for k, r in fresh.items()})
        _log_series(i, len(series), series[i], recs)
        return recs

    results: dict[int, list[dict]] = {}
    todo = {i: [x for x in row if not isinstance(x, dict)] for i, row in enumerate(slots)}
    if args.workers == 1:
        for i, s in enumerate(series):
            results[i] = done(i, _compute_series(s, todo[i], args.threads))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        log.info("%d series on %d worker processes (%d torch thread(s) each)", len(series), args.workers, args.threads)
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_compute_series, series[i], todo[i], args.threads): i for i in todo if todo[i]}
            for i in todo:
                if not todo[i]:
                    results[i] = done(i, [])
            for f in as_completed(futures):
                results[futures[f]] = done(futures[f], f.result())
    return [r for i in range(len(series)) for r in results[i]]


def _cache_entry(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("suite", "method", "seed")}


# ----------------------------------------------------------------------------- summary


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def summarize(runs: list[dict]) -> dict:
    """{"overall" | set: {method: {metric: mean over series (seeds averaged first), "series": n}}}.

    A method's means cover only the series where every method ran, so the columns compare like with like."""
    ok = [r for r in runs if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    common = set.intersection(*({r["dataset"] for r in ok if r["method"] == m} for m in methods)) if ok else set()
    per = {}  # (method, dataset) -> {metric: mean over seeds}
    for m in methods:
        for d in common:
            rs = [r for r in ok if r["method"] == m and r["dataset"] == d]
            per[m, d] = {k: _mean(r.get(k) for r in rs) for k in METRICS}
    sets = {r["dataset"]: r["set"] for r in ok}
    out = {}
    for group in ["overall", *[x for x in SETS if x in sets.values()]]:
        ds = sorted(d for d in common if group == "overall" or sets[d] == group)
        if ds:
            out[group] = {
                m: {k: _mean(per[m, d][k] for d in ds) for k in METRICS} | {"series": len(ds)} for m in methods
            }
    out["errors"] = {m: sum(1 for r in runs if r["method"] == m and "error" in r) for m in methods}
    return out


def markdown(block: dict, labels: dict) -> str:
    summ = block["summary"]
    methods = block["methods"]
    parts = ["### Time series (TSB-AD's metrics): mean over series, fit on train, score test"]
    if block.get("run"):
        r = block["run"]
        parts.append(f"\nRun: commit {str(r.get('git_commit'))[:12]}, {r.get('timestamp')}: `{r.get('command')}`")
    header = ["group", "series", *[labels.get(m, m) for m in methods]]
    for metric in METRICS:
        rows = []
        for group, by_method in summ.items():
            if group == "errors":
                continue
            best = max((by_method[m][metric] or -1) for m in methods)
            cells = []
            for m in methods:
                v = by_method[m][metric]
                cells.append("—" if v is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}"))
            rows.append([f"**{group}**" if group == "overall" else group, str(by_method[methods[0]]["series"]), *cells])
        parts.append(f"\n{METRIC_LABELS[metric]}\n\n" + markdown_table(header, rows))
    errs = {m: n for m, n in summ.get("errors", {}).items() if n}
    if errs:
        parts.append("\nFailed runs (left out of the means): " + ", ".join(f"{m} {n}" for m, n in errs.items()))
    parts.append(
        "\nVUS windows: each series' period (TSB-AD's find_length_rank on the test part's first channel). "
        "F1: best over all thresholds on the test labels (an oracle threshold). PA-F1: point-adjusted, inflated."
    )
    return "\n".join(parts)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
