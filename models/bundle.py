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

from .errors import BundleError, BundleVersionError, storage_problem
from .features import FeatureSchema
from .manifest import Manifest, ThresholdRecord, TrainingRecord
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


@dataclass
class Bundle:
    """A loaded bundle: the manifest, the frozen schema and the built module."""

    manifest: Manifest
    schema: FeatureSchema
    module: torch.nn.Module
    uri: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    @property
    def model_config(self):
        return family(self.kind).stored_config(self.manifest.family_config)


def build_manifest(
    kind: str, model_config: dict, schema: FeatureSchema, threshold: ThresholdRecord, training: TrainingRecord
) -> Manifest:
    """A new bundle's manifest (:func:`seal` stamps its version and hash)."""
    return Manifest(
        format_version=FORMAT_VERSION,
        kind=kind,
        family_config=model_config,
        width=schema.width,
        features=schema.to_dict(),
        threshold=threshold,
        training=training,
        libraries=library_versions(),
    )


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


def seal(manifest: Manifest, module: torch.nn.Module) -> tuple[Manifest, bytes]:
    """Serialise the weights and stamp the manifest with its model version and
    content hash. The version is derived from the content, so the same weights
    and metadata always get the same version, saved or not."""
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    weights = buf.getvalue()
    body = {k: v for k, v in manifest.to_json().items() if k not in ("content_hash", "model_version")}
    body["model_version"] = f"{manifest.kind}-{content_hash(body, weights)[:12]}"
    body["content_hash"] = content_hash(body, weights)
    return Manifest.parse(body, "(being written)"), weights


def save_bundle(uri: str, manifest: Manifest, module: torch.nn.Module, overwrite: bool = False) -> Manifest:
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
            f.write(json.dumps(manifest.to_json(), indent=1, sort_keys=True, default=float).encode())
    return manifest


def _manifest_json(fs, root: str, uri: str) -> dict:
    """The JSON object of ``manifest.json``, of a format this version reads."""
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
    return manifest


def read_manifest(uri: str) -> Manifest:
    """A bundle's manifest alone, its format checked but not its content hash (the weights are not read):
    what a report describes."""
    fs, root = _fs(uri)
    return Manifest.parse(_manifest_json(fs, root, uri), uri)


def read_bundle(uri: str) -> tuple[Manifest, bytes]:
    """The manifest and weights bytes of a bundle, with its format version and
    content hash checked; needs no PyTorch (e.g. a job's driver planning work)."""
    fs, root = _fs(uri)
    manifest = _manifest_json(fs, root, uri)
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
    return Manifest.parse(manifest, uri), weights


def load_bundle(uri: str, map_location="cpu") -> Bundle:
    import torch

    manifest, weights = read_bundle(uri)
    try:
        fam = family(manifest.kind)
        schema = FeatureSchema.from_dict(manifest.features)
        module = fam.module(fam.stored_config(manifest.family_config), manifest.width)
        state = torch.load(io.BytesIO(weights), map_location=map_location, weights_only=True)
        module.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        # UnpicklingError: weights_only=True refused the weights file (not a plain
        # state_dict, or pickled code); EOFError: an empty weights file.
        raise BundleError(f"bundle at {uri} is inconsistent: {e}") from None
    module.to(map_location).eval()
    return Bundle(manifest, schema, module, str(uri))
