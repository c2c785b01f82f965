"""A version of its own for each deployment ``start`` deploys: the code it runs and its arguments.

Serve rolls a deployment's replicas over when its version changes and reconfigures them in place
when only the ``user_config`` (a model's checkpoint) or autoscaling changed. Serve's imperative API
(``serve.run``) gives each deployment a random version on every call, so without this every
``start`` restarted every replica of every application (under load the gateway drained with no
successor up, and requests met the fallback proxy's 500s).
"""

from __future__ import annotations

from ..rayprivate import with_version


def _code_digest() -> str:
    """A digest of the code the replicas run (this package's models and serving modules)."""
    import hashlib
    import pathlib

    if not _CODE:
        h = hashlib.sha256()
        root = pathlib.Path(__file__).resolve().parents[1]
        for path in sorted([*root.joinpath("serving").glob("*.py"), *root.joinpath("models").glob("*.py")]):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        _CODE.append(h.hexdigest())
    return _CODE[0]


_CODE: list = []


def pinned(deployment, *args):
    """``deployment`` with a version made of the code it runs and its arguments ``args``; config files
    (``serve deploy``) set a version of their own over this."""
    import hashlib
    import json

    key = json.dumps([deployment.func_or_class.__qualname__, _code_digest(), args], sort_keys=True, default=repr)
    version = hashlib.sha256(key.encode()).hexdigest()[:16]
    return with_version(deployment, version)  # a Serve without it: every start rolls the replicas, as before
