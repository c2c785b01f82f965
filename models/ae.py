"""Dense autoencoder: score = mean squared reconstruction error of the scaled features
(optionally each column in units of its usual error on normal data: ``normalize_errors``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import SquaredErrorModule, check_norm, default_latent, mlp


@dataclass
class AEConfig:
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    latent: int | None = None  # None: max(2, min(32, width // 4))
    # Defaults measured with benchmarks/quality.py across ODDS, NSL-KDD and SMD (before norm): dropout 0.2
    # helped the ODDS average (0.881 -> 0.890 ROC-AUC) but cost NSL-KDD (0.983 -> 0.970) and
    # SMD (0.684 -> 0.666), so it is off. Per-column error normalisation, a win for the LSTM on
    # SMD, cost the AE on ODDS, so it is off here and on for the LSTM.
    dropout: float = 0.0
    # Layer norm before each hidden ReLU. Measured (benchmarks/quality.py, 5 seeds): ODDS
    # average ROC-AUC 0.881 -> 0.903 (PR-AUC 0.800 -> 0.848); without it the AE learns to
    # reconstruct cardio's anomalies as training goes on (test ROC-AUC 0.96 after one epoch,
    # 0.82 at the best validation loss; 0.90 with it). NSL-KDD 0.983 -> 0.985; SMD (rows as
    # points) ROC-AUC 0.684 -> 0.675, PR-AUC 0.164 -> 0.173. Weight decay, dropout, input
    # or latent noise, a latent penalty, Huber/L1 losses and shorter training were tried:
    # each traded cardio against pendigits and satellite.
    norm: str | None = "layer"
    normalize_errors: bool = False  # each column's error in units of its usual level (SquaredErrorModule)

    def __post_init__(self):
        check_norm(self.norm)


class AutoEncoder(SquaredErrorModule):
    def __init__(self, config: AEConfig, width: int):
        super().__init__()
        self.config = config
        latent = config.latent or default_latent(width)
        self.encoder = mlp([width, *config.hidden, latent], dropout=config.dropout, norm=config.norm)
        self.decoder = mlp([latent, *reversed(config.hidden), width], dropout=config.dropout, norm=config.norm)
        self._init_error_scale(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, width) -> (B, width)
        return self.decoder(self.encoder(x))

    def loss(self, x):
        return ((self(x) - x) ** 2).mean()

    def errors(self, x):
        return (self(x) - x) ** 2
