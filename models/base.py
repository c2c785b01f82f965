"""The contract every model family implements, and small shared layers."""

from __future__ import annotations

import torch
from torch import nn


class AnomalyModule(nn.Module):
    """Base class of the model families.

    ``x`` is a float32 batch: ``(B, width)`` for tabular families, or
    ``(B, context, width)`` windows for sequence families (``context`` given by
    :attr:`context_length`; the row being scored is the last step).
    """

    sequence = False

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of a batch (mean over rows)."""
        raise NotImplementedError

    def score_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores ``(B,)`` (higher = more anomalous) and per-column
        contributions ``(B, width)`` that rank the features behind each score."""
        raise NotImplementedError


def mlp(sizes: list[int], last_activation: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ReLU (and dropout, if any) between them, and after the last if asked."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def default_latent(width: int) -> int:
    """A bottleneck that compresses without starving small inputs."""
    return max(2, min(32, width // 4))
