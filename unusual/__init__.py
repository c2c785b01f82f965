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

from . import models as _models  # light: its names are imported on first use

__version__ = _models.__version__
__all__ = _models.__all__


def __getattr__(name: str):
    if name in __all__:
        value = getattr(_models, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unusual' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
