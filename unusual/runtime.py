"""What every Ray job shares: connecting to (or starting) Ray, and the error
for resources a cluster can never provide. Imports neither PyTorch nor Ray at
module level, so Ray Data tasks that unpickle job functions stay light."""

from __future__ import annotations

import sys

from .models.errors import UnusualError


def progress(msg: str) -> None:
    """A progress line of a job's driver, on stderr (stdout carries the JSON result)."""
    print(f"[unusual] {msg}", file=sys.stderr, flush=True)


class ResourceError(UnusualError):
    """The requested workers / actors / GPUs can never be placed on this cluster."""


def ensure_ray(address: str | None = None):
    """The ``ray`` module, connected: to ``address`` (or ``RAY_ADDRESS``, as in a
    submitted job), or a new local Ray for this process when neither is set,
    never silently to some other cluster running on the machine (a bare
    ``ray.init()`` would join the last one started there); ``--address auto``
    asks for that explicitly."""
    import os

    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, log_to_driver=True, include_dashboard=False)
    return ray
