"""LSTM over sliding windows of a multivariate time series, one series per entity.

Two objectives:

- ``forecast``: the window is the ``window`` rows before row t plus row t; the
  LSTM reads the first ``window`` rows and predicts row t. Score of row t = the
  mean squared prediction error.
- ``reconstruct``: an LSTM encoder-decoder reads the ``window`` rows ending at
  row t and reconstructs them. Score of row t = the mean squared reconstruction
  error of its own (last) step.

Every row gets exactly one score. The rule for rows with less history than the
window (the start of a series, or a series shorter than the window) is edge
padding: the missing earlier rows are copies of the series' first row (see
:mod:`unusual.models.windows`). Training uses only full windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import SquaredErrorModule


@dataclass
class LSTMConfig:
    window: int = 32
    objective: str = "forecast"  # "forecast" or "reconstruct"
    hidden: int = 64
    layers: int = 1
    entity_column: str | None = None
    time_column: str | None = None
    normalize_errors: bool = True  # each column's error in units of its usual level (SquaredErrorModule)

    def __post_init__(self):
        if self.objective not in ("forecast", "reconstruct"):
            raise ValueError(f"objective must be 'forecast' or 'reconstruct'; got {self.objective!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1; got {self.window}")

    @property
    def context_length(self) -> int:
        """Rows in one input window, the scored row included."""
        return self.window + 1 if self.objective == "forecast" else self.window


class LSTMDetector(SquaredErrorModule):
    def __init__(self, config: LSTMConfig, width: int):
        super().__init__()
        self.config = config
        self.encoder = nn.LSTM(width, config.hidden, num_layers=config.layers, batch_first=True)
        if config.objective == "reconstruct":
            self.decoder = nn.LSTM(config.hidden, config.hidden, num_layers=config.layers, batch_first=True)
        self.head = nn.Linear(config.hidden, width)
        self._init_error_scale(width)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def _predict(self, x):
        """Returns (prediction, target); both (B, width) for forecast, (B, W, width) otherwise."""
        if self.config.objective == "forecast":
            out, _ = self.encoder(x[:, :-1])  # (B, W, hidden)
            return self.head(out[:, -1]), x[:, -1]
        _, (h, _) = self.encoder(x)  # h: (layers, B, hidden)
        rep = h[-1].unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, W, hidden)
        out, _ = self.decoder(rep)
        return self.head(out), x

    def loss(self, x):
        pred, target = self._predict(x)
        return ((pred - target) ** 2).mean()

    def errors(self, x):
        pred, target = self._predict(x)
        err = (pred - target) ** 2
        return err[:, -1] if err.dim() == 3 else err
