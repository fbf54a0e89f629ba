"""The training and evaluation steps: `train_one_epoch(...) -> dict`, `evaluate(...) -> dict`.

Images stay uint8 on the device and are normalised and augmented per batch; nothing is read
from disk. This module knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.optim.swa_utils import AveragedModel

from fersearch.augment import Augment, Mix
from fersearch.config import TrainConfig
from fersearch.errors import DivergedError, FersearchError
from fersearch.metrics import classification_metrics

log = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FersearchError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FersearchError(f"device {name} was asked for but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FersearchError(f"device {name} was asked for but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FersearchError("device mps was asked for but Apple's MPS is not available on this machine")
    return device


def tune_cpu_allocator() -> None:
    """Keep freed memory in the process heap (glibc only; a no-op elsewhere).

    By default glibc can hand large buffers (a 32x6x44x44 activation is 1.5 MB) back to the
    kernel on free and fault fresh pages in on the next allocation, every training step.
    Raising the mmap and trim thresholds makes steps reuse warm memory (measured +5-20%
    samples/s for the seed CNN on a CPU). The heap then keeps its high-water mark.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc (musl, for one)
        ok = False
    log.debug("CPU allocator thresholds %s", "raised" if ok else "unchanged")


_ALLOCATOR_TUNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to the device in channels-last layout (measured ~14% faster for the seed CNN on CPU)."""
    return model.to(device=device, memory_format=torch.channels_last)


@dataclass
class Normalize:
    """uint8 (B, 48, 48) -> float (B, 1, 48, 48), standardised with the training set's stats."""

    mean: float
    std: float

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255.0 - self.mean) / self.std).unsqueeze(1)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # One fused kernel per step on a CPU instead of a loop over tensors (measured 2.5x faster
    # for the seed CNN's 10 tensors). Other devices keep PyTorch's default implementation.
    fused = {"fused": True} if params and all(p.device.type == "cpu" for p in params) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **fused
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    raise FersearchError(f"unknown optimizer {cfg.optimizer!r}")


class Schedule:
    """An LR scheduler, when it steps (per batch for onecycle and wsd, per epoch for the rest),
    and an optional linear warm-up.

    Warm-up raises every group's LR linearly from lr/W to lr over the first W batches
    (`warmup_epochs` epochs, a fraction allowed); the scheduler's own course starts at the first
    epoch boundary after it, so an epoch scheduler does not step during warm-up and cosine
    anneals over the remaining whole epochs. (wsd has its warm-up inside its own factor.)

    Why not torch's LinearLR + SequentialLR: SequentialLR steps every scheduler it holds at one
    cadence, but here the warm-up steps per batch (a fraction of an epoch allowed) and the
    scheduler after it per epoch (or on validation, for ReduceLROnPlateau, which SequentialLR
    does not take); the search's own schedule, wsd, is one LambdaLR with its warm-up inside.
    """

    def __init__(
        self,
        scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None,
        per_batch: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        warmup_epochs: float = 0,
        steps_per_epoch: int = 1,
    ) -> None:
        self.scheduler, self.per_batch = scheduler, per_batch
        self.optimizer = optimizer
        self.warmup_steps = round(warmup_epochs * max(1, steps_per_epoch)) if optimizer is not None else 0
        self.step = self.epoch = 0
        self.handed_over = self.warmup_steps == 0  # the scheduler's own course has begun
        self.base_lrs = [g["lr"] for g in optimizer.param_groups] if optimizer is not None else []
        if self.warmup_steps:
            self._set_factor(1 / self.warmup_steps)

    @property
    def warming_up(self) -> bool:
        return self.step < self.warmup_steps

    def _set_factor(self, factor: float) -> None:
        assert self.optimizer is not None
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def after_batch(self) -> None:
        self.step += 1
        if self.warming_up:
            self._set_factor(min(1.0, (self.step + 1) / self.warmup_steps))
        elif self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def after_epoch(self, val_score: float) -> None:
        self.epoch += 1
        if self.warming_up or self.per_batch:
            return
        if not self.handed_over:
            self.handed_over = True
            self._set_factor(1.0)  # warm-up ends on an epoch boundary, however many batches ran
            return
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_score)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "handed_over": self.handed_over,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state.get("step", 0)), int(state.get("epoch", 0))
        self.handed_over = bool(state.get("handed_over", self.warmup_steps == 0 or self.epoch > 0))


def wsd_factor(warmup: int, stable_end: int, total: int, step: int) -> float:
    """Warmup-stable-decay (the LR factor at batch `step`): linear warm-up over `warmup` batches,
    constant until `stable_end`, then a cosine decay to 0 at `total`. Everything before the decay
    is the same whatever the run's length, so a trial judged at an early rung has had exactly
    the schedule a longer one had by then (one-cycle's and cosine's depend on the length)."""
    if step < warmup:
        return (step + 1) / warmup
    if step < stable_end:
        return 1.0
    done = min(1.0, (step - stable_end) / max(1, total - stable_end))
    return 0.5 * (1.0 + math.cos(math.pi * done))


def cooldown_schedule(optimizer: torch.optim.Optimizer, batches: int) -> Schedule:
    """A branch's decay (Trainer.cooldown): the LR from its current value to 0 over `batches`,
    on wsd's cosine. The optimizer's groups hold their current LR as the base: a fresh LambdaLR
    would start from `initial_lr`, the configured LR, wherever the run's own schedule is."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(wsd_factor, 0, 0, batches)), per_batch=True)


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    sched = torch.optim.lr_scheduler
    warmup = {"optimizer": optimizer, "warmup_epochs": cfg.warmup_epochs, "steps_per_epoch": steps_per_epoch}
    if cfg.scheduler == "none":
        return Schedule(None, **warmup)
    if cfg.scheduler == "exponential":
        return Schedule(sched.ExponentialLR(optimizer, gamma=cfg.gamma), **warmup)
    if cfg.scheduler == "plateau":
        return Schedule(
            sched.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience),
            **warmup,
        )
    if cfg.scheduler == "cosine":
        whole_epochs_left = cfg.epochs - math.ceil(cfg.warmup_epochs)
        return Schedule(sched.CosineAnnealingLR(optimizer, T_max=max(1, whole_epochs_left)), **warmup)
    if cfg.scheduler == "onecycle":  # has its own warm-up (config refuses warmup_epochs with it)
        return Schedule(
            sched.OneCycleLR(
                optimizer,
                max_lr=cfg.lr,
                total_steps=cfg.epochs * steps_per_epoch,
                pct_start=cfg.onecycle_pct,
            ),
            per_batch=True,
        )
    if cfg.scheduler == "wsd":
        total = cfg.epochs * steps_per_epoch
        stable_end = total - max(1, round(cfg.decay_fraction * total))
        factor = functools.partial(wsd_factor, round(cfg.warmup_epochs * steps_per_epoch), stable_end, total)
        return Schedule(sched.LambdaLR(optimizer, factor), per_batch=True)
    raise FersearchError(f"unknown scheduler {cfg.scheduler!r}")


# EMA warm-up: the averaging weight of step t is min(ema_decay, (1 + t) / (10 + t)), so early in a
# run the average follows the weights closely instead of holding on to the random start (at
# decay 0.998 a plain EMA still carries ~80% of the initial weights after 100 steps, which is
# where a search's first rung judges a trial).
EMA_WARMUP = 10


def ema_update_fn(decay: float) -> Callable:
    """AveragedModel's multi_avg_fn: the EMA of the weights with its own warm-up."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (EMA_WARMUP + n))
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, weight)
        else:  # integer buffers (BatchNorm's batch count)
            for averaged, current in zip(ema_params, params, strict=True):
                averaged.copy_(averaged * (1 - weight) + current * weight)

    return update


def build_ema(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    """PyTorch's exponential moving average of the weights and BN statistics (ema_decay > 0).

    `update_parameters` after every optimizer step: ema = d * ema + (1 - d) * weights, starting
    from a copy of the weights at the first step, with d warming up to `ema_decay` (ema_update_fn).
    """
    if cfg.ema_decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=ema_update_fn(cfg.ema_decay), use_buffers=True)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's "balanced" weights, n / (C * count) over the C classes present; a class
    with no images gets 0 (sklearn refuses a class absent from the labels)."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = np.zeros(n_classes, np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


@dataclass
class Loss:
    """Cross-entropy against per-image target distributions, for every label mode."""

    label_mode: str
    label_smoothing: float = 0.0
    weights: torch.Tensor | None = None  # per-class, for class_balance=loss

    def targets(self, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.label_mode == "pld":
            # Probabilistic label drawing: a one-hot label drawn from the votes each minibatch.
            drawn = torch.multinomial(targets.cpu(), 1, generator=gen).to(targets.device)
            return torch.zeros_like(targets).scatter_(1, drawn, 1.0)
        return targets

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.label_mode == "multi_target":
            # Any accepted label is right: reward the most probable of them.
            logp = F.log_softmax(logits.float(), dim=1)
            per_sample = -logp.masked_fill(targets <= 0, -math.inf).max(dim=1).values
        else:
            # PyTorch's cross-entropy takes probability targets and smooths them itself.
            per_sample = F.cross_entropy(
                logits.float(), targets, label_smoothing=self.label_smoothing, reduction="none"
            )
        if self.weights is not None:
            # Each image counts by its own (unsmoothed) target's class weights.
            per_sample = per_sample * (targets * self.weights).sum(dim=1)
        return per_sample.mean()


def batch_indices(
    n: int, batch_size: int, gen: torch.Generator, sample_weights: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """A shuffled epoch, or a class-balanced draw with replacement when weights are given."""
    if sample_weights is None:
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.multinomial(sample_weights, n, replacement=True, generator=gen)
    yield from order.split(batch_size)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    normalize: Normalize,
    augment: Augment,
    batch_size: int,
    gen: torch.Generator,
    schedule: Schedule | None = None,
    scaler: torch.amp.GradScaler | None = None,
    sample_weights: torch.Tensor | None = None,
    max_batches: int | None = None,
    mix: Mix | None = None,
    ema: AveragedModel | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over the training images; raises DivergedError on a non-finite loss.

    `mix` mixes each batch's images and targets (after augmentation and label drawing); `ema`
    is updated after every optimizer step. `progress(samples_done)` is called after every batch
    (a search's sub-epoch report may evaluate the model there: train mode is set again after it).
    """
    model.train()
    device = images.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    for step, idx in enumerate(batch_indices(len(images), batch_size, gen, sample_weights)):
        if max_batches is not None and step >= max_batches:
            break
        idx = idx.to(device)
        x = augment(normalize(images[idx]), gen) if augment.active else normalize(images[idx])
        y = loss_fn.targets(targets[idx], gen)
        if mix is not None:
            x, y = mix(x, y, gen)  # unchanged (and no draw) when mixing is off
        with _autocast(device):
            logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        if schedule is not None:
            schedule.after_batch()
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y.argmax(1)).sum()
        seen += len(idx)
        if step % 50 == 0 and not torch.isfinite(loss):
            break
        if progress is not None:
            progress(seen)
            model.train()
    mean_loss = float(total_loss) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise DivergedError(f"training diverged: loss is {mean_loss} (try a lower lr)")
    return {"loss": mean_loss, "accuracy": float(correct) / max(seen, 1), "samples": seen}


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int = 512, tta: str = "none"
) -> torch.Tensor:
    """Logits for uint8 images, optionally test-time augmented (softmax averaged over views).

    `flip`: the image and its mirror. `tencrop`: the image enlarged by 1/8, its four corner
    crops and centre crop at the model's size, and their mirrors.
    """
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size])
        with _autocast(images.device):
            if tta == "none":
                outputs.append(model(x).float())
                continue
            views = _tta_views(x, tta)
            probs = torch.stack([model(v).float().softmax(1) for v in views]).mean(0)
            outputs.append(probs.clamp_min(1e-12).log())
    return torch.cat(outputs) if outputs else torch.zeros((0, 0))


def _tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta == "tencrop":
        size = x.shape[-1]
        big = F.interpolate(x, size=size + size // 8, mode="bilinear", align_corners=False)
        return list(TF.ten_crop(big, [size, size]))
    raise FersearchError(f"unknown tta {tta!r} (none, flip, tencrop)")


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    classes: Sequence[str],
    normalize: Normalize,
    *,
    tta: str = "none",
    class_map: Sequence[int] | None = None,
) -> dict[str, object]:
    """Loss and classification metrics on one split.

    `class_map[j]` is the model output that stands for class j of `classes` (-1: the model has
    no such output), so a model trained under one protocol can be scored under another.
    """
    logits = predict_logits(model, images, normalize, tta=tta)
    if class_map is not None:
        columns = [c for c in class_map if c >= 0]
        own = logits[:, columns]
        pred_local = own.argmax(1).cpu().numpy()
        lookup = np.array([j for j, c in enumerate(class_map) if c >= 0])
        y_pred = lookup[pred_local]
        logits = torch.full((len(logits), len(class_map)), -1e4, device=logits.device)
        logits[:, torch.as_tensor(lookup, device=logits.device)] = own
    else:
        y_pred = logits.argmax(1).cpu().numpy()
    loss = F.cross_entropy(logits, torch.as_tensor(labels, device=logits.device)).item()
    metrics = classification_metrics(labels, y_pred, classes)
    metrics["loss"] = float(loss)
    return metrics


def set_seed(seed: int) -> torch.Generator:
    """Seed torch's global RNG (weight init, dropout) and return the data/augmentation RNG."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
