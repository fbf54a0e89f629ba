"""MLflow tracking: the store location, a parent run per search, a nested run per trial.

The driver is the only writer (a Ray Tune callback), so a local SQLite store is safe. The
default store is `mlruns/mlflow.db` with artifacts in `mlruns/artifacts/`;
`MLFLOW_TRACKING_URI` (a team's tracking server) wins when set. A failure to log is logged as
a warning and never stops a search.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from fersearch import metrics as M
from fersearch.errors import FersearchError, one_line
from fersearch.outcome import FAILED, trial_outcome

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
RESUMED_TAG = "fersearch.resumed"
BEST_TRIAL_TAG = "fersearch.best_trial"  # the Ray trial id of the best trial
NEVER_PASSED_TAG = "fersearch.never_passed_{point}"  # no epoch beat that known point's best
REPEAT_SEED_TAG = "fersearch.repeat_seed"  # on a `fersearch repeat` run
NODE_TAG = "fersearch.node"  # on a trial's run: the Ray node id of its latest epoch
NODES_TAG = "fersearch.nodes"  # every node the trial trained on, in order (a lost node's trial moves)
NODE_IP_TAG = "fersearch.node_ip"  # that node's address
RETRIES_TAG = "fersearch.retries"  # on a trial's run: times Ray restarted it from its checkpoint
MODEL_URI_TAG = "fersearch.model_uri"  # the best trial's logged MLflow model (models:/...)
EPOCH_KEYS = (M.TRAIN_LOSS, M.TRAIN_ACCURACY, M.VAL_LOSS, M.VAL_ACCURACY, M.VAL_F1_MACRO, M.LR, M.EPOCH_SECONDS)


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


# MLflow calls of the trial callback that failed in this process (the search reads the count
# before and after; the Ray results hold what the failed calls carried).
FAILED_CALLS = [0]


def safe(method: Callable) -> Callable:
    """Logging must never kill a search: one warning line per failed call, counted in
    FAILED_CALLS so the search can say what to sync, and carry on."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracking failure is non-fatal
            log.warning("MLflow logging failed in %s: %s", method.__name__, one_line(exc))
            FAILED_CALLS[0] += 1
            return None

    return wrapper


class MlflowTrialCallback(tune.Callback):
    """Ray Tune callback (driver side): a nested MLflow run per trial, metrics every epoch."""

    def __init__(
        self, uri: str, experiment_id: str, parent_run_id: str, max_epochs: int, points: list[str] | None = None
    ) -> None:
        self.uri = uri
        self.points = list(points or [])  # the first trials are these known points, in order
        self._sized: set[str] = set()
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self._runs: dict[str, str] = {}
        self._nodes: dict[str, list[str]] = {}  # run id -> the nodes its trial trained on
        self._logged: dict[str, set[int]] = {}  # run id -> the epochs it has logged
        self._ended: dict[str, str] = {}  # run id -> its status, for runs a resumed search found ended
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles its callbacks for resume: keep names and ids, not connections.
        return {**self.__dict__, "_client": None, "_runs": {}, "_sized": set(), "_nodes": {}, "_logged": {}, "_ended": {}}

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
        )
        if existing:  # a resumed search continues the trial's run
            run = existing[0]
            run_id = run.info.run_id
            # Epochs it logged before: a trial restored from an older checkpoint (its driver was
            # killed before Ray saved its state) trains them again; they are logged once.
            self._logged[run_id] = {m.step for m in self.client.get_metric_history(run_id, M.VAL_ACCURACY)}
            if run.info.status in ("FINISHED", "FAILED"):
                self._ended[run_id] = run.data.tags.get(STATUS_TAG, "")
        else:
            tags = {
                "mlflow.parentRunId": self.parent_run_id,
                TRIAL_TAG: trial.trial_id,
                INDEX_TAG: trial_index(trial),
                STATUS_TAG: "running",
            }
            point = known_point(trial, self.points)
            if point:
                tags[POINT_TAG] = point
            run = self.client.create_run(self.experiment_id, run_name=trial.trial_id, tags=tags)
            run_id = run.info.run_id
            self._logged[run_id] = set()
            log_params(self.client, run_id, trial.config)
        self._runs[trial.trial_id] = run_id
        return run_id

    @safe
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.run_id(trial)

    @safe
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric

        step = result_step(result)
        now = int(time.time() * 1000)
        rows = [Metric(k, float(result[k]), now, step) for k in EPOCH_KEYS if k in result]
        run_id = self.run_id(trial)
        if step in self.logged_epochs(run_id):
            return
        self.client.log_batch(run_id, metrics=rows)
        self.logged_epochs(run_id).add(step)
        if run_id not in self._sized and M.PARAMETERS in result:
            self._sized.add(run_id)
            log_params(self.client, run_id, {MODEL_PARAMS: int(result[M.PARAMETERS]), MODEL_FLOPS: int(result[M.TRAIN_FLOPS])})
        if M.NODE in result:
            self._tag_node(run_id, str(result[M.NODE]), str(result.get(M.NODE_IP, "")))

    def logged_epochs(self, run_id: str) -> set[int]:
        """The epochs `run_id` has logged (as far as this callback knows)."""
        return self._logged.setdefault(run_id, set())

    def _tag_node(self, run_id: str, node: str, node_ip: str) -> None:
        """The run's node tags, set when its trial starts on a node (again after a move)."""
        nodes = self._nodes.get(run_id)
        if nodes is None:  # a resumed search: the nodes the run was tagged with before
            tagged = self.client.get_run(run_id).data.tags.get(NODES_TAG, "")
            nodes = self._nodes[run_id] = [n for n in tagged.split(",") if n]
        if nodes and nodes[-1] == node:
            return
        nodes.append(node)
        self.client.set_tag(run_id, NODE_TAG, node)
        self.client.set_tag(run_id, NODES_TAG, ",".join(nodes))
        self.client.set_tag(run_id, NODE_IP_TAG, node_ip)

    @safe
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        epochs = int(last.get(M.TRAINING_ITERATION, 0))
        status = trial_outcome(last, self.max_epochs)
        run_id = self.run_id(trial)
        if self._ended.get(run_id) == status:  # a restored trial that had finished ends again
            return
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.log_metric(run_id, M.EPOCHS_TRAINED, epochs)
        if M.BEST_METRIC in last and status != FAILED:
            self.client.log_metric(run_id, M.BEST_METRIC, float(last[M.BEST_METRIC]))
        self.client.set_terminated(run_id, "FAILED" if status == FAILED else "FINISHED")

    @safe
    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A trial's worker died or it raised; Ray restarts it from its last checkpoint."""
        run_id = self.run_id(trial)
        retries = int(self.client.get_run(run_id).data.tags.get(RETRIES_TAG, 0)) + 1
        self.client.set_tag(run_id, RETRIES_TAG, str(retries))

    @safe
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, STATUS_TAG, FAILED)
        self.client.set_terminated(run_id, "FAILED")


def result_step(result: dict) -> int:
    """The MLflow step of a trial's result: its epoch."""
    return int(result.get(M.EPOCH, result.get(M.TRAINING_ITERATION, 0)))


def trial_index(trial) -> str:
    """Ray numbers trials in the order the searcher suggested them (experiment_tag '3_lr=...')."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return head if head.isdigit() else ""


def known_point(trial, points: list[str]) -> str | None:
    """The known point a trial is: the searcher suggests the space's points first, in order."""
    index = trial_index(trial)
    return points[int(index) - 1] if index.isdigit() and 0 < int(index) <= len(points) else None


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in params.items()}
    items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
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
    with using_uri(uri), mlflow.start_run(run_id=run_ids[0]), warnings.catch_warnings():
        # torch's archive writer warns that weights sharing storage "may cause issues when your
        # weights are not on CPU": they are on CPU here (`.cpu()` above), the case it says is safe.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        info = mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(input_example, output), input_example=input_example
        )
    for run_id in run_ids:  # MLflow 3 keeps logged models outside the run's artifacts
        client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
