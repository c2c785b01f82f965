"""Dense autoencoder: score = mean squared reconstruction error of the scaled features
(optionally each column in units of its usual error on normal data: ``normalize_errors``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import SquaredErrorModule, check_norm, default_latent, mlp
from .training import trimmed_mean


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
    # Trimmed loss: each batch's training (and validation) loss leaves out its worst-reconstructed
    # `trim` fraction of rows, so anomalies in the training data (PyOD's unsupervised protocol:
    # fit on a contaminated split) give no gradient and stay badly reconstructed. Measured with
    # `benchmarks/quality.py --suites tabular-unsupervised --methods ae,vae --seeds 0,1,2
    # --max-rows 10000 --params-ae '{"trim": 0.1}'`, trim 0 -> 0.1: mean ROC-AUC over the 5 ODDS sets
    # and NSL-KDD 0.711 -> 0.723, PR-AUC 0.332 -> 0.385 (cardio 0.684 -> 0.693, NSL-KDD 0.667 -> 0.697,
    # pendigits 0.627 -> 0.656, satellite 0.668 -> 0.711; arrhythmia 0.765 -> 0.759, shuttle 0.856 -> 0.825).
    # But semi-supervised (--suites tabular,nslkdd, same seeds, trim 0 -> 0.1):
    # ODDS 0.903 -> 0.896 (pendigits 0.990 -> 0.962), PR-AUC 0.845 -> 0.772,
    # NSL-KDD 0.983 -> 0.974; so it is off by default.
    # With epochs 20 / patience 3 as well (TrainConfig, shared with the LSTM, so not a default here;
    # semi-supervised effect not measured):
    # unsupervised 0.771, PR-AUC 0.427, every set up or equal. Robust (median / IQR) scaling: 0.669.
    trim: float = 0.0

    def __post_init__(self):
        check_norm(self.norm)
        if not 0.0 <= self.trim < 1.0:
            raise ValueError(f"trim must be in [0, 1); got {self.trim}")


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
        return trimmed_mean(((self(x) - x) ** 2).mean(-1), self.config.trim)

    def errors(self, x):
        return (self(x) - x) ** 2
