"""Batched augmentation of normalised image tensors (B, 1, H, W), drawn from a seeded generator.

All random numbers come from a CPU `torch.Generator`, so a run is reproducible whatever the
device. Zero after normalisation is the mean gray, so padding and erasing use 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from fersearch.config import TrainConfig


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    shift: float = 0.0  # max translation, fraction of the side
    scale: float = 0.0  # max relative zoom in or out
    rotation: float = 0.0  # max degrees either way
    crop_padding: int = 0  # pad then random-crop back (integer translation)
    erasing: float = 0.0  # probability of erasing one rectangle per image
    erasing_scale: float = 0.2  # largest erased area, fraction of the image
    resample: float = 0.0  # probability of passing an image through a smaller side and back

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Augment:
        """Each field from the config key of the same name."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def active(self) -> bool:
        return bool(
            self.flip or self.shift or self.scale or self.rotation or self.crop_padding or self.erasing or self.resample
        )

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        affine = bool(self.shift or self.scale or self.rotation)
        flips = _flips(x.shape[0], gen) if self.flip else None
        if affine:
            # A mirror is the affine map x -> -x: folded into the sampling grid, not a pass of its own.
            x = _affine(x, gen, self.shift, self.scale, self.rotation, flips)
        elif flips is not None:
            x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)
        if self.resample:
            x = _resample(x, gen, self.resample)
        if self.crop_padding:
            x = _random_crop(x, gen, self.crop_padding)
        if self.erasing:
            x = _erase(x, gen, self.erasing, self.erasing_scale)
        return x


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def _flips(n: int, gen: torch.Generator) -> torch.Tensor:
    """Which images of a batch are mirrored (half of them, on average)."""
    return torch.rand(n, generator=gen) < 0.5


def _affine(
    x: torch.Tensor,
    gen: torch.Generator,
    shift: float,
    scale: float,
    rotation: float,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random rotation, zoom and shift; images where `flips` is set are mirrored first."""
    n = x.shape[0]
    angle = _uniform(n, -rotation, rotation, gen) * (math.pi / 180.0)
    zoom = _uniform(n, 1.0 - scale, 1.0 + scale, gen)
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of f of the side is 2f.
    tx = _uniform(n, -2 * shift, 2 * shift, gen)
    ty = _uniform(n, -2 * shift, 2 * shift, gen)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    source_x = [cos, -sin, tx]
    if flips is not None:
        # Mirroring the input negates the source x coordinate (pixel centres are symmetric about
        # 0 with align_corners=False, so this is exact).
        sign = 1.0 - 2.0 * flips.to(cos.dtype)
        source_x = [v * sign for v in source_x]
    theta = torch.stack([torch.stack(source_x, 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = _affine_grid(theta.to(x.device, x.dtype), x.shape[-2], x.shape[-1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`F.affine_grid(theta, (n, 1, h, w), align_corners=False)` from broadcast mul-adds.

    PyTorch builds the grid as a batched (h*w, 3) @ (3, 2) product, which on a CPU cost about
    as much as the seed CNN's forward pass; this is ~10x cheaper and equal to float rounding.
    """
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    rows = theta[:, :, 2, None] + theta[:, :, 1, None] * ys  # (n, 2, h)
    planes = rows[..., None] + theta[:, :, 0, None, None] * xs  # (n, 2, h, w): x and y sources
    return planes.permute(0, 2, 3, 1)


RESAMPLE_MIN_SIDE = 24  # the smallest side an image is passed through (half of FER2013's 48)


def _resample(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """With probability `p` an image is shrunk (antialiased) to a random smaller side and
    enlarged back: the softening a face from a photo gets on its way to 48x48 (scaled in the
    photo, turned, resampled to the model's side), which FER2013's own crops do not have. One
    side per batch (two interpolations for the whole batch); it is drawn whether or not any
    image is chosen, so the random stream does not depend on the draws."""
    n, _, h, w = x.shape
    apply = torch.rand(n, generator=gen) < p
    side = int(torch.randint(min(RESAMPLE_MIN_SIDE, h - 1), h, (1,), generator=gen))
    if not bool(apply.any()):
        return x
    chosen = apply.to(x.device)
    small = F.interpolate(x[chosen], size=(side, max(1, round(side * w / h))), mode="bilinear", antialias=True)
    out = x.clone()
    out[chosen] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def _random_crop(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def _erase(x: torch.Tensor, gen: torch.Generator, p: float, max_area: float) -> torch.Tensor:
    n, _, h, w = x.shape
    apply = torch.rand(n, generator=gen) < p
    area = _uniform(n, min(0.02, max_area), max_area, gen) * h * w
    log_ratio = _uniform(n, math.log(0.3), math.log(3.3), gen)
    eh = torch.sqrt(area * torch.exp(log_ratio)).clamp(1, h).long()
    ew = torch.sqrt(area / torch.exp(log_ratio)).clamp(1, w).long()
    top = (torch.rand(n, generator=gen) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=gen) * (w - ew + 1)).long()
    ys = torch.arange(h)[None, :]
    xs = torch.arange(w)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]).to(x.device)
    return x.masked_fill(mask[:, None], 0.0)


@dataclass(frozen=True)
class Mix:
    """Mixup and CutMix of a batch with its own roll by one (each image with the one before it).

    Both the images and the target distributions (the soft vote targets, or one-hot labels) are
    mixed with the same weight, so mixed targets still sum to 1. With probability `prob` a batch
    is mixed; when both alphas are > 0, mixup or cutmix is picked evenly for it. The mixing
    weight is drawn from Beta(alpha, alpha). Pairing and box rule follow the papers (and
    `torchvision.transforms.v2.MixUp/CutMix`, which only take integer labels, so they cannot
    mix vote distributions; the tests check this class against them on one-hot labels).
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Mix:
        mixup_alpha = cfg.mixup_alpha if cfg.mixing in ("auto", "mixup") else 0.0
        cutmix_alpha = cfg.cutmix_alpha if cfg.mixing in ("auto", "cutmix") else 0.0
        return cls(mixup_alpha, cutmix_alpha, cfg.mix_prob)

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active or float(torch.rand(1, generator=gen)) >= self.prob:
            return x, y
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or float(torch.rand(1, generator=gen)) < 0.5)
        lam = _beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha, gen)
        if use_cutmix:
            cy = int(torch.randint(0, x.shape[-2], (1,), generator=gen))
            cx = int(torch.randint(0, x.shape[-1], (1,), generator=gen))
            return cutmix(x, y, lam, cy, cx)
        return mixup(x, y, lam)


def _beta(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from the run's generator (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lam * each sample + (1 - lam) * the sample before it, for images and targets alike."""
    return x * lam + x.roll(1, 0) * (1 - lam), y * lam + y.roll(1, 0) * (1 - lam)


def cutmix(
    x: torch.Tensor, y: torch.Tensor, lam: float, cy: int, cx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the previous sample's box into each image; targets weigh by the pixels kept.

    The box has sides sqrt(1 - lam) of the image's, centred at (cy, cx) and clipped to the
    image, so the weight actually used is 1 - (clipped box area) / (image area).
    """
    h, w = x.shape[-2:]
    half = 0.5 * math.sqrt(1.0 - lam)
    dh, dw = int(half * h), int(half * w)
    y0, y1 = max(cy - dh, 0), min(cy + dh, h)
    x0, x1 = max(cx - dw, 0), min(cx + dw, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x.roll(1, 0)[..., y0:y1, x0:x1]
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return out, y * kept + y.roll(1, 0) * (1 - kept)
