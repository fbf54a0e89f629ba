"""MLflow tracking: the store location, a parent run per search, a nested run per trial.

The driver is the only writer (a Ray Tune callback), so a local SQLite store is safe. The
default store is `mlruns/mlflow.db` with artifacts in `mlruns/artifacts/`;
`MLFLOW_TRACKING_URI` (a team's tracking server) wins when set. A failure to log is logged as
a warning and never stops a search.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from fersearch import metrics as M
from fersearch.config import param_value
from fersearch.errors import FersearchError

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
TRIAL_TAG = "fersearch.trial_id"
STATUS_TAG = "fersearch.status"
KIND_TAG = "fersearch.kind"  # "search" on a search's parent run
BEST_RUN_TAG = "fersearch.best_run_id"  # on the parent run: the MLflow run of the best trial
REPEAT_TAG = "fersearch.repeat_of"  # on a `fersearch repeat` run: the search's parent run id
INDEX_TAG = "fersearch.trial_index"
POINT_TAG = "fersearch.point"  # a known point's name (seed, modern) on its trial's run
# Size of a trial's model, logged as params of its run (reported by the trainable).
MODEL_PARAMS = "model.parameters"
MODEL_FLOPS = "model.train_flops"
# On a search's parent run:
DATASET_TAG = "fersearch.dataset"
FINGERPRINT_TAG = "fersearch.data_fingerprint"
COMMAND_TAG = "fersearch.command"
SPACE_FILE_TAG = "fersearch.space_file"
OPTUNA_STORAGE_TAG = "fersearch.optuna_storage"
OPTUNA_STUDY_TAG = "fersearch.optuna_study"
OPTUNA_FILE = "optuna.db"  # a local store's Optuna storage, beside mlflow.db
RESUMED_TAG = "fersearch.resumed"
BEST_TRIAL_TAG = "fersearch.best_trial"  # the Ray trial id of the best trial
NEVER_PASSED_TAG = "fersearch.never_passed_{point}"  # no epoch beat that known point's best
REPEAT_SEED_TAG = "fersearch.repeat_seed"  # on a `fersearch repeat` run
NODE_TAG = "fersearch.node"  # on a trial's run: the Ray node id of its latest epoch
NODES_TAG = "fersearch.nodes"  # every node the trial trained on, in order (a lost node's trial moves)
NODE_IP_TAG = "fersearch.node_ip"  # that node's address
RETRIES_TAG = "fersearch.retries"  # on a trial's run: times Ray restarted it from its checkpoint
ERROR_TAG = "fersearch.error"  # on a trial that failed on an invalid configuration: why
MODEL_URI_TAG = "fersearch.model_uri"  # the best trial's logged MLflow model (models:/...)
CONFIG_TAG = "fersearch.config"  # on a trial's run: a hash of its whole config and fidelity (reuse of known points)
EPOCH_KEYS = (
    M.TRAIN_LOSS, M.TRAIN_ACCURACY, M.VAL_LOSS, M.VAL_ACCURACY, M.VAL_F1_MACRO, M.LR, M.EPOCH_SECONDS, M.COOLED_ACCURACY,
)


# A search name becomes a folder under mlruns/ray and is pasted into MLflow filter strings:
# letters, digits, '.', '_' and '-' only, starting with a letter or digit (no '/', no '..'
# component, no quotes).
SEARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_search_name(name: str) -> str:
    if not SEARCH_NAME.fullmatch(name):
        raise FersearchError(
            f"search name {name!r} is not allowed: use up to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


REUSED_TAG = "fersearch.reused_from"  # on a known point's run taken from an earlier search: that run's id


def config_key(model: str, config: dict[str, Any], fingerprint: str) -> str:
    """What identifies a trial's result: its whole resolved config, the data and the fidelity
    (CONFIG_TAG on its run). Two runs with the same key trained the same thing on the same data.
    A parameter of config.KEY_NEUTRAL at its neutral value is left out: the key is the one the
    versions before that parameter gave the same training."""
    import hashlib
    import json

    from fersearch.config import FIDELITY, KEY_NEUTRAL, resolve_config

    params = resolve_config(model, {k: v for k, v in config.items() if k != "model"}).to_params()
    params = {k: v for k, v in params.items() if not (k in KEY_NEUTRAL and v == KEY_NEUTRAL[k])}
    text = json.dumps([sorted(params.items()), fingerprint, FIDELITY], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tracking_uri(mlruns: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(mlruns).resolve() / STORE_FILE}"


def existing_store_uri(mlruns: Path) -> str:
    """The store a reader (export, report) opens; a local store must already exist, so a typo in
    --mlruns is reported instead of silently creating a new, empty store."""
    uri = tracking_uri(mlruns)
    store = Path(mlruns).expanduser().resolve() / STORE_FILE
    if "MLFLOW_TRACKING_URI" not in os.environ and not store.is_file():
        raise FersearchError(
            f"no MLflow store at {store} (run fersearch search first, or pass --mlruns with the folder that holds it)"
        )
    return uri


def best_of_search(mlruns: Path, model: str, search: str | None, run_id: str | None = None):
    """(store URI, client, the search's parent run, its best trial's run id), or a clear error."""
    uri = existing_store_uri(mlruns)
    client = client_for(uri)
    parent = find_search(client, model, search, run_id)
    best_run_id = parent.data.tags.get(BEST_RUN_TAG)
    if not best_run_id:
        raise FersearchError(f"search {parent.info.run_name!r} has no best trial (interrupted, or every trial failed)")
    return uri, client, parent, best_run_id


def find_search(client, model: str, search: str | None, run_id: str | None):
    """The parent run of the asked search (by name or run id), else the latest finished one."""
    experiment = client.get_experiment_by_name(model)
    if experiment is None:
        raise FersearchError(f"no searches for model {model} in the MLflow store (run fersearch search first)")
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception:  # mlflow raises MlflowException subclasses for unknown ids
            raise FersearchError(f"no MLflow run with id {run_id}") from None
        if run.info.experiment_id != experiment.experiment_id:
            raise FersearchError(f"run {run_id} is not a {model} run")
        parent_id = run.data.tags.get("mlflow.parentRunId")
        return client.get_run(parent_id) if parent_id else run
    filters = f"tags.`{KIND_TAG}` = 'search'"
    if search:
        check_search_name(search)  # the name goes into the filter string below
        filters += f" and attributes.run_name = '{search}'"
    else:
        filters += f" and tags.`{STATUS_TAG}` = 'finished'"
    runs = client.search_runs([experiment.experiment_id], filter_string=filters, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise FersearchError(f"no {'search named ' + repr(search) if search else 'finished search'} for model {model}")
    return runs[0]


def artifact_location(mlruns: Path, experiment: str) -> str:
    return (Path(mlruns).resolve() / "artifacts" / experiment).as_uri()


@contextlib.contextmanager
def using_uri(uri: str):
    """Point MLflow's fluent API at `uri` for a block, then restore the previous state.

    `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in the environment, which would
    silently redirect every later store lookup in this process (and its children).
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets the variable again


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_experiment_id(uri: str, name: str, mlruns: Path) -> str:
    """One experiment per model; local stores keep artifacts beside the database. A new local
    store's tables and the experiment are created by one process at a time (`sqlite_lock`)."""
    from fersearch.outputs import sqlite_lock

    with sqlite_lock(uri):
        client = client_for(uri)
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None if uri.startswith(("http://", "https://", "databricks")) else artifact_location(mlruns, name)
        return client.create_experiment(name, artifact_location=location)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(param_value(v))[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_best_trial(uri: str, run_ids: list[str], trainer, report: dict[str, Any], input_example) -> None:
    """Artifacts of the best trial (on its run and the parent): plots, report, config, model."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from fersearch.run_files import BEST_DIR, write_run_files

    client = client_for(uri)
    with tempfile.TemporaryDirectory() as tmp:
        write_run_files(Path(tmp), trainer, report, "best trial")  # model.pt: what `fersearch export` reads
        for run_id in run_ids:
            client.log_artifacts(run_id, tmp, BEST_DIR)
    summary = {
        f"{split}_{protocol}/{key}": value
        for protocol, splits in report["by_protocol"].items()
        for split, values in splits.items()
        for key, value in values.items()
    }
    for run_id in run_ids:
        for key, value in summary.items():
            client.log_metric(run_id, key, value)
    model = trainer.best_model().cpu().eval()
    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).numpy()
    # log_model needs the trial's run active: it is reopened, then ended with the status it had
    # (a best trial cut short by the budget was closed KILLED by record._close_unfinished_runs).
    status = client.get_run(run_ids[0]).info.status
    with using_uri(uri), warnings.catch_warnings():
        # torch's archive writer warns that weights sharing storage "may cause issues when your
        # weights are not on CPU": they are on CPU here (`.cpu()` above), the case it says is safe.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        mlflow.start_run(run_id=run_ids[0])
        try:
            info = mlflow.pytorch.log_model(
                model, name="model", signature=infer_signature(input_example, output), input_example=input_example
            )
        finally:
            mlflow.end_run(status=status if status in ("KILLED", "FAILED") else "FINISHED")
    for run_id in run_ids:  # MLflow 3 keeps logged models outside the run's artifacts
        client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
