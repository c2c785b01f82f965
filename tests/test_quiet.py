"""Quiet by default, clean afterwards: what a user sees of a tiny `unusual train` and `unusual score`
(run as commands against the session's Ray), and what they leave in the temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from unusual.models import Detector
from unusual.ray_jobs import sample_data

from unusual.cli import build_parser
from unusual.runtime import sweep_temp_dirs

CARDIO = Path(sample_data.__file__).parent / "cardio.parquet"
ROOT = Path(__file__).resolve().parents[1]


def _temp_dirs() -> set[str]:
    tmp = tempfile.gettempdir()
    return {n for n in os.listdir(tmp) if n.startswith("unusual-") and os.path.isdir(os.path.join(tmp, n))}


def _unusual(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unusual", *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def _check_quiet(r: subprocess.CompletedProcess, command: str) -> list[str]:
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) <= 30, f"unusual {command} printed {len(lines)} lines:\n" + "\n".join(lines)
    progress = r.stderr.splitlines()
    # Only our own progress on stderr (no Ray INFO / WARNING, no worker prefixes), each line once.
    assert progress and all(line.startswith("[unusual] ") for line in progress), r.stderr
    assert len(set(progress)) == len(progress), r.stderr
    return progress


@pytest.mark.slow
def test_tiny_train_and_score_are_quiet_and_leave_nothing_behind(ray_cluster, tmp_path):
    before = _temp_dirs()
    address = ray_cluster.get_runtime_context().gcs_address
    bundle = tmp_path / "ae"
    r = _unusual(
        "train", "--model", "ae", "--data", str(CARDIO), "--exclude", "label", "--epochs", "3",
        "--output", str(bundle), "--address", address,
    )  # fmt: skip
    progress = _check_quiet(r, "train")
    assert sum("] epoch " in line for line in progress) == 3 and "epoch 3/3" in progress[-1]
    assert json.loads(r.stdout)["epochs_run"] == 3
    # The bundle holds the model alone; the run's checkpoints went beside it and were removed.
    assert sorted(os.listdir(bundle)) == ["manifest.json", "weights.pt"]
    assert not (tmp_path / "ae.checkpoints").exists()

    r = _unusual(
        "score", "--checkpoint", str(bundle), "--data", str(CARDIO), "--keep-columns", "label",
        "--output", str(tmp_path / "scores"), "--address", address,
    )  # fmt: skip
    _check_quiet(r, "score")
    summary = json.loads(r.stdout)
    assert summary["rows_in"] == summary["rows_scored"] == 1831
    assert _temp_dirs() <= before, f"left in {tempfile.gettempdir()}: {sorted(_temp_dirs() - before)}"


def test_verbose_after_the_command_too():
    args = ["--data", "d", "--output", "o"]
    assert build_parser().parse_args(["train", *args, "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "train", *args]).verbose is True
    assert build_parser().parse_args(["train", *args]).verbose is False


def test_stale_temporary_folders_are_swept(tmp_path):
    """A crashed run's folders (their process is gone) go on the next run; a live one's stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"unusual-ckpt-{dead_pid}-abc").mkdir()
    (tmp_path / f"unusual-fail-{dead_pid}-run").write_text("")
    (tmp_path / f"unusual-ckpt-{os.getpid()}-def").mkdir()
    legacy = tmp_path / "unusual-ckpt-x1y2z3"  # unusual 0.1: no process id; swept once an hour old
    legacy.mkdir()
    os.utime(legacy, (0, 0))
    (tmp_path / "unusual-bench.lock").write_text("")
    removed = sweep_temp_dirs(str(tmp_path))
    assert sorted(Path(p).name for p in removed) == sorted(
        [f"unusual-ckpt-{dead_pid}-abc", f"unusual-fail-{dead_pid}-run", "unusual-ckpt-x1y2z3"]
    )
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"unusual-ckpt-{os.getpid()}-def", "unusual-bench.lock"])


def test_detector_progress_bar_follows_verbose(capsys):
    x = np.random.default_rng(0).normal(size=(400, 4)).astype(np.float32)
    Detector("ae", verbose=False, epochs=2, hidden=[8], latent=2).fit(x)
    assert capsys.readouterr().err == ""
    Detector("ae", verbose=True, epochs=2, hidden=[8], latent=2).fit(x)
    err = capsys.readouterr().err
    assert "fit ae" in err and "2/2" in err and "val_loss=" in err


def test_sigusr1_prints_the_stacks_and_the_command_goes_on():
    """Where a command that seems stuck waits: ``kill -USR1 <pid>`` (a job's driver, too)."""
    code = (
        "import os, signal, sys, time\n"
        "from unusual.configbase import stacks_on_sigusr1\n"
        "from unusual.runtime import filter_native_stderr\n"
        "filter_native_stderr()\n"
        "stacks_on_sigusr1()\n"
        "def waiting_here():\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(0.5)\n"
        "waiting_here()\n"
        "print('still running')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "still running\n", p.stderr
    assert "Current thread" in p.stderr and "in waiting_here" in p.stderr, p.stderr


def test_native_stderr_past_a_pipe_buffer_with_the_gil_held_does_not_block():
    """The quiet filter of Ray's native log lines must not need this process's GIL: native code that
    writes more than a pipe's buffer to stderr while holding it (as Ray's core worker may while it
    connects) blocked forever with a filter thread (submitted jobs hung after their first line)."""
    code = (
        "import ctypes, sys\n"
        "from unusual.runtime import filter_native_stderr\n"
        "filter_native_stderr()\n"
        "buf = b'native line\\n' * 20000 + b'[2026-12-03 10:00:00,123 W 1 2] a Ray log line\\n'\n"
        "ctypes.PyDLL(None).write(2, buf, len(buf))\n"  # a PyDLL call keeps the GIL
        "print('done', file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stderr.splitlines()
    assert lines.count("native line") == 20000 and "done" in lines
    assert not any("a Ray log line" in line for line in lines)  # Ray's own line is still filtered


def test_ray_error_messages_go_to_stderr_and_the_serve_shutdown_one_is_dropped(capsys, monkeypatch):
    """Quiet mode: the messages Ray's driver prints about its processes stay off stdout (a command's JSON
    result), and the one every `serve.shutdown()` causes is not shown at all."""
    from ray._private import worker

    from unusual.runtime import _filter_error_messages

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored afterwards
    _filter_error_messages()
    wrapped = worker.print_to_stdstream
    _filter_error_messages()
    assert worker.print_to_stdstream is wrapped  # a second Ray connection in the same process does not wrap it twice
    benign = ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task "
              "will be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    oom = "Task model.score failed: the worker was killed because the node ran low on memory (unusual-test-7)."
    worker.print_to_stdstream({"lines": [benign], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": [benign, oom], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out, err = capsys.readouterr()
    assert out == ""
    assert "graceful_shutdown" not in err and err.count("ran low on memory (unusual-test-7)") == 1, err
