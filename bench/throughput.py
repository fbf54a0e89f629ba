"""Training throughput: fersearch's in-memory engine against a seed-style pipeline.

Both train the same model (the seed CNN by default) with the same optimizer, batch size and
augmentation (horizontal flip + affine shift/rotation), in this one process, so the ratio is
meaningful on a noisy shared machine. The seed-style pipeline reads and decodes each PNG per
sample and applies PIL/torchvision transforms through a DataLoader, and runs the network
through PyTorch's own layers, as the seed project did. A middle row runs the engine's data
path through those same stock layers, to show what the C kernels (fersearch.native: the
one-channel first convolution and the BN-ReLU-maxpool blocks) add. All rows use the same
optimizer code (fused on CPUs). fersearch's CPU allocator setting is process-wide, so
with `--allocator tuned` (the default) every row gets it; the seed-style row gains from it
too, which makes the ratios conservative.
Also prints the CNN's compute-bound limit: its training FLOPs per sample against a measured
fp32 matmul rate at the same thread count.

    python bench/throughput.py [--data ../shared/data/ferplus] [--batches 200] [--threads 1] [--repeats 2]
                               [--allocator tuned|default]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fersearch import native
from fersearch.augment import Augment
from fersearch.config import resolve_config
from fersearch.data import SPLIT_DIRS, load_dataset, load_raw
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


class SeedStyleDataset(Dataset):
    """Reads one PNG from disk per sample, as the seed's training loop did."""

    def __init__(self, folder: Path, names: list[str], targets: torch.Tensor, mean: float, std: float):
        self.folder, self.names, self.targets = folder, names, targets
        self.transform = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(),
                transforms.RandomAffine(degrees=ROTATION, translate=(SHIFT, SHIFT)),
                transforms.ToTensor(),
                transforms.Normalize([mean], [std]),
            ]
        )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        with Image.open(self.folder / self.names[i]) as image:
            x = self.transform(image.convert("L"))
        return x, self.targets[i]


def seed_style_rate(cfg, data_dir: Path, raw, data, batches: int, workers: int) -> float:
    train_mask = raw.split == 0
    names = [str(n).split("/", 1)[1] for n in raw.names[train_mask]]
    votes = torch.as_tensor(raw.votes[train_mask], dtype=torch.float32)[:, :8]
    targets = votes / votes.sum(1, keepdim=True).clamp_min(1)
    ds = SeedStyleDataset(data_dir / SPLIT_DIRS["train"], names, targets, data.mean, data.std)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    model = stock(build_model(cfg, 8))
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
    raw = load_raw(data_dir)
    data = load_dataset(data_dir, "ferplus8")
    # Interleaved repeats, best of each: one pipeline's leftovers (caches, allocator state)
    # must not decide the ratio on a shared machine.
    seeds, stocks, engines = [], [], []
    for _ in range(args.repeats):
        engines.append(engine_rate(cfg, data, args.batches))
        seeds.append(seed_style_rate(cfg, data_dir, raw, data, args.batches, args.workers))
        stocks.append(engine_rate(cfg, data, args.batches, fused=False))
    seed, stock_engine, engine = max(seeds), max(stocks), max(engines)
    print(
        f"repeats (samples/s): seed-style {[round(v) for v in seeds]}, "
        f"engine with stock layers {[round(v) for v in stocks]}, engine {[round(v) for v in engines]}"
    )
    flops = training_flops_per_sample(build_model(cfg, 8))
    rate = matmul_flops()
    print(
        f"\nseed CNN, batch {cfg.batch_size}, flip + affine, {args.threads} thread(s), {args.batches} batches, "
        f"{args.allocator} allocator, {data_dir}"
    )
    print("| pipeline | samples/s | vs seed-style |")
    print("|---|---|---|")
    print(f"| seed-style (PNG per sample + PIL transforms, DataLoader workers={args.workers}) | {seed:,.0f} | 1.0x |")
    print(
        f"| engine data path, PyTorch's own layers (uint8 in memory, batched augmentation) "
        f"| {stock_engine:,.0f} | {stock_engine / seed:.1f}x |"
    )
    kernels = (
        "C kernels: narrow convolutions, BN-ReLU-pool"
        if native.library() is not None
        else "C kernels unavailable: PyTorch composition for BN-ReLU-pool"
    )
    print(f"| fersearch engine ({kernels}) | {engine:,.0f} | {engine / seed:.1f}x |")
    print(f"| compute-bound limit ({flops / 1e6:.2f} MFLOP/sample at {rate / 1e9:.1f} GFLOP/s matmul) "
          f"| {rate / flops:,.0f} | {rate / flops / seed:.1f}x |")
    print(f"\nengine reaches {engine / (rate / flops):.0%} of the compute-bound limit")


if __name__ == "__main__":
    main()
