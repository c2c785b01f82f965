"""The one training step and loop shared by every model family and every runner.

``train_step`` is what the in-memory API and the Ray Train loop both call per
batch; ``fit_module`` is the in-memory loop around it (shuffled mini-batches,
validation loss, early stopping that restores the best weights).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("unusual")


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    val_fraction: float = 0.15  # held out for early stopping and the threshold
    patience: int = 8  # epochs without validation improvement before stopping
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


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
def error_sums(module, batches):
    """Per-column sums of a squared-error family's raw errors and the row count
    (None for families that do not normalise errors)."""
    if not hasattr(module, "set_error_scale"):
        return None
    module.eval()
    total, n = None, 0
    for x in batches:
        e = module.errors(x).double().sum(0).cpu()
        total = e if total is None else total + e
        n += len(x)
    return total, n


def calibrate_error_scale(module, batches) -> None:
    """Set a squared-error family's ``error_scale`` from held-out normal data."""
    sums = error_sums(module, batches)
    if sums is not None and sums[1]:
        module.set_error_scale((sums[0] / sums[1]).float())


def _batches(data, idx: np.ndarray, size: int, device) -> list:
    for a in range(0, len(idx), size):
        yield torch.as_tensor(np.ascontiguousarray(data[idx[a : a + size]]), device=device)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into (train, validation) positions."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_val = min(n_val, n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit_module(
    module,
    data,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> History:
    """Train ``module`` on ``data[train_idx]``; early-stop on ``data[val_idx]``.

    ``data`` is anything indexable by an integer array that returns a float32
    numpy batch: the encoded matrix, or a :class:`unusual.models.windows.WindowSet`.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    module.to(device)
    objective = Objective(module)
    opt = make_optimizer(module, cfg)
    hist = History()
    # Small data: at least ~8 steps per epoch, so that patience counts real progress.
    batch_size = max(8, min(cfg.batch_size, len(train_idx) // 8))
    stopper = EarlyStopping(cfg.patience)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = rng.permutation(train_idx)
        losses, sizes = [], []
        for x in _batches(data, order, batch_size, device):
            losses.append(train_step(objective, x, opt, cfg.grad_clip))
            sizes.append(len(x))
        train_loss = float(np.average(losses, weights=sizes))
        if len(val_idx):
            total, count = eval_loss(objective, _batches(data, val_idx, 4096, device))
            val_loss = total / count
        else:
            val_loss = train_loss
        hist.train_loss.append(train_loss)
        hist.val_loss.append(val_loss)
        if on_epoch:
            on_epoch(epoch, train_loss, val_loss)
        log.info("epoch %d/%d train_loss=%.5f val_loss=%.5f", epoch + 1, cfg.epochs, train_loss, val_loss)
        if stopper.update(epoch, val_loss, module):
            hist.stopped_early = True
            break
    hist.best_epoch = stopper.best_epoch
    module.load_state_dict(stopper.best_state)
    module.eval()
    hist.seconds = time.perf_counter() - t0
    return hist
