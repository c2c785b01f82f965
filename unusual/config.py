"""The typed configuration of every job: one pydantic model per job, the one source of truth.

    FitJob       unusual fit        one detector in this process
    TrainJob     unusual train      Ray Data + Ray Train       (python -m unusual.ray_jobs.train)
    ScoreJob     unusual score      Ray Data batch scoring     (python -m unusual.ray_jobs.score)
    EvaluateJob  unusual evaluate   metrics and a report       (python -m unusual.ray_jobs.evaluate)
    ServeConfig  the Serve application's arguments (serve run / config files / RayService ``args``)
    ServeJob     unusual serve      ServeConfig + where to listen

Everything else derives from these classes: the CLI flags of each command (one flag per field,
``--field-name``, its help the field's description, its choices the ``Literal``'s values), the
``python -m`` entrypoints (the same flags), YAML files (``--config`` for Detector parameters) and
Serve's typed application builder. Values are validated and converted by pydantic, never by
hand: a flag's string becomes the field's type or a one-line error naming the flag.

Nothing here imports Ray or PyTorch: the CLI builds every command's parser from this module alone.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Literal

import yaml
from pydantic import field_validator, model_validator

from .configbase import (  # noqa: F401
    CSV,
    TOKEN_ENV,
    VERBOSE_HELP,
    ConfigError,
    JobConfig,
    KeyValues,
    NameURIs,
    named_checkpoints,
    opt,
    run_parsed,
)
from .models.errors import UnusualError
from .models.registry import DEFAULT_KIND, kinds
from .models.tables import OUTPUT_COLUMNS  # every scored output has them: --keep-columns must not clash
from .tracking import INSTALL as MLFLOW_INSTALL
from .tracking import available as mlflow_available
from .tracking import is_mlflow_uri, resolve_checkpoint

# A checkpoint: a bundle URI, or an MLflow model URI, resolved to its bundle's location where the job runs
# (:func:`unusual.tracking.resolve_checkpoint`), not when the config is validated.
Checkpoint = str


# --------------------------------------------------------------------------- detector parameters


class ModelSpec(JobConfig):
    """The detector a job builds: its family and parameters (fit, train)."""

    model: str | None = opt(None, "model family (default: the --config file's, else ae)", choices=kinds)
    config: str | None = opt(None, "YAML file of Detector parameters; flags override it")
    features: CSV | None = opt(None, "comma-separated feature columns (default: all others)", metavar="A,B")
    exclude: CSV | None = opt(None, "comma-separated columns to leave out (ids, labels)", metavar="A,B")
    categorical: CSV | None = opt(None, "comma-separated categorical columns (default: string columns)", metavar="A,B")
    entity_column: str | None = opt(None, "sequence models: column naming the series each row belongs to")
    time_column: str | None = opt(None, "sequence models: column ordering rows within a series")
    window: int | None = opt(None, "sequence models: rows of history per window", ge=1)
    epochs: int | None = opt(None, "maximum training epochs (early stopping may end sooner)", ge=1)
    seed: int | None = opt(None, "random seed (default 0)")
    clean: bool = opt(
        False,
        "the training data holds no anomalies (cleaned, or normal by construction): train with the clean-data "
        "defaults; without it the defaults expect anomalies among the training rows, as most data has",
    )
    params: KeyValues = opt(
        {},
        "any other Detector parameter, e.g. --param latent=8 --param threshold=pot",
        flags=["--param"],
        metavar="KEY=VALUE",
    )

    @field_validator("model")
    @classmethod
    def _known_kind(cls, v):
        if v is not None and v not in kinds():
            raise ValueError(f"unknown model kind {v!r}; choose one of {kinds()}")
        return v

    @field_validator("config")
    @classmethod
    def _config_file(cls, v):
        if v is not None:
            _read_params(v)  # a missing or malformed file is an error at parse time
        return v

    def detector(self) -> tuple[str, dict]:
        """(kind, Detector parameters): the ``--config`` file, then the flags, then ``--param``."""
        params = _read_params(self.config) if self.config else {}
        kind = self.model or params.pop("model", None) or params.pop("kind", None) or DEFAULT_KIND
        params.pop("model", None)
        params.pop("kind", None)
        shortcuts = ("features", "exclude", "categorical", "entity_column", "time_column", "window", "epochs", "seed")
        params.update({k: getattr(self, k) for k in shortcuts if getattr(self, k) is not None})
        if self.clean:
            params["clean"] = True
        params.update(self.params)
        return kind, params


def _read_params(path: str) -> dict:
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of parameters")
    return loaded


# --------------------------------------------------------------------------- the jobs


class FitJob(ModelSpec):
    """Train one detector in this process and write its checkpoint bundle."""

    data: str = opt(help="Parquet file / folder / prefix, or a CSV file (local, s3://, gs://)")
    output: str = opt(help="bundle URI (local path or s3://…)")
    overwrite: bool = opt(False, "replace a bundle already at --output")


class TrainJob(ModelSpec):
    """Distributed training with Ray Data + Ray Train; writes a bundle."""

    data: str = opt(help="Parquet file, folder or prefix of shards (local, s3://, gs://)")
    output: str = opt(help="bundle URI (local path or s3://…)")
    overwrite: bool = opt(False, "replace a bundle already at --output")
    num_workers: int = opt(1, "Ray Train workers (DDP); one uses every CPU it is given", ge=1)
    use_gpu: bool = opt(False, "one GPU per worker (DDP over NCCL)")
    cpus_per_worker: float | None = opt(None, "CPUs per worker (default: sized from the cluster)", gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "autocast on GPU")
    storage: str | None = opt(None, "run storage for the training checkpoints (default: <output>.checkpoints)")
    keep_checkpoints: bool = opt(False, "keep the run's checkpoints in --storage after it succeeds")
    checkpoint_every: int | None = opt(
        None, "checkpoint every N epochs (default: at a cadence costing < 5% of the training time)", ge=1
    )
    run_name: str | None = opt(None, "name of the run in its storage (default: <model>-<random>)")
    max_failures: int = opt(2, "worker failures to recover from", ge=0)
    address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    cache: bool | None = opt(
        None,
        "hold the encoded data in memory (default: when it fits in 25% of the object store); "
        "--no-cache streams it from storage every epoch",
    )
    driver_read_mb: float = opt(
        64.0, "inputs up to this many MiB of Parquet are read and encoded by the driver, not Ray Data tasks", ge=0
    )
    mlflow: bool = opt(
        False,
        "log the run to MLflow (parameters, per-epoch losses, the bundle) and register the bundle as an "
        'MLflow model (needs pip install "unusual[mlflow]")',
    )
    mlflow_tracking_uri: str | None = opt(
        None, "with --mlflow: the tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default)", metavar="URI"
    )
    mlflow_experiment: str | None = opt(
        None, "with --mlflow: the experiment (default: $MLFLOW_EXPERIMENT_NAME, else MLflow's default)", metavar="NAME"
    )
    mlflow_model_name: str | None = opt(
        None, "with --mlflow: the registered model's name (default: unusual-<model>)", metavar="NAME"
    )
    fail_at_epoch: int | None = opt(None, "testing: one worker process dies at this epoch, once", cli=False)

    @model_validator(mode="after")
    def _mlflow_options(self):
        given = [f for f in ("mlflow_tracking_uri", "mlflow_experiment", "mlflow_model_name") if getattr(self, f)]
        if given and not self.mlflow:
            flag = self.flags_of(given[0])[0]
            raise ValueError(f"{flag} is given without --mlflow: add --mlflow to log the run")
        if self.mlflow and not mlflow_available():
            raise ValueError(f"--mlflow needs MLflow: {MLFLOW_INSTALL}")
        return self


# --partition-filter: KEY<OP>VALUE over a partition's Hive keys (dt=2026-12-07/hour=13)
PARTITION_FILTER = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(>=|<=|!=|==|=|>|<)\s*(.*?)\s*$")


class ScoreJob(JobConfig):
    """Batch-score Parquet data with Ray Data; writes scores and a quarantine."""

    checkpoint: Checkpoint = opt(
        help="bundle URI written by unusual train / fit, or an MLflow model: models:/NAME/VERSION, models:/NAME@ALIAS"
    )
    data: str = opt(help="Parquet file, folder or prefix of shards (local, s3://, gs://)")
    output: str = opt(help="output prefix for the scored Parquet parts")
    keep_columns: CSV = opt([], "comma-separated input columns copied to the output (ids, labels)", metavar="A,B")
    batch_size: int | None = opt(None, "rows per scoring call (default 131072; sequences: whole buckets)", ge=1)
    concurrency: int | None = opt(
        None, "scoring actors (default: one per CPU; with --use-gpu, four sharing each GPU)", ge=1
    )
    use_gpu: bool = opt(False, "score on GPU actors (a share of a GPU each)")
    unit_rows: int | None = opt(None, "rows per unit of work and output part (default: rows/64, within 1e5..1e6)", ge=1)
    block_rows: int = opt(65_536, "rows per block read", ge=1)
    bucket_rows: int = opt(500_000, "sequence models: target rows per entity bucket", ge=1)
    top_k: int = opt(3, "contributing features reported per row", ge=0)
    read: Literal["auto", "actors", "tasks"] = opt(
        "auto", "who reads the Parquet: the scoring actors or Ray Data tasks"
    )
    overwrite: bool = opt(False, "delete whatever is at --output first")
    incremental: bool = opt(
        False,
        "score only what this model version has not scored yet: the new or changed partitions of a "
        "partitioned --data root (dt=…/hour=…), written under the same partition paths in "
        "--output/model_version=<version>/ and recorded in --output/_unusual/ledger/",
    )
    partition_filter: CSV = opt(
        [], "with --incremental: partitions to consider, e.g. dt>=2026-12-01 (comma-separated, all must hold)",
        metavar="KEY<OP>VALUE,…",
    )
    rescore: bool = opt(False, "with --incremental: score every partition again, even those already recorded")
    watch_alpha: float = opt(
        1e-3, "with --incremental: the anomaly-rate watch's false-alarm probability per partition", gt=0, lt=1
    )
    address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    fail_after_parts: int | None = opt(None, "testing: a scoring actor raises after this many parts", cli=False)

    @field_validator("partition_filter")
    @classmethod
    def _filters(cls, v):
        for f in v:
            m = PARTITION_FILTER.match(f)
            if not m or not m.group(3):
                raise ValueError(f"{f!r}: expected KEY<OP>VALUE with OP one of >= <= > < = !=, e.g. dt>=2026-12-01")
        return v

    @model_validator(mode="after")
    def _incremental_options(self):
        given = [f for f, on in (("--partition-filter", self.partition_filter), ("--rescore", self.rescore)) if on]
        if given and not self.incremental:
            raise ValueError(f"{given[0]} needs --incremental")
        if self.incremental and self.overwrite:
            raise ValueError("--overwrite deletes the record --incremental keeps: use --rescore to score again")
        return self

    @field_validator("keep_columns")
    @classmethod
    def _no_clash(cls, v):
        clash = sorted(set(v) & {*OUTPUT_COLUMNS, "error"})
        if clash:
            raise ValueError(f"{clash} would clash with the output columns {list(OUTPUT_COLUMNS)}")
        return v


class EvaluateJob(JobConfig):
    """ROC-AUC, PR-AUC, F1 (time series: VUS-PR, VUS-ROC) and an HTML report from scored data with labels."""

    scores: str = opt(help="batch-scoring output: Parquet folder or prefix (local, s3://, gs://)")
    label_column: str = opt(help="column of true labels (positive = true / non-zero)")
    output: str | None = opt(None, "where metrics.json and report.html go (default: <scores>/_evaluation)")
    entity_column: str | None = opt(
        None, "series id column, for per-series VUS and point-adjusted metrics (needs --time-column)"
    )
    time_column: str | None = opt(
        None, "order of rows within a series; given, VUS-PR / VUS-ROC and point-adjusted metrics too"
    )
    bins: int = opt(16384, "score bins when the scores are too many to be exact", ge=2)
    vus_window: int = opt(
        100,
        "with --time-column: VUS-PR / VUS-ROC's widest buffer around each labelled segment, in rows "
        "(TSB-AD's slidingWindow; 0: the segments as labelled)",
        ge=0,
    )
    address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")

    @model_validator(mode="after")
    def _entity_needs_time(self):
        if self.entity_column and not self.time_column:
            raise ValueError(
                f"entity column {self.entity_column!r} needs a time column: point-adjusted metrics "
                "order each entity's rows by time"
            )
        return self

    @property
    def output_uri(self) -> str:
        return self.output or f"{self.scores.rstrip('/')}/_evaluation"


class ServeConfig(JobConfig):
    """The Serve application: what ``serve run``, Serve config files and a RayService pass as ``args``."""

    models: NameURIs = opt(
        help="a bundle to serve as [NAME=]URI (NAME defaults to its kind); repeat, or NAME=URI,NAME=URI",
        flags=["--checkpoint", "--models"],
        metavar="[NAME=]URI",
    )
    default_model: str | None = opt(None, "the model of POST /v1/score (default: the only one)")
    top_k: int = opt(3, "contributing features reported per row", ge=0)
    max_body_bytes: int = opt(64 * 1024 * 1024, "largest request body accepted", ge=1)
    max_rows: int = opt(1_000_000, "most rows in one request", ge=1)
    auth_token: str | None = opt(
        None, f"require Authorization: Bearer TOKEN (default: ${TOKEN_ENV})", flags=["--token"]
    )
    use_gpu: bool = opt(False, "model replicas score on GPUs (a share of one each)")
    # A whole GPU each left a second model's replica waiting forever on a 1-GPU machine
    # (seen on an H100 with benchmarks/gpu_paths.py): the models are small, replicas share GPUs.
    gpus_per_replica: float = opt(0.25, "share of a GPU per model replica with --use-gpu", gt=0, le=1)
    num_cpus: float = opt(0.25, "CPUs per model replica", gt=0)
    min_replicas: int = opt(1, "autoscaling floor per model", ge=0)
    max_replicas: int = opt(2, "autoscaling ceiling per model", ge=1)
    target_ongoing_requests: float = opt(2.0, "autoscaling target of ongoing requests per replica", gt=0)
    upscale_delay_s: float = opt(3.0, "seconds of load before adding a replica", ge=0)
    downscale_delay_s: float = opt(30.0, "seconds of idleness before removing a replica", ge=0)
    max_batch_size: int = opt(
        64, "most rows in one model call of requests that arrive together (no wait); a larger request is scored alone",
        ge=1,
    )
    streaming: bool | None = opt(
        None, "deploy each model's /stream route (default: for sequence models with a time column)"
    )
    stream_entities: int = opt(
        100_000, "entities a replica keeps for /stream; past it the least recently sent is dropped", ge=1
    )
    stream_idle_s: float = opt(3600.0, "seconds after which an entity not sent to /stream is dropped", gt=0)
    access_log: bool = opt(False, "a log line per request in the replicas' Serve logs (costs throughput)")
    jobs_address: str | None = opt(
        None, "dashboard address for POST /v1/jobs (default: $RAY_DASHBOARD_ADDRESS, else this cluster)"
    )
    jobs_uri_prefixes: CSV = opt(
        [],
        "URI prefixes POST /v1/jobs may read from and write to, e.g. s3://bucket/scoring/ (with a token; "
        "none: POST /v1/jobs is off)",
        metavar="A,B",
    )

    @field_validator("models")
    @classmethod
    def _names(cls, v):
        if not v:
            raise ValueError("at least one model is needed: models={name: checkpoint URI}")
        for name in v:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"model name {name!r}: use letters, digits, '-', '_' or '.'")
        return v

    @model_validator(mode="after")
    def _defaults(self):
        if self.default_model is None and len(self.models) == 1:
            self.__dict__["default_model"] = next(iter(self.models))
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not one of {sorted(self.models)}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"replicas: need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")
        return self

    def with_environment(self, resolve: bool = True):
        """This config as the process that starts or builds the application completes it (validation
        itself reads nothing): the bearer token from ``$UNUSUAL_SERVE_TOKEN`` when none is given and, with
        ``resolve``, each MLflow model URI as its bundle's location."""
        update = {}
        if resolve and any(is_mlflow_uri(u) for u in self.models.values()):
            try:
                update["models"] = {k: resolve_checkpoint(u) for k, u in self.models.items()}
            except UnusualError as e:
                raise ConfigError(f"--checkpoint: {e}") from None
        token = os.environ.get(TOKEN_ENV) or None
        if self.auth_token is None and token:
            update["auth_token"] = token
        return self.model_copy(update=update) if update else self


def loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


class ModelAppConfig(ServeConfig):
    """One model's own application in a Serve config file (``unusual.serving.configfile:model_app``):
    ServeConfig's fields but ``models`` and ``default_model``; ``model`` names it (its route is
    ``/v1/models/NAME``). Its checkpoint is not an argument but its deployment's ``user_config``, which
    Serve swaps on the running replicas (a changed argument redeploys the application)."""

    model: str = opt(help="the model's name: its route is /v1/models/NAME", cli=False)

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, values):
        if isinstance(values, dict):
            if "models" in values or "default_model" in values:
                raise ValueError(
                    "a model application serves one model: name it with `model: NAME` and give its checkpoint "
                    "as its deployment's user_config ({checkpoint: URI}), not `models` / `default_model`"
                )
            if isinstance(values.get("model"), str):
                values = {**values, "models": {values["model"]: USER_CONFIG}}
        return values


USER_CONFIG = "user_config"  # a model application's checkpoint: its deployment's user_config


class ServeJob(ServeConfig):
    """Start the Ray Serve endpoint (online JSON + bulk Arrow / Parquet scoring)."""

    host: str = opt("127.0.0.1", "bind address")
    port: int = opt(8000, "HTTP port", ge=1, le=65535)
    address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    insecure: bool = opt(False, "allow a --host beyond this machine without a token")
    print_config: bool = opt(
        False, "print the Serve config file of these flags (serve deploy, a RayService's serveConfigV2) and exit"
    )

    @model_validator(mode="after")
    def _reachable_only_with_a_token(self):
        if not self.auth_token and not self.insecure and not self.print_config and not loopback(self.host):
            raise ValueError(
                f"--host {self.host} is reachable beyond this machine and no token is set: anyone who reaches "
                f"it could score with your models. Set --token (or ${TOKEN_ENV}), or pass --insecure"
            )
        return self

    @classmethod
    def from_namespace(cls, ns):
        """The command line's job, completed here, where it runs: a bare ``--checkpoint URI`` named by its
        bundle's kind, the token from ``--token``, else ``$UNUSUAL_SERVE_TOKEN``."""
        values = {"models": named_checkpoints(getattr(ns, "models", None))}
        if getattr(ns, "auth_token", None) is None and os.environ.get(TOKEN_ENV):
            values["auth_token"] = os.environ[TOKEN_ENV]
        return super().from_namespace(argparse.Namespace(**{**vars(ns), **values}))

    def app_config(self) -> ServeConfig:
        """The application's own arguments (what a Serve config file would pass)."""
        return ServeConfig.model_validate(self.model_dump(include=set(ServeConfig.model_fields)))


# The jobs of the CLI's commands, by command name (``unusual <command>``).
JOBS: dict[str, type[JobConfig]] = {
    "fit": FitJob,
    "train": TrainJob,
    "score": ScoreJob,
    "evaluate": EvaluateJob,
    "serve": ServeJob,
}


# --------------------------------------------------------------------------- running a job from its flags


def main_for(command: str, run_command, argv: list[str] | None = None) -> int:
    """``python -m unusual.ray_jobs.<job>``: the same flags as ``unusual <command>``, parsed into the job's
    config and handed to ``run_command(job) -> exit status`` (a job module's ``command``)."""
    cls = JOBS[command]
    parser = argparse.ArgumentParser(
        prog=f"python -m unusual.ray_jobs.{command}", description=cls.__doc__, allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    cls.add_arguments(parser)
    return run_parsed(command, cls, parser.parse_args(argv), run_command)
