"""The Ray Train worker of ``unusual train``: :func:`train_loop` runs on every worker.

Each worker builds the model from the driver's ``loop_config``, wraps its
training :class:`~unusual.models.training.Objective` in DDP and runs the same
:func:`~unusual.models.training.train_epochs` loop as the in-memory API on its
dataset shards; the loss sums are all-reduced across workers, rank 0 writes a
checkpoint (weights, optimizer, early-stopping state, history) every epoch,
and a restarted worker group resumes from the last one. The driver
(``unusual.ray_jobs.train``) reads the final checkpoint with :func:`load_state`.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict

import torch

from ..models.registry import family
from ..models.training import (
    EarlyStopping,
    History,
    Objective,
    TrainConfig,
    batch_size_for,
    make_optimizer,
    train_epochs,
)

STATE_FILE = "state.pt"


def save_state(module, opt, stopper: EarlyStopping, hist: History, epoch: int) -> str:
    """A new temporary directory holding the training state after ``epoch``."""
    d = tempfile.mkdtemp(prefix="unusual-ckpt-")
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "optimizer": opt.state_dict(),
            "stopper": stopper.state_dict(),
            "history": asdict(hist),
            "epoch": epoch,
        },
        os.path.join(d, STATE_FILE),
    )
    return d


def load_state(directory: str) -> dict:
    """The state a checkpoint directory holds; ``"history"`` as a :class:`History`."""
    st = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    st["history"] = History.from_dict(st["history"])
    return st


def _inject_fault(config: dict, epoch: int, rank: int, world: int) -> None:
    """Testing (``fail_at_epoch``): the last worker's process dies at that epoch, once per run."""
    if config.get("fail_at_epoch") != epoch or rank != world - 1:
        return
    marker = config["fail_marker"]
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    print(f"[unusual] fault injection: worker {rank} exits at epoch {epoch}", flush=True)
    # Ray Train's controller collects reports on its health-check poll (every 2 s);
    # let it register the last checkpoint, so the test knows which epoch the run
    # must resume from.
    time.sleep(5)
    os._exit(1)


def train_loop(config: dict) -> None:
    """Ray Train's per-worker loop (also runs alone for ``num_workers=1``)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["threads"])))
    cfg = TrainConfig(**config["train"])
    torch.manual_seed(cfg.seed)
    fam = family(config["kind"])
    module = fam.module(fam.stored_config(config["model_config"]), config["width"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    stopper = EarlyStopping(cfg.patience)
    hist = History()
    start = 0
    opt_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = load_state(d)
        module.load_state_dict(st["model"])
        opt_state = st["optimizer"]
        stopper.load_state_dict(st["stopper"])
        hist = st["history"]
        start = int(st["epoch"]) + 1
        if rank == 0:
            print(f"[unusual] resumed from the checkpoint of epoch {start}", flush=True)

    objective = ray.train.torch.prepare_model(Objective(module))
    opt = make_optimizer(objective, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"]) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None

    # The in-memory rule on this worker's share of the training samples.
    n_train = config.get("train_samples")
    batch_size = batch_size_for(cfg.batch_size, n_train // world) if n_train else cfg.batch_size
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def train_batches(epoch: int):
        _inject_fault(config, epoch, rank, world)
        for b in train_shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes=torch.float32,
            device=device,
            local_shuffle_buffer_size=batch_size * 8,
            local_shuffle_seed=cfg.seed + epoch,
        ):
            yield b["x"]

    def val_batches():
        for b in val_shard.iter_torch_batches(batch_size=4096, dtypes=torch.float32, device=device):
            yield b["x"]

    def all_reduce(sums: list[float]) -> list[float]:
        if world == 1:
            return sums
        t = torch.tensor(sums, dtype=torch.float64, device=device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(t)
        return t.tolist()

    def on_epoch(epoch: int, hist: History, stop: bool) -> None:
        samples, seconds = hist.samples[-1], hist.epoch_seconds[-1]
        metrics = {
            "epoch": epoch,
            "train_loss": hist.train_loss[-1],
            "val_loss": hist.val_loss[-1],
            "best_val_loss": stopper.best,
            "samples_per_s": samples / max(seconds, 1e-9),
        }
        if rank == 0:
            print(
                f"[unusual] epoch {epoch + 1}/{cfg.epochs} train_loss={metrics['train_loss']:.5f} "
                f"val_loss={metrics['val_loss']:.5f} samples={samples:,} ({metrics['samples_per_s']:,.0f}/s)"
                f"{' early stop' if stop else ''}",
                flush=True,
            )
            d = save_state(module, opt, stopper, hist, epoch)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    train_epochs(
        objective,
        module,
        opt,
        cfg,
        train_batches,
        val_batches,
        stopper,
        hist,
        start=start,
        reduce=all_reduce,
        on_epoch=on_epoch,
        autocast_dtype=amp,
        scaler=scaler,
    )
