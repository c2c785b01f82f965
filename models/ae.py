"""Dense autoencoder.

Two scores (``score``):

- ``"joint"`` (the default): how unlikely the row is under the autoencoder read as a non-linear
  probabilistic PCA. Two terms, each about 1 on a typical row:
  the reconstruction error, each column in units of its usual error on the training rows (the part
  of the row off the learned surface), plus the squared Mahalanobis distance of the row's latent code
  from the training rows' codes (their mean, under their covariance), divided by the latent width
  (how far along the surface the row lies). Reconstruction alone misses rows that sit on the surface but far out
  along it: an autoencoder reconstructs a cluster of anomalies it was trained on (data as users have
  it, anomalies included), yet their codes lie apart from the normal rows' codes.
- ``"reconstruction"``: the mean squared reconstruction error of the scaled features (optionally
  each column in units of its usual error: ``normalize_errors``), as bundles before ``score`` had.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NORMALIZE_HELP, TRIM_HELP, DenseConfig, SquaredErrorModule, default_latent, mlp
from .params import param, validate
from .training import trimmed_mean


@dataclass
class AEConfig(DenseConfig):
    # off: cost the AE on ODDS; on for the LSTM (benchmarks/README.md, "ae: normalize_errors")
    normalize_errors: bool = param(False, help=NORMALIZE_HELP)
    # 0.2 for data with anomalies; clean=True trains with 0 (benchmarks/README.md, "ae: trim")
    trim: float = param(0.2, ge=0, lt=1, help=TRIM_HELP)
    score: str = param("joint", choices=("joint", "reconstruction"), help=(
        "`joint`: the reconstruction error of each column in units of its usual error, plus the squared "
        "Mahalanobis distance of the row's latent code from the codes of the training rows, over the latent "
        "width (each term is about 1 on a usual row); `reconstruction`: the mean squared reconstruction error "
        "alone (what AE bundles written before this option do)"))
    # Keeps the Mahalanobis distance finite where the held-out split is small next to the latent width
    # or codes are collinear.
    latent_ridge: float = param(0.05, ge=0, help=(
        "added to the latent covariance of the `joint` score, as a fraction of its mean variance"))

    def __post_init__(self):
        validate(self)


class AutoEncoder(SquaredErrorModule):
    def __init__(self, config: AEConfig, width: int):
        super().__init__()
        self.config = config
        # joint: every row, the val split was too noisy (benchmarks/README.md, "ae: calibrate_on")
        self.calibrate_on = "all" if config.score == "joint" else "validation"
        latent = self.latent = config.latent or default_latent(width)
        self.encoder = mlp([width, *config.hidden, latent], dropout=config.dropout, norm=config.norm)
        self.decoder = mlp([latent, *reversed(config.hidden), width], dropout=config.dropout, norm=config.norm)
        self._init_error_scale(width)
        if config.score == "joint":  # set by set_calibration from the training rows' codes
            self.register_buffer("latent_mean", torch.zeros(latent))
            self.register_buffer("latent_precision", torch.eye(latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, width) -> (B, width)
        return self.decoder(self.encoder(x))

    def loss(self, x):
        return trimmed_mean(((self(x) - x) ** 2).mean(-1), self.config.trim)

    def errors(self, x):
        return (self(x) - x) ** 2

    # ----------------------------------------------------------------- the joint score
    def score_terms(self, x):
        if self.config.score != "joint":
            return super().score_terms(x)
        z = self.encoder(x)  # (B, latent)
        err = (self.decoder(z) - x) ** 2 / self.error_scale  # (B, width), about 1 per column on normal rows
        d = z - self.latent_mean
        latent = ((d @ self.latent_precision) * d).sum(-1) / self.latent  # (B,), about 1 on normal rows
        # Per-column terms that sum to the score: each column's share of the error term, plus the latent
        # term shared in proportion to how far each scaled column is from its mean (x is in scales from
        # the column's centre), so the columns that put a row far along the surface rank first.
        x2 = x * x
        share = x2 / x2.sum(-1, keepdim=True).clamp(min=1e-12)
        terms = err / err.shape[-1] + latent.unsqueeze(-1) * share
        return terms.sum(-1), terms

    def calibration_rows(self, x):
        if self.config.score != "joint":
            return super().calibration_rows(x)
        z = self.encoder(x)
        outer = (z.unsqueeze(-1) * z.unsqueeze(-2)).flatten(1)  # (B, latent * latent)
        return torch.cat([(self.decoder(z) - x) ** 2, z, outer], dim=-1)

    def calibration_size(self) -> int:
        return self.error_scale.numel() + self.latent + self.latent * self.latent

    def set_calibration(self, means):
        if self.config.score != "joint":
            return super().set_calibration(means)
        w, k = self.error_scale.numel(), self.latent
        means = means.double()
        self.set_error_scale(means[:w].float())
        mean = means[w : w + k]
        cov = means[w + k :].reshape(k, k) - torch.outer(mean, mean)
        cov = 0.5 * (cov + cov.T)
        ridge = self.config.latent_ridge * float(cov.diagonal().clamp(min=0).mean()) + 1e-6
        cov = cov + ridge * torch.eye(k, dtype=cov.dtype, device=cov.device)
        self.latent_mean.copy_(mean.float())
        self.latent_precision.copy_(torch.linalg.pinv(cov, hermitian=True).float())
