"""Gaussian variational autoencoder.

Encoder q(z|x) = N(mu, diag sigma^2); decoder p(x|z) = N(mu_x, diag s^2) with a
learned per-column log-variance. The score is a Monte-Carlo estimate of the
reconstruction negative log-likelihood, E_q[-log p(x|z)] over ``n_samples``
latent draws (``score="nll"``), or the negative ELBO, that plus KL(q||p)
(``score="elbo"``). Per-column attributions are the per-column NLL terms.

Scoring draws the same ``n_samples`` standard-normal vectors for every row
(common random numbers from a fixed seed), so a row's score does not depend on
the batch it arrives in and a save/load round trip gives identical scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import TRIM_HELP, AnomalyModule, DenseConfig, default_latent, mlp
from .params import param, validate
from .training import trimmed_mean

_LOG2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig(DenseConfig):
    score: str = param("elbo", choices=("elbo", "nll"), help=(
        "`elbo` (negative ELBO: reconstruction NLL + KL) or `nll` (Monte-Carlo reconstruction NLL only)"))
    n_samples: int = param(16, ge=1, help="latent samples L per row when scoring")
    beta: float = param(1.0, ge=0, help="weight of the KL term in training")
    min_logvar: float = param(-6.0, help="floor of the decoder's log-variance (keeps the NLL finite)")
    # 0.1 for data with anomalies; clean=True trains with 0 (benchmarks/README.md, "vae: trim")
    trim: float = param(0.1, ge=0, lt=1, help=TRIM_HELP)

    def __post_init__(self):
        validate(self)


class VAE(AnomalyModule):
    def __init__(self, config: VAEConfig, width: int):
        super().__init__()
        self.config = config
        self.latent = config.latent or default_latent(width)
        self.encoder = mlp([width, *config.hidden], last_activation=True, dropout=config.dropout, norm=config.norm)
        self.to_mu = nn.Linear(config.hidden[-1], self.latent)
        self.to_logvar = nn.Linear(config.hidden[-1], self.latent)
        self.decoder = mlp([self.latent, *reversed(config.hidden), width], dropout=config.dropout, norm=config.norm)
        self.dec_logvar = nn.Parameter(torch.zeros(width))
        self._eps: torch.Tensor | None = None

    def encode(self, x):
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h).clamp(-10.0, 10.0)

    def _nll(self, x, mu_x):
        logvar = self.dec_logvar.clamp(min=self.config.min_logvar)
        return 0.5 * (_LOG2PI + logvar + (x - mu_x) ** 2 * torch.exp(-logvar))

    @staticmethod
    def _kl(mu, logvar):  # (B,)
        return -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)

    def loss(self, x):
        mu, logvar = self.encode(x)
        # In eval mode (validation loss, early stopping) the draw is the first
        # common random number, so the loss is deterministic.
        eps = torch.randn_like(mu) if self.training else self._common_eps(x.device)[:1].expand_as(mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        nll = self._nll(x, self.decoder(z)).sum(-1)
        return trimmed_mean(nll + self.config.beta * self._kl(mu, logvar), self.config.trim) / x.shape[-1]

    def _common_eps(self, device) -> torch.Tensor:
        if self._eps is None or self._eps.device != device:
            g = torch.Generator().manual_seed(0)
            self._eps = torch.randn(self.config.n_samples, self.latent, generator=g).to(device)
        return self._eps

    def score_terms(self, x):
        mu, logvar = self.encode(x)  # (B, latent)
        eps = self._common_eps(x.device)  # (L, latent)
        z = mu.unsqueeze(0) + eps.unsqueeze(1) * torch.exp(0.5 * logvar).unsqueeze(0)  # (L, B, latent)
        terms = self._nll(x.unsqueeze(0), self.decoder(z)).mean(0)  # (B, width)
        score = terms.sum(-1)
        if self.config.score == "elbo":
            score = score + self._kl(mu, logvar)
        return score, terms
