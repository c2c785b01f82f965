"""fastpath's reaper (processes_using, reap): it finds the processes naming a folder in their command line
or environment, and ends them: SIGTERM, SIGKILL after the grace, a zombie counting as gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from unusual.serving.fastpath import processes_using, reap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="real processes, Linux")


@pytest.fixture
def children():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _sleep_in(folder) -> str:
    """A real ``sleep`` whose command line names ``folder`` (it is run from there)."""
    path = folder / "sleep"
    shutil.copy(shutil.which("sleep"), path)
    return str(path)


def test_reap_ends_a_process_whose_command_line_names_the_folder(tmp_path, children):
    proc = subprocess.Popen([_sleep_in(tmp_path), "60"])
    children.append(proc)
    other = subprocess.Popen(["sleep", "60"])  # names nothing of ours: left alone
    children.append(other)
    assert processes_using(str(tmp_path)) == [proc.pid]
    assert reap(str(tmp_path)) == []
    assert proc.poll() is not None and other.poll() is None
    assert processes_using(str(tmp_path)) == []


def test_environ_finds_a_process_started_with_the_folder_in_its_environment(tmp_path, children):
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, "UNUSUAL_TEST_FOLDER": str(tmp_path)})
    children.append(proc)
    assert proc.pid not in processes_using(str(tmp_path))
    assert processes_using(str(tmp_path), environ=True) == [proc.pid]
    assert reap(str(tmp_path), environ=True) == []
    assert proc.poll() is not None


def test_a_process_ignoring_sigterm_is_killed_after_the_grace(tmp_path, children):
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    children.append(proc)
    assert proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    assert reap(str(tmp_path), grace=0.5) == []
    assert 0.5 <= time.monotonic() - t0 < 5
    assert proc.poll() is not None


def test_a_zombie_another_process_never_waits_for_counts_as_gone(tmp_path, children):
    """A parent (not naming the folder) that never waits for its child: SIGTERM leaves the child a zombie."""
    code = ("import os, subprocess, time; p = subprocess.Popen([os.environ['SLEEP'], '60']); print(p.pid, flush=True); "
            "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "SLEEP": _sleep_in(tmp_path)},
                              stdout=subprocess.PIPE, text=True)
    children.append(parent)
    child = int(parent.stdout.readline())
    assert processes_using(str(tmp_path)) == [child]
    t0 = time.monotonic()
    assert reap(str(tmp_path), grace=5) == []
    assert time.monotonic() - t0 < 3  # not waited out to the grace, nor to SIGKILL
    with open(f"/proc/{child}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # still there, as a zombie
