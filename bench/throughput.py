"""Training throughput: fersearch's in-memory engine against seed-style pipelines.

Every row trains the same model (the seed CNN by default) with the same optimizer, batch size
and augmentation (horizontal flip + affine shift/rotation), in this one process, so the ratios
are meaningful on a noisy shared machine. Rows:

- seed-style: the seed's per-sample loop in the shape of PyTorch's data-loading tutorial, with
  the libraries of the seed's stack (pandas, scikit-image): each sample looks up its label row,
  reads its PNG from disk and goes through PIL/torchvision transforms in a DataLoader; the
  network runs through PyTorch's own layers, as the seed's Net did. The ratio the issue asks
  for (engine >= 4x) is against this row.
- lean seed-style: the same per-sample disk read and PIL transforms with the cheapest reader
  (PIL opens the PNG, targets computed once up front): a stricter reference.
- the engine's data path through PyTorch's own layers, to show what the C kernels
  (fersearch.native) add on top of feeding from memory;
- the fersearch engine.

All rows use the same optimizer code (fused on CPUs). fersearch's CPU allocator setting is
process-wide, so with `--allocator tuned` (the default) every row gets it; the seed-style rows
gain from it too, which makes the ratios conservative.
Also prints the CNN's compute-bound limit: its training FLOPs per sample against a measured
fp32 matmul rate at the same thread count.

    python bench/throughput.py [--data ../shared/data/ferplus] [--batches 200] [--threads 1] [--repeats 2]
                               [--allocator tuned|default]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from skimage import io
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fersearch import native
from fersearch.augment import Augment
from fersearch.config import resolve_config
from fersearch.data import SPLIT_DIRS, load_dataset
from fersearch.engine import (
    Loss,
    Normalize,
    build_optimizer,
    place_model,
    train_one_epoch,
    tune_cpu_allocator,
)
from fersearch.models import build_model
from fersearch.synthetic import ensure_synthetic

ROOT = Path(__file__).resolve().parents[1]
SHIFT, ROTATION = 0.1, 10.0
N_CLASSES = 8  # ferplus8's emotions: the first 8 vote columns
ROWS = ["tutorial", "lean", "stock", "engine"]  # measured rows, in table order


def seed_transform(mean: float, std: float, from_array: bool) -> transforms.Compose:
    steps = [transforms.ToPILImage()] if from_array else []
    steps += [
        transforms.RandomHorizontalFlip(),
        transforms.RandomAffine(degrees=ROTATION, translate=(SHIFT, SHIFT)),
        transforms.ToTensor(),
        transforms.Normalize([mean], [std]),
    ]
    return transforms.Compose(steps)


class SeedStyleDataset(Dataset):
    """The seed's per-sample loop in the shape of PyTorch's data-loading tutorial, with the
    libraries of the seed's stack: a pandas label table, one scikit-image PNG read per sample,
    the target computed from the row's votes, PIL transforms."""

    def __init__(self, folder: Path, mean: float, std: float):
        self.folder = folder
        self.frame = pd.read_csv(folder / "label.csv", header=None)
        self.transform = seed_transform(mean, std, from_array=True)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int):
        image = io.imread(self.folder / self.frame.iloc[i, 0])
        votes = self.frame.iloc[i, 2 : 2 + N_CLASSES].to_numpy(dtype=np.float32)
        target = torch.from_numpy(votes / max(float(votes.sum()), 1.0))
        return self.transform(image), target


class LeanSeedStyleDataset(Dataset):
    """A leaner per-sample reader: PIL opens the PNG, targets are computed once up front."""

    def __init__(self, folder: Path, mean: float, std: float):
        frame = pd.read_csv(folder / "label.csv", header=None)
        self.folder, self.names = folder, list(frame[0])
        votes = torch.as_tensor(frame.iloc[:, 2 : 2 + N_CLASSES].to_numpy(dtype=np.float32))
        self.targets = votes / votes.sum(1, keepdim=True).clamp_min(1)
        self.transform = seed_transform(mean, std, from_array=False)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        with Image.open(self.folder / self.names[i]) as image:
            x = self.transform(image.convert("L"))
        return x, self.targets[i]


SEED_STYLES = {"tutorial": SeedStyleDataset, "lean": LeanSeedStyleDataset}


def seed_style_rate(cfg, data_dir: Path, data, style: str, batches: int, workers: int) -> float:
    ds = SEED_STYLES[style](data_dir / SPLIT_DIRS["train"], data.mean, data.std)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    model = stock(build_model(cfg, N_CLASSES))
    opt = build_optimizer(cfg, model)
    loss_fn = Loss("probability")
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 5:  # warm-up excluded
            seen, start = 0, time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
        if step >= batches + 5:
            break
    return seen / (time.perf_counter() - start)


def stock(model: nn.Module) -> nn.Module:
    """The same network run through PyTorch's own layers, as the seed's Net was."""
    model.use_kernels = False
    return model


def engine_rate(cfg, data, batches: int, fused: bool = True) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, len(data.classes))
    model = place_model(model if fused else stock(model), torch.device("cpu"))
    images = torch.as_tensor(data.train.images)
    targets = torch.as_tensor(data.train.votes / data.train.votes.sum(1, keepdims=True))
    kwargs = dict(
        optimizer=build_optimizer(cfg, model),
        loss_fn=Loss("probability"),
        normalize=Normalize(data.mean, data.std),
        augment=Augment.from_config(cfg),
        batch_size=cfg.batch_size,
        gen=torch.Generator().manual_seed(0),
    )
    train_one_epoch(model, images, targets, max_batches=5, **kwargs)  # warm-up
    start = time.perf_counter()
    out = train_one_epoch(model, images, targets, max_batches=batches, **kwargs)
    return out["samples"] / (time.perf_counter() - start)


def training_flops_per_sample(model: nn.Module) -> float:
    """2 FLOPs per multiply-add, forward + backward (~2x forward) = 6 x MACs."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 48, 48))
    for h in handles:
        h.remove()
    return 6.0 * macs


def matmul_flops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "ferplus"))
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the seed-style pipeline")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved measurements of each pipeline")
    parser.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: fersearch's CPU allocator setting (process-wide, so for every row); default: glibc's",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.allocator == "tuned":
        tune_cpu_allocator()  # process-wide: the seed-style rows get it too
    data_dir = Path(args.data).resolve()
    if not (data_dir / "FER2013Train" / "label.csv").is_file():
        print(f"{data_dir} not found; benchmarking on the synthetic dataset")
        data_dir = ensure_synthetic(ROOT / "data" / "synthetic")
    cfg = resolve_config("cnn", {"shift": SHIFT, "rotation": ROTATION, "flip": True})
    data = load_dataset(data_dir, "ferplus8")
    # Interleaved repeats, best of each: one pipeline's leftovers (caches, allocator state)
    # must not decide the ratio on a shared machine.
    runs = {name: [] for name in ROWS}
    for _ in range(args.repeats):
        runs["engine"].append(engine_rate(cfg, data, args.batches))
        runs["tutorial"].append(seed_style_rate(cfg, data_dir, data, "tutorial", args.batches, args.workers))
        runs["stock"].append(engine_rate(cfg, data, args.batches, fused=False))
        runs["lean"].append(seed_style_rate(cfg, data_dir, data, "lean", args.batches, args.workers))
    print("repeats (samples/s): " + ", ".join(f"{name} {[round(v) for v in runs[name]]}" for name in ROWS))
    best = {name: max(values) for name, values in runs.items()}
    flops = training_flops_per_sample(build_model(cfg, N_CLASSES))
    rate = matmul_flops()
    best["limit"] = rate / flops
    kernels = (
        "C kernels: narrow convolutions, BN-ReLU-pool"
        if native.library() is not None
        else "C kernels unavailable: PyTorch composition for BN-ReLU-pool"
    )
    labels = {
        "tutorial": f"seed-style: pandas label row + scikit-image PNG read + PIL transforms per sample, "
        f"DataLoader workers={args.workers}, PyTorch's layers",
        "lean": "lean seed-style: PIL PNG read + PIL transforms per sample, targets precomputed",
        "stock": "engine data path, PyTorch's own layers (uint8 in memory, batched augmentation)",
        "engine": f"fersearch engine ({kernels})",
        "limit": f"compute-bound limit ({flops / 1e6:.2f} MFLOP/sample at {rate / 1e9:.1f} GFLOP/s matmul)",
    }
    print(
        f"\nseed CNN, batch {cfg.batch_size}, flip + affine, {args.threads} thread(s), {args.batches} batches, "
        f"{args.allocator} allocator, {data_dir}"
    )
    print("| pipeline | samples/s | vs seed-style | vs lean seed-style |")
    print("|---|---|---|---|")
    for name in [*ROWS, "limit"]:
        value = best[name]
        print(f"| {labels[name]} | {value:,.0f} | {value / best['tutorial']:.1f}x | {value / best['lean']:.1f}x |")
    engine, limit = best["engine"], best["limit"]
    print(f"\nengine reaches {engine / limit:.0%} of the compute-bound limit")


if __name__ == "__main__":
    main()
