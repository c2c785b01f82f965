"""Detection quality of unusual's detectors on real, labelled data beside PyOD's and TSB-AD's: the suites tabular,
smd, nslkdd, tabular-unsupervised and timeseries (``timeseries.py``). Protocols, options, results: benchmarks/README.md.

    python benchmarks/quality.py [--suites tabular,smd] [--methods ours] [--seeds 0,1] [--datasets cardio]
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import timeseries
from harness import RESULTS, ROOT, loadavg, names, options, provenance, raw_path, write_result
from timeseries import ANCHORS, SETS, markdown_table
from unusual.models.metrics import best_f1, best_f1_pa, label_segments, point_adjust, prf, ranking_metrics
from unusual.models.vus import series_period, vus

SUITES = ("tabular", "smd", "nslkdd", "tabular-unsupervised", "timeseries")
OURS = ("ae", "vae", "lstm")
SEEDED, QUIET = {"random_state": "seed"}, {"random_state": "seed", "verbose": 0}  # "seed": the run's seed
PYOD = {"pyod_ae": ("auto_encoder", "AutoEncoder", QUIET), "pyod_vae": ("vae", "VAE", QUIET),  # (module, class, args)
        "iforest": ("iforest", "IForest", SEEDED), "pca": ("pca", "PCA", SEEDED), "ecod": ("ecod", "ECOD", {}),
        "knn": ("knn", "KNN", {}), "mcd": ("mcd", "MCD", SEEDED)}  # MCD can fail on a singular covariance
ALL_METHODS = (*OURS, *PYOD, *ANCHORS)
LABELS = {**{m: f"ours {m}" for m in OURS}, **{m: f"PyOD {c}" for m, (_, c, _) in PYOD.items()},
          **{m: f"TSB-AD {a[0]}" for m, a in ANCHORS.items()}}
SUITE_METHODS = {"tabular": ("ae", "vae", "pyod_ae", "pyod_vae", "iforest"), "smd": ("lstm", "ae", "iforest"),
                 "nslkdd": ("ae", "vae", "iforest"), "tabular-unsupervised": ("ae", "vae", *PYOD),
                 "timeseries": ("lstm", *ANCHORS)}
SMD_COLUMNS = {"vus_pr": "VUS-PR", "vus_roc": "VUS-ROC", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC", "best_f1": "best F1",
               "best_f1_pa": "best F1 (PA)", "f1_at_threshold": "F1 @thr", "f1_pa_at_threshold": "F1 @thr (PA)",
               "fit_s": "fit s"}
TABLES = {"roc_auc": "ROC-AUC", "pr_auc": "PR-AUC (average precision)", "fit_s": "fit seconds"}
METRICS = {"smd": list(SMD_COLUMNS), "timeseries": list(timeseries.METRICS)}  # the other suites: TABLES
TRAIN_FRACTION = 0.7  # semi-supervised: of the normal rows; tabular-unsupervised: of all rows (stratified)
HIGH_CONTAMINATION = 0.15  # tabular-unsupervised: sets with a larger anomaly share are averaged apart
GROUPS = {"average": "mean over all sets", "average_high_contamination": "mean over high-contamination sets "
          "(>15 % anomalies)", "average_rest": "mean over the rest"}
CATS = ["protocol_type", "service", "flag"]  # NSL-KDD's categorical columns
log = logging.getLogger("quality")
set_order = lambda name: (name.lower(), name)  # noqa: E731


def stratified(y, seed: int, n):
    """A stratified, seeded split of all rows: ``n`` rows (a count or a fraction) and the rest."""
    from sklearn.model_selection import train_test_split
    a, b = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return np.sort(a), np.sort(b)


def tabular_sets(suite: str, data_dir: Path) -> dict:
    """{name: (X, y)}: the ODDS ``.mat`` files, and for tabular-unsupervised ADBench's ``<k>_<name>.npz`` (named
    without the numeric prefix) and NSL-KDD's 20 % train file (the nslkdd suite's only set)."""
    import pandas as pd
    import scipy.io
    out = {}
    for path in sorted((data_dir / "tabular" / "odds").glob("*.mat")) if suite != "nslkdd" else []:
        m = scipy.io.loadmat(path)
        out[path.stem] = (np.asarray(m["X"], dtype=np.float64), np.asarray(m["y"]).ravel().astype(int))
    if not out and suite != "nslkdd":
        raise SystemExit(f"no ODDS .mat files under {data_dir / 'tabular' / 'odds'}")
    for path in sorted((data_dir / "tabular" / "adbench").glob("*.npz")) if suite == "tabular-unsupervised" else []:
        prefix, sep, name = path.stem.partition("_")
        if (name := name if sep and prefix.isdigit() and name else path.stem) in out:
            raise SystemExit(f"ADBench file {path} maps to the name {name!r}, which is taken")
        with np.load(path, allow_pickle=True) as d:
            out[name] = (np.asarray(d["X"], dtype=np.float64), np.asarray(d["y"]).ravel().astype(int))
    root = data_dir / "network" / "nsl_kdd"
    if suite == "nslkdd" or (suite == "tabular-unsupervised" and root.is_dir()):
        cols = [ln.split(",")[0].strip() for ln in (root / "field_names.csv").read_text().splitlines() if ln.strip()]
        df = pd.read_csv(root / "KDDTrain+_20Percent.txt", header=None, names=[*cols, "label", "difficulty"])
        if df.shape[1] != 43 or df["label"].isna().any():
            raise SystemExit(f"unexpected NSL-KDD layout: {df.shape} with columns {cols}")
        X = df.drop(columns=["label", "difficulty"]).astype({c: str for c in CATS})
        out["nsl_kdd_train20"] = (X, (df["label"] != "normal").to_numpy().astype(int))
    return out


def rows(X, idx):
    return X.iloc[idx].reset_index(drop=True) if hasattr(X, "iloc") else X[idx]


def one_hot_like(train_df, test_df):
    """One-hot encoding for PyOD, with the training split's categories (unseen -> all zeros)."""
    import pandas as pd
    tr = pd.get_dummies(train_df, columns=CATS, dtype=np.float64)
    return tr.to_numpy(np.float64), pd.get_dummies(test_df, columns=CATS, dtype=np.float64).reindex(
        columns=tr.columns, fill_value=0.0).to_numpy(np.float64)


def cases(suite: str, args, data_dir: Path):
    """Every (data set, seed) of a suite: ours' and PyOD's train / test inputs, the test labels, record fields.
    Semi-supervised: train on a random 70 % of the normal rows, test on the other normals and every anomaly."""
    if suite == "smd":  # one model per machine: fit on its train part, score its test part
        for s in timeseries.load_series(data_dir, ("smd",), names=args.datasets):
            train, test, label = np.asarray(s.train, np.float64), np.asarray(s.test, np.float64), s.label.astype(int)
            log.info("smd %s: train %s, test %s, %.2f%% anomalous, %d segments", s.name, train.shape, test.shape,
                     100 * label.mean(), len(label_segments(label)))
            yield from ((s.name, seed, (train, test), (train, test), label, {}) for seed in args.smd_seeds)
        return
    for name, (X, y) in tabular_sets(suite, data_dir).items():
        if args.datasets and name not in args.datasets:
            continue
        fields = {}
        if suite == "tabular-unsupervised":  # the whole set's anomaly share decides its group
            fields = {"n_rows": len(y), "n_anomalies": int(y.sum()), "anomaly_share": int(y.sum()) / len(y)}
            if args.max_rows is not None and args.max_rows < len(y):
                keep = stratified(y, 0, args.max_rows)[0]
                X, y = rows(X, keep), y[keep]
        log.info("%s %s: %d rows x %d cols, %d anomalies", suite, name, *X.shape, int(y.sum()))
        for seed in args.seeds:
            if suite == "tabular-unsupervised":
                tr, te = stratified(y, seed, TRAIN_FRACTION)
                split = {"n_train": int(tr.size), "n_train_anomalies": int(y[tr].sum())}
            else:
                normal = np.random.default_rng(seed).permutation(np.flatnonzero(y == 0))
                n = int(round(TRAIN_FRACTION * normal.size))
                tr, te = np.sort(normal[:n]), np.sort(np.concatenate([normal[n:], np.flatnonzero(y == 1)]))
                split = {"n_train": int(tr.size)}
            ours = rows(X, tr), rows(X, te)
            pyod = one_hot_like(*ours) if hasattr(X, "iloc") else ours
            split.update(n_test=int(te.size), n_test_anomalies=int(y[te].sum()))
            yield name, seed, ours, pyod, y[te], {**fields, **split}


def run_method(args, method: str, seed: int, X_train, X_test, clean: bool) -> dict:
    """Fit on the training rows, score the test rows. Ours take ``--params-<kind>`` and, on clean training
    data (the semi-supervised splits), the documented switch ``clean=True``."""
    if method in OURS:
        from unusual.models import Detector
        switch = {"clean": True} if clean and method in ("ae", "vae") else {}
        model = Detector(method, **{**switch, **getattr(args, f"params_{method}"), "seed": seed})
    else:  # PyOD seeds python/numpy/torch in __init__, so it is built right before fit
        module, cls, kwargs = PYOD[method]
        cls = getattr(importlib.import_module(f"pyod.models.{module}"), cls)
        model = cls(**{k: seed if v == "seed" else v for k, v in kwargs.items()})
    t0 = time.perf_counter()
    model.fit(X_train)
    t1 = time.perf_counter()
    scores = model.score(X_test) if method in OURS else np.asarray(model.decision_function(X_test), np.float64)
    out = {"scores": scores, "fit_s": t1 - t0, "score_s": time.perf_counter() - t1, "info": {}, "model": model}
    if method in OURS:
        h = model.history_
        out["info"] = {"epochs_run": len(h.train_loss), "best_epoch": h.best_epoch,
                       "stopped_early": h.stopped_early, "final_train_loss": (h.train_loss or [None])[-1],
                       "best_val_loss": min(h.val_loss) if h.val_loss else None,
                       "threshold": float(model.threshold_)}
    return out


def smd_metrics(out: dict, method: str, test, label, s) -> dict:
    """VUS (window: the period of the test part's first channel), and F1 without and with point adjustment at
    the best threshold and, for ours, at the model's own (``predict``)."""
    rec = {**vus(label, s, series_period(test[:, 0])), "vus_window": series_period(test[:, 0])}
    b, bpa = best_f1(s, label), best_f1_pa(s, label)
    rec.update(best_f1=b["f1"], best_f1_pa=bpa["f1"], best_f1_detail=b, best_f1_pa_detail=bpa)
    if method in OURS:
        pred = out["model"].predict(test)
        out["info"].update(predict_rate=float(pred.mean()), predict_matches_score_gt_threshold=bool(
            np.array_equal(pred, (out["scores"] > out["model"].threshold_).astype(np.int64))))
        at, at_pa = prf(pred, label), prf(point_adjust(pred, label), label)
        rec.update(f1_at_threshold=at["f1"], f1_pa_at_threshold=at_pa["f1"], at_threshold_detail=at,
                   at_threshold_pa_detail=at_pa)
    return rec


def run_suite(suite: str, args, data_dir: Path, methods: list[str]) -> list[dict]:
    """The one loop of the tabular, smd, nslkdd and tabular-unsupervised suites: every method on every case."""
    runs = []
    for name, seed, ours, pyod, y, fields in cases(suite, args, data_dir):
        for method in methods:
            rec = {"suite": suite, "dataset": name, "method": method, "seed": seed, **fields}
            try:
                X_train, X_test = ours if method in OURS else pyod
                out = run_method(args, method, seed, X_train, X_test, clean=suite in ("tabular", "nslkdd"))
                s = np.asarray(out["scores"], dtype=np.float64).copy()  # non-finite ones rank first (+inf, NaN) or last
                finite = s[np.isfinite(s)]
                s[np.isnan(s) | (s == np.inf)] = finite.max() + 1 if finite.size else 1.0
                s[s == -np.inf] = finite.min() - 1 if finite.size else 0.0
                rec.update(nonfinite_scores=int((~np.isfinite(out["scores"])).sum()), **ranking_metrics(y, s))
                rec.update(smd_metrics(out, method, X_test, y, s) if suite == "smd" else {})
                rec.update(fit_s=out["fit_s"], score_s=out["score_s"], info=out["info"])
                f1 = f"  F1 {rec['best_f1']:.4f}  F1-PA {rec['best_f1_pa']:.4f}" if suite == "smd" else ""
                log.info("  %-8s seed %d  roc %.4f  pr %.4f%s  fit %.1fs", method, seed, rec["roc_auc"],
                         rec["pr_auc"], f1, rec["fit_s"])
            except Exception as e:  # noqa: BLE001 - record it and go on with the next run
                rec.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                log.error("  %s seed %s on %s failed: %s", method, seed, name, rec["error"])
            runs.append(rec)
    return runs


def mean_std(values) -> list:
    """[mean, std, n] of the values that are not None or NaN."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and np.isnan(x))], float)
    return [float(v.mean()), float(v.std()), v.size] if v.size else [None, None, 0]


def group_mean(runs: list[dict], metrics, method: str, group: list[str], drop_failed: bool) -> dict:
    """A method's mean over the sets of ``group`` within each seed, then mean and std over the seeds where it
    ran on every set. ``drop_failed``: a set where it failed in any seed is left out (``n_sets`` < total)."""
    mine = [r for r in runs if r["method"] == method and r["dataset"] in group]
    failed = {r["dataset"] for r in mine if "error" in r}
    sets_ok = {r["dataset"] for r in mine} - failed if drop_failed else set(group)
    ok = [r for r in mine if r["dataset"] in sets_ok and "error" not in r]
    per_seed: dict = {k: [] for k in metrics}
    for seed in sorted({r["seed"] for r in ok}):
        rs = [r for r in ok if r["seed"] == seed]
        for k in metrics if {r["dataset"] for r in rs} == sets_ok else ():
            if all(r.get(k) is not None for r in rs):
                per_seed[k].append(float(np.mean([r.get(k) for r in rs])))
    out = {k: mean_std(v) for k, v in per_seed.items()}
    if drop_failed:
        out.update(n_sets=len(sets_ok), n_sets_total=len(group), errors=sum("error" in r for r in mine),
                   sets_left_out=sorted(set(group) - sets_ok, key=set_order))
    return out


def unsupervised_sets(runs: list[dict]) -> dict:
    """tabular-unsupervised: each set's rows, anomalies, anomaly share (before --max-rows), rows used, group."""
    out = {}
    for r in runs:
        out.setdefault(r["dataset"], {"n_rows": r["n_rows"], "n_anomalies": r["n_anomalies"],
                                      "anomaly_share": r["anomaly_share"], "n_rows_used": r["n_train"] + r["n_test"],
                                      "high_contamination": r["anomaly_share"] > HIGH_CONTAMINATION})
    return {d: out[d] for d in sorted(out, key=set_order)}


def summarize(runs: list[dict], suite: str) -> dict:
    """{dataset: {method: {metric: [mean, std, n], errors (if any)}}} and the mean rows: "average" (over the seeds where
    a method ran on every set) or, in tabular-unsupervised, the GROUPS (each leaving out the sets it failed on)."""
    metrics = METRICS.get(suite, list(TABLES))
    datasets = sorted({r["dataset"] for r in runs}, key=set_order)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out: dict = {d: {} for d in datasets}
    for d in datasets:
        for m in methods:
            rs = [r for r in runs if r["dataset"] == d and r["method"] == m]
            ok = [r for r in rs if "error" not in r]
            out[d][m] = {k: mean_std([r.get(k) for r in ok]) for k in metrics}
            if len(rs) > len(ok):
                out[d][m]["errors"] = len(rs) - len(ok)
    if suite == "tabular-unsupervised":
        high = [d for d, s in unsupervised_sets(runs).items() if s["high_contamination"]]
        for key, group in (("average", datasets), ("average_high_contamination", high),
                           ("average_rest", [d for d in datasets if d not in high])):
            out[key] = {m: group_mean(runs, metrics, m, group, True) for m in methods}
    elif len(datasets) > 1:
        out["average"] = {m: group_mean(runs, metrics, m, datasets, False) for m in methods}
    return out


def cell(s: list | None, digits: int = 3, note: str = "") -> str:
    if not s or s[0] is None:
        return "—" + note
    return (f"{s[0]:.{digits}f} ± {s[1]:.{digits}f}" if s[2] > 1 else f"{s[0]:.{digits}f}") + note


def tables(summ: dict, methods: list[str], sets: dict | None) -> str:
    """ROC-AUC, PR-AUC and fit-seconds tables; ``sets`` (tabular-unsupervised) adds anomaly shares and GROUPS."""
    datasets = list(summ) if sets is None else sorted((d for d in summ if d not in GROUPS), key=set_order)
    parts = []
    for metric, label in TABLES.items():
        digits, body = 1 if metric == "fit_s" else 3, []
        for d in datasets:
            share = None if sets is None else sets.get(d, {}).get("anomaly_share")
            row = [f"**{d}**" if d == "average" else d] + (
                [] if sets is None else ["—" if share is None else f"{100 * share:.1f} %"])
            err = {m: summ[d].get(m, {}).get("errors") for m in methods}
            body.append(row + [cell(summ[d].get(m, {}).get(metric), digits, f" ({err[m]} err)" * bool(err[m]))
                               for m in methods])
        for g in [g for g in GROUPS if g in summ] if sets is not None else []:
            n = max((s.get("n_sets_total", 0) for s in summ[g].values()), default=0)
            of = {m: summ[g].get(m, {}).get("n_sets", n) for m in methods}
            body.append([f"**{GROUPS[g]}**", f"{n} set{'s' if n != 1 else ''}"] + [
                cell(summ[g].get(m, {}).get(metric), digits, f" ({of[m]} of {n} sets)" * (of[m] < n))
                for m in methods])
        head = ["dataset", *([] if sets is None else ["anomalies"]), *[LABELS[m] for m in methods]]
        parts.append(f"\n{label}\n\n" + markdown_table(head, body))
    if sets is not None:
        high = [d for d in datasets if sets.get(d, {}).get("high_contamination")]
        rest = ", ".join(d for d in datasets if d not in high) or "none"
        parts.append(
            f"\nanomalies = the set's share of anomalous rows. High-contamination sets (>{100 * HIGH_CONTAMINATION:.0f}"
            f" % anomalies): {', '.join(high) or 'none'}; the rest: {rest}. Each mean row averages the sets within "
            "each seed, then takes mean ± std over seeds; a set on which a method failed (err) is left out of that "
            "method's means, which then say over how many sets they are.")
    return "\n".join(parts)


def markdown(result: dict) -> str:
    parts = []
    for suite, block in result["suites"].items():
        summ, n_seeds, r = block["summary"], len(block["seeds"]), block["run"]
        if not summ:
            continue
        run = f"\nRun: commit {str(r.get('git_commit'))[:12]}, {r.get('timestamp')}: `{r.get('command')}`"
        methods = list(dict.fromkeys(m for d in summ.values() for m in d))
        if suite == "timeseries":
            parts.append(timeseries.markdown(block, LABELS))
        elif suite == "smd":
            parts += [f"### SMD: {n_seeds} seed(s) per machine" + (" (mean ± std)" if n_seeds > 1 else ""), run]
            body = [[f"**{d}**" if d == "average" else d, LABELS[m]] + [
                cell(summ[d][m].get(k), 1 if k == "fit_s" else 3,
                     f" ({summ[d][m].get('errors')} err)" * bool(k == "fit_s" and summ[d][m].get("errors")))
                for k in SMD_COLUMNS] for d in summ for m in methods]
            parts.append("\n" + markdown_table(["machine", "method", *SMD_COLUMNS.values()], body))
            parts.append("\nPA = point adjustment (inflates scores; unadjusted figures are the honest ones). best F1 = "
                         "oracle threshold on the test labels; @thr = the model's own fitted threshold (det.predict); "
                         "IForest has no calibrated threshold here.")
        else:
            f = round(100 * block.get("train_fraction", TRAIN_FRACTION))
            title = {"tabular": "Tabular (ODDS), semi-supervised (ours with clean=True, the switch for clean "
                                "training data)",
                     "nslkdd": "NSL-KDD (KDDTrain+_20Percent), semi-supervised (ours with clean=True)",
                     "tabular-unsupervised": f"Tabular (ODDS + ADBench + NSL-KDD), unsupervised (stratified {f} / "
                                             f"{100 - f} split of all rows, anomalies in the training split)"}[suite]
            parts += [f"### {title}: mean ± std over {n_seeds} seed(s)", run]
            if block.get("max_rows"):
                parts.append(f"\nEach data set subsampled (stratified) to at most {block['max_rows']} rows.")
            parts.append(tables(summ, methods, block.get("sets") if suite == "tabular-unsupervised" else None))
        parts.append(f"\nSuite wall time: {block['seconds']:.0f} s\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = options(__doc__, argv, data_dir=ROOT.parent / "shared" / "data", suites=list(SUITES), methods="all",
                   datasets=(names, None), seeds=[0, 1, 2, 3, 4], smd_seeds=[0], ts_sets=list(SETS),
                   per_set=(int, None), workers=1, rerun_anchors=False, max_rows=(int, None),
                   **{f"params_{k}": {} for k in OURS}, threads=1, out=RESULTS / "quality.json", quiet=False)
    groups = {"ours": OURS, "pyod": tuple(PYOD), "tsb": tuple(ANCHORS), "all": ALL_METHODS}
    args.methods = list(dict.fromkeys(m for tok in names(args.methods) for m in groups.get(tok, [tok])))
    if set(args.suites) - set(SUITES) or set(args.methods) - set(ALL_METHODS) or args.workers < 1:
        raise SystemExit(f"--suites takes {SUITES}, --methods {ALL_METHODS} or {tuple(groups)}, --workers 1 or more")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("unusual").setLevel(logging.WARNING)  # the library logs every epoch
    if not (data_dir := args.data_dir.resolve()).is_dir():
        raise SystemExit(f"data directory {data_dir} does not exist: pass --data-dir PATH (the shared data sets)")
    import torch
    torch.set_num_threads(args.threads)
    result = {**provenance("unusual quality", ("models", "numpy", "torch", "pyod", "sklearn", "scipy", "pandas",
                                               "pyarrow", "polars"),
                           torch_threads=torch.get_num_threads(), cuda_available=torch.cuda.is_available()),
              "data_dir": str(data_dir), "protocol": {"train_fraction_of_normals": TRAIN_FRACTION, "seeds": args.seeds,
                                                      "smd_seeds": args.smd_seeds, "torch_threads": args.threads,
                                                      "workers": args.workers},
              "params": {"ours": {k: {**getattr(args, f"params_{k}"), "seed": "<seed>"} for k in OURS},
                         **{m: f"pyod.models.{mod}.{c}(**{kw}), other arguments default"
                            for m, (mod, c, kw) in PYOD.items()}}, "suites": {}}
    raw = raw_path(args.out)  # every run's records
    kept, kept_raw = {}, {}  # an earlier result's suites that this run does not rerun (each names its own run)
    for path, into in ((args.out, kept), (raw, kept_raw)):
        try:
            into.update({k: v for k, v in json.loads(path.read_text())["suites"].items() if k not in args.suites})
        except (OSError, ValueError, KeyError):
            pass
    t_all = time.perf_counter()
    for suite in args.suites:
        if not (methods := [m for m in args.methods if m in SUITE_METHODS[suite]]):
            log.warning("suite %s: none of the selected methods apply; skipped", suite)
            continue
        log.info("=== suite %s: methods %s", suite, ", ".join(methods))
        t0, ts = time.perf_counter(), suite == "timeseries"
        runs = timeseries.suite_timeseries(args, data_dir, methods) if ts else run_suite(suite, args, data_dir, methods)
        block = {"methods": methods, "seeds": args.smd_seeds if suite in ("smd", "timeseries") else args.seeds,
                 "seconds": time.perf_counter() - t0, "load_average_end": loadavg(),
                 "run": {k: result[k] for k in ("timestamp", "git_commit", "git_dirty_files", "command")},
                 "summary": timeseries.summarize(runs) if ts else summarize(runs, suite)}
        if ts:
            block.update(sets=args.ts_sets, per_set=args.per_set, tsb_ad=timeseries.tsb_version())
        if suite == "tabular-unsupervised":
            block.update(max_rows=args.max_rows, train_fraction=TRAIN_FRACTION, sets=unsupervised_sets(runs),
                         high_contamination_share=HIGH_CONTAMINATION)
        kept[suite], kept_raw[suite] = block, runs  # written after every suite: a long run keeps partial results
        result.update(total_seconds=time.perf_counter() - t_all, suites={k: kept[k] for k in SUITES if k in kept})
        write_result(raw, {**result, "suites": {k: kept_raw[k] for k in SUITES if k in kept_raw}}, depth=5)
        write_result(args.out, result, depth=5)
        log.info("=== suite %s done in %.0f s", suite, block["seconds"])
    dirty = " (dirty tree)" * bool(result["git_dirty_files"])
    md = (f"Quality benchmark — commit {str(result['git_commit'])[:12]}{dirty}, {result['timestamp']}, "
          f"{os.cpu_count()} CPU(s), total {result.get('total_seconds', 0):.0f} s\n\n" + markdown(result))
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    if n_err := sum("error" in r for s in args.suites for r in kept_raw.get(s, [])):
        log.error("%d run(s) failed; see 'error' / 'traceback' in %s", n_err, raw)
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
