"""Dense autoencoder: score = mean squared reconstruction error of the scaled features."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.base import AnomalyModule, default_latent, mlp
from models.registry import register


@dataclass
class AEConfig:
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    latent: int | None = None  # None: max(2, min(32, width // 4))
    dropout: float = 0.0


class AutoEncoder(AnomalyModule):
    def __init__(self, config: AEConfig, width: int):
        super().__init__()
        self.config = config
        latent = config.latent or default_latent(width)
        self.encoder = mlp([width, *config.hidden, latent], dropout=config.dropout)
        self.decoder = mlp([latent, *reversed(config.hidden), width], dropout=config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, width) -> (B, width)
        return self.decoder(self.encoder(x))

    def loss(self, x):
        return ((self(x) - x) ** 2).mean()

    def score_terms(self, x):
        terms = (self(x) - x) ** 2 / x.shape[-1]  # (B, width); sums to the MSE
        return terms.sum(-1), terms


register("ae", AutoEncoder, AEConfig)
