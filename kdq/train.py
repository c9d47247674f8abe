"""The one training loop: teacher, baseline and distilled student (and QAT) all run through `fit`.

Data stays on the device as uint8; each step gathers a shuffled batch, augments it as a batch and
normalizes it. Each epoch's shuffling and augmentation come from a generator seeded by (seed, epoch),
and the global RNG (dropout, MixUp) is saved in every checkpoint, so a resumed run is bit-identical
to an uninterrupted one. Under torchrun every rank augments the same global batch and keeps its
slice of it: N processes see exactly the data one process would, and on CPU BatchNorm statistics are
all-reduced over that global batch (`sync_batchnorm_cpu`), so a step computes the one-process gradient
up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kdq import checkpoint as ck
from kdq.config import CHECKPOINT, ONECYCLE_MOMENTUM_SWING, Augment, Optim
from kdq.data import Dataset, Normalize, Split, augment
from kdq.device_data import TrainImages
from kdq.errors import KdqError
from kdq.evaluate import predict_logits
from kdq.files import check_writable, remove_stale_temps, save_json
from kdq.losses import KDLoss
from kdq.tblog import ScalarLog

HISTORY_JSON = "history.json"
# Under DDP every collective (and rank 0's soft targets, behind a barrier) must finish within this many
# seconds, else the job fails instead of hanging; override with the environment variable KDQ_DIST_TIMEOUT.
DIST_TIMEOUT_S = 300


class TrainingError(KdqError):
    """Training cannot start or cannot go on; the message says why."""


@dataclass
class Distill:
    """What the KD loss needs: weights, and the teacher either live (online) or as logits (offline)."""

    alpha: float = 0.7
    temperature: float = 4.0
    kd_loss: str = "hinton"  # the soft term (kdq.losses)
    kd_weighting: str = "blend"  # how it meets cross-entropy (kdq.config.KD_WEIGHTINGS)
    teacher: nn.Module | None = None  # online: forward on the same augmented batch, no grad
    soft_targets: torch.Tensor | None = None  # offline: (N_train, C) teacher logits on unaugmented images
    taught_by: dict | None = None  # the teacher file's sha256 (and the soft targets' data): part of the recipe


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        # A timeout turns a hung peer into an error instead of a hang (a dead one fails at once: its sockets close).
        seconds = float(os.environ.get("KDQ_DIST_TIMEOUT", DIST_TIMEOUT_S))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=seconds))
    return Runtime(dev, rank, world_size)


def _all_reduce(values: list[float], rt: Runtime) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def _check_compatible(ckpt: dict, model: nn.Module, path: Path, recipe: dict) -> None:
    """A resumed run must continue the same recipe: same model, data order, schedule and loss."""
    saved = ckpt.get(ck.RECIPE)
    if saved is not None and "image_size" not in saved:  # recorded since kdq read other sizes; before, 32 px
        saved = {**saved, "image_size": 32}
    if saved is not None and saved != recipe:
        old, new = _flatten(saved), _flatten(recipe)
        diffs = [
            f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
        ]
        raise TrainingError(
            f"{path}: cannot resume with other settings ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}); "
            "use the original options, or --overwrite to start over"
        )
    try:
        model.load_state_dict(ckpt[ck.MODEL])
    except RuntimeError as e:
        why = ck.state_dict_mismatch(e)
        raise TrainingError(f"{path}: cannot resume, weights do not fit this model ({why})") from e


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_finite(model: nn.Module, stage: str, epoch: int, ckpt_path: Path) -> None:
    """Never checkpoint NaN/inf weights or BN statistics: the last good checkpoint must stay the last one.

    (Quantization observers legitimately hold +-inf until they see data: only weights and BN statistics count.)
    """
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n.endswith(("_mean", "_var")))]
    for name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TrainingError(
                f"[{stage}] {name} became non-finite in epoch {epoch}; lower --lr "
                f"(last good checkpoint kept: {ckpt_path if ckpt_path.exists() else 'none'})"
            )


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another process died or hung (gloo/NCCL transport errors, timeouts)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    )


def make_scheduler(optimizer: torch.optim.Optimizer, optim: Optim, steps_per_epoch: int):
    total = optim.epochs * steps_per_epoch
    if total < 4:
        raise TrainingError(f"only {total} optimizer steps: use more epochs or a smaller batch size")
    if optim.schedule == "onecycle":  # warm up over 25% of the steps (at least one), then anneal
        # 1cycle also cycles the momentum, lowest at the peak lr: around the recipe's momentum (±0.05; 0.9 gives
        # PyTorch's own 0.85..0.95), not around OneCycleLR's fixed defaults whatever Optim.momentum says
        swing = ONECYCLE_MOMENTUM_SWING  # kdq.config.Optim keeps momentum +- swing within [0, 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=optim.lr, total_steps=total, pct_start=max(0.25, 1.5 / total),
            base_momentum=optim.momentum - swing, max_momentum=optim.momentum + swing,
        )  # fmt: skip
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    raise TrainingError(f"unknown schedule {optim.schedule!r}; choose from: onecycle, cosine")


def _fail_clearly_when_a_peer_is_lost(f):
    """Under DDP, a transport error or timeout (another rank died or hung) becomes a one-line TrainingError."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        rt = kwargs["rt"]
        try:
            return f(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:
            if rt.world_size == 1 or isinstance(e, KdqError) or not _lost_peer(e):
                raise
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
            raise TrainingError(
                f"rank {rt.rank}/{rt.world_size}: another process of the job failed or stopped responding ({first}); "
                "the last checkpoint is kept: restart the job with --resume"
            ) from e

    return wrapper


@_fail_clearly_when_a_peer_is_lost
def fit(
    model: nn.Module,
    arch: dict,
    data: Dataset,
    optim: Optim,
    aug: Augment,
    out_dir: Path,
    *,
    stage: str,
    preset: dict,
    rt: Runtime,
    distill: Distill | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    compile: bool = False,
    extra: dict | None = None,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    tensorboard: Path | None = None,
) -> dict:
    """Train `model` and write `out_dir/checkpoint.pt` (every epoch), `history.json` and, given a folder, its
    TensorBoard curves (`kdq.tblog`).

    Returns the final checkpoint dict. `extra` entries are stored in the checkpoint (e.g. the QAT
    recipe); `on_epoch_start(model, epoch)` runs before each epoch (e.g. the QAT freeze schedule).
    With `resume`, an existing checkpoint is continued; without it, an existing checkpoint
    is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    distill = distill or Distill(alpha=0.0)
    criterion = KDLoss(distill.alpha, distill.temperature, optim.label_smoothing, distill.kd_loss,
                       distill.kd_weighting)  # checks them  # fmt: skip
    _check_settings(data, optim, aug, distill, rt, out_dir / CHECKPOINT, resume or overwrite)
    if rt.is_main:  # only rank 0 writes; fail now, not after the first epoch
        check_writable(out_dir)
        remove_stale_temps(out_dir / CHECKPOINT)  # left by a run killed while writing
        remove_stale_temps(out_dir / HISTORY_JSON)
    recipe = {
        "arch": arch,
        "optim": dataclasses.asdict(optim),
        "augment": dataclasses.asdict(aug),
        "seed": seed,
        "alpha": distill.alpha,
        "temperature": distill.temperature,
        **({"kd_loss": distill.kd_loss} if distill.alpha > 0 and distill.kd_loss != "hinton" else {}),
        **({"kd_weighting": distill.kd_weighting} if distill.alpha > 0 and distill.kd_weighting != "blend" else {}),
        "val_images": len(data.val) if data.val is not None else 0,  # the split is part of what a resume continues
        **({"train_images": len(data.train)} if preset.get("train_subset") else {}),  # ... and so is a subset
        **({"taught_by": distill.taught_by} if distill.taught_by else {}),  # resuming with another teacher fails
        "image_size": data.train.images.shape[-1],
    }
    mean, std = data.normalization()
    run = _TrainingRun(model, data, Normalize(mean, std, rt.device), criterion, optim, aug, distill, rt, compile)
    ckpt: dict = {
        ck.ARCH: arch,
        ck.STAGE: stage,
        ck.PRESET: preset,
        ck.CLASSES: list(data.classes),
        ck.NORMALIZATION: {"mean": mean, "std": std},
        ck.EPOCH: 0,
        ck.HISTORY: [],
        ck.DONE: False,
        ck.RECIPE: recipe,
        **(extra or {}),
    }
    if resume and (out_dir / CHECKPOINT).exists():
        run.restore(ckpt, out_dir / CHECKPOINT, stage)
    run.wrap_for_ranks()
    log = ScalarLog(tensorboard if rt.is_main and not ckpt[ck.DONE] else None, ckpt[ck.EPOCH] * run.steps_per_epoch)
    try:
        for epoch in range(ckpt[ck.EPOCH], optim.epochs):
            if ckpt[ck.DONE]:
                break
            run.model.train()
            if on_epoch_start is not None:
                on_epoch_start(run.raw_model, epoch)
            record = run.train_epoch(epoch, seed, stage, out_dir / CHECKPOINT, log)
            _check_finite(run.raw_model, stage, epoch + 1, out_dir / CHECKPOINT)
            _end_epoch(ckpt, record, run, out_dir, stage)
            log.epoch(record["epoch"] * run.steps_per_epoch, record)
    finally:
        log.close()
    if ck.MODEL not in ckpt:  # resumed a finished run
        ckpt = ck.load_checkpoint(out_dir / CHECKPOINT)
    return ckpt


def _check_settings(
    data: Dataset, optim: Optim, aug: Augment, distill: Distill, rt: Runtime, ckpt_path: Path, may_exist: bool
) -> None:
    """Every setting that cannot train, refused before anything is loaded onto the device."""
    if optim.epochs <= 0:
        raise TrainingError(f"epochs must be > 0, got {optim.epochs}")
    if optim.batch_size <= 0 or optim.batch_size > len(data.train):
        raise TrainingError(f"batch size {optim.batch_size} must be in 1..{len(data.train)} (the training set size)")
    if optim.batch_size % rt.world_size:
        raise TrainingError(f"batch size {optim.batch_size} is not divisible by {rt.world_size} processes")
    if ckpt_path.exists() and not may_exist:
        raise TrainingError(f"{ckpt_path} exists; pass --resume to continue it or --overwrite to replace it")
    if distill.alpha > 0 and distill.teacher is None and distill.soft_targets is None:
        raise TrainingError("distillation (alpha > 0) needs a teacher or precomputed soft targets")
    if distill.soft_targets is not None and len(distill.soft_targets) != len(data.train):
        raise TrainingError(
            f"soft targets cover {len(distill.soft_targets)} images, the training set has {len(data.train)}"
        )
    if (aug.cutmix_alpha > 0 or aug.mixup_alpha > 0) and distill.alpha > 0 and distill.teacher is None:
        raise TrainingError("CutMix/MixUp change the images the teacher must see: use online distillation")


class _TrainingRun:
    """What one stage's training holds on the device (data, model, teacher, optimizer, schedule), and its epoch."""

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        normalize: Normalize,
        criterion: KDLoss,
        optim: Optim,
        aug: Augment,
        distill: Distill,
        rt: Runtime,
        compile: bool,
    ):
        dev = rt.device
        self.data, self.normalize, self.optim, self.aug, self.distill = data, normalize, optim, aug, distill
        self.rt, self.compile, self.criterion = rt, compile, criterion
        self.train_images, self.train_y = TrainImages(data.train.images, dev), data.train.labels.to(dev)
        self.soft = distill.soft_targets.to(dev) if distill.soft_targets is not None else None
        self.teacher = distill.teacher.to(dev).eval().requires_grad_(False) if distill.teacher is not None else None
        mixing = aug.cutmix_alpha > 0 or aug.mixup_alpha > 0
        self.mixer = _mixer(aug, len(data.classes)) if mixing else None
        self.model = self.raw_model = model.to(dev, memory_format=torch.channels_last)
        decay, no_decay = [], []
        for p in model.parameters():  # no weight decay on BN and bias parameters
            (decay if p.ndim > 1 else no_decay).append(p)
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=True,
        )
        self.steps_per_epoch = len(data.train) // optim.batch_size
        self.scheduler = make_scheduler(self.optimizer, optim, self.steps_per_epoch)
        cuda = dev.type == "cuda"
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        self.step_model = self.model

    def restore(self, ckpt: dict, path: Path, stage: str) -> None:
        """Continue `path`: weights, optimizer, schedule, RNG and the run's progress (into `ckpt`)."""
        saved = ck.load_checkpoint(path)
        _check_compatible(saved, self.model, path, ckpt[ck.RECIPE])
        self.optimizer.load_state_dict(saved[ck.OPTIMIZER])
        self.scheduler.load_state_dict(saved[ck.SCHEDULER])
        torch.set_rng_state(saved[ck.RNG]["torch"])
        if self.rt.device.type == "cuda" and "cuda" in saved[ck.RNG]:
            torch.cuda.set_rng_state(saved[ck.RNG]["cuda"], self.rt.device)
        ckpt.update({k: saved[k] for k in (ck.EPOCH, ck.HISTORY, ck.DONE, ck.BEST, ck.SELECTED_EPOCH) if k in saved})
        if self.rt.is_main:
            print(f"[{stage}] resuming {path} after epoch {saved[ck.EPOCH]}", file=sys.stderr)

    def wrap_for_ranks(self) -> None:
        """DDP (with BN statistics over the global batch, as one process computes them) and torch.compile."""
        if self.rt.world_size > 1:
            self.raw_model = sync_batchnorm(self.raw_model, self.rt.device)
            dev = self.rt.device
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        self.step_model = torch.compile(self.model) if self.compile else self.model

    def train_epoch(self, epoch: int, seed: int, stage: str, ckpt_path: Path, log: ScalarLog) -> dict:
        """One epoch: every rank augments the same global batch (generator seeded by (seed, epoch)), keeps its slice."""
        rt, distill = self.rt, self.distill
        gen = torch.Generator(rt.device).manual_seed(seed * 1_000_003 + epoch)
        t0 = time.perf_counter()
        loss_sum = soft_sum = hard_sum = correct = seen = 0.0
        bar = tqdm(
            self.train_images.epoch(self.optim.batch_size, gen),
            total=self.steps_per_epoch,
            desc=f"{stage} {epoch + 1}/{self.optim.epochs}",
            disable=None if rt.is_main else True,
            leave=False,
            file=sys.stderr,
        )
        for idx, x in bar:
            x = self.normalize(augment(x, self.aug, gen))
            y = self.train_y[idx]
            target = y
            if self.mixer is not None:
                x, target = self.mixer(x, y)
            shard = slice(rt.rank, None, rt.world_size)
            x, y, target = x[shard], y[shard], target[shard]
            with self.amp:
                logits = self.step_model(x)
                with torch.no_grad():
                    t_logits = (
                        self.teacher(x)
                        if self.teacher is not None and distill.alpha > 0
                        else (self.soft[idx][shard] if self.soft is not None else None)
                    )
                loss, soft_part, hard_part = self.criterion(logits, target, t_logits)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"[{stage}] loss became {loss.item()} in epoch {epoch + 1}; "
                    f"lower --lr (last good checkpoint kept: {ckpt_path if ckpt_path.exists() else 'none'})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            n = len(y)
            loss_sum += loss.item() * n
            soft_sum += soft_part.item() * n
            hard_sum += hard_part.item() * n
            correct += (logits.argmax(1) == y).sum().item()
            seen += n
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.step(self.scheduler.last_epoch, loss.item(), self.scheduler.get_last_lr()[0])
        loss_sum, soft_sum, hard_sum, correct, seen = _all_reduce([loss_sum, soft_sum, hard_sum, correct, seen], rt)
        seconds = time.perf_counter() - t0
        val = self.data.val
        return {
            "epoch": epoch + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / seen,
            "train_soft_loss": soft_sum / seen,
            "train_hard_loss": hard_sum / seen,
            "train_acc": correct / seen,
            **({"val_acc": _accuracy(self.raw_model, val, self.normalize, rt)} if val is not None else {}),
            "epoch_seconds": seconds,
            "images_per_second": seen / seconds,
        }


def _end_epoch(ckpt: dict, record: dict, run: _TrainingRun, out_dir: Path, stage: str) -> None:
    """Book the epoch into `ckpt`: history, best validation epoch, early stopping, states; rank 0 saves it.

    Without a validation split there is no early stopping and the last epoch is kept; with one, the finished
    checkpoint holds the best validation epoch's weights (`selected_epoch`)."""
    history: list[dict] = ckpt[ck.HISTORY]
    history.append(record)
    validated = "val_acc" in record
    best = ckpt.get(ck.BEST)
    if validated and (best is None or record["val_acc"] > history[best["epoch"] - 1]["val_acc"]):
        best = ckpt[ck.BEST] = {"epoch": record["epoch"], "model": _cpu_copy(run.raw_model.state_dict())}
    epochs, patience = run.optim.epochs, run.optim.patience
    stale = record["epoch"] - best["epoch"] if validated else 0
    done = record["epoch"] == epochs or (validated and patience > 0 and stale >= patience)
    dev = run.rt.device
    ckpt.update(
        {
            ck.MODEL: run.raw_model.state_dict(),
            ck.OPTIMIZER: run.optimizer.state_dict(),
            ck.SCHEDULER: run.scheduler.state_dict(),
            ck.EPOCH: record["epoch"],
            ck.HISTORY: history,
            ck.DONE: done,
            ck.RNG: {
                "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {}),
            },
        }
    )
    if done and validated:  # the weights of the best validation epoch are the stage's model
        ckpt.pop(ck.BEST)
        ckpt[ck.MODEL], ckpt[ck.SELECTED_EPOCH] = best["model"], best["epoch"]
    if not run.rt.is_main:
        return
    ck.save_checkpoint(ckpt, out_dir / CHECKPOINT)
    save_json(history, out_dir / HISTORY_JSON)
    val = f" val {record['val_acc']:.2%}" if validated else ""
    speed = f"{record['epoch_seconds']:.1f}s, {record['images_per_second']:.0f} img/s"
    print(
        f"[{stage}] epoch {record['epoch']}/{epochs} loss {record['train_loss']:.4f} "
        f"train {record['train_acc']:.2%}{val} ({speed})",
        file=sys.stderr,
    )
    if done and record["epoch"] < epochs:
        print(f"[{stage}] early stop: no better validation accuracy for {stale} epochs", file=sys.stderr)
    if done and validated:
        kept = history[best["epoch"] - 1]["val_acc"]
        print(f"[{stage}] keeping epoch {best['epoch']} (best validation accuracy, {kept:.2%})", file=sys.stderr)


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _accuracy(model: nn.Module, split: Split, normalize: Normalize, rt: Runtime) -> float:
    """Top-1 on `split` (the validation split in training); each rank scores its shard and the counts are summed."""
    was_training = model.training
    model.eval()
    images, labels = split.images[rt.rank :: rt.world_size], split.labels[rt.rank :: rt.world_size]
    with observers_frozen(model):
        logits = predict_logits(model, images, normalize)
    correct, total = _all_reduce([(logits.argmax(1) == labels).sum().item(), len(labels)], rt)
    model.train(was_training)
    return correct / total


@contextlib.contextmanager
def observers_frozen(model: nn.Module) -> Iterator[None]:
    """QAT's FakeQuantize observers update whenever they are enabled, in eval mode too: without this, every
    evaluation would move the quantization ranges toward the evaluation images. Restores each one's state."""
    fake_quants = [m for m in model.modules() if hasattr(m, "observer_enabled")]
    saved = [m.observer_enabled.clone() for m in fake_quants]
    for m in fake_quants:
        m.observer_enabled.fill_(0)
    try:
        yield
    finally:
        for m, enabled in zip(fake_quants, saved, strict=True):
            m.observer_enabled.copy_(enabled)


class _SyncBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm over the batch of every rank: per-channel sums all-reduced (float64), NCHW."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c, dims, f64 = x.shape[1], (0, 2, 3), torch.float64
        # Two passes (mean, then squared deviations), like BatchNorm itself: E[x^2] - E[x]^2 cancels badly.
        sums = torch.cat([x.sum(dims, dtype=f64), x.new_tensor([x.numel() // c], dtype=f64)])
        dist.all_reduce(sums)
        n = sums[-1]
        mean = (sums[:c] / n).to(x.dtype)[None, :, None, None]
        centered = x - mean
        sq = (centered * centered).sum(dims, dtype=f64)
        dist.all_reduce(sq)
        var = sq / n
        invstd = (var + eps).rsqrt().to(x.dtype)
        xhat = centered * invstd[None, :, None, None]
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n = n
        y = xhat * weight[None, :, None, None] + bias[None, :, None, None]
        batch_mean, batch_var = mean.flatten(), (var * n / (n - 1).clamp_min(1)).to(x.dtype)  # unbiased, as BN
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return y, batch_mean, batch_var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        xhat, weight, invstd = ctx.saved_tensors
        c, dims = xhat.shape[1], (0, 2, 3)
        local = torch.cat([dy.sum(dims, dtype=torch.float64), (dy * xhat).sum(dims, dtype=torch.float64)])
        total = local.clone()
        dist.all_reduce(total)  # every rank's dy carries the same 1/world_size: DDP averages the parameters' grads
        mean_dy = (total[:c] / ctx.n).to(dy.dtype)[None, :, None, None]
        mean_dy_xhat = (total[c:] / ctx.n).to(dy.dtype)[None, :, None, None]
        dx = (weight * invstd)[None, :, None, None] * (dy - mean_dy - xhat * mean_dy_xhat)
        return dx, local[c:].to(dy.dtype), local[:c].to(dy.dtype), None


class _CpuSyncBatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics cover all ranks (nn.SyncBatchNorm has no CPU kernel).

    Same parameters, buffers and state_dict as nn.BatchNorm2d; eval mode, frozen BN (QAT) and one process
    are plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y, mean, var = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var, m)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` normalizes over the batch of all ranks: without it, `-j 2x4` on GPUs normalizes
    over each GPU's slice (16 images of a 128 batch), a different model from the one-process one. nn.SyncBatchNorm
    on CUDA (it has no CPU kernel; the same parameter objects, so the optimizer is unchanged), kdq's all-reduce on
    CPU. Also inside QAT's fused conv-bn modules, whose `bn` is a BatchNorm2d child."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sync_batchnorm_cpu(model)
    return model


def sync_batchnorm_cpu(model: nn.Module) -> None:
    """Make every (affine, float) BatchNorm2d of `model` synchronize its statistics across ranks, in place."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d and m.affine:
            m.__class__ = _CpuSyncBatchNorm


def _mixer(aug: Augment, num_classes: int):
    from torchvision.transforms import v2

    choices = []
    if aug.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    if aug.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
