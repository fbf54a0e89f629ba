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


def test_the_searcher_comparison_reads_each_study_as_the_search_recorded_it(smoke_search, tmp_path: Path) -> None:
    """bench/searcher_vs_random.py's table: configurations judged are the searched trials with a
    subset score (not the known points), and the best is the trial the search chose and scored."""
    from mlflow.tracking import MlflowClient

    from fersearch import metrics as M
    from fersearch.space import load_space
    from fersearch.tracking import POINT_TAG, tracking_uri

    spec = importlib.util.spec_from_file_location("searcher_vs_random", BENCH.parent / "searcher_vs_random.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    outcome, mlruns, _ = smoke_search
    row = bench.study_row(mlruns, "smoke")
    client = MlflowClient(tracking_uri(mlruns))
    runs = client.search_runs([client.get_experiment_by_name("cnn").experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    searched = [r for r in runs if not r.data.tags.get(POINT_TAG)]
    assert searched and len(searched) < len(runs)  # the known points ran and are not counted
    assert row["judged"] == sum(bool(client.get_metric_history(r.info.run_id, M.JUDGE_METRIC)) for r in searched)
    scored = outcome.best["by_protocol"]["ferplus8"]
    assert row["best"] == outcome.best["trial_id"] and row["val"] == scored["val"]["accuracy"]
    assert row["test"] == scored["test"]["accuracy"] and row["tpe"] + row["random"] <= len(searched)
    assert row["cooled"] == sum(len(client.get_metric_history(r.info.run_id, M.COOLED_ACCURACY)) for r in searched)
    # Fewer trials than the random start-up: every first-rung score is a random draw's; the
    # column compares what comes after the start-up (here the draws after the first).
    draws = row["first_rung"].get("random", [])
    assert draws and set(row["first_rung"]) == {"random"} and len(draws) <= row["judged"]
    row["after_startup"] = bench.after_startup(row, 1)
    assert row["after_startup"] == draws[1:]
    text = bench.table({"tpe": [row], "random": []})
    assert f"| smoke | {outcome.wall_s / 60:.1f} | {row['judged']} " in text and f"**{row['val']:.4f}**" in text
    space = load_space(bench.space_without_points(tmp_path / "space.yaml"), "cnn")
    assert space.points == {}  # neither arm trains a known point, nor reuses one the other trained
