"""The typed records of a bundle's ``manifest.json``: :class:`Manifest` and the two records it holds,
how the threshold was fit (:class:`ThresholdRecord`) and what the training run recorded
(:class:`TrainingRecord`).

A manifest is built from these models where a model is trained, checked where a bundle is read
(:meth:`Manifest.parse`: a missing field, or one of the wrong type, is a BundleError naming it) and
written as :meth:`Manifest.to_json`: the fields that were set, under their JSON names, so that a
manifest read and written again is the same JSON object, and its content hash the same. Fields
this version does not know are kept (``extra="allow"``): a newer writer's additions survive a
round trip. pydantic only: no PyTorch, so a job's driver can read manifests without it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BundleError


class ThresholdRecord(BaseModel):
    """How a threshold was fit: the manifest's ``threshold`` (``unusual.models.thresholds.fit_threshold_tail``)."""

    model_config = ConfigDict(extra="allow")

    value: float  # the decision threshold: a row is anomalous when its score is above it
    threshold: str  # the rule: "quantile" or "pot"
    contamination: float
    pot_level: float | None = None
    n_scores: int | None = None  # the scores it was fit on
    gpd: dict | None = None  # "pot": the generalized Pareto tail's parameters
    fit_on: str | None = None  # "validation" or "training"
    collected: int | None = None  # fit over a Ray Dataset: the top scores collected for the tail


class TrainingRecord(BaseModel):
    """The manifest's ``training``: what a run recorded (``History.training_record``) and how it was made."""

    model_config = ConfigDict(extra="allow")

    train_loss: list[float] = []  # per epoch
    val_loss: list[float] = []
    best_epoch: int = 0
    seconds: float = 0.0  # the training epochs only
    stopped_early: bool = False
    train_samples: int = 0  # the distinct training samples (rows, or windows)
    rows: int | None = None  # rows read
    val_samples: int | None = None
    config: dict = {}  # the TrainConfig, as asdict
    runner: str | None = None  # "in-memory" (unusual.models.Detector) or "ray-train"
    wall_seconds: float | None = None  # the whole job: reading, training, calibration
    samples_per_s: float | None = None
    # "ray-train" runs: how the job ran
    num_workers: int | None = None
    resources_per_worker: dict | None = None
    use_gpu: bool | None = None
    precision: str | None = None
    run_name: str | None = None
    started_at_epoch: list[int] | None = None  # one entry per (re)start
    epoch_seconds: list[float] | None = None
    data: str | None = None  # how the samples reached the workers ("in object store", "streaming", …)
    cached: bool | None = None
    storage: str | None = None  # where the run's checkpoints are, when they were kept


class Manifest(BaseModel):
    """A bundle's ``manifest.json``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    format_version: int
    kind: str  # the model family (unusual.models.registry)
    # "model_config" in the JSON (pydantic reserves the name): the family's config dataclass, as asdict
    family_config: dict = Field(alias="model_config")
    width: int  # columns of the encoded feature matrix
    features: dict  # FeatureSchema.to_dict(): columns, scalers, encoders
    threshold: ThresholdRecord
    training: TrainingRecord
    libraries: dict  # versions of unusual, torch, numpy, pyarrow, python
    model_version: str | None = None  # "<kind>-<12 hex>" of the content hash (stamped by seal)
    content_hash: str | None = None  # SHA-256 of the weights and of this manifest without this field
    mlflow: dict | None = None  # ``unusual train --mlflow``: the run and the registered model (not stored)

    @classmethod
    def parse(cls, raw: dict, uri) -> Manifest:
        """``raw`` (the JSON object) checked; a BundleError naming the first field it refuses."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise BundleError(f"bundle at {uri} is inconsistent: manifest field {where!r}: {err['msg']}") from None

    def to_json(self) -> dict:
        """The JSON object: the fields that were set, under their JSON names (what the content hash covers)."""
        return self.model_dump(by_alias=True, exclude_unset=True, exclude={"mlflow"})
