"""MLflow: log a training run, register its bundle as an MLflow model, open ``models:/`` checkpoints.

    unusual train --mlflow --data … --output …            (TrainJob(mlflow=True) from Python)
    unusual score --checkpoint models:/unusual-ae/1 …     (also models:/NAME@ALIAS, runs:/RUN_ID/bundle)
    unusual serve --checkpoint ae=models:/unusual-ae@prod

- :func:`track_training` wraps ``unusual train``: an MLflow run opened before the training (a store that
  refuses fails before any work), the job's parameters, then :func:`log_bundle`.
- :func:`log_bundle` logs any bundle (``unusual train`` / ``fit``, ``Detector.save``): the model's
  parameters, one metric value per epoch of its training history (``train_loss``, ``val_loss`` when
  validated; step = epoch; the all-reduced losses the driver got from the Ray Train workers), summary
  metrics, the bundle as the run's ``bundle`` artifact, and an MLflow model holding it (pyfunc flavour,
  logged as code: no pickle), registered as ``unusual-<kind>`` or the given name.
- The pyfunc model scores with :class:`unusual.Detector` (weights loaded ``weights_only``, as everywhere):
  ``mlflow.pyfunc.load_model(uri).predict(df)`` is a pandas DataFrame, a row per input row in input
  order: ``anomaly_score`` (float64, what ``Detector.score`` returns), ``is_anomaly`` (bool, > threshold).
- :func:`resolve_checkpoint`: ``models:/…`` / ``runs:/…`` -> the bundle's own location (a local path or
  object-storage URI every Ray worker reads), or for stores only MLflow reads (``mlflow-artifacts:/``,
  ``http(s)://``) a copy in a temporary folder removed at exit. Other URIs pass untouched, without MLflow.

The tracking URI is ``--mlflow-tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default
(``sqlite:///mlflow.db``, which needs SQLAlchemy: mlflow-skinny lacks it, use a tracking server or a
``file:`` store). MLflow 3 refuses a ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set.
MLflow is imported only when one of these is used: ``pip install "unusual[mlflow]"``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from importlib.util import find_spec
from urllib.parse import unquote, urlparse

from .models.errors import UnusualError
from .models.manifest import Manifest, TrainingRecord

__all__ = ["INSTALL", "TrackingError", "is_mlflow_uri", "log_bundle", "pyfunc_model", "resolve_checkpoint",
           "track_training"]  # fmt: skip

INSTALL = 'pip install "unusual[mlflow]"'
SCHEMES = ("models:/", "runs:/")
BUNDLE_ARTIFACT = "bundle"  # the run's artifact folder and the pyfunc model's artifact key
MODEL_NAME = "model"  # the logged model's name in its run
# The job's own parameters (the model's come from the bundle's manifest).
JOB_PARAMS = ("data", "output", "num_workers", "use_gpu", "cpus_per_worker", "precision", "cache", "max_failures")
MAX_PARAM = 6000  # MLflow's limit on a parameter's value
BUNDLE_FILES = ("manifest.json", "weights.pt")
# Schemes the bundle code (fsspec) reads itself, so that a models:/ checkpoint needs no copy.
READABLE = ("", "file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hdfs")


class TrackingError(UnusualError, ValueError):
    """MLflow is missing, or its store refused: one line naming the flag / URI at fault."""


def is_mlflow_uri(uri: str) -> bool:
    """Whether a checkpoint URI is MLflow's (``models:/…``, ``runs:/…``)."""
    return isinstance(uri, str) and uri.startswith(SCHEMES)


def available() -> bool:
    """Whether MLflow is installed (without importing it)."""
    return find_spec("mlflow") is not None


def _mlflow(what: str):
    if not available():
        raise TrackingError(f"{what} needs MLflow: {INSTALL}")
    import mlflow

    return mlflow


def _quiet_mlflow() -> None:
    """MLflow's INFO lines (``Created version '1'``…) only with ``-v``, like Ray's."""
    from .runtime import verbose

    if not verbose():
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _check_store(mlflow, what: str) -> None:
    """MLflow's default store (``sqlite:///mlflow.db``) or another database without SQLAlchemy (mlflow-skinny
    alone): one line saying what to use instead, not MLflow's page about unsupported URIs."""
    for uri in {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}:
        if urlparse(str(uri)).scheme.split("+")[0] in SQL_SCHEMES and find_spec("sqlalchemy") is None:
            raise TrackingError(
                f"{what}: the MLflow tracking URI {uri} needs SQLAlchemy, which mlflow-skinny lacks: set "
                "MLFLOW_TRACKING_URI (or --mlflow-tracking-uri) to a tracking server (http://…) or a file: folder "
                "(with MLFLOW_ALLOW_FILE_STORE=true), or pip install mlflow"
            )


@contextlib.contextmanager
def _refusals(what: str):
    """MLflow's errors (and a store's missing driver) as one line naming ``what``."""
    import mlflow

    _check_store(mlflow, what)
    try:
        yield
    except TrackingError:
        raise
    except ImportError as e:  # a store's driver missing (e.g. a database without its Python package)
        raise TrackingError(
            f"{what}: the MLflow tracking URI {mlflow.get_tracking_uri()} needs the Python package {e.name!r}"
        ) from None
    except Exception as e:
        from mlflow.exceptions import MlflowException

        if not isinstance(e, MlflowException):
            raise
        lines = [line.strip() for line in str(getattr(e, "message", e)).strip().splitlines() if line.strip()]
        raise TrackingError(f"{what}: {lines[0] if lines else type(e).__name__}") from None


@contextlib.contextmanager
def _tracking_uri(mlflow, uri: str | None):
    """Use ``uri`` (when given) as the tracking URI for a while; the previous one after."""
    if not uri:
        yield
        return
    from mlflow.tracking._tracking_service import utils

    old, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)
        if old_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _param(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"


def _flat(prefix: str, d: dict) -> dict[str, str]:
    return {f"{prefix}{k}": _param(v) for k, v in sorted(d.items()) if v is not None}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- the pyfunc model


def pyfunc_model():
    """The MLflow pyfunc model of a bundle (its ``bundle`` artifact), scoring through :class:`Detector`."""
    import mlflow.pyfunc
    import pandas as pd

    class UnusualModel(mlflow.pyfunc.PythonModel):
        """An unusual bundle as an MLflow model; ``predict`` -> DataFrame[anomaly_score, is_anomaly]."""

        def load_context(self, context):
            from .models import Detector

            self.detector = Detector.load(context.artifacts[BUNDLE_ARTIFACT])

        def predict(self, context, model_input, params=None):
            scores = self.detector.score(model_input)
            return pd.DataFrame({"anomaly_score": scores, "is_anomaly": scores > self.detector.threshold_})

        # The hint as an object (this module's annotations are strings): MLflow takes the input as it
        # comes (pandas, or anything Detector.score reads) and no longer warns that there is none.
        predict.__annotations__["model_input"] = pd.DataFrame

    return UnusualModel()


# The model's code (MLflow's "models from code"): no pickled object in the model, only this.
MODEL_CODE = (
    '"""unusual\'s MLflow model: the bundle in its artifacts, scored by unusual.Detector."""\n'
    "import mlflow\n\nfrom unusual.tracking import pyfunc_model\n\nmlflow.models.set_model(pyfunc_model())\n"
)


# --------------------------------------------------------------------------- logging a bundle


def _local_copy(bundle: str, into: str) -> str:
    """The bundle's two files copied to ``into/bundle`` (from any fsspec URI)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(bundle))
    root = root.rstrip("/")
    local = os.path.join(into, BUNDLE_ARTIFACT)
    os.makedirs(local)
    for name in BUNDLE_FILES:
        with fs.open(f"{root}/{name}", "rb") as src, open(os.path.join(local, name), "wb") as dst:
            dst.write(src.read())
    return local


# Summary metrics (step 0) from the manifest's training record: metric -> its key there.
SUMMARY = {"best_epoch": "best_epoch", "rows": "rows", "samples_per_s": "samples_per_s", "train_seconds": "seconds",
           "wall_seconds": "wall_seconds"}  # fmt: skip


def _metrics(training: TrainingRecord) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(per-epoch series, summary values) of a manifest's ``training`` record."""
    validated = float(training.config.get("val_fraction", 0) or 0) > 0
    series = {"train_loss": training.train_loss, "epoch_seconds": training.epoch_seconds or []}
    if validated:  # without a validation split, val_loss is the training loss again
        series["val_loss"] = training.val_loss
    summary = {k: getattr(training, v) for k, v in SUMMARY.items()}
    summary.update(best_val_loss=min(series["val_loss"]) if series.get("val_loss") else None)
    summary.update(epochs_run=len(series["train_loss"]))
    return series, {k: float(v) for k, v in summary.items() if _finite(v)}


def _log_metrics(mlflow, run_id: str, series: dict[str, list[float]], summary: dict[str, float]) -> None:
    """One value per epoch (step = epoch) of each series, and the summary values (step 0)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, vs in series.items() for step, v in enumerate(vs) if _finite(v)]
    metrics += [Metric(k, v, now, 0) for k, v in summary.items()]
    client = mlflow.MlflowClient()
    for a in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[a : a + 1000])


def _muted():
    """MLflow's own prints on stderr, unless ``-v``."""
    from .runtime import verbose

    return contextlib.nullcontext() if verbose() else contextlib.redirect_stderr(io.StringIO())


def _logged_params(manifest: Manifest, params: dict | None) -> dict:
    """The run's parameters: the kind, the model's, the training's, the features' and ``params``."""
    return {
        "kind": manifest.kind,
        **_flat("model.", manifest.family_config),
        **_flat("train.", manifest.training.config),
        **_flat("features.", {"columns": [c["name"] for c in manifest.features["columns"]]}),
        **{k: _param(v) for k, v in (params or {}).items() if v is not None},
    }


def _log_model(mlflow, bundle: str, manifest: Manifest, name: str):
    """The bundle as the run's ``bundle`` artifact and as an MLflow pyfunc model registered as ``name``."""
    from . import __version__
    from .runtime import temp_dir

    with temp_dir("mlflow") as d:
        local = _local_copy(bundle, d)
        mlflow.log_artifacts(local, BUNDLE_ARTIFACT)
        code = os.path.join(d, "unusual_model.py")
        with open(code, "w") as f:
            f.write(MODEL_CODE)
        with _muted():  # "Successfully registered model …" (printed, not logged)
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=code,
                artifacts={BUNDLE_ARTIFACT: local},
                registered_model_name=name,
                pip_requirements=[f"unusual[mlflow]=={__version__}"],
                metadata={"unusual_model_version": manifest.model_version, "kind": manifest.kind},
            )


def log_bundle(
    bundle: str,
    *,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    params: dict | None = None,
) -> dict:
    """Log the bundle at ``bundle`` (a local path or fsspec URI) to MLflow and register it.

    Into the active MLflow run if there is one, else a new run (in ``experiment``, named ``run_name``).
    Logs the parameters (``kind``, ``model.*``, ``train.*``, ``features.*`` and ``params``), one metric
    value per epoch (``train_loss``, ``val_loss`` when validated, ``epoch_seconds``), summary metrics,
    the bundle as the ``bundle`` artifact, and an MLflow model registered as ``model_name`` (default
    ``unusual-<kind>``). Returns ``{"run_id", "experiment_id", "tracking_uri", "model_uri",
    "registered_model": "models:/NAME/VERSION", "version"}``."""
    from .models.bundle import read_bundle

    mlflow = _mlflow("logging to MLflow")
    _quiet_mlflow()
    manifest, _ = read_bundle(bundle)  # checked (format, content hash) before anything is logged
    name = model_name or f"unusual-{manifest.kind}"
    series, summary = _metrics(manifest.training)
    summary["threshold"] = manifest.threshold.value
    logged = _logged_params(manifest, params)
    with _tracking_uri(mlflow, tracking_uri), _refusals(f"MLflow ({tracking_uri or mlflow.get_tracking_uri()})"):
        own = mlflow.active_run() is None
        if own:
            if experiment:
                mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name)
        else:
            run = mlflow.active_run()
        try:
            mlflow.log_params(logged)
            mlflow.set_tags({"unusual.model_version": manifest.model_version, "unusual.bundle": str(bundle)})
            info = _log_model(mlflow, bundle, manifest, name)
            # The metrics after the model: logged before, MLflow 3 copies a value into the run's
            # history again when it links them to the model (two values at step 0).
            _log_metrics(mlflow, run.info.run_id, series, summary)
        except BaseException:
            if own:
                mlflow.end_run("FAILED")
            raise
        if own:
            mlflow.end_run()
        version = info.registered_model_version
        return {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
            "model_uri": info.model_uri,
            "registered_model": f"models:/{name}/{version}",
            "version": int(version),
        }


def track_training(job, train) -> Manifest:
    """``unusual train --mlflow``: ``train(job)`` (-> the manifest) inside an MLflow run opened first, so a
    store that refuses fails before the training; the run's parameters, then :func:`log_bundle`. The
    manifest comes back with an ``"mlflow"`` record (what :func:`log_bundle` returns)."""
    from .runtime import progress

    mlflow = _mlflow("--mlflow")
    _quiet_mlflow()
    where = f"--mlflow-tracking-uri {job.mlflow_tracking_uri or mlflow.get_tracking_uri()}"
    with _tracking_uri(mlflow, job.mlflow_tracking_uri):
        with _refusals(where):
            if job.mlflow_experiment:
                mlflow.set_experiment(job.mlflow_experiment)
            mlflow.start_run(run_name=job.run_name)
        try:
            with _refusals(where):
                mlflow.log_params({k: _param(getattr(job, k)) for k in JOB_PARAMS if getattr(job, k) is not None})
            manifest = train(job)
            record = log_bundle(job.output, model_name=job.mlflow_model_name)
            mlflow.set_tag("unusual.ray_run_name", manifest.training.run_name or "")
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run()
    progress(
        f"MLflow: run {record['run_id']} (experiment {record['experiment_id']}) at {record['tracking_uri']}; "
        f"registered {record['registered_model']}"
    )
    return manifest.model_copy(update={"mlflow": record})


# --------------------------------------------------------------------------- opening models:/ checkpoints

_downloads: list = []  # temporary folders of downloaded bundles, removed when the process exits


def _readable(uri: str) -> str | None:
    """``uri`` as a location the bundle code reads (a local path, s3://…), or None."""
    p = urlparse(uri)
    if p.scheme == "file":
        return unquote(p.path)
    return uri if p.scheme in READABLE or len(p.scheme) == 1 else None  # (one letter: a Windows drive)


def _bundle_in(fs, root: str) -> str | None:
    """The bundle's folder within an MLflow model or artifact folder at ``root``, or None."""
    import yaml

    if fs.exists(f"{root}/{BUNDLE_FILES[0]}"):
        return root
    if not fs.exists(f"{root}/MLmodel"):
        return None
    with fs.open(f"{root}/MLmodel", "rb") as f:
        spec = yaml.safe_load(f) or {}
    art = (((spec.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}).get(BUNDLE_ARTIFACT)
    path = art.get("path") if isinstance(art, dict) else None
    return f"{root}/{path.strip('/')}" if path else None


def resolve_checkpoint(uri: str, flag: str | None = None) -> str:
    """The bundle location of an MLflow model URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
    ``runs:/RUN_ID/PATH``); any other URI unchanged. Errors are one line naming ``uri`` (and ``flag``)."""
    if not is_mlflow_uri(uri):
        return uri
    what = f"{flag} {uri}" if flag else uri
    mlflow = _mlflow(what)
    _quiet_mlflow()
    import fsspec

    with _refusals(what):
        if uri.startswith("models:/"):
            from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

            underlying = ModelsArtifactRepository.get_underlying_uri(uri)
        else:
            from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

            underlying = RunsArtifactRepository.get_underlying_uri(uri)
        direct = _readable(underlying)
        if direct is not None:
            fs, root = fsspec.core.url_to_fs(direct)
            found = _bundle_in(fs, root.rstrip("/"))
            if found is not None:
                return found if urlparse(direct).scheme in ("", "file") else f"{fs.unstrip_protocol(found)}"
            raise TrackingError(f"{what}: not an unusual model (no {BUNDLE_ARTIFACT} artifact at {underlying})")
        from .runtime import temp_dir

        d = temp_dir("mlflow")
        _downloads.append(d)
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d.name)
        found = _bundle_in(fsspec.filesystem("file"), str(local).rstrip("/"))
    if found is None:
        raise TrackingError(f"{what}: not an unusual model (no {BUNDLE_ARTIFACT} artifact in it)")
    return found
