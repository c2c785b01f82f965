"""The one training step and epoch loop shared by every model family and every runner.

``train_epochs`` is the loop both runners call: the in-memory API
(:func:`fit_module`: shuffled mini-batches of an indexable data set) and the Ray
Train worker (``unusual.ray_jobs.train_worker``: dataset shards, DDP). It runs
:func:`train_step` over each epoch's batches, measures the validation loss,
records the :class:`History` and asks the :class:`EarlyStopping`; what differs
between the runners comes in as hooks (where the batches come from, the
all-reduce of the loss sums, what to do after each epoch). Batch sizes come
from :func:`batch_size_for` in both. PyTorch and numpy only, never Ray.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .manifest import TrainingRecord
from .params import param, validate

log = logging.getLogger("unusual")


@dataclass
class TrainConfig:
    epochs: int = param(60, ge=1, help=(
        "maximum epochs; early stopping on the validation loss restores the best weights"))
    batch_size: int = param(128, ge=1, help="rows (or windows) per optimisation step (AdamW)")
    lr: float = param(1e-3, gt=0, help="AdamW's learning rate")
    weight_decay: float = param(1e-5, ge=0, help="AdamW's weight decay")
    val_fraction: float = param(0.15, ge=0, lt=1, help="held out for early stopping and for the threshold")
    patience: int = param(8, ge=1, help="epochs without improvement of the validation loss before stopping")
    grad_clip: float = param(5.0, ge=0, help="gradients clipped to this norm (0: off)")
    seed: int = param(0, ge=0, help="seed of the split, the weights and the batches")
    device: str = param("cpu", help='`cpu`, `cuda`, `cuda:1`, or `auto` (CUDA when present)')
    # The training data holds no anomalies (semi-supervised: cleaned, or normal by construction): the
    # family trains with its ``clean_defaults`` (models/registry.py) instead of the defaults for data
    # as users have it, anomalies included.
    clean: bool = param(False, help=(
        "the training data holds no anomalies: the `ae` and `vae` train with `epochs` 60, `patience` 8 and "
        "`trim` 0 unless given ([Data with anomalies, or clean data](#data-with-anomalies-or-clean-data))"))

    def __post_init__(self):
        validate(self)


@dataclass
class History:
    """What a training run records, the same way for every runner.

    Plain values only, so that the Ray worker's history travels in its
    checkpoints as ``asdict(history)`` (and comes back with :meth:`from_dict`).
    """

    train_loss: list[float] = field(default_factory=list)  # per epoch, row-weighted over all workers
    val_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)  # training samples per epoch (all workers)
    started_at_epoch: list[int] = field(default_factory=list)  # one entry per (re)start
    best_epoch: int = 0
    seconds: float = 0.0  # the sum of epoch_seconds
    stopped_early: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def record(self, train_loss: float, val_loss: float, samples: int, seconds: float) -> None:
        self.train_loss.append(train_loss)
        self.val_loss.append(val_loss)
        self.samples.append(int(samples))
        self.epoch_seconds.append(seconds)
        self.seconds = float(sum(self.epoch_seconds))

    def training_record(self, **how) -> TrainingRecord:
        """The manifest's ``training`` record: this history's summary, then ``how`` the run was made
        (which may say the distinct ``train_samples``: the last epoch's count may repeat a few)."""
        summary = {
            "train_loss": list(self.train_loss),
            "val_loss": list(self.val_loss),
            "best_epoch": int(self.best_epoch),
            "seconds": self.seconds,
            "stopped_early": bool(self.stopped_early),
            "train_samples": int(self.samples[-1]) if self.samples else 0,
        }
        return TrainingRecord(**{**summary, **how})


class EarlyStopping:
    """Tracks the best validation loss and its weights; says when to stop.

    Shared by the in-memory loop and the Ray Train loop; its state travels in
    the Ray checkpoints so a resumed run stops where an uninterrupted one would.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best = math.inf
        self.best_epoch = -1
        self.stale = 0
        self.best_state: dict | None = None

    @property
    def stopped(self) -> bool:
        """Whether the run had already stopped (a run resumed after its last epoch trains no more)."""
        return self.best_state is not None and self.stale >= self.patience

    def update(self, epoch: int, val_loss: float, module: torch.nn.Module) -> bool:
        """Record an epoch's validation loss; returns True when training should stop."""
        if self.best_state is None or val_loss < self.best - 1e-4 * abs(self.best):
            self.best, self.best_epoch, self.stale = val_loss, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            return False
        self.stale += 1
        return self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale, "best_state": self.best_state}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.best_epoch, self.stale = float(d["best"]), int(d["best_epoch"]), int(d["stale"])
        self.best_state = d["best_state"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Objective(torch.nn.Module):
    """Wraps a model family so that ``forward(x)`` is its training loss.

    DDP synchronises gradients through hooks on ``forward``, so the distributed
    runner wraps an ``Objective`` in DDP and both runners call the same
    :func:`train_step` on it.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.loss(x)


def trimmed_mean(per_row: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean of the per-row losses ``(B,)`` without the largest ``trim`` fraction of them.

    A robust autoencoder's loss: rows the model reconstructs worst (in training data
    contaminated with anomalies, mostly the anomalies) give no gradient, so the model
    does not learn to reconstruct them. ``trim=0`` is the plain mean.
    """
    if trim <= 0 or per_row.numel() < 2:
        return per_row.mean()
    keep = max(1, int(math.ceil(per_row.numel() * (1.0 - trim))))
    return torch.topk(per_row, keep, largest=False, sorted=False).values.mean()


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(
    objective, x: torch.Tensor, optimizer, grad_clip: float = 5.0, autocast_dtype=None, scaler=None
) -> float:
    """One optimisation step on a batch; returns the batch loss.

    ``objective`` is an :class:`Objective`, possibly wrapped in DDP. On GPUs,
    ``autocast_dtype`` (bf16 / fp16) runs the forward pass in mixed precision;
    fp16 also needs a ``torch.amp.GradScaler`` as ``scaler``.
    """
    objective.train()
    optimizer.zero_grad(set_to_none=True)
    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            loss = objective(x)
    else:
        loss = objective(x)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def eval_loss(objective, batches) -> tuple[float, int]:
    """Summed loss (row-weighted) and row count over an iterable of batches."""
    objective.eval()
    total, n = 0.0, 0
    for x in batches:
        total += float(objective(x)) * len(x)
        n += len(x)
    return total, n


@torch.no_grad()
def calibration_sums(module, batches):
    """Sums over ``batches`` of a family's per-row calibration statistics
    (:meth:`unusual.models.base.SquaredErrorModule.calibration_rows`) and the row count; None for
    families that calibrate nothing."""
    if not hasattr(module, "set_calibration"):
        return None
    module.eval()
    total, n = None, 0
    for x in batches:
        e = module.calibration_rows(x).double().sum(0).cpu()
        total = e if total is None else total + e
        n += len(x)
    return total, n


def calibrates_on_every_row(module) -> bool:
    """Whether a family calibrates on every training row (``calibrate_on = "all"``, the AE's joint score)
    rather than on the validation split: the one check every runner asks."""
    return getattr(module, "calibrate_on", "validation") == "all"


def calibrate(module, batches) -> None:
    """Set a family's calibration (error scale, latent statistics) from held-out data."""
    sums = calibration_sums(module, batches)
    if sums is not None:
        set_calibration(module, *sums)


def set_calibration(module, total, rows: float) -> None:
    """The one calibration every runner ends with: the means of the per-row statistics, from their sums
    over ``rows`` rows (in memory, all-reduced over the Ray Train workers, or aggregated by Ray Data);
    nothing without rows."""
    if rows:
        total = torch.as_tensor(total, dtype=torch.float64)
        device = next(iter(module.buffers()), total).device
        module.set_calibration((total / rows).float().to(device))


def batch_size_for(batch_size: int, n_train: int) -> int:
    """Rows per optimisation step for ``n_train`` training samples (per worker).

    At most ``batch_size``; small data gets at least ~8 steps per epoch (and
    never fewer than 8 rows a step), so that patience counts real progress.
    """
    return max(8, min(batch_size, n_train // 8))


def _batches(data, idx: np.ndarray, size: int, device) -> list:
    for a in range(0, len(idx), size):
        yield torch.as_tensor(np.ascontiguousarray(data[idx[a : a + size]]), device=device)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into (train, validation) positions."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_val = min(n_val, n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train_epochs(
    objective,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    train_batches: Callable[[int], Iterable[torch.Tensor]],
    val_batches: Callable[[], Iterable[torch.Tensor]],
    stopper: EarlyStopping,
    hist: History,
    *,
    start: int = 0,
    reduce: Callable[[list[float]], Sequence[float]] | None = None,
    on_epoch: Callable[[int, History, bool], None] | None = None,
    autocast_dtype=None,
    scaler=None,
) -> History:
    """Train from epoch ``start`` until ``cfg.epochs`` or an early stop; returns ``hist``.

    ``objective`` is the :class:`Objective` of ``module`` (possibly wrapped in
    DDP); ``module`` is what the stopper snapshots. Per epoch, ``train_batches(epoch)``
    gives that epoch's training batches and ``val_batches()`` the validation
    batches (none: the validation loss is the training loss). ``reduce`` turns
    this process's ``[train loss sum, train rows, val loss sum, val rows]`` into
    the sums over every worker (DDP's all-reduce); ``on_epoch(epoch, hist, stop)``
    runs after each epoch is recorded and the stopper updated (the Ray worker
    reports and checkpoints there). The best weights stay in ``stopper.best_state``.
    """
    hist.started_at_epoch.append(start)
    if stopper.stopped:
        return hist
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        losses, sizes = [], []
        for x in train_batches(epoch):
            losses.append(train_step(objective, x, optimizer, cfg.grad_clip, autocast_dtype, scaler))
            sizes.append(len(x))
        vtotal, vcount = eval_loss(objective, val_batches())
        # The row-weighted sum as np.average computes it (pairwise summation in float64).
        total = float(np.multiply(losses, sizes, dtype=np.float64).sum()) if sizes else 0.0
        sums = [total, float(sum(sizes)), vtotal, float(vcount)]
        if reduce is not None:
            sums = reduce(sums)
        total, count, vtotal, vcount = (float(v) for v in sums)
        train_loss = total / max(count, 1.0)
        val_loss = vtotal / vcount if vcount else train_loss
        log.info("epoch %d/%d train_loss=%.5f val_loss=%.5f", epoch + 1, cfg.epochs, train_loss, val_loss)
        stop = stopper.update(epoch, val_loss, module)
        hist.record(train_loss, val_loss, int(count), time.perf_counter() - t0)
        hist.best_epoch, hist.stopped_early = stopper.best_epoch, stop
        if on_epoch is not None:
            on_epoch(epoch, hist, stop)
        if stop:
            break
    return hist


@contextmanager
def epoch_progress(epochs: int, verbose: bool | None, desc: str):
    """An ``on_epoch`` callback drawing a progress bar over the epochs on stderr (tqdm), with the
    validation loss: always with ``verbose=True``, never with ``False``; with ``None``, only on a
    terminal and only once a fit has run for 2 s (short fits print nothing)."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=epochs,
        desc=desc,
        unit="epoch",
        file=sys.stderr,
        disable=True if verbose is False else (False if verbose else None),
        delay=0 if verbose else 2.0,
        leave=bool(verbose),
    )

    def on_epoch(epoch: int, hist: History, stop: bool) -> None:
        bar.set_postfix(val_loss=f"{hist.val_loss[-1]:.4g}", refresh=False)
        bar.update(1)

    try:
        yield on_epoch
    finally:
        bar.close()


def fit_module(
    module,
    data,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    on_epoch: Callable[[int, History, bool], None] | None = None,
) -> History:
    """Train ``module`` on ``data[train_idx]``; early-stop on ``data[val_idx]``; restore the best weights.

    ``data`` is anything indexable by an integer array that returns a float32
    numpy batch: the encoded matrix, or a :class:`unusual.models.windows.WindowSet`.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    module.to(device)
    opt = make_optimizer(module, cfg)
    batch_size = batch_size_for(cfg.batch_size, len(train_idx))
    stopper = EarlyStopping(cfg.patience)
    hist = train_epochs(
        Objective(module),
        module,
        opt,
        cfg,
        lambda epoch: _batches(data, rng.permutation(train_idx), batch_size, device),
        lambda: _batches(data, val_idx, 4096, device),
        stopper,
        History(),
        on_epoch=on_epoch,
    )
    module.load_state_dict(stopper.best_state)
    module.eval()
    return hist
