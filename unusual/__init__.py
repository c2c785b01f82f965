"""unusual: deep-learning anomaly detection at cluster scale.

    from unusual import Detector, Scorer

One distribution, one namespace:

- ``unusual.models``: the detector domain (PyTorch, numpy, pyarrow; never Ray);
- ``unusual.ray_jobs``: the Ray jobs (train, score, evaluate, demo);
- ``unusual.serving``: the Ray Serve application;
- ``unusual.config``: the typed configuration of every job, from which the CLI
  flags, YAML files, ``python -m`` entrypoints and Serve's app arguments derive;
- ``unusual.runtime``: what the jobs and the endpoint share (connecting to Ray,
  resource errors, progress lines);
- ``unusual.cli``: the ``unusual`` command, on top of everything.

Public names are imported lazily so that ``import unusual`` stays light
(Ray Data tasks unpickle functions of this package without loading PyTorch).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "unusual.models.bundle",
    "load_bundle": "unusual.models.bundle",
    "save_bundle": "unusual.models.bundle",
    "Detector": "unusual.models.detector",
    "Scorer": "unusual.models.scorer",
    "kinds": "unusual.models.registry",
    "UnusualError": "unusual.models.errors",
    "BundleError": "unusual.models.errors",
    "BundleVersionError": "unusual.models.errors",
    "NotFittedError": "unusual.models.errors",
    "SchemaError": "unusual.models.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unusual' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
