"""Calibrating a trained module on a Ray Dataset of encoded rows (or windows), without collecting them:
the calibration of squared-error families (per-column error scale, latent statistics), then the
threshold on the full distribution of validation scores. The in-memory twin is ``Detector.fit``
(``calibrate`` + ``fit_threshold``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import torch

from ..models.columns import as_float
from ..models.manifest import ThresholdRecord
from ..models.registry import family
from ..models.stats import NumStats
from ..models.thresholds import fit_threshold_tail, tail_fraction
from ..models.training import calibrates_on_every_row, calibration_sums, set_calibration
from .aggregates import merged

# --------------------------------------------------------------------------- the module on Ray Data blocks


_MODULES: dict = {}  # this worker process's module for the state it was last given


def _block_module(kind: str, model_config: dict, width: int, state):
    """The module with the weights ``state`` (an object ref), built once per worker process and state:
    Ray Data calls a task function once per block, and the blocks of one pass share the state."""
    import ray

    ref = isinstance(state, ray.ObjectRef)
    if not ref or state.hex() not in _MODULES:
        fam = family(kind)
        module = fam.module(fam.config(**model_config), width)
        module.load_state_dict(ray.get(state) if ref else state)
        if not ref:
            return module.eval()
        _MODULES.clear()
        _MODULES[state.hex()] = module.eval()
    return _MODULES[state.hex()]


def _block_x(block: pa.Table) -> torch.Tensor:
    from ray.data.block import BlockAccessor

    x = BlockAccessor.for_block(block).to_numpy("x")  # zero-copy and read-only: torch gets a copy
    return torch.tensor(x, dtype=torch.float32)


def _score_block(batch: dict, kind: str, model_config: dict, width: int, state) -> dict:
    module = _block_module(kind, model_config, width, state)
    with torch.inference_mode():
        s, _ = module.score_terms(torch.tensor(batch["x"], dtype=torch.float32))  # read-only: torch gets a copy
    return {"score": s.double().numpy()}


@dataclass
class CalibrationSums:
    """Sums of a family's per-row calibration statistics over some rows: mergeable."""

    total: np.ndarray
    rows: int

    def merge(self, other: CalibrationSums) -> CalibrationSums:
        return CalibrationSums(self.total + other.total, self.rows + other.rows)


def _block_calibration_sums(block: pa.Table, kind: str, model_config: dict, width: int, state):
    if block.num_rows == 0:
        return None
    total, rows = calibration_sums(_block_module(kind, model_config, width, state), [_block_x(block)])
    return CalibrationSums(total.numpy(), rows)


def calibrate_at_scale(
    module, data, kind: str, model_config: dict, width: int, thr_cfg, every=None
) -> ThresholdRecord:
    """Calibrate ``module`` (error scale, latent statistics) on ``data`` (a Ray Dataset with an ``x``
    column of encoded rows or windows, ``width`` features wide) and fit the threshold on its scores;
    returns the threshold record. A family with ``calibrate_on = "all"`` calibrates on ``every`` (the
    training and validation rows) instead of ``data``. The calibration sums reduce through Ray Data's
    aggregation API; the scores' top tail is all that is collected."""
    import ray

    if hasattr(module, "set_calibration"):  # a squared-error family: error scale (and latent statistics)
        state = ray.put(module.state_dict())
        summarise = partial(_block_calibration_sums, kind=kind, model_config=model_config, width=width, state=state)
        rows = every if every is not None and calibrates_on_every_row(module) else data
        sums = merged(rows, summarise)
        if sums is not None:
            set_calibration(module, sums.total, sums.rows)
    kwargs = {"kind": kind, "model_config": model_config, "width": width, "state": ray.put(module.state_dict())}
    scores = data.map_batches(_score_block, batch_format="numpy", fn_kwargs=kwargs).materialize()
    return fit_threshold_at_scale(scores, thr_cfg)


# --------------------------------------------------------------------------- the threshold


def _score_stats(block: pa.Table) -> NumStats:
    return NumStats.of(as_float(block.column("score")))


def fit_threshold_at_scale(scores, cfg) -> ThresholdRecord:
    """The threshold over a Ray Dataset of scores (a float ``score`` column) without collecting them all.

    Pass 1 merges per-block counts and reservoir samples (a Ray Data aggregation of
    :class:`unusual.models.stats.NumStats`) to find a score below which at most the needed
    top tail lies (with a safety margin); pass 2 collects the exact scores above it. The
    result equals fitting on every score (``unusual.models.thresholds.fit_threshold_tail``).
    """
    stats = merged(scores, _score_stats)
    if stats is None:
        raise ValueError("cannot fit a threshold: the validation split is empty")
    n = stats.count
    if n == 0:
        raise ValueError("cannot fit a threshold on zero finite scores")
    need = int(math.ceil(tail_fraction(cfg) * n)) + 2
    frac = min(1.0, 2.0 * need / n + 0.001)
    lower = float(np.quantile(stats.sample, 1.0 - frac)) if frac < 1.0 else -math.inf
    while True:
        tail = np.sort(
            np.concatenate(
                [b["score"] for b in scores.filter(expr=f"score >= {lower!r}").iter_batches(batch_format="numpy")]
                or [np.empty(0)]
            )
        )
        tail = tail[np.isfinite(tail)]
        if tail.size >= need or lower == -math.inf:
            break
        lower = -math.inf  # the sample misjudged the tail: take every score
    rec = fit_threshold_tail(tail, n, cfg)
    rec.collected = int(tail.size)
    return rec
