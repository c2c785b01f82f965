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


def train_worker_resources(num_workers: int, use_gpu: bool, cpus_per_worker: float | None) -> dict:
    """Resources per Ray Train worker, checked against what the connected cluster has.

    By default half the cluster's CPUs (at most) go to the training workers,
    so Ray Data's read and encode tasks always have CPUs left: on a 2-core
    machine two workers get 0.5 CPU each. Asking for more than the cluster can
    ever place is a :class:`ResourceError` now, not a training run that waits forever.
    """
    import math

    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if use_gpu and gpus < num_workers:
        raise ResourceError(
            f"--use-gpu with {num_workers} worker(s) needs {num_workers} GPU(s); the cluster has {gpus:g}"
        )
    if cpus_per_worker is None:
        budget = cpus / 2 if not use_gpu else max(cpus - 1, 0) / 2
        cpus_per_worker = max(0.25, min(float(math.floor(budget / num_workers)) or budget / num_workers, 8.0))
        cpus_per_worker = round(cpus_per_worker, 2)
    if cpus_per_worker * num_workers > cpus:
        raise ResourceError(
            f"{num_workers} worker(s) x {cpus_per_worker:g} CPU need {cpus_per_worker * num_workers:g} CPUs; "
            f"the cluster has {cpus:g}. Use fewer --num-workers or a smaller --cpus-per-worker"
        )
    res = {"CPU": cpus_per_worker}
    if use_gpu:
        res["GPU"] = 1
    return res
