"""`fersearch export`: the best trial of a search, out of MLflow, into a bundle + the registry.

The search already chose its best trial by validation accuracy (never test) and logged that
trial's weights, config, metrics and plots under the `best/` artifacts of its run; export reads
them back, writes a bundle (see `bundle.py`) and registers the MLflow model as
`fersearch-<model>` with the bundle's test metrics as version tags.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from fersearch.bundle import rebuild, write_bundle
from fersearch.config import config_from_dict
from fersearch.errors import FersearchError
from fersearch.outputs import check_out_dir
from fersearch.run_files import BEST_DIR, CONFUSION_FILE, METRICS_FILE, SOURCE_FILE, WEIGHTS_FILE
from fersearch.tracking import MODEL_URI_TAG, best_of_search, client_for, using_uri

log = logging.getLogger(__name__)


def export_best(
    model: str,
    out: Path,
    mlruns: Path,
    search: str | None = None,
    run_id: str | None = None,
    register: bool = True,
) -> dict[str, Any]:
    check_out_dir(out)  # before reading anything from the store
    uri, client, parent, best_run_id = best_of_search(mlruns, model, search, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(client.download_artifacts(best_run_id, BEST_DIR, tmp))
        except Exception as exc:  # noqa: BLE001 - any store error means the artifacts are unusable
            raise FersearchError(f"cannot read the best trial's artifacts from run {best_run_id} ({exc})") from None
        if not (folder / WEIGHTS_FILE).is_file():
            raise FersearchError(f"run {best_run_id} has no {BEST_DIR}/{WEIGHTS_FILE} to export")
        payload = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        report = json.loads((folder / METRICS_FILE).read_text())
        cfg = config_from_dict(payload["config"])
        net = rebuild(cfg, len(payload["classes"]), payload["state_dict"], f"run {best_run_id} {BEST_DIR}/{WEIGHTS_FILE}")
        metrics = {"val": report["val"], "test": report["test"], "by_protocol": report["by_protocol"], "best_epoch": report.get("best_epoch")}
        source = {
            "mlflow_run_id": best_run_id,
            "search_run_id": parent.info.run_id,
            "search": parent.info.run_name,
            "tracking_uri": uri,
        }
        extra = {CONFUSION_FILE: folder / CONFUSION_FILE} if (folder / CONFUSION_FILE).is_file() else {}
        bundle = write_bundle(
            out, cfg, net, payload["classes"], payload["normalize"]["mean"], payload["normalize"]["std"], metrics, source, extra
        )
    if register:
        model_uri = parent.data.tags.get(MODEL_URI_TAG) or f"runs:/{best_run_id}/model"
        source["registered"] = _register(uri, model, model_uri, report)
        (bundle / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return {"bundle": str(bundle), **source, "by_protocol": report["by_protocol"]}


def _register(uri: str, model: str, model_uri: str, report: dict[str, Any]) -> str | None:
    """Register the run's MLflow model; test metrics become version tags."""
    import mlflow

    name = f"fersearch-{model}"
    try:
        with using_uri(uri):
            version = mlflow.register_model(model_uri, name)
        client = client_for(uri)
        for protocol, splits in report["by_protocol"].items():
            for key in ("accuracy", "f1_macro", "f1_weighted", "balanced_accuracy"):
                client.set_model_version_tag(name, version.version, f"test_{protocol}_{key}", f"{splits['test'][key]:.4f}")
        return f"{name} v{version.version}"
    except Exception as exc:  # noqa: BLE001 - the bundle is written; registry trouble is a warning
        log.warning("could not register %s in the MLflow model registry: %s", name, exc)
        return None
