"""Ray Tune overhead of `fersearch search`: wall time against the time spent inside trials.

Runs a real search (synthetic data, one trial at a time, ASHA off by giving every trial the
same small budget) and reads Ray's per-trial results back:

- wall: Tuner.fit's wall time, without Ray's own start-up and the end-of-search scoring and
  logging, both measured separately;
- inside trials: the sum of each trial's `time_total_s` (the trainable from first line to
  last report, data hand-over and model build included);
- training: the sum of the epochs' own time (`time/epoch_s`), the part the engine controls.

    python bench/tune_overhead.py [--trials 12] [--epochs 2] [--no-reuse]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import ray
import yaml
from ray.tune import ExperimentAnalysis

from fersearch import metrics as M
from fersearch.search import SearchSettings, run_search
from fersearch.synthetic import ensure_synthetic

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = ensure_synthetic(ROOT / "data" / "synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.yaml"
        # The seed CNN with a few cheap knobs: trial cost stays comparable across trials.
        space.write_text(yaml.safe_dump({"model": "cnn", "params": {
            "lr": {"loguniform": [0.005, 0.05]}, "dropout": {"uniform": [0.0, 0.3]}, "flip": {"choice": [True, False]}}}))
        start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray_start = time.perf_counter() - start
        settings = SearchSettings(
            model="cnn", data_dir=data, name="overhead", mlruns=Path(tmp) / "mlruns", trials=args.trials,
            max_epochs=args.epochs, grace_period=args.epochs, cpus_per_trial=2, space_path=space,
        )
        start = time.perf_counter()
        outcome = run_search(settings)
        wall = time.perf_counter() - start
        analysis = ExperimentAnalysis(str(settings.experiment_dir))
        inside = sum(r["time_total_s"] for r in analysis.results.values() if r)
        training = sum(
            df[M.EPOCH_SECONDS].sum() for df in analysis.trial_dataframes.values() if M.EPOCH_SECONDS in df
        )
        ray.shutdown()
    n = outcome.counts["trials"]
    print(f"\n{n} trials x {args.epochs} epochs, synthetic data ({data}), one trial at a time, 2 CPUs")
    print("| measure | seconds | share of search wall |")
    print("|---|---|---|")
    print(f"| Ray local start-up (once) | {ray_start:.1f} | - |")
    fit = outcome.wall_s
    print(f"| search wall: Tuner.fit (all trials) | {fit:.1f} | 100% |")
    print(f"| inside trials (sum of time_total_s) | {inside:.1f} | {inside / fit:.0%} |")
    print(f"| training epochs (sum of time/epoch_s) | {training:.1f} | {training / fit:.0%} |")
    print(f"| after fit: best trial scored, model + report logged (once) | {wall - fit:.1f} | - |")
    print(f"\nfit wall / inside-trials = {fit / inside:.2f}; Ray overhead per trial = {(fit - inside) / n:.2f} s "
          f"(outside the trainable), {(inside - training) / n:.2f} s (inside it, before/after epochs)")


if __name__ == "__main__":
    main()
