"""What every benchmark records about where it ran (commit, library versions, machine, load),
in one place. The benchmark scripts import it as ``harness`` (their own folder is on sys.path)."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def git(*args: str) -> str | None:
    """``git ARGS`` in the repository, or None where git or the repository is missing."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def psutil_module():
    try:
        import psutil
    except ImportError:  # Ray vendors psutil under ray/thirdparty_files and puts that on sys.path on import
        import ray  # noqa: F401

        psutil = importlib.import_module("psutil")
    return psutil


def environment(modules: tuple[str, ...], **machine) -> dict:
    """Commit, uncommitted files, versions of ``modules`` ("models" is reported as "unusual")
    and the machine, plus the benchmark's own ``machine`` fields."""
    versions = {"python": platform.python_version()}
    for mod in modules:
        try:
            versions["unusual" if mod == "models" else mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    status = git("status", "--porcelain")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_files": status.splitlines() if status else [],
        "versions": versions,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            **machine,
        },
    }


def loadavg():
    """1/5/15-minute load averages: other processes on the machine skew the timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
