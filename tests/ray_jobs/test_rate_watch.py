"""The anomaly-rate watch (``unusual.ray_jobs.rate_watch``): its tail probabilities are the Beta-Binomial's
(exact rational sums, and scipy's where it is installed), its false-alarm rate under the calibration's
model is at most alpha, it stays quiet on random partitions of real held-out data and speaks on a broken
feed, and its Prometheus text parses.

Measured at writing (torch CPU, cardio, seed 0, an ae of 10 epochs on a random half; its threshold: 137
validation scores at 1 %, k = 1): 5 of the 916 held-out rows flagged; 0 alarms over the 50 held-out partitions
of 18 rows (the smallest two-sided p 0.44); the partition whose f00 arrives x10 flags 6 of its 18 rows,
p = 1.3e-5, a high alarm. The held-out anomalies concentrated into one partition (all 77 plus 77 normal rows)
flag only 5 of its 154 rows (3.2 %, p = 0.27, no alarm): at contamination 0.01 the threshold flags the few
most extreme anomalies only (5 of 77), and with k = 1 of 137 calibration scores a high alarm needs >= ~7 %
of a partition flagged. The watch is for broken feeds, not for detecting anomalies.
"""

from __future__ import annotations

import math
import re
import time
from fractions import Fraction

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from unusual.models import Detector
from unusual.ray_jobs import sample_data
from unusual.ray_jobs.rate_watch import RateCheck, check_rate, prometheus_text, tails

# --------------------------------------------------------------------------- the tails, against exact sums


def _exact_pmf(n: int, contamination: float, n_cal: int | None) -> list[Fraction]:
    """The pmf as exact rationals: Beta-Binomial(n, k + 1, n_cal - k + 1) with integer parameters (Beta
    functions of integers are ratios of factorials), or Binomial(n, contamination)."""
    if n_cal is None:
        p = Fraction(contamination)
        return [math.comb(n, x) * p**x * (1 - p) ** (n - x) for x in range(n + 1)]
    k = round(contamination * n_cal)
    a, b = k + 1, n_cal - k + 1

    def beta(p: int, q: int) -> Fraction:
        return Fraction(math.factorial(p - 1) * math.factorial(q - 1), math.factorial(p + q - 1))

    return [math.comb(n, x) * beta(x + a, n - x + b) / beta(a, b) for x in range(n + 1)]


CASES = [  # (rows, n_calibration, contamination): n_cal + 1 >= rows sums directly, below it the dual
    (40, 100, 0.05),
    (60, 9, 0.2),
    (25, 1, 0.01),
    (1, 50, 0.3),
    (80, 79, 0.49),
    (30, 300, 0.001),
    (50, None, 0.01),
    (70, None, 0.3),
]


@pytest.mark.parametrize("n,n_cal,contamination", CASES)
def test_the_tails_are_the_exact_sums_of_the_pmf(n, n_cal, contamination):
    pmf = _exact_pmf(n, contamination, n_cal)
    assert sum(pmf) == 1
    for x in range(n + 1):
        high, low = tails(n, x, contamination, n_cal)
        want_high, want_low = float(sum(pmf[x:])), float(sum(pmf[: x + 1]))
        assert high == pytest.approx(want_high, rel=1e-9, abs=1e-300), (x, "P(X >= x)")
        assert low == pytest.approx(want_low, rel=1e-9, abs=1e-300), (x, "P(X <= x)")


@pytest.mark.parametrize("n,n_cal,contamination", [(300, 137, 0.01), (500, 2000, 0.05), (1000, 40, 0.2)])
def test_the_tails_match_scipy(n, n_cal, contamination):
    stats = pytest.importorskip("scipy.stats")
    k = round(contamination * n_cal)
    ref = stats.betabinom(n, k + 1, n_cal - k + 1)
    binom = stats.binom(n, contamination)
    for x in range(0, n + 1, 7):
        high, low = tails(n, x, contamination, n_cal)
        # scipy's betabinom sums in floats and its sf is 1 - cdf: ~1e-12 absolute (the exact sums above agree
        # with ours where it does not, e.g. 5.11e-5 at x = 50 of (500, 2000, 0.05), scipy 1.5e-12 off)
        assert high == pytest.approx(ref.sf(x - 1), rel=1e-9, abs=1e-11)
        assert low == pytest.approx(ref.cdf(x), rel=1e-9, abs=1e-11)
        high, low = tails(n, x, contamination, None)
        assert high == pytest.approx(binom.sf(x - 1), rel=1e-9, abs=1e-12)
        assert low == pytest.approx(binom.cdf(x), rel=1e-9, abs=1e-12)


def test_partitions_of_ten_million_rows_take_milliseconds():
    n = 10**7
    worst = 0.0
    for n_cal in (None, 2, 137, 10**4, 10**6, 10**8):
        for x in (0, 10**5 - 2000, 10**5, 10**5 + 2000, 10**6, n):
            start = time.perf_counter()
            high, low = tails(n, x, 0.01, n_cal)
            worst = max(worst, time.perf_counter() - start)
            assert 0 <= high <= 1 and 0 <= low <= 1 and high + low >= 1 - 1e-9, (n_cal, x, high, low)
    assert worst < 0.05, f"slowest tail of a 10^7-row partition: {worst * 1e3:.1f} ms"


# --------------------------------------------------------------------------- the alarm


@pytest.mark.parametrize("rows,n_cal,contamination", [(2000, 500, 0.05), (400, 137, 0.01)])
def test_the_false_alarm_rate_under_the_model_is_at_most_alpha(rows, n_cal, contamination):
    """Partitions drawn from the calibration's model (p from the Beta, then the count from the Binomial)
    alarm at most alpha of the time; a plain Binomial, blind to the threshold's own uncertainty, does not."""
    alpha, draws = 0.05, 4000
    rng = np.random.default_rng(7)
    k = round(contamination * n_cal)
    counts = rng.binomial(rows, rng.beta(k + 1, n_cal - k + 1, size=draws))
    alarms = [check_rate("p", "v", rows, int(x), contamination, n_cal, alpha=alpha).alarm for x in counts]
    share = np.mean([a is not None for a in alarms])
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) / draws)
    assert share <= alpha + tolerance, f"{share:.4f} of {draws} partitions alarmed, alpha {alpha}"
    naive = np.mean([check_rate("p", "v", rows, int(x), contamination, None, alpha=alpha).alarm is not None
                     for x in counts])
    assert naive > 2 * alpha, f"the plain Binomial alarmed on only {naive:.4f}"


def test_a_rate_jump_and_a_collapse_alarm_and_say_so():
    high = check_rate("dt=2026-12-07/hour=13", "ae-1", 3120, 1285, 0.01, 137)
    assert high.alarm == "high" and high.p_high < 1e-20 and high.p_low == 1.0
    line = high.line()
    assert line.startswith("anomaly-rate watch: partition dt=2026-12-07/hour=13: 41.2 % of 3,120 rows flagged")
    assert "(model ae-1: 1.0 % expected; p = " in line and line.endswith("< 0.001): check the upstream data")
    low = check_rate("dt=2026-12-07", "ae-1", 100_000, 0, 0.01, 10_000)
    assert low.alarm == "low" and low.p_low < 5e-4 and "0.0 % of 100,000 rows" in low.line()
    quiet = check_rate("dt=2026-12-07", "ae-1", 100_000, 1040, 0.01, 10_000)
    assert quiet.alarm is None and quiet.p_value > 0.1 and quiet.line().endswith("as expected")
    with pytest.raises(ValueError):
        check_rate("p", "v", 10, 11, 0.01, 100)
    with pytest.raises(Exception):  # noqa: B017 - frozen
        high.alarm = None


def test_a_partition_without_rows_is_not_tested():
    check = check_rate("dt=2026-12-07/hour=03", "ae-1", 0, 0, 0.01, 137)
    assert check.alarm is None and check.rate is None and check.p_high is None and check.p_low is None
    assert check.reason == "no rows scored" and "not tested" in check.line()
    assert 'unusual_partition_anomaly_rate{partition="dt=2026-12-07/hour=03",model_version="ae-1"} NaN' in (
        prometheus_text([check]))


# --------------------------------------------------------------------------- on real data


@pytest.fixture(scope="module")
def cardio_watch():
    """The protocol users have: an ae trained on a random half of cardio (anomalies in, label out), the
    other half scored: the detector, its threshold record, the held-out rows, their flags and labels."""
    table = sample_data.load("cardio")
    labels, features = table.column("label").to_numpy(), table.drop_columns(["label"])
    rng = np.random.default_rng(0)
    perm = rng.permutation(table.num_rows)
    train, held = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: 3 s single-threaded, 15 s on two busy cores
    try:
        det = Detector("ae", epochs=10, seed=0, verbose=False).fit(features.take(train))
    finally:
        torch.set_num_threads(threads)
    rows = features.take(held)
    return det, det.bundle_.manifest.threshold, rows, det.predict(rows), labels[held]


def _check(det, threshold, name: str, flags) -> RateCheck:
    return check_rate(name, det.version, len(flags), int(np.sum(flags)), threshold.contamination,
                      threshold.n_scores)


def test_random_partitions_of_held_out_real_data_do_not_alarm(cardio_watch):
    det, threshold, _, flags, _ = cardio_watch
    rng = np.random.default_rng(1)
    assert threshold.fit_on == "validation" and threshold.n_scores > 100
    size = len(flags) // 50
    parts = rng.permutation(len(flags))[: 50 * size].reshape(50, size)
    checks = [_check(det, threshold, f"part={i}", flags[p]) for i, p in enumerate(parts)]
    alarms = [c.line() for c in checks if c.alarm]
    assert len(alarms) <= 2, f"{len(alarms)} of 50 partitions of {size} held-out rows alarmed:\n" + "\n".join(alarms)
    text = prometheus_text(checks)
    assert text.count("unusual_partition_rate_alarm{") == 50 and text.count("# TYPE ") == 4


def test_a_broken_feed_alarms_high_on_real_data(cardio_watch):
    """A partition whose feature f00 arrives in another unit (x10) is mostly flagged: a high alarm. The held-out
    anomalies concentrated into one partition raise its rate, but at contamination 0.01 only the most extreme
    few are flagged (see the module docstring): not the watch's business."""
    det, threshold, rows, flags, labels = cardio_watch
    rng = np.random.default_rng(2)
    part = rows.take(rng.permutation(rows.num_rows)[: rows.num_rows // 50])
    broken = part.set_column(0, "f00", pc.multiply(part["f00"], 10.0))
    check = _check(det, threshold, "dt=broken", det.predict(broken))
    assert check.alarm == "high", check.line()
    anomalies = np.flatnonzero(labels == 1)
    concentrated = np.concatenate([anomalies, rng.choice(np.flatnonzero(labels == 0), len(anomalies), replace=False)])
    dense = _check(det, threshold, "dt=dense", flags[concentrated])
    assert dense.rate > threshold.contamination and dense.p_high < 0.5, dense.line()


# --------------------------------------------------------------------------- Prometheus

_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}"
    rf"(?:,[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE})*)\}} "
    r"(?P<value>[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|Inf|NaN))$"
)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def test_the_prometheus_text_follows_the_exposition_format():
    checks = [
        check_rate('dt=2026-12-07/hour=13 "late"', "ae-1", 3120, 1285, 0.01, 137),
        check_rate("dt=2026-12-07/hour=14\\backup\nretry", "ae-1", 3120, 31, 0.01, 137),
        check_rate("dt=2026-12-07/hour=15", "ae-2", 0, 0, 0.01, None),
    ]
    text = prometheus_text(checks)
    assert text.endswith("\n")
    seen, samples = [], {}
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name, rest = line[2:].split(" ", 2)
            seen.append((kind, name))
            assert kind in ("HELP", "TYPE") and (kind == "HELP" or rest == "gauge"), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = dict(re.findall(rf"([a-zA-Z_][a-zA-Z0-9_]*)=({_LABEL_VALUE})", m["labels"]))
        samples[m["name"], _unescape(labels["partition"][1:-1])] = m["value"]
    names = ["unusual_partition_anomaly_rate", "unusual_partition_rows", "unusual_partition_anomalies",
             "unusual_partition_rate_alarm"]
    assert seen == [(kind, n) for n in names for kind in ("HELP", "TYPE")]
    assert samples["unusual_partition_rate_alarm", 'dt=2026-12-07/hour=13 "late"'] == "1"
    assert samples["unusual_partition_rate_alarm", "dt=2026-12-07/hour=14\\backup\nretry"] == "0"
    assert float(samples["unusual_partition_anomaly_rate", 'dt=2026-12-07/hour=13 "late"']) == 1285 / 3120
    assert samples["unusual_partition_rows", "dt=2026-12-07/hour=15"] == "0"
    assert samples["unusual_partition_anomaly_rate", "dt=2026-12-07/hour=15"] == "NaN"


def test_the_prometheus_text_parses_with_the_reference_client():
    parser = pytest.importorskip("prometheus_client.parser")
    checks = [check_rate('a "quoted"\\partition\n', "ae-1", 100, 50, 0.01, 137),
              check_rate("b", "ae-1", 100, 1, 0.01, 137)]
    families = {f.name: f for f in parser.text_string_to_metric_families(prometheus_text(checks))}
    assert set(families) == {"unusual_partition_anomaly_rate", "unusual_partition_rows",
                             "unusual_partition_anomalies", "unusual_partition_rate_alarm"}
    alarm = {s.labels["partition"]: s.value for s in families["unusual_partition_rate_alarm"].samples}
    assert alarm == {'a "quoted"\\partition\n': 1.0, "b": 0.0}
    assert all(f.type == "gauge" for f in families.values())
