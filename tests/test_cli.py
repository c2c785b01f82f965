"""Every flag of every command reaches the job it configures, and every field of a job's config is
read by the job (the ``unusual train --cache`` class of bug: a flag parsed, then silently dropped).

No Ray here: each command's function is replaced by one that records the config it receives."""

from __future__ import annotations

import importlib
import re
import typing
from pathlib import Path

import pytest

from unusual import cli
from unusual.config import JOBS, ConfigError, EvaluateJob, ModelSpec, ScoreJob, ServeConfig, ServeJob, TrainJob
from unusual.configbase import _base_type

ROOT = Path(__file__).resolve().parents[1]

# Required flags of each command, with valid values.
REQUIRED = {
    "fit": ["--data", "d.parquet", "--output", "out/ae"],
    "train": ["--data", "s3://b/d", "--output", "s3://b/m"],
    "score": ["--checkpoint", "s3://b/m", "--data", "s3://b/d", "--output", "s3://b/o"],
    "evaluate": ["--scores", "s3://b/o", "--label-column", "label"],
    "serve": ["--checkpoint", "ae=s3://b/m"],
    "info": ["s3://b/m"],
    "demo": [],
}
# Flags that only make sense together with another one.
COMPANIONS = {("evaluate", "entity_column"): ["--time-column", "ts"], ("serve", "default_model"): ["--models", "b=s3://b/b"],
              ("serve", "host"): ["--insecure"],
              ("score", "partition_filter"): ["--incremental"], ("score", "rescore"): ["--incremental"],
              **{("train", f"mlflow_{x}"): ["--mlflow"] for x in ("tracking_uri", "experiment", "model_name")}}


def other_value(cls, name: str, tmp_path: Path) -> tuple[list[str], object]:
    """(argv for field ``name`` with a value other than its default, the value the config must hold)."""
    f = cls.model_fields[name]
    base, _ = _base_type(f.annotation)
    flag = cls.flags_of(name)[0]
    default = f.default if f.default is not ... else None
    if name == "config":
        path = tmp_path / "params.yaml"
        path.write_text("latent: 5\n")
        return [flag, str(path)], str(path)
    if name == "model":
        return [flag, "vae"], "vae"
    if name == "params":
        return [flag, "latent=8", flag, "hidden=[16, 8]"], {"latent": 8, "hidden": [16, 8]}
    if name == "default_model":
        return [flag, "b"], "b"
    if name == "partition_filter":
        return [flag, "dt>=2026-12-01,hour<12"], ["dt>=2026-12-01", "hour<12"]
    if name == "models":
        return [flag, "a=s3://b/a", flag, "b=s3://b/b"], {"a": "s3://b/a", "b": "s3://b/b"}
    if base is bool:
        return ([f"--no-{flag[2:]}"], False) if default else ([flag], True)
    if typing.get_origin(base) is typing.Literal:
        value = next(c for c in typing.get_args(base) if c != default)
        return [flag, value], value
    if typing.get_origin(base) is list:
        return [flag, "c1,c2"], ["c1", "c2"]
    if base is int:
        value = 3 if default is None else default + 1
        return [flag, str(value)], value
    if base is float:
        value = 0.5 if default is None else default / 2
        return [flag, str(value)], value
    value = f"value-of-{name}"
    return [flag, value], value


CASES = [(command, name) for command, cls in cli.CONFIGS.items() for name in cls.cli_fields()]


@pytest.mark.parametrize("command,name", CASES, ids=[f"{c}--{n}" for c, n in CASES])
def test_every_flag_reaches_the_job(command, name, monkeypatch, tmp_path):
    cls = cli.CONFIGS[command]
    seen = []
    module, _, attr = cli.COMMANDS[command][0].partition(":")
    monkeypatch.setattr(importlib.import_module(module), attr, lambda job: seen.append(job) or 0)
    argv, expected = other_value(cls, name, tmp_path)
    required = REQUIRED[command]
    if cls.model_fields[name].is_required() and command not in ("info", "serve"):
        required = strip_flag(required, cls.flags_of(name)[0])  # the field under test gives its own value
    elif command == "serve" and name == "models":
        required = []
    if command == "info":
        argv, expected, required = ["s3://other/m"], "s3://other/m", []
    assert cli.main([command, *required, *argv, *COMPANIONS.get((command, name), [])]) == 0
    (job,) = seen
    assert isinstance(job, cls)
    assert getattr(job, name) == expected
    if isinstance(job, ModelSpec) and name in ModelSpec.model_fields and name not in ("model", "config"):
        # the shortcut flags and --param land in the Detector parameters
        _, params = job.detector()
        want = expected if name == "params" else {name: expected}
        assert want.items() <= params.items()
    if isinstance(job, ServeJob) and name in ServeConfig.model_fields:
        assert getattr(job.app_config(), name) == expected


def strip_flag(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def test_the_config_file_and_the_flags_merge_in_order(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: lstm\nwindow: 8\nlatent: 3\nepochs: 9\n")
    job = TrainJob(data="d", output="o", config=str(path), epochs=2, params={"latent": 4})
    assert job.detector() == ("lstm", {"window": 8, "latent": 4, "epochs": 2})


# Where each job's config is read: every field must appear as ``.field`` in that code.
READERS = {
    "fit": ["ray_jobs/fit.py"],
    "train": ["ray_jobs/train*.py", "unusual/tracking.py"],
    "score": ["ray_jobs/score*.py", "ray_jobs/incremental.py"],
    "evaluate": ["ray_jobs/evaluate*.py"],
    "serve": ["serving/*.py"],
}


@pytest.mark.parametrize("command", sorted(READERS))
def test_every_field_is_read_by_its_job(command):
    cls = JOBS[command]
    source = "\n".join(p.read_text() for pattern in READERS[command] for p in ROOT.glob(pattern))
    own = [n for n in cls.model_fields if n not in ModelSpec.model_fields]  # ModelSpec: read by detector()
    # A field read through a property of its config counts as read where the property is.
    via = {n: [n] for n in own} | {"output": ["output", "output_uri"]}
    unread = [n for n in own if not any(re.search(rf"\.{v}\b", source) for v in via[n])]
    assert unread == [], f"{command}: fields parsed but never read: {unread}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--data", "d", "--output", "o", "--num-workers", "0"],
         "unusual train: error: --num-workers: Input should be greater than or equal to 1; got '0'"),
        (["score", *REQUIRED["score"], "--keep-columns", "id,anomaly_score"],
         "unusual score: error: --keep-columns: ['anomaly_score'] would clash with the output columns "
         "['anomaly_score', 'is_anomaly', 'top_features', 'model_version']"),
        (["evaluate", *REQUIRED["evaluate"], "--time-column", "ts", "--vus-window", "-1"],
         "unusual evaluate: error: --vus-window: Input should be greater than or equal to 0; got '-1'"),
        (["evaluate", *REQUIRED["evaluate"], "--entity-column", "host"],
         "unusual evaluate: error: entity column 'host' needs a time column: point-adjusted metrics order each "
         "entity's rows by time"),
        (["train", "--data", "d", "--output", "o", "--config", "/nonexistent.yaml"],
         "unusual train: error: --config: cannot read /nonexistent.yaml: No such file or directory"),
        (["fit", "--data", "d", "--output", "o", "--param", "latent"],
         "unusual fit: error: --param: expected key=value; got 'latent'"),
        (["serve", "--checkpoint", "a b=s3://x"],
         "unusual serve: error: --checkpoint: model name 'a b': use letters, digits, '-', '_' or '.'"),
        (["fit", "--data", "d", "--output", "o", "--param", "x=[1"],
         "unusual fit: error: --param: x: '[1' is not a YAML value (expected ',' or ']', but got '<stream end>')"),
        (["serve", "--checkpoint", "a=s3://x", "--checkpoint", "a=s3://y"],
         "unusual serve: error: --checkpoint: two models named 'a' (s3://x and s3://y); name them NAME=URI"),
        (["serve", "--checkpoint", "/nonexistent/bundle"],
         "unusual serve: error: --checkpoint: no bundle at /nonexistent/bundle: manifest.json not found"),
        (["serve", "--checkpoint", "a=s3://x", "--host", "0.0.0.0"],
         "unusual serve: error: --host 0.0.0.0 is reachable beyond this machine and no token is set: anyone who "
         "reaches it could score with your models. Set --token (or $UNUSUAL_SERVE_TOKEN), or pass --insecure"),
    ],
    ids=["range", "clash", "vus-window", "entity-needs-time", "config-file", "param", "model-name", "param-yaml",
         "same-name", "no-bundle", "host-without-token"],
)
def test_a_bad_value_is_one_line_naming_the_flag(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == message


def test_an_unknown_argument_names_itself():
    with pytest.raises(ConfigError, match=r"^unknown argument 'replicas'; known: \['access_log', 'auth_token', "):
        ServeConfig.validated({"models": "a=s3://x", "replicas": 2})


def test_configs_from_python_validate_like_the_flags():
    with pytest.raises(ConfigError, match=r"^--bins: Input should be greater than or equal to 2; got 1$"):
        EvaluateJob.validated({"scores": "s", "label_column": "l", "bins": 1})
    job = ScoreJob(checkpoint="c", data="d", output="o", keep_columns="id,label")
    assert job.keep_columns == ["id", "label"]


def test_fit_refuses_before_reading_the_data(tmp_path, capsys):
    """``unusual fit`` end to end (no Ray): a bundle, then the refusals that must come before any work."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "d.parquet"
    x = np.random.default_rng(0).normal(size=(300, 3))
    pq.write_table(pa.table({f"x{j}": x[:, j] for j in range(3)}), data)
    out = tmp_path / "models" / "ae-1"
    assert cli.main(["fit", "--data", str(data), "--output", str(out), "--epochs", "2"]) == 0
    assert (out / "manifest.json").is_file()
    capsys.readouterr()
    # an existing bundle and an unknown parameter are refused even where the data does not exist
    assert cli.main(["fit", "--data", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"unusual fit: error: a bundle already exists at {out}; pass --overwrite to replace it"
    )
    nowhere = ["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "m")]
    assert cli.main(["fit", *nowhere, "--param", "lattent=3"]) == 2
    assert capsys.readouterr().err.startswith(
        "unusual fit: error: unknown parameter 'lattent' for kind 'ae' (did you mean 'latent'?); known: ["
    )


def test_bare_unusual_prints_the_help_and_version_prints_the_version(capsys):
    from unusual import __version__

    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: unusual") and all(c in out for c in ("fit", "train", "score", "serve", "demo"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"unusual {__version__}"


def test_validation_reads_no_environment_the_command_line_and_the_builders_do(monkeypatch):
    """The bearer token's variable is read where the application is started or built (the command line,
    ``unusual.serving.app.as_config``), not when a config is validated: a replica validates its
    arguments again and must not pick up a token of its own."""
    from unusual.serving.app import as_config

    monkeypatch.setenv("UNUSUAL_SERVE_TOKEN", "t0ken")
    config = ServeConfig(models={"ae": "s3://b/ae"})
    assert config.auth_token is None
    assert config.with_environment().auth_token == "t0ken" and as_config(config).auth_token == "t0ken"
    job = cli.CONFIGS["serve"].from_namespace(cli.build_parser().parse_args(["serve", "--checkpoint", "ae=s3://b/ae"]))
    assert job.auth_token == "t0ken"
    assert ServeConfig(models={"ae": "s3://b/ae"}, auth_token="given").with_environment().auth_token == "given"


def test_help_lists_the_param_keys_and_every_parameters_default(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["unusual", "fit", "--help"])
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Keys (default): batch_size (128); beta (1); categorical (string columns); clean (false);" in out
    assert "window (64)" in out and "trim (0.2 (ae); 0.1 (vae); 0 with clean)" in out
    epochs = "(early stopping may end sooner) (default: 20 (ae, vae); 60 (lstm); 60 with clean)"
    assert f"--epochs N maximum training epochs {epochs}" in out
