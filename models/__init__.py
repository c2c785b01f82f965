"""unusual's detector core: models, features, thresholds, bundles and the Scorer.

Pure PyTorch + numpy + pyarrow + fsspec; never imports Ray.

The public names are imported lazily, so that ``unusual.models.errors`` or
``unusual.models.features`` can be used (e.g. in Ray Data read tasks) without loading
PyTorch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "unusual.models.bundle",
    "load_bundle": "unusual.models.bundle",
    "save_bundle": "unusual.models.bundle",
    "Detector": "unusual.models.detector",
    "BundleError": "unusual.models.errors",
    "BundleVersionError": "unusual.models.errors",
    "NotFittedError": "unusual.models.errors",
    "UnusualError": "unusual.models.errors",
    "SchemaError": "unusual.models.errors",
    "ScoreError": "unusual.models.errors",
    "kinds": "unusual.models.registry",
    "register": "unusual.models.registry",
    "Scorer": "unusual.models.scorer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unusual.models' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
