"""Inference latency of an exported bundle: one face, batch 1, one CPU thread.

    python bench/latency.py BUNDLE [--runs 300] [--warmup 30] [--threads 1]

Times the bundle's TorchScript file (`model.torchscript.pt`: raw 0..255 pixels in, logits
out, what a deployment would load) and its PyTorch module rebuilt from `model.pt`, on one
48x48 face, after warm-up calls; prints the median and the 90th percentile of the runs, and
the parameter count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fersearch.bundle import load_bundle
from fersearch.models import count_parameters


def timings(fn, x: torch.Tensor, runs: int, warmup: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        out = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    face = torch.rand(1, 1, 48, 48) * 255
    scripted = torch.jit.load(str(Path(args.bundle) / "model.torchscript.pt")).eval()
    module = bundle.model.eval()
    normalize = bundle.normalize
    rows = {
        "TorchScript (model.torchscript.pt)": timings(scripted, face, args.runs, args.warmup),
        "PyTorch module (model.pt)": timings(lambda x: module(normalize(x[:, 0].to(torch.uint8))), face, args.runs, args.warmup),
    }
    print(f"bundle {bundle.path}: {bundle.cfg.model}, {count_parameters(module):,} parameters, "
          f"{args.threads} thread(s), batch 1, {args.runs} runs after {args.warmup} warm-up")
    for name, ms in rows.items():
        ms.sort()
        print(f"  {name:<36} median {statistics.median(ms):.3f} ms, p90 {ms[int(0.9 * len(ms))]:.3f} ms")


if __name__ == "__main__":
    main()
