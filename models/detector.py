"""The in-memory Python API, in the style PyOD and scikit-learn users know.

>>> det = Detector(kind="ae", epochs=20).fit(train_df)
>>> det.score(test_df)          # ndarray (n,), higher = more anomalous
>>> det.predict(test_df)        # 0/1 at the fitted threshold
>>> det.save("s3://bucket/models/ae1"); Detector.load("s3://bucket/models/ae1")

Lifecycle: ``fit`` learns the feature schema, trains the module on a seeded
split and fits the threshold on the held-out split's scores; scoring goes
through :class:`unusual.models.scorer.Scorer`, the same code the batch job and the
Serve deployment use.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, fields

import numpy as np
import pyarrow as pa
import torch

from .bundle import MANIFEST, WEIGHTS, Bundle, build_manifest, load_bundle, save_bundle, seal
from .columns import FeatureConfig
from .errors import NotFittedError
from .features import FeatureSchema
from .params import check_type
from .params import groups as config_groups
from .registry import DEFAULT_KIND, family
from .scorer import Scorer
from .tables import to_table
from .thresholds import ThresholdConfig, fit_threshold
from .training import (
    History,
    TrainConfig,
    _batches,
    calibrate,
    calibrates_on_every_row,
    epoch_progress,
    fit_module,
    split_indices,
)
from .windows import no_windows_error, training_windows

log = logging.getLogger("unusual")


def split_params(kind: str, params: dict):
    """Sort keyword parameters into the typed configs; unknown names and values of the wrong type are
    errors naming the parameter.

    Parameters the user leaves out take the family's defaults for data as users have it
    (``train_defaults`` in the registry, then the config classes' own), or with ``clean=True`` (the
    training data holds no anomalies) the family's ``clean_defaults``."""
    fam = family(kind)
    groups = config_groups(kind)
    out = {g: {} for g in groups}
    owners = {f.name: g for g, cls in groups.items() for f in fields(cls)}
    for name, value in params.items():
        if name not in owners:
            import difflib

            near = difflib.get_close_matches(name, owners, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TypeError(f"unknown parameter {name!r} for kind {kind!r}{hint}; known: {sorted(owners)}")
        check_type(name, value, groups[owners[name]])
    defaults = {**fam.train_defaults, **(fam.clean_defaults if params.get("clean") else {})}
    for name, value in {**defaults, **params}.items():
        out[owners[name]][name] = value
    return (
        fam.config(**out["model"]),
        FeatureConfig(**out["features"]),
        TrainConfig(**out["train"]),
        ThresholdConfig(**out["threshold"]),
    )


def prepare_training_data(table: pa.Table, schema: FeatureSchema, model_cfg, context: int | None):
    """Encode a table for training: the matrix, or a WindowSet of full windows per entity."""
    if context is None:
        X, _, _ = schema.transform(table)
        return X
    ws = training_windows(table, schema, model_cfg.entity_column, model_cfg.time_column, context)
    if len(ws) == 0:
        raise no_windows_error(model_cfg.window, context, int(ws.lengths.max()))
    short = int((ws.lengths < context).sum())
    if short:
        log.warning("%d series shorter than %d rows give no training windows", short, context)
    return ws


class Detector:
    """An anomaly detector of one model family (``ae``, ``vae`` or ``lstm``).

    Parameters are the fields of the model's config (e.g. ``hidden``,
    ``latent``, ``window``, ``objective``, ``entity_column``,
    ``time_column``), of :class:`FeatureConfig` (``features``, ``exclude``,
    ``categorical``, ``scaling``, ``nan_policy``, ``unseen_category``), of
    :class:`TrainConfig` (``epochs``, ``batch_size``, ``lr``, ``seed``,
    ``device``, ``clean`` …) and of :class:`ThresholdConfig` (``threshold``,
    ``contamination``, ``pot_level``).

    The defaults expect training data that still holds its anomalies (data as users have it);
    ``clean=True`` says the training rows are all normal and trains with the clean-data defaults.
    """

    def __init__(self, kind: str = DEFAULT_KIND, *, verbose: bool | None = None, **params):
        self.kind = kind
        self.verbose = verbose  # epoch progress: True always, False never, None on a terminal after 2 s
        self.params = params
        split_params(kind, params)  # fail early on unknown or invalid parameters

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Detector(kind={self.kind!r}{', ' + args if args else ''})"

    # ----------------------------------------------------------------- fit
    def fit(self, X, y=None) -> Detector:
        """Learn normal behaviour from ``X`` (assumed mostly normal; ``y`` is ignored)."""
        model_cfg, feat_cfg, train_cfg, thr_cfg = split_params(self.kind, self.params)
        fam = family(self.kind)
        table = to_table(X)
        context = model_cfg.context_length if fam.sequence else None
        reserved = (model_cfg.entity_column, model_cfg.time_column) if fam.sequence else ()
        schema = FeatureSchema.fit(table, feat_cfg, reserved)
        data = prepare_training_data(table, schema, model_cfg, context)
        torch.manual_seed(train_cfg.seed)
        module = fam.module(model_cfg, schema.width)
        train_idx, val_idx = split_indices(len(data), train_cfg.val_fraction, train_cfg.seed)
        with epoch_progress(train_cfg.epochs, self.verbose, f"fit {self.kind}") as on_epoch:
            hist: History = fit_module(module, data, train_idx, val_idx, train_cfg, on_epoch=on_epoch)
        module.to("cpu")
        calib = val_idx if len(val_idx) else train_idx
        calibrate(module, _batches(data, calibration_indices(module, train_idx, val_idx), 8192, "cpu"))
        val_scores = _module_scores(module, data, calib)
        threshold = fit_threshold(val_scores, thr_cfg)
        threshold.fit_on = "validation" if len(val_idx) else "training"
        training = hist.training_record(
            rows=table.num_rows,
            train_samples=int(len(train_idx)),
            val_samples=int(len(val_idx)),
            config=asdict(train_cfg),
            runner="in-memory",
        )
        manifest = build_manifest(self.kind, asdict(model_cfg), schema, threshold, training)
        manifest, _ = seal(manifest, module)
        self._set_bundle(Bundle(manifest, schema, module))
        return self

    def _set_bundle(self, bundle: Bundle) -> None:
        self.bundle_ = bundle
        self.schema_ = bundle.schema
        self.threshold_ = bundle.threshold
        self.history_ = bundle.manifest.training
        self.scorer_ = Scorer(bundle)

    def _scorer(self) -> Scorer:
        if not hasattr(self, "scorer_"):
            raise NotFittedError("this Detector is not fitted yet; call fit(X) first")
        return self.scorer_

    # ----------------------------------------------------------------- score
    def score(self, X) -> np.ndarray:
        """Anomaly scores, shape (n,), higher = more anomalous."""
        scorer = self._scorer()
        scorer.reset()  # each call is independent of the previous one
        return scorer.scores(X)

    def predict(self, X) -> np.ndarray:
        """1 for rows scoring above the fitted threshold, else 0."""
        return (self.score(X) > self.threshold_).astype(np.int64)

    def score_table(self, X) -> pa.Table:
        """The full scorer output: score, label, top features and model version per row."""
        scorer = self._scorer()
        scorer.reset()
        return scorer.score_table(X)

    # ----------------------------------------------------------------- persistence
    def save(self, uri: str, overwrite: bool = False) -> str:
        """Write the checkpoint bundle to a local path or fsspec URI; returns the model version."""
        bundle = self._scorer().bundle
        manifest = save_bundle(uri, bundle.manifest, bundle.module, overwrite=overwrite)
        self._set_bundle(Bundle(manifest, bundle.schema, bundle.module, str(uri)))
        return manifest.model_version

    @classmethod
    def load(cls, uri: str) -> Detector:
        bundle = load_bundle(uri)
        det = cls(bundle.kind)
        det.params = {}
        det._set_bundle(bundle)
        return det

    def to_bytes(self) -> dict:
        """The bundle as plain bytes (its manifest and weights files): what :meth:`from_bytes` reads
        back, e.g. to pickle a fitted estimator without pickling torch objects."""
        bundle = self._scorer().bundle
        manifest, weights = seal(bundle.manifest, bundle.module)
        return {"manifest": json.dumps(manifest.to_json(), sort_keys=True, default=float).encode(), "weights": weights}

    @classmethod
    def from_bytes(cls, blob: dict) -> Detector:
        """:meth:`load` of :meth:`to_bytes`' output (content hash checked, weights read with weights_only=True)."""
        import fsspec

        fs, uri = fsspec.filesystem("memory"), f"memory://unusual-bytes/{uuid.uuid4().hex}"
        try:
            fs.pipe(f"{uri}/{WEIGHTS}", blob["weights"])
            fs.pipe(f"{uri}/{MANIFEST}", blob["manifest"])
            return cls.load(uri)
        finally:
            fs.rm(uri, recursive=True)

    @property
    def version(self) -> str:
        return self._scorer().version


def calibration_indices(module, train_idx: np.ndarray, val_idx: np.ndarray) -> np.ndarray:
    """The rows a family calibrates on: the validation split (or the training split when there is none),
    or every row where the family says so (``calibrate_on = "all"``)."""
    if calibrates_on_every_row(module) or not len(val_idx):
        return np.sort(np.concatenate([train_idx, val_idx]))
    return val_idx


@torch.no_grad()
def _module_scores(module, data, idx: np.ndarray, chunk: int = 8192) -> np.ndarray:
    module.eval()
    out = []
    for a in range(0, len(idx), chunk):
        x = torch.from_numpy(np.ascontiguousarray(data[idx[a : a + chunk]]))
        out.append(module.score_terms(x)[0].double().numpy())
    return np.concatenate(out) if out else np.empty(0)
