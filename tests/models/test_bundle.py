"""The checkpoint bundle: manifest content, integrity checks, format versions,
safe weight loading, and a round trip over a real (moto) S3 endpoint."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from modeltestkit import tabular
from unusual.models import BundleError, BundleVersionError, Detector, load_bundle
from unusual.models.ae import AEConfig
from unusual.models.bundle import FORMAT_VERSION, MANIFEST, WEIGHTS, content_hash, read_manifest, save_bundle

TINY = {"hidden": [16], "epochs": 4, "batch_size": 64, "seed": 0}


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    return tabular(1000, seed=0)


@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return tabular(200, seed=1)


@pytest.fixture(scope="module")
def det(train) -> Detector:
    return Detector("ae", **TINY).fit(train)


@pytest.fixture
def saved(det, tmp_path) -> str:
    uri = str(tmp_path / "bundle")
    det.save(uri)
    return uri


def _read_manifest(uri: str) -> dict:
    with open(os.path.join(uri, MANIFEST)) as f:
        return json.load(f)


def _write_manifest(uri: str, manifest: dict, reseal: bool = False) -> None:
    """Rewrite the manifest; ``reseal`` recomputes a valid content hash, as an
    attacker (or a buggy writer) with access to the files could."""
    if reseal:
        with open(os.path.join(uri, WEIGHTS), "rb") as f:
            manifest["content_hash"] = content_hash(manifest, f.read())
    with open(os.path.join(uri, MANIFEST), "w") as f:
        json.dump(manifest, f)


def _replace_weights(uri: str, data: bytes) -> None:
    """Replace weights.pt and reseal the manifest so that only the weights are at fault."""
    with open(os.path.join(uri, WEIGHTS), "wb") as f:
        f.write(data)
    _write_manifest(uri, _read_manifest(uri), reseal=True)


# --------------------------------------------------------------------------- content


def test_bundle_files(saved):
    assert sorted(os.listdir(saved)) == [MANIFEST, WEIGHTS]


def test_manifest_content(det, saved, train):
    m = _read_manifest(saved)
    assert m["format_version"] == FORMAT_VERSION
    assert m["kind"] == "ae"
    assert m["model_config"] == asdict(AEConfig(hidden=[16]))
    assert m["width"] == train.shape[1]
    assert m["model_version"] == det.version
    assert m["model_version"].startswith("ae-")

    # Feature schema with the scaler state learnt from the training data.
    cols = m["features"]["columns"]
    assert [c["name"] for c in cols] == [f"x{j}" for j in range(train.shape[1])]
    assert all(c["kind"] == "numeric" and c["dtype"] == "double" for c in cols)
    np.testing.assert_allclose([c["center"] for c in cols], train.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([c["scale"] for c in cols], train.std(axis=0), rtol=1e-9)
    assert m["features"]["config"]["scaling"] == "standard"
    assert m["features"]["config"]["nan_policy"] == "raise"

    # The threshold and how it was fit.
    thr = m["threshold"]
    assert thr["threshold"] == "quantile"
    assert thr["contamination"] == 0.01
    assert thr["value"] == det.threshold_
    assert thr["fit_on"] == "validation"

    # Training metrics.
    tr = m["training"]
    assert tr["rows"] == len(train)
    assert tr["train_samples"] + tr["val_samples"] == len(train)
    assert thr["n_scores"] == tr["val_samples"] > 0
    assert len(tr["train_loss"]) == len(tr["val_loss"]) == TINY["epochs"]
    assert all(np.isfinite(tr["train_loss"])) and all(np.isfinite(tr["val_loss"]))
    assert 0 <= tr["best_epoch"] < TINY["epochs"]
    assert tr["val_loss"][tr["best_epoch"]] == min(tr["val_loss"])
    assert tr["config"]["epochs"] == TINY["epochs"] and tr["config"]["seed"] == 0
    assert tr["seconds"] > 0

    libs = m["libraries"]
    assert libs["torch"] == torch.__version__
    assert libs["numpy"] == np.__version__
    assert {"unusual", "pyarrow", "python"} <= set(libs)

    # The content hash covers the weights and the rest of the manifest.
    with open(os.path.join(saved, WEIGHTS), "rb") as f:
        weights = f.read()
    assert m["content_hash"] == content_hash(m, weights)


def test_weights_are_a_plain_state_dict(det, saved):
    with open(os.path.join(saved, WEIGHTS), "rb") as f:
        state = torch.load(f, weights_only=True)
    expected = det.bundle_.module.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_pot_threshold_record(train):
    det = Detector("ae", threshold="pot", contamination=0.005, **TINY).fit(train)
    thr = det.bundle_.manifest.threshold
    assert thr.threshold == "pot" and thr.pot_level == 0.98
    assert thr.value == det.threshold_
    assert thr.gpd is not None


def test_load_gives_the_same_model(det, saved, test_x):
    b = load_bundle(saved)
    assert b.kind == "ae" and b.version == det.version and b.threshold == det.threshold_
    assert b.uri == saved
    assert not b.module.training
    assert np.array_equal(Detector.load(saved).score(test_x), det.score(test_x))


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_bundle_from_before_the_norm_field_loads(kind, train, test_x, tmp_path):
    """AE and VAE bundles written before ``norm`` existed have no such key and no
    normalisation layers; they load as ``norm=None`` and score as before."""
    old = Detector(kind, norm=None, **TINY).fit(train)
    uri = str(tmp_path / "old")
    old.save(uri)
    m = _read_manifest(uri)
    del m["model_config"]["norm"]
    _write_manifest(uri, m, reseal=True)
    b = load_bundle(uri)
    assert b.model_config.norm is None
    assert np.array_equal(Detector.load(uri).score(test_x), old.score(test_x))
    # A new default model has layer norms, so its weights would not fit that config.
    assert any("norm" in type(m).__name__.lower() for m in Detector(kind, **TINY).fit(train).bundle_.module.modules())


def test_ae_bundle_from_before_the_score_field_loads(train, test_x, tmp_path):
    """AE bundles written before ``score`` existed scored by reconstruction alone and have no latent
    statistics; they load as ``score="reconstruction"`` and score as before."""
    old = Detector("ae", score="reconstruction", **TINY).fit(train)
    uri = str(tmp_path / "old")
    old.save(uri)
    m = _read_manifest(uri)
    del m["model_config"]["score"], m["model_config"]["latent_ridge"]
    _write_manifest(uri, m, reseal=True)
    b = load_bundle(uri)
    assert b.model_config.score == "reconstruction"
    assert np.array_equal(Detector.load(uri).score(test_x), old.score(test_x))
    # The default (joint) model carries the latent statistics, so its weights would not fit that config.
    assert "latent_precision" in Detector("ae", **TINY).fit(train).bundle_.module.state_dict()


# --------------------------------------------------------------------------- errors


def test_save_over_existing_bundle(det, saved, test_x):
    with pytest.raises(BundleError, match="already exists.*overwrite=True"):
        det.save(saved)
    assert det.save(saved, overwrite=True) == det.version
    assert np.array_equal(Detector.load(saved).score(test_x), det.score(test_x))


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="no bundle at"):
        load_bundle(str(tmp_path / "nowhere"))


def test_corrupt_manifest_json(saved):
    with open(os.path.join(saved, MANIFEST), "w") as f:
        f.write('{"format_version": 1, "kind": ')
    with pytest.raises(BundleError, match="corrupt.*not valid JSON"):
        load_bundle(saved)


def test_manifest_without_format_version(saved):
    m = _read_manifest(saved)
    del m["format_version"]
    _write_manifest(saved, m)
    with pytest.raises(BundleError, match="corrupt.*no format_version"):
        load_bundle(saved)


def test_truncated_weights(saved):
    path = os.path.join(saved, WEIGHTS)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(BundleError, match="content hash mismatch"):
        load_bundle(saved)


def test_missing_weights(saved):
    os.remove(os.path.join(saved, WEIGHTS))
    with pytest.raises(BundleError, match=f"incomplete: {WEIGHTS} not found"):
        load_bundle(saved)


def test_tampered_threshold(saved):
    m = _read_manifest(saved)
    m["threshold"]["value"] = m["threshold"]["value"] * 10
    _write_manifest(saved, m)
    with pytest.raises(BundleError, match="content hash mismatch"):
        load_bundle(saved)


def test_newer_format_version_is_refused_before_the_hash_check(saved):
    m = _read_manifest(saved)
    m["format_version"] = FORMAT_VERSION + 1
    _write_manifest(saved, m)  # the hash is now wrong too; the version must be reported
    with pytest.raises(BundleVersionError, match=rf"format version {FORMAT_VERSION + 1}.*upgrade unusual"):
        load_bundle(saved)
    assert issubclass(BundleVersionError, BundleError)


def test_inconsistent_manifest_with_valid_hash(saved):
    m = _read_manifest(saved)
    m["width"] = m["width"] + 1
    _write_manifest(saved, m, reseal=True)
    with pytest.raises(BundleError, match="inconsistent"):
        load_bundle(saved)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.pop("width"), "width"),
        (lambda m: m["threshold"].pop("value"), "threshold.value"),
        (lambda m: m.update(libraries="torch 2"), "libraries"),
    ],
    ids=["missing", "missing-nested", "wrong-type"],
)
def test_a_manifest_of_the_wrong_shape_is_an_error_naming_the_field(saved, change, field):
    m = _read_manifest(saved)
    change(m)
    _write_manifest(saved, m, reseal=True)
    with pytest.raises(BundleError, match=rf"inconsistent: manifest field '{re.escape(field)}'"):
        load_bundle(saved)


def test_the_typed_manifest_is_the_file_it_was_read_from(saved, tmp_path):
    """The manifest is typed in memory (Manifest) and written as its JSON: a bundle loaded and saved
    again is the same file, with the same content hash and version; fields this version does not
    know are kept (a newer writer's additions survive)."""
    bundle = load_bundle(saved)
    save_bundle(str(tmp_path / "again"), bundle.manifest, bundle.module)
    assert _read_manifest(str(tmp_path / "again")) == _read_manifest(saved)
    assert read_manifest(str(tmp_path / "again")).model_version == bundle.version

    m = _read_manifest(saved)
    m["written_by"] = {"tool": "a newer unusual"}
    m["training"]["gpu_name"] = "H100"
    _write_manifest(saved, m, reseal=True)
    bundle = load_bundle(saved)
    assert bundle.manifest.to_json() == m
    assert bundle.manifest.training.gpu_name == "H100" and bundle.manifest.threshold.value == bundle.threshold
    save_bundle(str(tmp_path / "newer"), bundle.manifest, bundle.module)
    stamped = ("model_version", "content_hash")
    assert {k: v for k, v in _read_manifest(str(tmp_path / "newer")).items() if k not in stamped} == {
        k: v for k, v in m.items() if k not in stamped
    }


def test_read_manifest_does_not_need_the_weights(saved):
    os.remove(os.path.join(saved, WEIGHTS))
    assert read_manifest(saved).kind == "ae"
    with pytest.raises(BundleError, match="incomplete: weights.pt not found"):
        load_bundle(saved)


def test_unknown_kind_with_valid_hash(saved):
    m = _read_manifest(saved)
    m["kind"] = "gan"
    _write_manifest(saved, m, reseal=True)
    with pytest.raises(BundleError, match="inconsistent.*unknown model kind 'gan'"):
        load_bundle(saved)


class _Payload:
    """Pickles into a call of builtins.open(marker, "w"): creates a file when unpickled unsafely."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_are_loaded_with_weights_only(saved, tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"encoder.0.weight": _Payload(str(marker))}, buf)
    _replace_weights(saved, buf.getvalue())
    with pytest.raises(BundleError, match="inconsistent"):
        load_bundle(saved)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data",
    [b"", b"not a torch file" * 8, pickle.dumps([1, 2, 3], protocol=2)],
    ids=["empty", "garbage", "not-a-state-dict"],
)
def test_bad_weights_with_valid_hash(saved, data):
    _replace_weights(saved, data)
    with pytest.raises(BundleError, match="inconsistent"):
        load_bundle(saved)


# --------------------------------------------------------------------------- S3


def test_s3_round_trip(det, s3_bucket, test_x):
    uri = f"s3://{s3_bucket}/models/ae1"
    version = det.save(uri)
    loaded = Detector.load(uri)
    assert loaded.version == version == det.version
    assert np.array_equal(loaded.score(test_x), det.score(test_x))
    assert loaded.bundle_.uri == uri
    with pytest.raises(BundleError, match="already exists"):
        det.save(uri)
    assert det.save(uri + "/", overwrite=True) == version


def test_s3_missing_bundle(s3_bucket):
    with pytest.raises(BundleError, match="no bundle at"):
        load_bundle(f"s3://{s3_bucket}/models/nothing-here")
