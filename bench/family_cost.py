"""Cost of the CNN family's shapes and ResNet-18 on this machine: parameters, training FLOPs, samples/s.

    python bench/family_cost.py [--threads 2] [--batches 30]

Each row trains `--batches` batches of 64 random 48x48 faces through the real engine step
(augmentation, loss, optimizer) after 5 warm-up batches and prints training samples/s, so a
search budget can be planned in epochs (FERPlus train has 28,558 faces at ferplus8). Rows are
the seed's Net, the hand-set three-block CNN (the `modern` recipe), the shapes of the default
space, and ResNet-18 from scratch with each stem (`imagenet`: 7x7 stride 2 and a max-pool,
12x12 maps at layer 1; `small`: 3x3 stride 1, no max-pool, 48x48 maps).
"""

from __future__ import annotations

import argparse
import time

import torch

from fersearch.augment import Augment, Mix
from fersearch.config import resolve_config
from fersearch.engine import (
    Loss,
    Normalize,
    build_ema,
    build_optimizer,
    place_model,
    train_one_epoch,
    tune_cpu_allocator,
)
from fersearch.models import build_model, count_parameters, training_flops

TRAIN_FACES = 28_558
SAME3 = {"padding": "same", "kernel_size": 3}
ROWS = {
    "seed Net": {},
    "3 stages 32-128, fc 256": {**SAME3, "channels": "32,64,128", "fc": "256"},
    "VGG 1,2x 32-128, fc 256": {**SAME3, "channels": "32,64,128", "convs_per_stage": "1,2", "fc": "256"},
    "VGG 1,1,2x 32-128, fc 256": {**SAME3, "channels": "32,64,128", "convs_per_stage": "1,1,2", "fc": "256"},
    "4 stages 32-256, fc 256": {**SAME3, "channels": "32,64,128,256", "fc": "256"},
    "VGG 1,1,2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "1,1,2", "head": "gap", "fc": ""},
    "residual 1,1,2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "1,1,2", "block": "residual", "head": "gap", "fc": ""},
    "VGG 2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "2", "head": "gap", "fc": ""},
    "VGG 1,2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "1,2", "head": "gap", "fc": ""},
    "VGG 1,2x 32-256, fc 256": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "1,2", "fc": "256"},
    "residual 1,2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "1,2", "block": "residual", "head": "gap", "fc": ""},
    "residual 2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "2", "block": "residual", "head": "gap", "fc": ""},
    "separable 2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "2", "conv_type": "separable", "head": "gap", "fc": ""},
    "separable 1,2x 32-256, gap": {**SAME3, "channels": "32,64,128,256", "convs_per_stage": "1,2", "conv_type": "separable", "head": "gap", "fc": ""},
    "resnet18, imagenet stem": {"model": "resnet18", "pretrained": False, "stem": "imagenet"},
    "resnet18, small stem": {"model": "resnet18", "pretrained": False, "stem": "small"},
}


def samples_per_s(overrides: dict, batches: int, extra: dict) -> tuple[int, int, float]:
    overrides = dict(overrides)
    model_name = overrides.pop("model", "cnn")
    cfg = resolve_config(model_name, {**overrides, "batch_size": 64, "shift": 0.05, "rotation": 10, **extra})
    torch.manual_seed(0)
    model = place_model(build_model(cfg, 8), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64 * (batches + 5), 48, 48), dtype=torch.uint8)
    targets = torch.softmax(torch.randn(len(images), 8), 1)
    kwargs = dict(
        optimizer=build_optimizer(cfg, model),
        loss_fn=Loss(cfg.label_mode),
        normalize=Normalize(0.5, 0.25),
        augment=Augment.from_config(cfg),
        batch_size=64,
        gen=gen,
        mix=Mix.from_config(cfg),
        ema=build_ema(cfg, model),
    )
    train_one_epoch(model, images, targets, max_batches=5, **kwargs)
    start = time.perf_counter()
    train_one_epoch(model, images, targets, max_batches=batches, **kwargs)
    rate = 64 * batches / (time.perf_counter() - start)
    return count_parameters(model), training_flops(model), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--ema-mix", action="store_true", help="also turn on EMA and mixup (their cost)")
    parser.add_argument("--only", default="", help="only the rows whose name contains this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    extra = {"ema_decay": 0.998, "mixup_alpha": 0.2, "mix_prob": 0.5} if args.ema_mix else {}
    print(f"{'shape':<36} {'params':>10} {'MFLOPs/sample':>14} {'samples/s':>10} {'s/epoch':>8}")
    for name, overrides in ROWS.items():
        if args.only not in name:
            continue
        params, flops, rate = samples_per_s(overrides, args.batches, extra)
        print(f"{name:<36} {params:>10,} {flops / 1e6:>14.1f} {rate:>10.0f} {TRAIN_FACES / rate:>8.1f}")


if __name__ == "__main__":
    main()
