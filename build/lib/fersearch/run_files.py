"""The files of a finished training run, written by one function for `fersearch train --out` and
for the best trial of a search (MLflow's `best/` artifacts, which `fersearch export` reads).

`evaluate`, `predict` and the app load such a folder as a bundle (`bundle.load_bundle`); an
exported bundle adds the TorchScript file and where the model came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.pt"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
PER_CLASS_FILE = "classification_report.json"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, CURVES_FILE, CONFUSION_FILE, PER_CLASS_FILE)
TORCHSCRIPT_FILE = "model.torchscript.pt"  # an exported bundle's additions
SOURCE_FILE = "source.json"
BEST_DIR = "best"  # the MLflow artifact folder of a search's best trial (its run and the parent's)


def write_run_files(folder: Path, trainer, report: dict[str, Any], title: str) -> tuple[str, ...]:
    """Writes RUN_FILES for a trained `Trainer` and its `final_report` into `folder`, each
    atomically (a reader never sees half a file). Returns the names written."""
    import torch
    import yaml

    from fersearch.outputs import atomic_write
    from fersearch.plots import plot_confusion, plot_curves
    from fersearch.training import model_file_payload

    folder = Path(folder)
    data = trainer.data
    metrics = {**report, "history": trainer.history, "data": {"source": data.source, "fingerprint": data.fingerprint}}
    per_class = {split: report[split]["per_class"] for split in ("val", "test")}
    writers = {
        CONFIG_FILE: lambda p: p.write_text(yaml.safe_dump(trainer.cfg.to_dict(), sort_keys=False)),
        METRICS_FILE: lambda p: p.write_text(json.dumps(metrics, indent=2, default=float)),
        WEIGHTS_FILE: lambda p: torch.save(model_file_payload(trainer), p),
        CURVES_FILE: lambda p: plot_curves(trainer.history, p, title),
        CONFUSION_FILE: lambda p: plot_confusion(
            report["test"]["confusion_matrix"], data.classes, p, f"{title}: test ({data.protocol})"
        ),
        PER_CLASS_FILE: lambda p: p.write_text(json.dumps(per_class, indent=2, default=float)),
    }
    for name in RUN_FILES:
        atomic_write(folder / name, writers[name])
    return RUN_FILES
