"""The anomaly-rate watch of incremental batch scoring: is a partition's flagged share what the model's
calibration predicts, or has the upstream feed broken (everything flagged, or nothing)?

The rule. A model's threshold is the (1 - ``contamination``) quantile of ``n_cal`` validation scores
(the bundle manifest's threshold record: ``contamination`` and ``n_scores``), so the probability ``p``
that a new row like the training data scores above it is itself uncertain. With ``k = round(contamination
* n_cal)`` calibration scores above the threshold, ``p ~ Beta(k + 1, n_cal - k + 1)`` (a uniform prior's
posterior), and the anomalies ``X`` among a partition's ``n`` scored rows are then
``Beta-Binomial(n, k + 1, n_cal - k + 1)``; when ``n_cal`` is unknown (``None``), ``X ~ Binomial(n,
contamination)``. Both one-sided tails are computed exactly for the observed count ``x``:
``p_high = P(X >= x)`` and ``p_low = P(X <= x)``. The alarm is ``"high"`` when ``p_high < alpha / 2`` and
``"low"`` when ``p_low < alpha / 2``, so under the model a partition raises a false alarm with probability
at most ``alpha`` (default 1e-3); the two-sided p-value reported is ``min(1, 2 * min(p_high, p_low))``.
A partition with no scored rows is not tested (``alarm`` None, ``reason`` says why).

The Beta term is what makes the watch usable: a threshold fit on ~140 validation scores at 1 % has an
exceedance probability anywhere between ~0.2 % and ~4 % (95 %), and a plain Binomial test ignores that: on
partitions drawn from the model it alarms on ~30 % of partitions of 400-2,000 rows at alpha = 0.05 (the
Beta-Binomial: <= 5 %). The price is power: with k = 1 of 137 calibration scores a partition alarms high
only from ~7 % flagged (1 % expected) and low only with >= ~6,000 rows and none flagged; with 10^4
calibration scores, from ~1.5 % and below ~0.6 % on 10^4 rows. It is a model of the ``quantile`` rule;
for a ``pot`` threshold, which extrapolates beyond its sample, it is an approximation.

How the tails are summed. The pmf is log-concave in ``x`` (Beta parameters >= 1), so each tail is summed
from ``x`` outward, away from the mode (the other side is one minus the complementary tail): in log space,
in vectorised chunks from the ratio of successive terms, each chunk anchored on an exact ``math.lgamma``
log-pmf, stopping once the geometric bound on what is left is below 1e-16 of the sum. With integer Beta
parameters ``a = k + 1``, ``b = n_cal - k + 1`` (``m = a + b - 1 = n_cal + 1``) a tail has an exact dual
(``p`` as the ``a``-th of ``m`` uniform order statistics): ``P(X >= x) = P(Y <= a - 1)`` with
``Y ~ Beta-Binomial(m, x, n - x + 1)``, and ``P(X <= x) = P(Y' <= b - 1)`` with ``Y' ~ Beta-Binomial(m,
n - x, x + 1)``; it is summed instead when ``m < n``. Either way at most ``min(n, n_cal) + 2`` terms, in
practice a few thousand: about a millisecond for a partition of 10^7 rows.

Pure: numpy, the standard library and pydantic (no Ray, no PyTorch, no scipy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

ALPHA = 1e-3  # the default false-alarm probability per partition
_TOL = math.log(1e-16)  # a walk stops once what is left is below this share of its sum (log)
_CHUNK, _MAX_CHUNK = 256, 1 << 16


# --------------------------------------------------------------------------- the distributions


@dataclass(frozen=True)
class _BetaBinomial:
    """Beta-Binomial(n, a, b): the anomalies among n rows when the exceedance probability is Beta(a, b)."""

    n: int
    a: float
    b: float

    def logpmf(self, x: int) -> float:
        n, a, b = self.n, self.a, self.b
        lg = math.lgamma
        return (lg(n + 1) - lg(x + 1) - lg(n - x + 1) + lg(x + a) + lg(n - x + b) - lg(n + a + b)
                + lg(a + b) - lg(a) - lg(b))

    def log_ratio(self, x: np.ndarray) -> np.ndarray:
        """log pmf(x + 1) - log pmf(x), for 0 <= x < n."""
        n, a, b = self.n, self.a, self.b
        return np.log(((n - x) * (x + a)) / ((x + 1.0) * (n - x - 1.0 + b)))


@dataclass(frozen=True)
class _Binomial:
    n: int
    p: float

    def logpmf(self, x: int) -> float:
        n, lg = self.n, math.lgamma
        return lg(n + 1) - lg(x + 1) - lg(n - x + 1) + x * math.log(self.p) + (n - x) * math.log1p(-self.p)

    def log_ratio(self, x: np.ndarray) -> np.ndarray:
        return np.log((self.n - x) / (x + 1.0)) + (math.log(self.p) - math.log1p(-self.p))


def _walk(dist, start: int, step: int) -> float:
    """log of the sum of ``dist``'s pmf from ``start`` to the end of its support in direction ``step``
    (+1 or -1). Terms come in vectorised chunks from their successive ratios, each chunk anchored on an exact
    log-pmf; the walk stops when the rest is negligible, bounded by a geometric series once the terms
    decrease (the pmf is log-concave, so they keep decreasing faster)."""
    end = dist.n if step > 0 else 0
    total, x, size = -math.inf, start, _CHUNK
    while True:
        xs = (x + step * np.arange(min(size, abs(end - x) + 1))).astype(np.float64)
        steps = dist.log_ratio(xs[:-1]) if step > 0 else -dist.log_ratio(xs[1:])
        logs = dist.logpmf(x) + np.concatenate(([0.0], np.cumsum(steps)))
        top = float(logs.max())
        total = float(np.logaddexp(total, top + math.log(float(np.exp(logs - top).sum()))))
        last = int(xs[-1])
        if last == end:
            return total
        ratio = float(dist.log_ratio(np.array([last if step > 0 else last - 1.0]))[0]) * step
        if ratio < 0 and float(logs[-1]) + ratio - math.log(-math.expm1(ratio)) < total + _TOL:
            return total
        x, size = last + step, min(2 * size, _MAX_CHUNK)


def _upper(dist, x: int) -> float:
    """P(X >= x)."""
    if x <= 0:
        return 1.0
    if x > dist.n:
        return 0.0
    if x == dist.n or dist.log_ratio(np.array([float(x)]))[0] <= 0:  # at or past the mode: walk up
        return math.exp(_walk(dist, x, +1))
    return min(1.0, max(0.0, -math.expm1(_walk(dist, x - 1, -1))))


def _lower(dist, x: int) -> float:
    """P(X <= x)."""
    if x >= dist.n:
        return 1.0
    if x < 0:
        return 0.0
    if x == 0 or dist.log_ratio(np.array([x - 1.0]))[0] >= 0:  # at or before the mode: walk down
        return math.exp(_walk(dist, x, -1))
    return min(1.0, max(0.0, -math.expm1(_walk(dist, x + 1, +1))))


def tails(rows: int, anomalies: int, contamination: float, n_calibration: int | None) -> tuple[float, float]:
    """``(P(X >= anomalies), P(X <= anomalies))`` for ``X`` the anomalies among ``rows`` rows (the module's
    docstring: Beta-Binomial, or Binomial without ``n_calibration``)."""
    n, x = rows, anomalies
    if n_calibration is None:
        dist = _Binomial(n, contamination)
        return _upper(dist, x), _lower(dist, x)
    k = int(round(contamination * n_calibration))
    a, b = k + 1, n_calibration - k + 1
    m = a + b - 1
    if m >= n:
        dist = _BetaBinomial(n, a, b)
        return _upper(dist, x), _lower(dist, x)
    # the order-statistic dual: at most m + 1 terms whatever n
    high = 1.0 if x == 0 else _lower(_BetaBinomial(m, x, n - x + 1), a - 1)
    low = 1.0 if x == n else _lower(_BetaBinomial(m, n - x, x + 1), b - 1)
    return high, low


# --------------------------------------------------------------------------- the check


class RateCheck(BaseModel):
    """One partition's anomaly-rate test (:func:`check_rate`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str  # e.g. "dt=2026-12-07/hour=13"
    model_version: str
    rows: int  # scored rows
    anomalies: int  # of them flagged
    rate: float | None  # anomalies / rows; None without rows
    expected_rate: float  # the threshold's contamination
    n_calibration: int | None  # the scores the threshold was fit on (None: unknown, a plain Binomial)
    p_high: float | None  # P(X >= anomalies) under the calibration's model
    p_low: float | None  # P(X <= anomalies)
    alpha: float  # false-alarm probability per partition (alpha / 2 per side)
    alarm: str | None  # "high", "low" or None
    reason: str | None = None  # why the partition was not tested

    @property
    def p_value(self) -> float | None:
        """The two-sided p-value, ``min(1, 2 * min(p_high, p_low))``: an alarm is raised when it is below alpha."""
        if self.p_high is None or self.p_low is None:
            return None
        return min(1.0, 2.0 * min(self.p_high, self.p_low))

    def line(self) -> str:
        """One human line (for stderr when :attr:`alarm` is set)."""
        head = f"anomaly-rate watch: partition {self.partition}"
        if self.rate is None:
            return f"{head}: not tested ({self.reason})"
        p = self.p_value
        shown = f"p < {math.ulp(0.0):.0e}" if p == 0 else f"p = {p:.2g}"
        verdict = f"{shown} < {self.alpha:g}): check the upstream data" if self.alarm else f"{shown}): as expected"
        return (f"{head}: {_percent(self.rate)} % of {self.rows:,} rows flagged (model {self.model_version}: "
                f"{_percent(self.expected_rate)} % expected; {verdict}")


def _percent(share: float) -> str:
    pct = 100.0 * share
    return f"{pct:.1f}" if pct == 0 or pct >= 0.1 else f"{pct:.2g}"


def check_rate(
    partition: str,
    model_version: str,
    rows: int,
    anomalies: int,
    contamination: float,
    n_calibration: int | None,
    alpha: float = ALPHA,
) -> RateCheck:
    """Test one partition's flagged share against the model's calibration (the module's docstring).

    ``contamination`` and ``n_calibration`` are the bundle manifest's threshold record
    (``manifest.threshold.contamination`` and ``.n_scores``)."""
    if not 0 < contamination < 1:
        raise ValueError(f"contamination must be in (0, 1), got {contamination}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_calibration is not None and n_calibration < 1:
        raise ValueError(f"n_calibration must be a positive count or None, got {n_calibration}")
    if rows < 0 or not 0 <= anomalies <= max(rows, 0):
        raise ValueError(f"need 0 <= anomalies <= rows, got {anomalies} of {rows}")
    common = dict(partition=partition, model_version=model_version, rows=rows, anomalies=anomalies,
                  expected_rate=contamination, n_calibration=n_calibration, alpha=alpha)
    if rows == 0:
        return RateCheck(**common, rate=None, p_high=None, p_low=None, alarm=None, reason="no rows scored")
    p_high, p_low = tails(rows, anomalies, contamination, n_calibration)
    alarm = "high" if p_high < alpha / 2 else "low" if p_low < alpha / 2 else None
    return RateCheck(**common, rate=anomalies / rows, p_high=p_high, p_low=p_low, alarm=alarm)


# --------------------------------------------------------------------------- Prometheus


METRICS = (
    # name, help, value of a check
    ("unusual_partition_anomaly_rate", "share of the partition's scored rows flagged anomalous",
     lambda c: math.nan if c.rate is None else c.rate),
    ("unusual_partition_rows", "rows of the partition scored", lambda c: c.rows),
    ("unusual_partition_anomalies", "rows of the partition flagged anomalous", lambda c: c.anomalies),
    ("unusual_partition_rate_alarm", "1 when the partition's anomaly rate is outside what the calibration "
     "predicts (false-alarm probability alpha)", lambda c: int(c.alarm is not None)),
)


def _label(value: str) -> str:
    """A label value escaped per the text exposition format: backslash, double quote, line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value == math.inf else "-Inf" if value == -math.inf else repr(float(value))


def prometheus_text(checks: list[RateCheck]) -> str:
    """The checks as Prometheus text exposition (gauges, ``# HELP`` and ``# TYPE`` once per metric), e.g. for
    a node exporter's textfile collector or a Pushgateway; labelled ``partition`` and ``model_version``."""
    out = []
    for name, help_, value in METRICS:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        for c in checks:
            labels = f'partition="{_label(c.partition)}",model_version="{_label(c.model_version)}"'
            out.append(f"{name}{{{labels}}} {_number(value(c))}")
    return "\n".join(out) + "\n"
