"""Session-wide fixtures: one real S3 endpoint (moto's server over HTTP on
localhost) and one local Ray cluster, shared by every test that needs them."""

from __future__ import annotations

import os

import pytest

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free local port; the standard AWS variables point at it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")}
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint) -> str:
    import s3fs

    s3fs.S3FileSystem().mkdir("unusual-test")
    return "unusual-test"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the whole session, 2 CPUs as on CI; its workers get the S3 settings."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
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
