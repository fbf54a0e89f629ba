"""What one sub-epoch report of a search trial costs, against the training it reports on.

A trial reports 4 times an epoch (config.REPORTS_PER_EPOCH). Each report costs:
- in the trial: scoring the fixed validation subset (`Trainer.judge`, JUDGE_IMAGES images);
- in the driver: the MLflow callback's `log_batch`, Optuna's `report` to its sqlite study and
  ASHA's rung bookkeeping (measured on the real objects, with a real store in a temp folder).
Both are set against the training time of a quarter epoch of the same model, measured in the
same run (1 thread, as search trials run).

    python bench/report_overhead.py [--data ../shared/data/ferplus] [--threads 1] [--reports 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from fersearch import metrics as M
from fersearch.config import JUDGE_IMAGES, REPORTS_PER_EPOCH, resolve_config
from fersearch.data import apply_protocol, load_raw
from fersearch.engine import evaluate
from fersearch.synthetic import ensure_synthetic
from fersearch.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODERN = {"channels": "32,64,128", "padding": "same", "kernel_size": 3, "fc": "256", "dropout": 0.3, "lr": 0.05,
          "nesterov": True, "weight_decay": 5e-4, "batch_size": 64, "shift": 0.05, "rotation": 10, "scale": 0.1,
          "scheduler": "wsd", "warmup_epochs": 0.25}


def trial_side(data_dir: Path, threads: int, batches: int) -> dict[str, float]:
    """Seconds per training batch and per subset scoring, for the seed Net and the modern CNN."""
    torch.set_num_threads(threads)
    raw = load_raw(data_dir)
    out = {}
    for name, overrides in (("seed Net", {}), ("modern CNN", MODERN)):
        cfg = resolve_config("cnn", {**overrides, "epochs": 24})
        trainer = Trainer(cfg, apply_protocol(raw, cfg.protocol), "cpu")
        trainer.run_epoch(max_batches=3)  # warm-up
        start = time.perf_counter()
        trainer.run_epoch(max_batches=batches)
        epoch_s = time.perf_counter() - start
        start = time.perf_counter()  # the epoch's whole-validation pass, taken out below
        evaluate(trainer.eval_model, trainer.val_images, trainer.data.valid.labels, trainer.data.classes, trainer.normalize)
        per_batch = (epoch_s - (time.perf_counter() - start)) / batches
        trainer.judge()
        start = time.perf_counter()
        for _ in range(3):
            trainer.judge()
        judge = (time.perf_counter() - start) / 3
        quarter = trainer.train_size / REPORTS_PER_EPOCH / cfg.batch_size * per_batch
        out[name] = {"quarter_epoch_s": quarter, "judge_s": judge, "subset": len(trainer.judge_labels)}
    return out


def driver_side(reports: int) -> dict[str, float]:
    """Milliseconds per report in the driver: MLflow callback, Optuna's report, ASHA."""
    from fersearch.scheduler import SearchASHA
    from fersearch.searcher import make_searcher
    from fersearch.space import SPACES_DIR, load_space
    from fersearch.tracking import get_experiment_id, tracking_uri
    from fersearch.trial_runs import MlflowTrialCallback

    with tempfile.TemporaryDirectory() as tmp:
        mlruns = Path(tmp)
        uri = tracking_uri(mlruns)
        experiment = get_experiment_id(uri, "cnn", mlruns)
        from fersearch.tracking import client_for

        parent = client_for(uri).create_run(experiment).info.run_id
        callback = MlflowTrialCallback(uri, experiment, parent, 24, [])
        space = dataclasses.replace(load_space(SPACES_DIR / "cnn.yaml", "cnn"), points={})
        searcher = make_searcher(space, 0, 0, 24, f"sqlite:///{mlruns / 'optuna.db'}", "bench")
        asha = SearchASHA(max_epochs=24, grace=0.25, factor=3, points=[])
        trial = SimpleNamespace(trial_id="t1", experiment_tag="1_x", config=searcher.suggest("t1"))
        asha.on_trial_add(None, trial)
        callback.on_trial_start(0, [], trial)
        timings = {"MLflow callback": [], "Optuna report": [], "ASHA": []}
        for k in range(1, reports + 1):
            result = {M.EPOCHS_SEEN: k / REPORTS_PER_EPOCH, M.REPORT: k, M.EPOCH: k // REPORTS_PER_EPOCH,
                      M.JUDGE_METRIC: 0.5, M.DIVERGED: 0}
            if k >= REPORTS_PER_EPOCH:  # past the first epoch a report carries the trial's best
                result[M.BEST_METRIC] = 0.5
            for name, call in (("MLflow callback", lambda r=result: callback.on_trial_result(0, [], trial, r)),
                               ("Optuna report", lambda r=result: searcher.on_trial_result("t1", r)),
                               ("ASHA", lambda r=result: asha.on_trial_result(None, trial, r))):
                start = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="FERPlus folder (default: the synthetic set)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--reports", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data) if args.data else ensure_synthetic(ROOT / "data" / "synthetic")
    trial = trial_side(data, args.threads, args.batches)
    driver = driver_side(args.reports)
    print(f"\ndata {data}; {args.threads} thread(s); subset of {JUDGE_IMAGES} validation images (at most); "
          f"{REPORTS_PER_EPOCH} reports an epoch")
    print("| model | quarter epoch of training (s) | subset scoring (s) | subset scoring / quarter epoch |")
    print("|---|---|---|---|")
    for name, row in trial.items():
        print(f"| {name} | {row['quarter_epoch_s']:.2f} | {row['judge_s']:.3f} ({row['subset']} images) | "
              f"{row['judge_s'] / row['quarter_epoch_s']:.1%} |")
    print(f"\n| driver, per report (median of {args.reports}) | ms |")
    print("|---|---|")
    for name, ms in driver.items():
        print(f"| {name} | {ms:.2f} |")
    print(f"| total | {sum(driver.values()):.2f} |")


if __name__ == "__main__":
    main()
