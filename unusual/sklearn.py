"""scikit-learn / PyOD-compatible estimators over :class:`unusual.models.Detector`.

Needs the optional extra ``unusual[sklearn]`` (scikit-learn)::

    >>> from unusual.sklearn import AutoencoderDetector, VAEDetector
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> pipe = make_pipeline(StandardScaler(), AutoencoderDetector(epochs=20, contamination=0.05)).fit(X)
    >>> pipe.predict(X_new)          # +1 inlier / -1 outlier (scikit-learn)
    >>> pipe[-1].anomaly_score(X_new)  # higher = more anomalous (PyOD, Detector.score)

The estimators are ordinary scikit-learn estimators: explicit keyword parameters stored unchanged
(``get_params`` / ``set_params`` / ``clone`` work), validated in ``fit``; inputs are checked with
scikit-learn's ``validate_data`` (numpy arrays, lists, pandas DataFrames and pyarrow Tables of numeric
columns; no NaN, inf or sparse matrices: impute and one-hot encode in the pipeline, or use
:class:`unusual.models.Detector` directly, which also takes categorical columns and ``nan_policy``).
Training, scoring and the threshold rules are the Detector's: an estimator holds the fitted Detector
as ``detector_`` (its ``score_table`` gives the top features behind each score), ``save`` writes the
Detector's checkpoint bundle and ``load`` reads one back. Fitted estimators pickle (joblib, pipelines)
through the bundle's bytes, read back with ``torch.load(weights_only=True)``.

Sign conventions. The methods follow scikit-learn's outlier-detector convention (what
``check_estimator`` checks); the PyOD-style values are offered beside them:

==========================  =============================================  ==========================================
quantity                    scikit-learn (methods)                         PyOD (attributes / methods)
==========================  =============================================  ==========================================
per-row score               ``score_samples(X)``: higher = more normal,    ``anomaly_score(X)``, ``decision_scores_``
                            exactly ``-Detector.score(X)``                 (training set): higher = more anomalous
decision                    ``decision_function(X)`` =                     ``anomaly_score(X) - threshold_``:
                            ``score_samples(X) - offset_``: < 0 = outlier  > 0 = outlier
labels                      ``predict(X)``, ``fit_predict(X)``:            ``anomaly_label(X)``, ``labels_``
                            +1 inlier, -1 outlier                          (training set): 0 inlier, 1 outlier
threshold                   ``offset_`` = ``-threshold_``                  ``threshold_``
==========================  =============================================  ==========================================

A row is an outlier when its anomaly score is strictly above ``threshold_``.

``contamination``. With ``threshold_on="training"`` (the default), as in scikit-learn and PyOD, the
threshold rule (``threshold="quantile"`` or ``"pot"``) is applied to the training set's scores, so that
``contamination`` is the proportion of training rows flagged (``labels_.mean()``). With
``threshold_on="validation"`` it is the Detector's own rule: applied to the scores of the held-out
``val_fraction`` split, ``contamination`` is the target false-positive rate on unseen normal data. Either
way the threshold is stored in the bundle, so ``Detector.load(uri).predict`` flags the same rows.
"""

from __future__ import annotations

import inspect
from numbers import Integral

import numpy as np
import pyarrow as pa

try:
    from sklearn.base import BaseEstimator, OutlierMixin
    from sklearn.utils._param_validation import StrOptions
    from sklearn.utils.validation import check_is_fitted
except ImportError:  # pragma: no cover - exercised by tests/models/test_sklearn.py with sklearn hidden
    raise ImportError('unusual.sklearn needs scikit-learn, an optional extra: pip install "unusual[sklearn]"') from None

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - scikit-learn < 1.6

    def _validate_data(estimator, X, **kwargs):
        return estimator._validate_data(X, **kwargs)


from .models.bundle import Bundle, seal
from .models.detector import Detector, split_params
from .models.params import SKLEARN_RENAMED, estimator_parameters, sklearn_constraints
from .models.registry import family
from .models.thresholds import fit_threshold

__all__ = ["AutoencoderDetector", "DeepOutlierDetector", "VAEDetector"]

# Estimator parameter -> Detector parameter, where the names differ (``score`` would shadow
# scikit-learn's ``score`` method, which scorers and checks look for).
_RENAMED = {v: k for k, v in SKLEARN_RENAMED.items()}
# Estimator-only parameters (not passed to the Detector): default and constraints.
_OWN = {
    "threshold_on": ("training", [StrOptions({"training", "validation"})]),
    "verbose": (None, ["boolean", None]),
}


def _estimator(kind: str):
    """Class decorator: the estimator of ``kind`` gets its keyword parameters, defaults and
    ``_parameter_constraints`` from the Detector's parameter tree (:mod:`unusual.models.params`) plus
    its own; ``__init__`` stores them unchanged, as scikit-learn requires (no validation)."""

    def wrap(cls):
        params = estimator_parameters(kind)
        defaults = {p.name: p.default for p in params} | {k: d for k, (d, _) in _OWN.items()}
        cls._parameter_constraints = {p.name: sklearn_constraints(p) for p in params} | {
            k: c for k, (_, c) in _OWN.items()
        }

        def __init__(self, **kwargs):
            unknown = sorted(set(kwargs) - set(defaults))
            if unknown:
                raise TypeError(f"{cls.__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}")
            for name, default in defaults.items():
                setattr(self, name, kwargs.get(name, default))

        keyword = inspect.Parameter.KEYWORD_ONLY
        __init__.__signature__ = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(name, keyword, default=d) for name, d in defaults.items()]
        )
        __init__.__qualname__ = f"{cls.__name__}.__init__"
        cls.__init__ = __init__
        return cls

    return wrap


def _positive_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool) and v >= 1


class DeepOutlierDetector(OutlierMixin, BaseEstimator):
    """Shared base of :class:`AutoencoderDetector` and :class:`VAEDetector` (not used directly).

    Fitted attributes: ``detector_`` (the :class:`unusual.models.Detector`), ``n_features_in_``,
    ``feature_names_in_`` (when ``X`` had string column names), ``threshold_`` and ``offset_``;
    after ``fit`` (not after ``load``) also ``decision_scores_`` and ``labels_``, the PyOD-style
    anomaly scores and 0/1 labels of the training set.
    """

    _kind: str = ""

    _parameter_constraints: dict = {}  # each estimator's, from the parameter tree (``_estimator``)

    # ----------------------------------------------------------------- parameters
    def _detector_params(self) -> dict:
        """The Detector's keyword parameters from this estimator's (validated) parameters.

        With ``clean=True``, a parameter left at its default that the family sets for clean data
        (``epochs``, ``patience``, ``trim``) is not passed on, so the Detector's clean-data default applies."""
        params = {}
        defaults = inspect.signature(type(self).__init__).parameters
        clean = family(self._kind).clean_defaults if self.get_params(deep=False).get("clean") else {}
        for name, value in self.get_params(deep=False).items():
            if name in _OWN or (name in clean and name in defaults and value == defaults[name].default):
                continue
            if name == "hidden":
                if len(value) == 0 or not all(_positive_int(h) for h in value):
                    raise ValueError(
                        f"hidden must be a non-empty tuple of positive layer sizes, e.g. (64, 32); got {value!r}"
                    )
                value = [int(h) for h in value]
            params[_RENAMED.get(name, name)] = value
        return params

    def _validate_params(self) -> None:
        super()._validate_params()  # types and ranges, scikit-learn's messages name the parameter
        split_params(self._kind, self._detector_params())  # the Detector's own checks

    # ----------------------------------------------------------------- data
    def _check_X(self, X, reset: bool) -> np.ndarray:
        return _validate_data(self, X, reset=reset, dtype=np.float64, ensure_min_samples=2 if reset else 1)

    def _table(self, X: np.ndarray) -> pa.Table:
        """The validated matrix as the Detector's table: the fitted column names, else ``x0 … x{d-1}``."""
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            names = [f"x{j}" for j in range(X.shape[1])]
        return pa.table({str(name): X[:, j] for j, name in enumerate(names)})

    # ----------------------------------------------------------------- fit
    def fit(self, X, y=None):
        """Train on ``X`` (assumed mostly normal; ``y`` is ignored) and fit the threshold; returns self.

        ``X``: (n_samples, n_features) numeric array-like, pandas DataFrame or pyarrow Table (dense, finite).
        """
        self._validate_params()
        X = self._check_X(X, reset=True)
        table = self._table(X)
        det = Detector(self._kind, verbose=self.verbose, **self._detector_params()).fit(table)
        scores = det.score(table)
        if self.threshold_on == "training":
            _, _, _, thr_cfg = split_params(self._kind, det.params)
            record = fit_threshold(scores, thr_cfg)
            record.fit_on = "training"
            bundle = det.bundle_
            manifest, _ = seal(bundle.manifest.model_copy(update={"threshold": record}), bundle.module)
            det._set_bundle(Bundle(manifest, bundle.schema, bundle.module))
        self._set_detector(det)
        self.decision_scores_ = scores
        self.labels_ = (scores > self.threshold_).astype(np.int64)
        return self

    def _set_detector(self, det: Detector) -> None:
        self.detector_ = det
        self.threshold_ = float(det.threshold_)
        self.offset_ = -self.threshold_

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "detector_")

    # ----------------------------------------------------------------- scikit-learn convention
    def score_samples(self, X) -> np.ndarray:
        """Normality scores, shape (n_samples,): higher = more normal; exactly ``-anomaly_score(X)``."""
        return -self.anomaly_score(X)

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``, shape (n_samples,): negative for outliers, >= 0 for inliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for inliers, -1 for outliers (anomaly score strictly above ``threshold_``)."""
        return np.where(self.decision_function(X) < 0, -1, 1).astype(np.int64)

    # ----------------------------------------------------------------- PyOD convention
    def anomaly_score(self, X) -> np.ndarray:
        """Anomaly scores, shape (n_samples,): higher = more anomalous (PyOD's ``decision_function``,
        :meth:`unusual.models.Detector.score`)."""
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self.detector_.score(self._table(X))

    def anomaly_label(self, X) -> np.ndarray:
        """0 for inliers, 1 for outliers (PyOD's ``predict``)."""
        return (self.anomaly_score(X) > self.threshold_).astype(np.int64)

    # ----------------------------------------------------------------- persistence
    def save(self, uri: str, overwrite: bool = False) -> str:
        """Write the Detector's checkpoint bundle to a local path or fsspec URI; returns the model version."""
        check_is_fitted(self)
        return self.detector_.save(uri, overwrite=overwrite)

    @classmethod
    def load(cls, uri: str) -> DeepOutlierDetector:
        """An estimator from a checkpoint bundle (of this class's model kind; the base class takes any).

        Its parameters are the bundle's, so ``clone`` gives an unfitted estimator configured alike.
        ``decision_scores_`` and ``labels_`` (training-set values) are not restored.
        """
        return cls._from_detector(Detector.load(uri), uri)

    @classmethod
    def _from_detector(cls, det: Detector, uri: str) -> DeepOutlierDetector:
        by_kind = {c._kind: c for c in (AutoencoderDetector, VAEDetector)}
        if det.kind not in by_kind:
            raise ValueError(
                f"the bundle at {uri} is a {det.kind!r} model; unusual.sklearn has estimators for "
                f"{sorted(by_kind)} only: use unusual.models.Detector.load"
            )
        target = by_kind[det.kind]
        if cls._kind and cls is not target:
            raise ValueError(f"the bundle at {uri} is a {det.kind!r} model; load it with {target.__name__}.load")
        schema = det.schema_
        not_numeric = [c.name for c in schema.columns if c.kind != "numeric"]
        if not_numeric:
            raise ValueError(
                f"the bundle at {uri} has categorical features {not_numeric}; "
                "the scikit-learn estimators take numeric columns only: use unusual.models.Detector.load"
            )
        manifest = det.bundle_.manifest
        stored = {
            **manifest.family_config,
            **manifest.training.config,
            **manifest.threshold.model_dump(exclude_unset=True),
            "scaling": schema.config.scaling,
        }
        own = {v: k for k, v in _RENAMED.items()}
        names = set(target._get_param_names())
        params = {own.get(k, k): v for k, v in stored.items() if own.get(k, k) in names}
        if isinstance(params.get("hidden"), list):
            params["hidden"] = tuple(params["hidden"])
        params["threshold_on"] = "training" if manifest.threshold.fit_on == "training" else "validation"
        est = target(**params)
        est._set_detector(det)
        est.n_features_in_ = len(schema.columns)
        if schema.names != [f"x{j}" for j in range(len(schema.columns))]:
            est.feature_names_in_ = np.asarray(schema.names, dtype=object)
        return est

    # ----------------------------------------------------------------- pickling
    def __getstate__(self):
        state = dict(super().__getstate__())
        det = state.pop("detector_", None)
        if det is not None:
            state["_detector_bundle"] = det.to_bytes()
        return state

    def __setstate__(self, state):
        state = dict(state)
        blob = state.pop("_detector_bundle", None)
        if blob is not None:
            det = Detector.from_bytes(blob)
            det.verbose = state.get("verbose")
            state["detector_"] = det
        super().__setstate__(state)


@_estimator("ae")
class AutoencoderDetector(DeepOutlierDetector):
    """Dense autoencoder outlier detector (``Detector(kind="ae")``): by default (``score_type="joint"``) the
    anomaly score is the reconstruction error, each column in units of its usual error, plus the distance
    of the row's latent code from the usual codes (``"reconstruction"``: the mean squared reconstruction
    error alone).

    Parameters (defaults as :class:`unusual.models.Detector`'s):

    - model: ``hidden`` layer sizes, ``latent`` size (None: ``max(2, min(32, n_features // 4))``),
      ``dropout``, ``norm`` (``"layer"`` or None), ``trim`` (each batch's loss leaves out its worst-fitted
      fraction of rows: robustness to anomalies in the training data), ``score_type`` (``"joint"`` or
      ``"reconstruction"``), ``latent_ridge``, ``normalize_errors`` (with ``"reconstruction"``: each
      column's error in units of its usual level);
    - features: ``scaling`` (``"standard"``, ``"robust"`` or ``"none"``);
    - training: ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``val_fraction`` (held out for early
      stopping), ``patience``, ``grad_clip``, ``seed``, ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``…),
      ``clean``: the defaults expect anomalies among the training rows (data as users have it);
      ``clean=True`` says the training rows are all normal, and ``epochs``, ``patience`` and ``trim`` left at
      their defaults take the clean-data values (60, 8 and 0);
    - threshold: ``contamination``, ``threshold`` (``"quantile"`` or ``"pot"``), ``pot_level``,
      ``threshold_on`` (``"training"`` or ``"validation"``, see the module docstring);
    - ``verbose``: the epoch progress bar (True always, False never, None on a terminal after 2 s).
    """

    _kind = "ae"


@_estimator("vae")
class VAEDetector(DeepOutlierDetector):
    """Gaussian variational autoencoder outlier detector (``Detector(kind="vae")``).

    Parameters as :class:`AutoencoderDetector`'s (less ``normalize_errors``), plus ``score_type``
    (the Detector's ``score``: ``"elbo"``, the negative ELBO, or ``"nll"``, the reconstruction negative
    log-likelihood), ``n_samples`` (latent draws per row when scoring), ``beta`` (weight of the KL term
    in training) and ``min_logvar`` (floor of the decoder log-variance).
    """

    _kind = "vae"
