"""unusual's detector core: models, features, thresholds, bundles and the Scorer.

Pure PyTorch + numpy + pyarrow + fsspec; never imports Ray.

The public names are imported lazily, so that ``models.errors`` or
``models.features`` can be used (e.g. in Ray Data read tasks) without loading
PyTorch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "models.bundle",
    "load_bundle": "models.bundle",
    "save_bundle": "models.bundle",
    "Detector": "models.detector",
    "BundleError": "models.errors",
    "BundleVersionError": "models.errors",
    "NotFittedError": "models.errors",
    "SchemaError": "models.errors",
    "kinds": "models.registry",
    "Scorer": "models.scorer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
