"""What a new user meets in the first hour, as one-line errors rather than tracebacks: object-storage
URIs without credentials (the command line and the Python API) and a serve checkpoint that is not
there."""

from __future__ import annotations

import os
import subprocess
import sys

from unusual.runtime import free_port

CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
    "S3-compatible store such as MinIO (README: Object storage)"
)


def _no_credentials_env(tmp_path) -> dict:
    """This machine's environment without any AWS credentials or endpoint (and no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path),
    )  # fmt: skip
    return env


def _run(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_commands_without_credentials_say_what_to_set_in_one_line(tmp_path):
    env = _no_credentials_env(tmp_path)
    p = _run(["-m", "unusual.cli", "score", "--checkpoint", "s3://my-bucket/models/ae", "--data",
              "s3://my-bucket/data", "--output", "s3://my-bucket/scores"], env)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == (
        f"unusual score: error: no object-storage credentials reading the bundle at s3://my-bucket/models/ae: "
        f"{CREDENTIALS}"
    )
    data = tmp_path / "data.csv"
    data.write_text("a,b\n" + "".join(f"{i},{i % 7}\n" for i in range(64)))
    p = _run(["-m", "unusual.cli", "fit", "--data", str(data), "--output", "s3://my-bucket/models/ae",
              "--epochs", "1"], env)  # fmt: skip
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1] == (  # checked before any training
        f"unusual fit: error: no object-storage credentials checking s3://my-bucket/models/ae: {CREDENTIALS}"
    ), p.stderr
    assert "Traceback" not in p.stderr


def test_the_python_api_names_the_uri_and_what_to_set(tmp_path):
    code = (
        "from unusual.models import BundleError, Detector\n"
        "from unusual.ray_jobs import sample_data\n"
        "det = Detector('ae', epochs=1, seed=0).fit(sample_data.load('cardio').drop_columns(['label']).slice(0, 256))\n"
        "try:\n"
        "    det.save('s3://my-bucket/models/ae')\n"
        "except BundleError as e:\n"
        "    print(e)\n"
    )
    p = _run(["-c", code], _no_credentials_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (
        f"no object-storage credentials saving the bundle to s3://my-bucket/models/ae: {CREDENTIALS}"
    )


def test_serve_refuses_a_checkpoint_that_is_not_there_before_starting_anything(tmp_path):
    missing = tmp_path / "models" / "ae"
    p = _run(["-m", "unusual.cli", "serve", "--checkpoint", f"ae={missing}", "--port", str(free_port())],
             _no_credentials_env(tmp_path), timeout=60)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == (
        f"unusual serve: error: --checkpoint ae={missing}: no bundle at {missing}: manifest.json not found"
    )
