"""What every Ray job shares: connecting to (or starting) Ray quietly, the driver's progress
lines, the error for resources a cluster can never provide, and cleaning up temporary folders.
Imports neither PyTorch nor Ray at module level, so Ray Data tasks that unpickle job functions
stay light.

Quiet by default: a job prints its own progress (lines that start with ``[unusual]``, each
once) and its result; Ray's INFO / WARNING lines, Ray Data's progress logging and the other
lines of Ray's worker processes are left to Ray's log files (``/tmp/ray/session_latest/logs``).
``-v`` (``set_verbose(True)``, or ``UNUSUAL_VERBOSE=1``) shows everything Ray prints.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings

from . import rayprivate
from .models.errors import UnusualError

MARK = "[unusual]"
TMP_PREFIX = "unusual-"
_state = {"verbose": None, "embedded": False}


def set_verbose(on: bool | None) -> None:
    """``-v``: Ray's own lines are shown (True) or filtered (False); None follows ``UNUSUAL_VERBOSE``.
    Quiet, the driver does not log the tracebacks of failed tasks nobody waited for (a job that fails
    says why in one line; Ray logged every other failed task of it, each with its remote traceback)."""
    _state["verbose"] = on
    if not verbose():
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")


def verbose() -> bool:
    on = _state["verbose"]
    return bool(on) if on is not None else os.environ.get("UNUSUAL_VERBOSE", "") not in ("", "0")


def progress(msg: str) -> None:
    """A progress line of a job's driver, on stderr (stdout carries the JSON result)."""
    print(f"{MARK} {msg}", file=sys.stderr, flush=True)


class ResourceError(UnusualError):
    """The requested workers / actors / GPUs can never be placed on this cluster."""


RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune", "ray.air")


def _to_file(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.FileHandler) or "File" in type(handler).__name__


def _quiet_loggers() -> None:
    """Ray's console lines below ERROR off; what Ray writes to its log files stays there."""
    import ray.data  # noqa: F401 - Ray Data sets up its loggers when imported: quiet them after

    warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # Ray's own advice and deprecations: -v shows them

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        consoles = [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not _to_file(h)]
        if len(consoles) < len(logger.handlers):  # it also logs to a file (Ray Data): quiet the console only
            for h in consoles:
                h.setLevel(logging.ERROR)
        else:
            logger.setLevel(logging.ERROR)


# Ray's native (C++) log lines, e.g. "[2026-12-02 15:24:40,776 E 28122 28122] core_worker.cc:2465: …"
NATIVE_LINE = re.compile(rb"^(\x1b\[[0-9;]*m)*\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")


# The filter runs in a process of its own: a thread of this process needs the GIL to read the pipe, and
# native code that writes more than a pipe's buffer (64 KiB) to stderr while holding the GIL (Ray's
# core worker logging as it connects) then blocks forever: jobs that printed their first line and hung.
_PUMP = (
    "import os, re, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "line = re.compile(sys.argv[1].encode('latin-1'))\n"
    "for raw in sys.stdin.buffer:\n"
    "    if not line.match(raw):\n"
    "        os.write(1, raw)\n"
)


def filter_native_stderr() -> None:
    """Quiet mode of a command: Ray's native log lines written to this process's stderr (they
    are in its ``python-core-driver-*.log`` too) are dropped; any other native output passes.
    Python's own ``sys.stderr`` goes straight to the terminal, never through the filter, which is a
    small child process reading a pipe (it ends when the last writer closes it)."""
    import subprocess

    if _state.get("native") or verbose() or sys.stderr is not sys.__stderr__:  # e.g. captured by pytest
        return
    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded)
        return
    if fd != 2:
        return
    real = os.dup(fd)
    r, w = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-c", _PUMP, NATIVE_LINE.pattern.decode("latin-1")],
            stdin=r, stdout=real, stderr=subprocess.DEVNULL, close_fds=True,
        )  # fmt: skip
    except OSError:
        for f in (r, w, real):
            os.close(f)
        return
    os.close(r)
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    os.close(real)
    os.dup2(w, fd)
    os.close(w)
    _state["native"] = True


class _OurLines:
    """The driver's handler of the output Ray forwards from its worker processes, in quiet mode:
    only our own lines pass (without Ray's ``(Actor pid=…)`` prefix), and each of them once
    (Ray Train's workers echo every print)."""

    def __init__(self, limit: int = 10_000):
        self.seen: dict[str, None] = {}
        self.limit = limit

    def __call__(self, data: dict) -> None:
        for line in data.get("lines") or ():
            i = line.find(MARK)
            if i < 0:
                continue
            line = line[i:]
            if line in self.seen:
                continue
            self.seen[line] = None
            if len(self.seen) > self.limit:
                self.seen.pop(next(iter(self.seen)))
            print(line, file=sys.stderr, flush=True)


def _filter_worker_output() -> None:
    """Quiet mode: Ray's handler of forwarded worker output replaced by :class:`_OurLines` (where
    the private API moved, Ray prints as it always did)."""
    rayprivate.replace_worker_output_handler("ray_print_logs", _OurLines())


# Serve's shutdown kills its controller while the controller's own graceful_shutdown task is pending, and
# Ray reports that, benign, as an error message of the job: one line after every `serve.shutdown()`.
_BENIGN_ERRORS = (("ServeController.graceful_shutdown failed", "killed by `ray.kill`"),)


def _filter_error_messages() -> None:
    """Quiet mode: the error messages Ray sends the driver about its processes (a worker killed for
    memory, a task that failed and will be retried) go to stderr, not to stdout, which carries the
    command's JSON result, and the benign ones in ``_BENIGN_ERRORS`` are dropped."""
    rayprivate.filter_driver_messages(_driver_message)  # where it moved, Ray prints as it always did


def _driver_message(data: dict) -> dict | None:
    """A message of Ray's driver, as quiet mode prints it: the raylet's on stderr, benign ones dropped."""
    if data.get("pid") == "raylet":
        lines = [x for x in data.get("lines") or () if not any(all(p in x for p in b) for b in _BENIGN_ERRORS)]
        if not lines:
            return None
        data = {**data, "lines": lines, "is_err": True}
    return data


def configure_ray_data() -> None:
    """Ray Data settings of every job: aggregations and groupbys shuffle with tasks (Ray's
    hash shuffle starts aggregator actors, seconds of fixed cost for our one-object
    reductions); quiet mode shows one progress bar per dataset on a terminal and none in logs."""
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if not verbose():
        ctx.enable_progress_bars = sys.stderr.isatty()
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False


def ensure_ray(address: str | None = None, **init_kwargs):
    """The ``ray`` module, connected: to ``address`` (or ``RAY_ADDRESS``, as in a
    submitted job), or a new local Ray for this process when neither is set,
    never silently to some other cluster running on the machine (a bare
    ``ray.init()`` would join the last one started there); ``--address auto``
    asks for that explicitly. Quiet unless :func:`verbose`. ``init_kwargs`` go to
    ``ray.init`` (``num_cpus``, ``runtime_env``) when this starts Ray."""
    import ray

    quiet = not verbose()
    if quiet:
        _quiet_loggers()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        _state["embedded"] = address == "local"
        ray.init(
            address=address,
            log_to_driver=True,
            include_dashboard=False,
            logging_level=logging.ERROR if quiet else logging.INFO,
            **init_kwargs,
        )
        if quiet:
            _quiet_loggers()  # ray.init sets up its loggers again
            _filter_worker_output()
            _filter_error_messages()
    configure_ray_data()
    return ray


def embedded() -> bool:
    """Whether this process started the local Ray it is connected to (:func:`ensure_ray`)."""
    return bool(_state["embedded"])


def quick_ray_train() -> None:
    """Ray Train settings for a run: its controller polls the workers every 0.5 s, not 2 s
    (seconds of fixed cost at the start and end of every run). On the local Ray a job started
    for itself, where there is no dashboard to show them and no spot instance to lose, Ray
    Train's metrics export and preemption watcher (actors that start beside the first epoch)
    are off too. Settings already in the environment win."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if _state["embedded"]:
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# --------------------------------------------------------------------------- ports


def free_port(host: str = "0.0.0.0") -> int:
    """A TCP port nothing listens on now, for a server started a moment later (an HAProxy stats port,
    a test's ``unusual serve``).

    Chosen at random *below* the kernel's ephemeral range (``net.ipv4.ip_local_port_range``) and above
    Ray's worker ports (10002-19999): a port the kernel handed out for ``bind(0)`` would be free now
    but could be handed out again (to one of the many gRPC servers and clients a Ray starts) before
    our server binds it, which CI met as HAProxy's "cannot bind socket (Address already in use)".
    Falls back to the kernel's choice where the range leaves no room."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()  # not the seeded global generator: two processes must not agree
    for _ in range(200 if low - 1 > 20000 else 0):
        port = rng.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- temporary folders


def checkpoint_directory(checkpoint):
    """``checkpoint.as_directory()``, leaving no lock files behind: Ray Train's ``TempFileLock`` keeps one
    empty file per local path it locked (the checkpoint's download folder, and that path + ".lock") in
    ``<tmp>/_ray_lockfiles``, never removed, so every training run left two there. The paths are the
    download's own (a fresh uuid), so no other process holds their locks once the download is done."""
    from contextlib import contextmanager

    @contextmanager
    def directory():
        with checkpoint.as_directory() as d:
            yield d
        for path in (d, f"{os.path.normpath(d)}.lock"):
            lock = rayprivate.temp_lock_path(path)  # None where Ray's API moved: they stay as Ray leaves them
            try:
                if lock is not None:
                    os.remove(lock)
            except OSError:
                pass

    return directory()


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named ``unusual-<kind>-<pid>-…``: removed when its ``with`` ends, and by
    :func:`sweep_temp_dirs` in a later run when its process died first."""
    return tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{kind}-{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LEGACY_CKPT = "unusual-ckpt-"  # unusual 0.1 left one of these per epoch, without a process id


def _older_than(path: str, seconds: float) -> bool:
    import time

    try:
        return time.time() - os.path.getmtime(path) > seconds
    except OSError:
        return False


def sweep_temp_dirs(root: str | None = None) -> list[str]:
    """Remove the temporary folders of :func:`temp_dir` whose process is gone (a crash, a kill);
    returns what was removed."""
    import shutil

    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TMP_PREFIX):
            continue
        parts = name.split("-")
        path = os.path.join(root, name)
        if len(parts) >= 4 and parts[2].isdigit():
            if _alive(int(parts[2])):
                continue
        elif not (name.startswith(LEGACY_CKPT) and _older_than(path, 3600)):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(path)
    return removed


# --------------------------------------------------------------------------- resources


def train_worker_resources(
    num_workers: int, use_gpu: bool, cpus_per_worker: float | None, streaming: bool = True
) -> dict:
    """Resources per Ray Train worker, checked against what the connected cluster has.

    While the workers stream their data, Ray Data's read and encode tasks run beside
    them: by default half the cluster's CPUs (at most) go to the training workers, so
    those tasks always have CPUs left (on a 2-core machine two workers get 0.5 CPU each).
    Workers that hold their data in memory (``streaming=False``) share all the CPUs.
    Asking for more than the cluster can ever place is a :class:`ResourceError` now,
    not a training run that waits forever.
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
        budget = cpus if not streaming else (cpus / 2 if not use_gpu else max(cpus - 1, 0) / 2)
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
