"""MLflow (``unusual train --mlflow``, ``models:/`` checkpoints) against a real tiny training run on the
session's Ray and a real MLflow ``file:`` store under the test's temporary folder.

One training run (ae, 2 epochs, one small hidden layer) logs to MLflow; then: the run's parameters and
one metric value per epoch, the registered model at version 1, its pyfunc flavour scoring exactly as
``Detector.score``, ``unusual score --checkpoint models:/NAME/1`` (the command, in a subprocess)
writing as many rows as it read, and the one-line errors (no MLflow, an unknown model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from unusual.models import Detector
from unusual.ray_jobs import sample_data

from unusual import cli

pytest.importorskip("mlflow")

CARDIO = Path(sample_data.__file__).parent / "cardio.parquet"
ROOT = Path(__file__).resolve().parents[2]
NAME = "unusual-test-ae"
EPOCHS = 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file: tracking store (MLflow 3 refuses one without MLFLOW_ALLOW_FILE_STORE) as the process's
    tracking URI, for this module only."""
    import mlflow

    uri = f"file:{tmp_path_factory.mktemp('mlflow') / 'mlruns'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def trained(ray_cluster, store, tmp_path_factory):
    """``unusual train --mlflow`` through the job's function (the CLI's code path, in this process)."""
    from unusual.ray_jobs.train import TrainJob, run

    bundle = str(tmp_path_factory.mktemp("bundle") / "ae")
    job = TrainJob(
        data=str(CARDIO),
        output=bundle,
        model="ae",
        exclude=["label"],
        epochs=EPOCHS,
        params={"hidden": [8], "latent": 2},
        mlflow=True,
        mlflow_tracking_uri=store,
        mlflow_experiment="unusual-tests",
        mlflow_model_name=NAME,
    )
    return bundle, run(job)


def test_the_run_has_the_parameters_and_one_loss_per_epoch(trained, tmp_path):
    import mlflow

    bundle, manifest = trained
    record = manifest.mlflow
    assert record["registered_model"] == f"models:/{NAME}/1" and record["version"] == 1
    client = mlflow.MlflowClient()
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "unusual-tests"
    p = run.data.params
    assert p["kind"] == "ae" and p["data"] == str(CARDIO) and p["output"] == bundle and p["num_workers"] == "1"
    assert json.loads(p["model.hidden"]) == [8] and p["model.latent"] == "2"
    assert p["train.epochs"] == str(EPOCHS) and float(p["train.lr"]) > 0
    assert "label" not in json.loads(p["features.columns"])
    training = manifest.training
    for key in ("train_loss", "val_loss"):
        history = client.get_metric_history(record["run_id"], key)
        assert sorted((m.step, m.value) for m in history) == list(enumerate(getattr(training, key))), key
        assert len(history) == EPOCHS
    assert run.data.metrics["threshold"] == manifest.threshold.value
    assert run.data.tags["unusual.model_version"] == manifest.model_version
    # The bundle is the run's artifact too, byte for byte.
    # (into tmp_path: without dst_path MLflow downloads into a new folder under /tmp and leaves it there)
    local = mlflow.artifacts.download_artifacts(run_id=record["run_id"], artifact_path="bundle", dst_path=str(tmp_path))
    assert sorted(os.listdir(local)) == ["manifest.json", "weights.pt"]
    assert Path(local, "weights.pt").read_bytes() == Path(bundle, "weights.pt").read_bytes()


def test_the_registered_model_scores_like_the_detector(trained, tmp_path):
    import mlflow

    bundle, manifest = trained
    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert version.run_id == manifest.mlflow["run_id"]
    df = sample_data.load("cardio").drop_columns(["label"]).to_pandas()
    out = mlflow.pyfunc.load_model(f"models:/{NAME}/1", dst_path=str(tmp_path)).predict(df)
    det = Detector.load(bundle)
    assert list(out.columns) == ["anomaly_score", "is_anomaly"] and len(out) == len(df)
    np.testing.assert_allclose(out["anomaly_score"].to_numpy(), det.score(df), rtol=0, atol=1e-6)
    assert np.array_equal(out["is_anomaly"].to_numpy(), det.predict(df).astype(bool))


def test_models_uris_resolve_to_the_bundle_for_score_and_serve(trained, monkeypatch):
    """``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` and ``runs:/RUN_ID/bundle`` become a local bundle
    folder (the file: store is readable in place: no copy) where a job or the endpoint opens it, not when
    its config is validated."""
    import mlflow

    from unusual.config import ScoreJob, ServeConfig, named_checkpoints
    from unusual.tracking import resolve_checkpoint

    bundle, manifest = trained
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    uris = [f"models:/{NAME}/1", f"models:/{NAME}@champion", f"runs:/{manifest.mlflow['run_id']}/bundle"]
    for uri in uris:
        assert ScoreJob(checkpoint=uri, data="d", output="o").checkpoint == uri  # validation reads nothing
        where = resolve_checkpoint(uri)  # what unusual score does first
        assert Path(where, "manifest.json").read_bytes() == Path(bundle, "manifest.json").read_bytes(), uri
    # The command line names a bare URI by its bundle's kind; the application's start resolves the rest.
    parts = named_checkpoints([f"a=models:/{NAME}/1", f"models:/{NAME}@champion"])
    assert parts[0] == f"a=models:/{NAME}/1" and parts[1].startswith("ae=")
    served = ServeConfig(models=parts).with_environment().models
    assert sorted(served) == ["a", "ae"] and all(Path(u, "weights.pt").is_file() for u in served.values())
    # A store only MLflow reads (mlflow-artifacts:/, http): a copy in a temporary folder, removed at exit.
    from unusual import tracking

    monkeypatch.setattr(tracking, "_readable", lambda uri: None)
    copy = tracking.resolve_checkpoint(uris[0])
    assert Path(copy, "weights.pt").read_bytes() == Path(bundle, "weights.pt").read_bytes()
    assert Path(tracking._downloads[-1].name) in Path(copy).parents
    tracking._downloads.pop().cleanup()
    assert not Path(copy).exists()


def test_unusual_score_reads_a_models_uri(trained, ray_cluster, store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    out = tmp_path / "scores"
    r = subprocess.run(
        [sys.executable, "-m", "unusual", "score", "--checkpoint", f"models:/{NAME}/1", "--data", str(CARDIO),
         "--output", str(out), "--address", ray_cluster.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["rows_in"] == summary["rows_scored"] == 1831
    parts = sorted(p for p in out.rglob("*.parquet") if "quarantine" not in str(p) and not p.name.startswith("_"))
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 1831
    # the scores are the registered bundle's
    assert set(pq.read_table(parts[0], columns=["model_version"]).column(0).to_pylist()) == {
        trained[1].model_version
    }


def test_an_unknown_model_is_one_line(store, capsys):
    argv = ["score", "--checkpoint", "models:/no-such-model/1", "--data", "d", "--output", "o"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "unusual score: error: --checkpoint: models:/no-such-model/1: Registered Model with name=no-such-model "
        "not found"
    )
    assert cli.main(["serve", "--checkpoint", "ae=models:/no-such-model@prod"]) == 2
    assert capsys.readouterr().err.strip() == (
        "unusual serve: error: --checkpoint: models:/no-such-model@prod: Registered Model with name=no-such-model "
        "not found"
    )


def test_without_mlflow_the_flags_fail_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec None, import fails
    assert cli.main(["train", "--mlflow", "--data", "d", "--output", "o"]) == 2
    assert capsys.readouterr().err.strip() == (
        'unusual train: error: --mlflow needs MLflow: pip install "unusual[mlflow]"'
    )
    assert cli.main(["score", "--checkpoint", "models:/m/1", "--data", "d", "--output", "o"]) == 2
    assert capsys.readouterr().err.strip() == (
        'unusual score: error: --checkpoint: models:/m/1 needs MLflow: pip install "unusual[mlflow]"'
    )
    # and the MLflow options alone say what they need
    assert cli.main(["train", "--mlflow-model-name", "x", "--data", "d", "--output", "o"]) == 2
    assert capsys.readouterr().err.strip() == (
        "unusual train: error: --mlflow-model-name is given without --mlflow: add --mlflow to log the run"
    )


@pytest.mark.skipif(find_spec("sqlalchemy") is not None, reason="full MLflow: its default sqlite store works")
def test_the_default_store_without_sqlalchemy_is_one_line(monkeypatch, tmp_path, capsys):
    """mlflow-skinny alone: MLflow's default tracking URI (sqlite:///mlflow.db) cannot be opened."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    try:
        assert cli.main(["score", "--checkpoint", "models:/m/1", "--data", "d", "--output", "o"]) == 2
    finally:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("unusual score: error: --checkpoint: models:/m/1: the MLflow tracking URI sqlite:///"), err
    assert "needs SQLAlchemy, which mlflow-skinny lacks" in err and "MLFLOW_ALLOW_FILE_STORE=true" in err
