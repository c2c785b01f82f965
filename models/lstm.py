"""LSTM over sliding windows of a multivariate time series, one series per entity.

Two objectives:

- ``forecast``: the window is the ``window`` rows before row t plus row t; the
  LSTM reads the first ``window`` rows and predicts row t (and, at each earlier
  step, the row after it); the error of a step is its squared prediction error.
- ``reconstruct``: an LSTM encoder-decoder reads the ``window`` rows ending at
  row t and reconstructs them; the error of a step is its squared
  reconstruction error.

A row's score averages the errors of the last ``score_steps`` steps of its
window (default: half the window): the row itself and the rows just before it,
each predicted from the rows before it (forecast) or reconstructed
(reconstruct). Anomalies last longer than one row, and the average of many
errors separates them from the one-row spikes of ordinary noise; the steps of
the window's first half are left out because they were predicted from little
context. ``train_steps`` sets how many trailing steps of each window the
training loss covers (0: every step).

That average trails the row: an anomaly raises it only as its errors come in,
so the score peaks up to ``score_steps`` rows late. ``score_lookahead`` (default:
``score_steps``) centres it: a row's final score is the mean of its own trailing
score and those of the next ``score_lookahead`` rows of the same series, i.e. a
triangular average of the errors from ``score_steps`` rows before the row to
``score_lookahead`` rows after it (TSB-AD's window methods likewise give each row
the mean over every window that covers it). The rows near the end of what one
call scores (a request, a batch, a series) average the rows that follow them
there, so the newest row's score is its trailing score, known at once, and an
earlier row's score settles ``score_lookahead`` rows later. ``score_lookahead=0``
keeps every score causal. The :class:`unusual.models.Scorer` applies it, since it
sees the rows in series order.

Every row gets exactly one score. The rule for rows with less history than the
window (the start of a series, or a series shorter than the window) is edge
padding: the missing earlier rows are copies of the series' first row (see
:mod:`unusual.models.windows`). Training uses only full windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import NORMALIZE_HELP, SquaredErrorModule
from .params import param, validate


@dataclass
class LSTMConfig:
    window: int = param(64, ge=1, help="rows of history")
    objective: str = param("forecast", choices=("forecast", "reconstruct"), help=(
        "`forecast` (predict row t from the window before it) or `reconstruct` (encoder-decoder)"))
    hidden: int = param(64, ge=1, help="LSTM size (hidden units)")
    layers: int = param(1, ge=1, help="stacked LSTM layers")
    entity_column: str | None = param(None, help="series id column (each series is windowed on its own)")
    time_column: str | None = param(None, help="order column of each series (a stable sort)")
    normalize_errors: bool = param(True, help=NORMALIZE_HELP)
    error_floor: float = param(0.01, ge=0, help=(
        "with `normalize_errors`, no column's error scale below this fraction of the mean column error"))
    score_steps: int | None = param(None, shown="half the window", help=(
        "a row's score is the mean error of this many steps ending at the row (each predicted from the rows "
        "before it): anomalies last, noise spikes do not; 1 = the row's own error only (what LSTM bundles "
        "written before this option do)"))
    train_steps: int | None = param(None, shown="1 (forecast), all (reconstruct)", help=(
        "trailing steps of each window in the training loss (0: all)"))
    score_lookahead: int | None = param(None, ge=0, shown="`score_steps`", help=(
        "centres the score: a row's score is the mean of its trailing score and those of the next this-many "
        "rows of its series, so a score peaks on the anomaly rather than up to `score_steps` rows after it "
        "(TSB-AD's window methods likewise average every window covering a row); the newest row of a call has "
        "its trailing score at once, an earlier row's settles this many rows later; 0 = causal (what LSTM "
        "bundles written before this option do)"))

    def __post_init__(self):
        validate(self)
        if self.score_steps is None:
            self.score_steps = max(1, self.window // 2)
        if not 1 <= self.score_steps <= self.window:
            raise ValueError(f"score_steps must be between 1 and window ({self.window}); got {self.score_steps}")
        if self.score_lookahead is None:
            self.score_lookahead = self.score_steps
        if self.train_steps is None:
            self.train_steps = 1 if self.objective == "forecast" else 0
        if not 0 <= self.train_steps <= self.window:
            raise ValueError(f"train_steps must be between 0 and window ({self.window}); got {self.train_steps}")

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

    def _predict(self, x, steps: int):
        """(prediction, target) of the last ``steps`` steps of each window (0: all), both (B, steps, width)."""
        if self.config.objective == "forecast":
            out, _ = self.encoder(x[:, :-1])  # (B, W, hidden): step j predicts row j + 1
            return self.head(out[:, -steps:]), x[:, 1:][:, -steps:]
        _, (h, _) = self.encoder(x)  # h: (layers, B, hidden)
        rep = h[-1].unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, W, hidden)
        out, _ = self.decoder(rep)
        return self.head(out[:, -steps:]), x[:, -steps:]

    def loss(self, x):
        pred, target = self._predict(x, self.config.train_steps)
        return ((pred - target) ** 2).mean()

    def errors(self, x):
        pred, target = self._predict(x, self.config.score_steps)
        return ((pred - target) ** 2).mean(dim=1)
