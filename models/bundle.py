"""The checkpoint bundle: one versioned, self-describing directory.

Layout at any local path or fsspec URI (``s3://bucket/ckpt/run1``)::

    manifest.json      format version, model kind and hyper-parameters, feature
                       schema with scaler/encoder state, window spec, threshold
                       and how it was fit, training metrics, library versions,
                       the content hash
    weights.pt         the module's state_dict, written by torch.save and read
                       back with torch.load(weights_only=True): no pickle code

The content hash is the SHA-256 of the weights bytes and of the manifest
without its ``content_hash`` field (canonical JSON). Loading checks the format
version and the hash; a bundle that is corrupt, truncated or of a newer format
raises :class:`unusual.models.errors.BundleError` / :class:`BundleVersionError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BundleError, BundleVersionError, storage_problem
from .features import FeatureSchema
from .registry import family

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"


def library_versions() -> dict:
    import torch

    from . import __version__

    return {
        "unusual": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=float).encode()


def content_hash(manifest: dict, weights: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    h = hashlib.sha256()
    h.update(weights)
    h.update(_canonical(body))
    return h.hexdigest()


class ThresholdRecord(BaseModel):
    """How a bundle's threshold was fit (:func:`unusual.models.thresholds.fit_threshold_tail`)."""

    model_config = ConfigDict(extra="allow")

    value: float  # the decision threshold: a row is anomalous when its score is above it
    threshold: str  # the rule: "quantile" or "pot"
    contamination: float
    pot_level: float | None = None
    n_scores: int | None = None  # the scores it was fit on
    gpd: dict | None = None  # "pot": the generalized Pareto tail's parameters
    fit_on: str | None = None  # "validation" or "training"


class Manifest(BaseModel):
    """The shape of ``manifest.json``, checked where a bundle is written (:func:`seal`) and read
    (:func:`read_bundle`: a manifest without a field, or with one of the wrong type, is a BundleError naming
    it). In memory and on disk a manifest stays the plain JSON object this validates: its canonical form is
    what the content hash covers, so it must round-trip unchanged."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    format_version: int
    kind: str  # the model family (unusual.models.registry)
    family_config: dict = Field(alias="model_config")  # the family's config dataclass, as asdict
    width: int  # columns of the encoded feature matrix
    features: dict  # FeatureSchema.to_dict(): columns, scalers, encoders
    threshold: ThresholdRecord
    training: dict  # the History's summary and how the run was made (rows, samples, config, runner)
    libraries: dict  # versions of unusual, torch, numpy, pyarrow, python
    model_version: str | None = None  # "<kind>-<12 hex>" of the content hash (stamped by seal)
    content_hash: str | None = None  # SHA-256 of the weights and of this manifest without this field


def check_manifest(manifest: dict, uri) -> None:
    """A BundleError naming the first field of ``manifest`` that :class:`Manifest` refuses."""
    try:
        Manifest.model_validate(manifest)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise BundleError(f"bundle at {uri} is inconsistent: manifest field {where!r}: {err['msg']}") from None


@dataclass
class Bundle:
    """A loaded bundle: the manifest, the frozen schema and the built module."""

    manifest: dict  # the JSON object of manifest.json (its shape: Manifest)
    schema: FeatureSchema
    module: torch.nn.Module
    uri: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def version(self) -> str:
        return self.manifest["model_version"]

    @property
    def threshold(self) -> float:
        return threshold_of(self.manifest)

    @property
    def model_config(self):
        return family(self.kind).stored_config(self.manifest["model_config"])


def threshold_of(manifest: dict) -> float:
    """The decision threshold of a manifest (its ``threshold`` record also says how it was fit)."""
    return float(manifest["threshold"]["value"])


def build_manifest(kind: str, model_config: dict, schema: FeatureSchema, threshold: dict, training: dict) -> dict:
    """A new bundle's manifest (:func:`seal` checks it against :class:`Manifest` and stamps version and hash)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_config": model_config,
        "width": schema.width,
        "features": schema.to_dict(),
        "threshold": threshold,
        "training": training,
        "libraries": library_versions(),
    }
    return manifest


@contextlib.contextmanager
def _storage(uri: str, doing: str):
    """Missing credentials or access denied: a BundleError in one line naming the URI and what to set."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:
        problem = storage_problem(e, uri, doing)
        if problem is None:
            raise
        raise BundleError(problem) from None


def _fs(uri: str):
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path.rstrip("/")


def seal(manifest: dict, module: torch.nn.Module) -> tuple[dict, bytes]:
    """Serialise the weights and stamp the manifest with its model version and
    content hash. The version is derived from the content, so the same weights
    and metadata always get the same version, saved or not."""
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    weights = buf.getvalue()
    check_manifest(manifest, "(being written)")
    manifest = {k: v for k, v in manifest.items() if k not in ("content_hash", "model_version")}
    manifest["model_version"] = f"{manifest['kind']}-{content_hash(manifest, weights)[:12]}"
    manifest["content_hash"] = content_hash(manifest, weights)
    return manifest, weights


def save_bundle(uri: str, manifest: dict, module: torch.nn.Module, overwrite: bool = False) -> dict:
    """Write a bundle; returns the final manifest (with hash and model version)."""
    fs, root = _fs(uri)
    with _storage(uri, "saving the bundle to"):
        exists = fs.exists(f"{root}/{MANIFEST}")
    if exists and not overwrite:
        raise BundleError(f"a bundle already exists at {uri}; pass overwrite=True to replace it")
    manifest, weights = seal(manifest, module)
    with _storage(uri, "saving the bundle to"):
        fs.makedirs(root, exist_ok=True)
        # Weights first, manifest last: a reader never sees a manifest whose weights are missing.
        with fs.open(f"{root}/{WEIGHTS}", "wb") as f:
            f.write(weights)
        with fs.open(f"{root}/{MANIFEST}", "wb") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True, default=float).encode())
    return manifest


def read_bundle(uri: str) -> tuple[dict, bytes]:
    """The manifest and weights bytes of a bundle, with its format version and
    content hash checked; needs no PyTorch (e.g. a job's driver planning work)."""
    fs, root = _fs(uri)
    try:
        with _storage(uri, "reading the bundle at"), fs.open(f"{root}/{MANIFEST}", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise BundleError(f"no bundle at {uri}: {MANIFEST} not found") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle at {uri} is corrupt: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise BundleError(f"bundle at {uri} is corrupt: {MANIFEST} has no format_version")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleVersionError(
            f"bundle at {uri} has format version {version}, newer than this unusual "
            f"understands ({FORMAT_VERSION}); upgrade unusual to load it"
        )
    try:
        with _storage(uri, "reading the bundle at"), fs.open(f"{root}/{WEIGHTS}", "rb") as f:
            weights = f.read()
    except FileNotFoundError:
        raise BundleError(f"bundle at {uri} is incomplete: {WEIGHTS} not found") from None
    expected = manifest.get("content_hash")
    if expected != content_hash(manifest, weights):
        raise BundleError(
            f"bundle at {uri} is corrupt or was modified: content hash mismatch (manifest says {str(expected)[:12]}…)"
        )
    check_manifest(manifest, uri)
    return manifest, weights


def load_bundle(uri: str, map_location="cpu") -> Bundle:
    import torch

    manifest, weights = read_bundle(uri)
    try:
        fam = family(manifest["kind"])
        schema = FeatureSchema.from_dict(manifest["features"])
        module = fam.module(fam.stored_config(manifest["model_config"]), int(manifest["width"]))
        state = torch.load(io.BytesIO(weights), map_location=map_location, weights_only=True)
        module.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        # UnpicklingError: weights_only=True refused the weights file (not a plain
        # state_dict, or pickled code); EOFError: an empty weights file.
        raise BundleError(f"bundle at {uri} is inconsistent: {e}") from None
    module.to(map_location).eval()
    return Bundle(manifest, schema, module, str(uri))
