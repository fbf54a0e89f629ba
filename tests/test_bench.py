"""The throughput benchmark's seed-style pipelines: every label row, its soft target, a normalised
48x48 image, and a training loop that runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from fersearch.data import SPLIT_DIRS, parse_label_csv

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_style_datasets_match_the_label_file(synthetic_dir: Path) -> None:
    bench = load_bench()
    folder = synthetic_dir / SPLIT_DIRS["train"]
    rows = list(parse_label_csv(folder / "label.csv"))
    votes = np.array([row for _, _, row in rows], dtype=np.float32)[:, : bench.N_CLASSES]
    expected = torch.as_tensor(votes / np.maximum(votes.sum(1, keepdims=True), 1))
    for style, dataset_class in bench.SEED_STYLES.items():
        ds = dataset_class(folder, mean=0.5, std=0.25)
        assert len(ds) == len(rows), style
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (1, 48, 48) and x.dtype == torch.float32, style
            torch.testing.assert_close(y, expected[i], msg=style)
            # Normalised with the given statistics: pixel 0 maps to -0.5 / 0.25 = -2.
            assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6, style
