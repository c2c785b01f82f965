"""Session-wide fixtures: one real S3 endpoint (moto's server over HTTP on
localhost) and one local Ray cluster, shared by every test that needs them."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free local port; the standard AWS variables point at it."""
    from unusual.ray_jobs.local_s3 import local_s3

    with local_s3() as env:
        yield env["AWS_ENDPOINT_URL"]


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint) -> str:
    import s3fs

    s3fs.S3FileSystem().mkdir("unusual-test")
    return "unusual-test"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the whole session, 2 CPUs as on CI; its workers get the S3 settings.
    Serve runs on it as ``unusual serve`` runs on the Ray it starts: the fast path (HAProxy straight
    to the replicas, throughput-optimized) where HAProxy exists (UNUSUAL_SERVE_FAST=0: the default proxy)."""
    import ray
    from unusual.serving import fastpath

    if ray.is_initialized():
        ray.shutdown()
    fastpath.configure()
    # Ray's dashboard runs its modules under a multiprocessing forkserver and is killed at shutdown, which
    # left an empty /tmp/pymp-* folder per session: the cluster's processes get a temporary folder of their
    # own, removed with it (RAY_TMPDIR keeps Ray's session files where Ray puts them by default).
    scratch = tempfile.mkdtemp(prefix="unusual-tests-ray-")
    with pytest.MonkeyPatch.context() as env:  # this process's own temporary files stay where they were
        env.setenv("RAY_TMPDIR", os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp")
        env.setenv("TMPDIR", scratch)
        ray.init(
            address="local",  # never join another Ray running on the machine
            num_cpus=2,
            include_dashboard=True,  # the job API (serving's /v1/jobs) lives in the dashboard
            log_to_driver=False,
            runtime_env={"env_vars": {k: os.environ[k] for k in AWS_ENV}},
        )
    try:
        yield ray
    finally:
        ray.shutdown()
        fastpath.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)
