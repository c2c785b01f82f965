"""How the LSTM turns errors into scores (``score_steps``, ``score_lookahead``), its settings' errors, and its detection
quality on the NAB series shipped with the package, measured the field's way (VUS-PR)."""

from __future__ import annotations

import numpy as np
import pytest
from unusual.models import Detector
from unusual.models.lstm import LSTMConfig
from unusual.models.vus import series_period, vus
from unusual.ray_jobs.sample_data import load

TRAIN = {"epochs": 8, "seed": 0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"score_steps": 0}, "score_steps must be between 1 and window (64); got 0"),
        ({"window": 8, "score_steps": 9}, "score_steps must be between 1 and window (8); got 9"),
        ({"train_steps": -1}, "train_steps must be between 0 and window (64); got -1"),
        ({"score_lookahead": -1}, "score_lookahead must be >= 0; got -1"),
    ],
)
def test_bad_step_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError) as e:
        LSTMConfig(**kwargs)
    assert str(e.value) == message


def test_score_steps_default_to_half_the_window():
    assert LSTMConfig().window == 64
    assert LSTMConfig().score_steps == 32
    assert LSTMConfig(window=12).score_steps == 6
    assert LSTMConfig(window=1).score_steps == 1
    assert LSTMConfig(window=12, score_steps=12).score_steps == 12


def test_lookahead_defaults_to_score_steps():
    assert LSTMConfig().score_lookahead == 32
    assert LSTMConfig(window=12, score_steps=5).score_lookahead == 5
    assert LSTMConfig(score_lookahead=0).score_lookahead == 0
    assert LSTMConfig(score_lookahead=100).score_lookahead == 100  # may reach past the window


def test_bundles_from_before_the_lookahead_score_causally():
    from unusual.models.registry import family

    stored = {"window": 16, "score_steps": 8}  # a manifest written before score_lookahead existed
    assert family("lstm").stored_config(stored).score_lookahead == 0


@pytest.fixture(scope="module")
def sine_models():
    t = np.arange(1200, dtype=np.float32)
    train = np.stack([np.sin(t / 6), np.cos(t / 9)], axis=1)
    models = {k: Detector("lstm", window=16, score_steps=k, score_lookahead=0, **TRAIN).fit(train) for k in (1, 16)}
    models["ahead"] = Detector("lstm", window=16, score_steps=16, **TRAIN).fit(train)  # look-ahead 16, the default
    test = np.stack([np.sin(t[:400] / 6), np.cos(t[:400] / 9)], axis=1)
    test[200] += 4.0  # one spiked row
    return models, test


def test_a_spike_raises_the_next_window_of_scores_only_when_they_average_the_window(sine_models):
    models, test = sine_models
    for k in (1, 16):
        s = models[k].score(test)
        before = s[150:200].max()
        after = s[201:216]  # the 15 rows after the spike: their windows still hold it
        later = s[240:300].max()
        assert s[200] > 5 * before, k
        if k == 16:
            assert after.min() > 2 * before  # the spike's error is in each of these rows' windows
        else:
            assert np.median(after) < s[200] / 5  # each row scored by its own step only
        assert later < 2 * before  # and once out of the window, back to normal


def test_the_lookahead_raises_the_rows_before_a_spike_and_centres_its_peak(sine_models):
    models, test = sine_models
    causal, ahead = models[16].score(test), models["ahead"].score(test)
    normal = causal[150:180].max()
    assert causal[184:200].max() < 2 * normal  # causal: nothing before the spike
    assert np.all(np.diff(ahead[184:201]) > 0)  # the spike is within the next 16 rows: they rise towards it
    assert ahead[192:200].min() > 2 * normal
    assert ahead[150:180].max() < 2 * normal  # but not of rows further back
    # the peak moves from the rows just after the spike (trailing average) to the spike itself
    assert abs(int(np.argmax(ahead)) - 200) < abs(int(np.argmax(causal)) - 200) or int(np.argmax(ahead)) == 200
    assert ahead[-1] == pytest.approx(causal[-1], rel=1e-6)  # the last row has no rows after it


def _nab(name: str):
    t = load(name).to_pandas()
    x, y = t[["value"]].to_numpy(np.float32), t["label"].to_numpy().astype(int)
    cut = min(int(0.15 * len(t)), int(np.argmax(y)))  # NAB's probationary period, before the first window
    return x[:cut], x[cut:], y[cut:]


# Measured with the defaults (window 64, score_steps 32, score_lookahead 32; seed 0, 8 epochs) when the floors were
# set: ec2 0.469, machine temperature 0.284; causal (score_lookahead=0) 0.313 and 0.279; with score_steps=1 too (each
# row scored by its own step, the first rule) 0.147 and 0.321. Floors: about 0.06 under the measured values, so the
# ec2 floor fails if scoring falls back to causal or to one step (machine temperature's one long anomaly is found
# either way).
FLOORS = {"nab_ec2_request_latency": 0.40, "nab_machine_temperature": 0.22}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_vus_pr_floor_on_nab(name):
    train, test, label = _nab(name)
    scores = Detector("lstm", **TRAIN).fit(train).score(test)
    assert scores.shape == (len(test),)
    got = vus(label, scores, series_period(test[:, 0]))["vus_pr"]
    assert got >= FLOORS[name], got
