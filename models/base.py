"""The contract every model family implements, and small shared layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .params import param


class AnomalyModule(nn.Module):
    """Base class of the model families.

    ``x`` is a float32 batch: ``(B, width)`` for tabular families, or
    ``(B, context, width)`` windows for sequence families (``context`` given by
    :attr:`context_length`; the row being scored is the last step).
    """

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of a batch (mean over rows)."""
        raise NotImplementedError

    def score_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores ``(B,)`` (higher = more anomalous) and per-column
        contributions ``(B, width)`` that rank the features behind each score."""
        raise NotImplementedError


class SquaredErrorModule(AnomalyModule):
    """A family scored by squared errors per column (reconstruction or forecast).

    With ``normalize_errors`` (the default) each column's error is divided by
    its mean error on held-out normal data (``error_scale``, set by
    :func:`unusual.models.training.calibrate_error_scale` after training and stored
    with the weights). A column that is hard to predict even when all is well
    (a noisy metric) then counts as much as an easy one, and the score reads as
    "how many times the usual error"; without it, the noisiest columns drown
    out the rest.
    """

    def _init_error_scale(self, width: int) -> None:
        self.register_buffer("error_scale", torch.ones(width))

    def calibration_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row statistics ``(B, K)`` whose mean over the calibration rows :meth:`set_calibration` takes.

        A mean is all any runner needs to gather (the in-memory fit, the Ray Train workers' all-reduce,
        Ray Data's aggregation); here the squared error per column."""
        return self.errors(x)

    def calibration_size(self) -> int:
        """K, the columns of :meth:`calibration_rows` (a worker with no calibration rows sends K zeros)."""
        return self.error_scale.numel()

    def set_calibration(self, means: torch.Tensor) -> None:
        """Set what scoring needs (error scale, …), given the mean of :meth:`calibration_rows`."""
        self.set_error_scale(means)

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Squared error per column of the row being scored, (B, width)."""
        raise NotImplementedError

    def score_terms(self, x):
        err = self.errors(x)
        if self.config.normalize_errors:
            err = err / self.error_scale
        terms = err / err.shape[-1]  # sums to the mean over columns
        return terms.sum(-1), terms

    def set_error_scale(self, mean_errors: torch.Tensor) -> None:
        # A floor relative to the overall level keeps columns that were
        # reconstructed perfectly (constant ones) from dividing by ~0; a family
        # may raise it (``error_floor``: the fraction of the mean column error).
        floor = getattr(self.config, "error_floor", 1e-2) * float(mean_errors.mean()) + 1e-12
        self.error_scale.copy_(mean_errors.clamp(min=floor))


NORMS = ("layer", None)

# The meaning of the parameters the dense families share (the README's parameter table, models/params.py).
HIDDEN_HELP = "encoder layer sizes (the decoder mirrors them)"
LATENT_SHOWN = "`max(2, min(32, width // 4))`"
NORM_HELP = (
    "`layer`: layer norm before each hidden ReLU (keeps the AE from learning to reconstruct outliers; see "
    "`benchmarks/results/quality.md`); `None`: plain dense layers (what AE / VAE bundles written before this "
    "option have)")
TRIM_HELP = (
    "each training batch leaves out this fraction of its worst-fitted rows (anomalies in the training data "
    "then give no gradient)")
NORMALIZE_HELP = (
    "divide each column's squared error by its mean error on the validation split, so noisy columns do not "
    "drown out the rest (the `ae`'s `joint` score always does)")


@dataclass
class DenseConfig:
    """The layers of the dense families (ae, vae): what their configs share, declared once."""

    hidden: list[int] = param(factory=lambda: [64, 32], help=HIDDEN_HELP)
    latent: int | None = param(None, ge=1, shown=LATENT_SHOWN, help="bottleneck size")
    # off: helped ODDS, cost NSL-KDD and SMD (benchmarks/README.md, "ae: dropout")
    dropout: float = param(0.0, ge=0, lt=1, help="dropout between layers")
    # Layer norm before each hidden ReLU: ODDS 0.881 -> 0.903 (ae), 0.907 -> 0.913 (vae) (benchmarks/README.md)
    norm: str | None = param("layer", choices=NORMS, help=NORM_HELP)


def check_norm(norm) -> None:
    """The one check of a ``norm`` setting (model configs call it so a bad value fails at ``Detector(...)``)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")


def mlp(
    sizes: list[int], last_activation: bool = False, dropout: float = 0.0, norm: str | None = None
) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last if asked); each
    hidden layer is layer-normalised before its ReLU if ``norm="layer"``, and
    followed by dropout if any. (Batch norm is not offered: it depends on the
    batch, so a one-row tail batch or a per-GPU batch would change training.)"""
    check_norm(norm)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            if norm == "layer":
                layers.append(nn.LayerNorm(b))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def default_latent(width: int) -> int:
    """A bottleneck that compresses without starving small inputs."""
    return max(2, min(32, width // 4))
