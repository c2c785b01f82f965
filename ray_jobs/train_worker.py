"""The Ray Train worker of ``unusual train``: :func:`train_loop` runs on every worker.

Each worker builds the model from the driver's :class:`LoopConfig`, wraps its training
:class:`~unusual.models.training.Objective` in DDP and runs the same
:func:`~unusual.models.training.train_epochs` loop as the in-memory API; the loss sums are
all-reduced across workers.

- **Data.** With ``pieces`` (the driver or Ray Data put the encoded samples in the object
  store), a worker fetches its contiguous share once and trains from one tensor, shuffled
  per epoch by index, as a plain PyTorch loop does; it then calibrates the model on its
  share of the validation split (error scale all-reduced, the threshold from every worker's
  top tail), so the driver has nothing left to score. Without ``pieces``, batches stream
  from the Ray Dataset shards every epoch and the driver calibrates.
- **Batches.** The configured batch size is the global one (the in-memory rule on all
  training samples), split across the workers, so 1 or N workers take the same steps.
- **Checkpoints.** Rank 0 checkpoints at a cadence that costs under 5 % of the training time
  (the first after 10 s of training, then whenever 20 times the last checkpoint's cost has
  passed; ``checkpoint_every`` fixes it in epochs) and once at the end; a restarted worker
  group resumes from the last one. Each checkpoint is written to a temporary folder that is
  removed once Ray Train has persisted it to the run's storage.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..models.manifest import ThresholdRecord
from ..models.registry import family
from ..models.thresholds import ThresholdConfig, fit_threshold, fit_threshold_tail, tail_fraction
from ..models.training import (
    EarlyStopping,
    History,
    Objective,
    TrainConfig,
    batch_size_for,
    calibrates_on_every_row,
    calibration_sums,
    make_optimizer,
    set_calibration,
    train_epochs,
)
from ..runtime import MARK, checkpoint_directory, temp_dir
from .train_data import fetch_share

STATE_FILE = "state.pt"
FIRST_CHECKPOINT_S = 10.0  # auto cadence: the first checkpoint after this much training
COST_FACTOR = 20.0  # then one whenever 20 x the last checkpoint's cost has passed (< 5 %)


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every Ray Train worker (``train_loop_config={"loop": …}``)."""

    kind: str
    model_config: dict  # the family's stored config (asdict), rebuilt by family.stored_config
    width: int  # columns of the encoded input
    train: TrainConfig
    threshold: ThresholdConfig
    pieces: list | None  # object refs of the encoded samples (in memory), or None: stream the Ray Dataset shards
    train_samples: int  # expected training samples (the batch-size rule); the split is by hash
    precision: str
    threads: int
    checkpoint_every: int | None
    fail_at_epoch: int | None  # testing: the last worker dies at this epoch, once (marker file)
    fail_marker: str


@dataclass
class TrainState:
    """What a training checkpoint holds (``state.pt``, saved as plain tensors and lists, read back with
    ``weights_only``): the model, the optimizer, the early stopping, the history and the last epoch;
    the final one, when the workers calibrated, also the calibrated model, its threshold and the
    distinct training samples."""

    model: dict
    optimizer: dict
    stopper: dict
    history: History
    epoch: int
    final: bool = False
    calibrated_model: dict | None = None
    threshold: ThresholdRecord | None = None
    train_samples: int | None = None

    def save(self, directory: str) -> None:
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        plain.update(history=asdict(self.history), threshold=self.threshold and self.threshold.model_dump())
        torch.save(plain, os.path.join(directory, STATE_FILE))

    @classmethod
    def load(cls, directory: str) -> TrainState:
        st = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        names = {f.name for f in fields(cls)}
        st = {k: v for k, v in st.items() if k in names}
        threshold = st.get("threshold") and ThresholdRecord.model_validate(st["threshold"])
        return cls(**{**st, "history": History.from_dict(st["history"]), "threshold": threshold})


def model_weights(module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _inject_fault(config: LoopConfig, epoch: int, rank: int, world: int) -> None:
    """Testing (``fail_at_epoch``): the last worker's process dies at that epoch, once per run."""
    if config.fail_at_epoch != epoch or rank != world - 1:
        return
    marker = config.fail_marker
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    print(f"{MARK} fault injection: worker {rank} exits at epoch {epoch}", flush=True)
    # Ray Train's controller collects reports on its health-check poll;
    # let it register the last checkpoint, so the test knows which epoch the run
    # must resume from.
    time.sleep(5)
    os._exit(1)


class Cadence:
    """When rank 0 checkpoints (see the module's docstring)."""

    def __init__(self, every: int | None):
        self.every = every
        self.last = time.perf_counter()
        self.cost: float | None = None

    def due(self, epoch: int) -> bool:
        if self.every:
            return (epoch + 1) % self.every == 0
        waited = time.perf_counter() - self.last
        return waited >= (FIRST_CHECKPOINT_S if self.cost is None else COST_FACTOR * self.cost)

    def done(self, started: float) -> None:
        self.last = time.perf_counter()
        self.cost = self.last - started


def _shown(epoch: int, epochs: int, stop: bool) -> bool:
    """At most ~10 epoch lines per run, and always the last one."""
    step = max(1, math.ceil(epochs / 10))
    return stop or epoch + 1 == epochs or (epoch + 1) % step == 0 or epoch == 0


class Collectives:
    """The few collectives the loop needs; no-ops on one worker."""

    def __init__(self, world: int, device):
        self.world, self.device = world, device

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, torch.distributed.ReduceOp.SUM if self.world > 1 else None)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, torch.distributed.ReduceOp.MAX if self.world > 1 else None)

    def _reduce(self, values, op) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every worker (Ray Train wants every worker to report together)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.broadcast(t, 0)
        return bool(t.item())

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def _chunks(x: torch.Tensor, size: int, device):
    for a in range(0, len(x), size):
        yield x[a : a + size].to(device, non_blocking=True)


@torch.inference_mode()
def calibrate(module, xt, xv, coll: Collectives, thr_cfg: ThresholdConfig, device) -> ThresholdRecord:
    """Calibration (error scale, latent statistics) and threshold from every worker's share of the
    validation split (or of the training split when there is none; calibration on both where the family
    asks, ``calibrate_on = "all"``), as ``Detector.fit`` computes them in memory."""
    n_val = coll.sum([float(len(xv))])[0]
    data = xv if n_val > 0 else xt
    module.eval()
    if hasattr(module, "set_calibration"):
        rows = [xt, xv] if calibrates_on_every_row(module) else [data]
        sums = calibration_sums(module, (x for part in rows for x in _chunks(part, 8192, device)))
        width = module.calibration_size()
        total = sums[0].tolist() if sums and sums[0] is not None else [0.0] * width
        reduced = coll.sum([*total, float(sums[1] if sums else 0)])
        set_calibration(module, reduced[:-1], reduced[-1])
    parts = [module.score_terms(x)[0].double().cpu().numpy() for x in _chunks(data, 8192, device)]
    scores = np.concatenate(parts) if parts else np.empty(0)
    if coll.world == 1:
        rec = fit_threshold(scores, thr_cfg)
    else:
        finite = np.sort(scores[np.isfinite(scores)])
        n = int(coll.sum([float(finite.size)])[0])
        need = int(math.ceil(tail_fraction(thr_cfg) * n)) + 2
        tail = np.sort(np.concatenate(coll.gather(finite[-need:])))
        rec = fit_threshold_tail(tail, n, thr_cfg)
    rec.fit_on = "validation" if n_val > 0 else "training"
    return rec


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker loop (also runs alone for ``num_workers=1``): ``loop_config["loop"]`` is the
    driver's :class:`LoopConfig`."""
    import ray.train
    import ray.train.torch

    config: LoopConfig = loop_config["loop"]
    torch.set_num_threads(max(1, config.threads))
    cfg = config.train
    torch.manual_seed(cfg.seed)
    fam = family(config.kind)
    module = fam.module(fam.stored_config(config.model_config), config.width)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    coll = Collectives(world, device)

    stopper, hist, start, opt_state = _resume(module, cfg, rank)
    objective = ray.train.torch.prepare_model(Objective(module))
    opt = make_optimizer(objective, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None

    if config.pieces is not None:
        data = _InMemory(config, rank, world, coll, device)
    else:
        data = _Streaming(config, rank, world, device)
    reporter = _Reporter(module, opt, stopper, hist, rank, coll, cfg.epochs, config.checkpoint_every)
    train_epochs(
        objective,
        module,
        opt,
        cfg,
        data.train_batches,
        data.val_batches,
        stopper,
        hist,
        start=start,
        reduce=coll.sum,
        on_epoch=reporter.on_epoch,
        autocast_dtype=amp,
        scaler=scaler,
    )
    final = {"final": True}
    if isinstance(data, _InMemory):
        module.load_state_dict(stopper.best_state)
        calibrated = calibrate(module, data.xt, data.xv, coll, config.threshold, device)
        final.update(calibrated_model=model_weights(module), threshold=calibrated, train_samples=data.n_train)
    reporter.checkpoint(max(len(hist.val_loss) - 1, start - 1), **final)


def _resume(module, cfg: TrainConfig, rank: int) -> tuple[EarlyStopping, History, int, dict | None]:
    """The early stopping, history, first epoch and optimizer state: fresh, or from the run's last
    checkpoint (a restarted worker group), whose weights go into ``module``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    stopper = EarlyStopping(cfg.patience)
    if ckpt is None:
        return stopper, History(), 0, None
    with checkpoint_directory(ckpt) as d:
        st = TrainState.load(d)
    module.load_state_dict(st.model)
    stopper.load_state_dict(st.stopper)
    if rank == 0:
        print(f"{MARK} resumed from the checkpoint of epoch {st.epoch + 1}", flush=True)
    return stopper, st.history, st.epoch + 1, st.optimizer


class _InMemory:
    """A worker's contiguous share of the encoded samples (``pieces``), fetched once: batches are drawn
    from one tensor, shuffled per epoch by index, as a plain PyTorch loop does."""

    def __init__(self, config: LoopConfig, rank: int, world: int, coll: Collectives, device):
        x, val = fetch_share(config.pieces, rank, world)
        xt, xv = torch.from_numpy(np.ascontiguousarray(x[~val])), torch.from_numpy(np.ascontiguousarray(x[val]))
        del x, val
        if device.type == "cuda":  # on the GPU when it fits easily, else pinned for fast copies
            free, _ = torch.cuda.mem_get_info(device)
            if xt.nbytes + xv.nbytes < 0.25 * free:
                xt, xv = xt.to(device), xv.to(device)
            else:
                xt, xv = xt.pin_memory(), xv.pin_memory()
        self.xt, self.xv, self.config, self.rank, self.world, self.device = xt, xv, config, rank, world, device
        self.n_train = int(coll.sum([float(len(xt))])[0])
        # Every worker takes the same number of steps (DDP): a worker with fewer training
        # samples than the largest share repeats a few of its own, drawn anew each epoch.
        self.steps_rows = int(coll.max([float(len(xt))])[0])
        if len(xt) == 0 and self.steps_rows:
            raise ValueError(f"worker {rank} of {world} got no training samples: use fewer --num-workers")
        self.batch_size = max(1, batch_size_for(config.train.batch_size, self.n_train) // world)

    def train_batches(self, epoch: int):
        _inject_fault(self.config, epoch, self.rank, self.world)
        xt, steps = self.xt, self.steps_rows
        gen = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + epoch * 1009 + self.rank)
        perm = torch.randperm(len(xt), generator=gen)
        if len(xt) < steps:
            perm = torch.cat([perm, torch.randint(len(xt), (steps - len(xt),), generator=gen)])
        perm = perm.to(xt.device)
        for a in range(0, steps, self.batch_size):
            yield xt[perm[a : a + self.batch_size]].to(self.device, non_blocking=True)

    def val_batches(self):
        return _chunks(self.xv, 4096, self.device)


class _Streaming:
    """Batches streamed from the worker's Ray Dataset shards every epoch (the driver calibrates)."""

    def __init__(self, config: LoopConfig, rank: int, world: int, device):
        import ray.train

        self.config, self.rank, self.world, self.device = config, rank, world, device
        self.batch_size = max(1, batch_size_for(config.train.batch_size, config.train_samples) // world)
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")

    def train_batches(self, epoch: int):
        _inject_fault(self.config, epoch, self.rank, self.world)
        for b in self.train_shard.iter_torch_batches(
            batch_size=self.batch_size,
            dtypes=torch.float32,
            device=self.device,
            local_shuffle_buffer_size=self.batch_size * 8,
            local_shuffle_seed=self.config.train.seed + epoch,
        ):
            yield b["x"]

    def val_batches(self):
        for b in self.val_shard.iter_torch_batches(batch_size=4096, dtypes=torch.float32, device=self.device):
            yield b["x"]


class _Reporter:
    """Rank 0's progress lines and every worker's reports to Ray Train, with a checkpoint at the
    :class:`Cadence` (every worker reports together: they agree on rank 0's decision)."""

    def __init__(self, module, opt, stopper: EarlyStopping, hist: History, rank: int, coll: Collectives,
                 epochs: int, every: int | None):
        self.module, self.opt, self.stopper, self.hist = module, opt, stopper, hist
        self.rank, self.coll, self.epochs = rank, coll, epochs
        self.cadence = Cadence(every)

    def checkpoint(self, epoch: int, **extra) -> None:
        import ray.train

        t0 = time.perf_counter()
        hist = self.hist
        metrics = {
            "epoch": epoch,
            "train_loss": hist.train_loss[-1] if hist.train_loss else None,
            "val_loss": hist.val_loss[-1] if hist.val_loss else None,
            "best_val_loss": self.stopper.best,
        }
        if self.rank == 0:
            with temp_dir("ckpt") as d:
                state = TrainState(model_weights(self.module), self.opt.state_dict(), self.stopper.state_dict(), hist,
                                   epoch, **extra)
                state.save(d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        self.cadence.done(t0)

    def on_epoch(self, epoch: int, hist: History, stop: bool) -> None:
        if self.rank == 0 and _shown(epoch, self.epochs, stop):
            samples, seconds = hist.samples[-1], hist.epoch_seconds[-1]
            print(
                f"{MARK} epoch {epoch + 1}/{self.epochs} train_loss={hist.train_loss[-1]:.5f} "
                f"val_loss={hist.val_loss[-1]:.5f} ({samples / max(seconds, 1e-9):,.0f} samples/s)"
                f"{' early stop' if stop else ''}",
                flush=True,
            )
        last = stop or epoch + 1 == self.epochs
        if not last and self.coll.agree(self.rank == 0 and self.cadence.due(epoch)):
            self.checkpoint(epoch)
