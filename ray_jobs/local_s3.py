"""A local S3 endpoint for development, tests and the demo: moto's server over HTTP on localhost.

    with local_s3(bucket="unusual") as env:      # the standard AWS variables now point at it
        ...                                       # s3://unusual/… works for fsspec, pyarrow and Ray workers

Everything is in memory and gone when it stops; the process's AWS variables are restored then.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

# Variables that would send requests elsewhere or sign them for another account: unset while it runs.
_SHADOWING = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


@contextmanager
def local_s3(host: str = "127.0.0.1", port: int = 0, bucket: str | None = None, key: str = "testing") -> Iterator[dict]:
    """Start the endpoint (``port=0``: a free one), point ``AWS_ENDPOINT_URL`` & co. at it, create
    ``bucket``; yields the variables (hand them to Ray workers' ``runtime_env``)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{bound_host}:{bound_port}",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in (*env, *_SHADOWING)}
    for var in _SHADOWING:
        os.environ.pop(var, None)
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        if bucket:
            s3fs.S3FileSystem().mkdir(bucket)
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
