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

import os as _os

# Installed, the subpackages live in this folder (pyproject.toml's package-dir). Run from a source
# checkout that is not installed (a Ray job whose runtime_env uploads the checkout as its
# working_dir, cluster/runtime_env.example.yaml), they are the checkout's models/, ray_jobs/ and
# serving/ folders beside this one.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "models")) and all(
    _os.path.isfile(_os.path.join(_checkout, *p)) for p in (("pyproject.toml",), ("models", "registry.py"))
):
    __path__.append(_checkout)  # noqa: F821 - a package's own __path__

from . import models as _models  # noqa: E402 - light: its names are imported on first use

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
