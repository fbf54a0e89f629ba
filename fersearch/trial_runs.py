"""The Ray Tune callback that writes a search's trials to MLflow (driver side): a nested run per
trial under the search's parent run, every report's subset score, every epoch's metrics, the
trial's status when it ends. Only the search and sync import it (it needs Ray); tracking.py
keeps what every command shares.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from ray import tune

from fersearch import metrics as M
from fersearch.errors import one_line
from fersearch.outcome import FAILED, UNFINISHED, trial_outcome
from fersearch.scheduler import known_point, trial_index
from fersearch.tracking import (
    CONFIG_TAG,
    EPOCH_KEYS,
    ERROR_TAG,
    INDEX_TAG,
    MODEL_FLOPS,
    MODEL_PARAMS,
    NODE_IP_TAG,
    NODE_TAG,
    NODES_TAG,
    POINT_TAG,
    RETRIES_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    client_for,
    config_key,
    log_params,
)

log = logging.getLogger(__name__)


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
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        max_epochs: int,
        points: list[str] | None = None,
        model: str = "",
        fingerprint: str = "",
    ) -> None:
        self.uri = uri
        self.model, self.fingerprint = model, fingerprint  # for each run's CONFIG_TAG
        self.points = list(points or [])  # the first trials are these known points, in order
        self._sized: set[str] = set()
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self._runs: dict[str, str] = {}
        self._nodes: dict[str, list[str]] = {}  # run id -> the nodes its trial trained on
        self._logged: dict[str, set[int]] = {}  # run id -> the reports it has logged (their index)
        self._ended: dict[str, str] = {}  # run id -> its status, for runs a resumed search found ended
        self._paused: set[str] = set()  # runs ended at a pause (reopened if their trial is promoted)
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        # Tuner pickles its callbacks for resume: keep names and ids, not connections.
        return {**self.__dict__, "_client": None, "_runs": {}, "_sized": set(), "_nodes": {}, "_logged": {}, "_ended": {}, "_paused": set()}

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
            # Reports it logged before: a trial restored from an older checkpoint (its driver was
            # killed before Ray saved its state) trains them again; they are logged once.
            self._logged[run_id] = {m.step for m in self.client.get_metric_history(run_id, M.JUDGE_METRIC)}
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
            if self.model:
                tags[CONFIG_TAG] = config_key(self.model, trial.config, self.fingerprint)
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
        # Every report: the subset score at its report index; an epoch's end also: the epoch's
        # metrics at the epoch (MLflow's charts of val/accuracy stay per epoch).
        rows = [Metric(M.JUDGE_METRIC, float(result[M.JUDGE_METRIC]), now, step)] if M.JUDGE_METRIC in result else []
        if M.VAL_ACCURACY in result:
            rows += [Metric(k, float(result[k]), now, int(result[M.EPOCH])) for k in EPOCH_KEYS if k in result]
        rows += current_totals(result, now)
        run_id = self.run_id(trial)
        if result.get(M.PAUSED):
            self._end_run(run_id, result)  # waits at a rung: stopped there unless promoted
        elif run_id in self._paused:
            self._paused.discard(run_id)  # promoted: its run goes on
            self.client.set_tag(run_id, STATUS_TAG, "running")
            self.client.update_run(run_id, status="RUNNING")
        if M.NODE in result:  # a replayed report (a resumed or promoted trial) still names its node
            self._tag_node(run_id, str(result[M.NODE]), str(result.get(M.NODE_IP, "")))
        if step in self.logged_reports(run_id):
            return
        self.client.log_batch(run_id, metrics=rows)
        self.logged_reports(run_id).add(step)
        if run_id not in self._sized and M.PARAMETERS in result:
            self._sized.add(run_id)
            log_params(self.client, run_id, {MODEL_PARAMS: int(result[M.PARAMETERS]), MODEL_FLOPS: int(result[M.TRAIN_FLOPS])})

    def logged_reports(self, run_id: str) -> set[int]:
        """The reports `run_id` has logged, by index (as far as this callback knows)."""
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
        self._end_run(self.run_id(trial), trial.last_result or {})

    def _end_run(self, run_id: str, last: dict) -> None:
        """The run's status, epochs trained and best validation as of `last` (a trial's last
        result, or the report it paused at), and the run ended."""
        if last.get(M.PAUSED):
            if run_id in self._paused:
                return  # ended when it paused; the scheduler now ends it for good
            self._paused.add(run_id)
        epochs = float(last.get(M.EPOCHS_SEEN, 0))
        status = trial_outcome(last, self.max_epochs)
        if self._ended.get(run_id) == status:  # a restored trial that had finished ends again
            return
        self.client.set_tag(run_id, STATUS_TAG, status)
        if last.get(M.ERROR):
            self.client.set_tag(run_id, ERROR_TAG, str(last[M.ERROR])[:500])
        self.client.log_metric(run_id, M.EPOCHS_TRAINED, epochs)
        if M.BEST_METRIC in last and status != FAILED:
            self.client.log_metric(run_id, M.BEST_METRIC, float(last[M.BEST_METRIC]))
        # Cut short (a trial proposed before the switch to finishing, ended unstarted): KILLED,
        # as the runs the budget cuts are (record._close_unfinished_runs).
        self.client.set_terminated(run_id, {FAILED: "FAILED", UNFINISHED: "KILLED"}.get(status, "FINISHED"))

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


def current_totals(result: dict, now: int) -> list:
    """The run's epochs trained and best validation as of this report, at step 0 (the run's
    summary, as `_end_run` writes it; the latest write wins). A run the budget, Ctrl-C or a kill
    cuts, which no callback ends, is then current as of its last report, not as of the rung it
    last paused at."""
    from mlflow.entities import Metric

    rows = [Metric(M.EPOCHS_TRAINED, float(result[M.EPOCHS_SEEN]), now, 0)] if M.EPOCHS_SEEN in result else []
    if M.BEST_METRIC in result and not result.get(M.DIVERGED) and not result.get(M.INVALID):
        rows.append(Metric(M.BEST_METRIC, float(result[M.BEST_METRIC]), now, 0))
    return rows


def result_step(result: dict) -> int:
    """The MLflow step of a trial's report: its index (M.REPORT)."""
    return int(result.get(M.REPORT, 0))


