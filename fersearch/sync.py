"""`fersearch sync`: what MLflow missed while a search ran, sent from the search's Ray results.

The Ray results (mlruns/ray/NAME) hold every trial's config and every epoch's metrics, and
OUTCOME_FILE holds the search's totals and best trial. When the tracking server was down for
part of a search, the driver logged a warning per failed call and went on; this brings MLflow
up to date: a run per trial under the search's parent run, each epoch's metrics once, each
ended trial's status, and the parent's totals, best trial and model. Running it again changes
nothing. `--resume` does the trial part first, and a search whose server came back does it at
its end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fersearch.config import bound_mlflow_http
from fersearch.errors import FersearchError, one_line

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    name: str
    trials: int  # trials in the Ray results
    runs_updated: int  # trial runs that were created, got metrics or were ended
    parent_recorded: bool  # the parent run got the search's totals and best trial now


def read_results(result_file: Path) -> list[dict]:
    """A trial's results, one per epoch (a line being written when the driver died is dropped)."""
    rows = []
    try:
        lines = result_file.read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def sync_trials(
    experiment_dir: Path, uri: str, client, parent_run_id: str, max_epochs: int, points: list[str]
) -> tuple[int, int]:
    """Every trial of the Ray results has its run, its epochs and (once Ray ended it) its final
    status in MLflow. Returns the trials and how many runs changed; raises when MLflow calls fail."""
    from fersearch.tracking import FAILED_CALLS

    if not any(experiment_dir.glob("experiment_state-*.json")):
        return 0, 0  # no trial was ever started
    failed_before = FAILED_CALLS[0]
    try:
        trials, changed = _sync_trials(experiment_dir, uri, client, parent_run_id, max_epochs, points)
    except Exception as exc:  # noqa: BLE001 - a server that is down, a broken store: one line
        raise FersearchError(f"cannot sync the search's trials to MLflow at {uri} ({one_line(exc)})") from None
    failed = FAILED_CALLS[0] - failed_before
    if failed:
        raise FersearchError(f"{failed} MLflow call(s) failed while syncing to {uri}; is the tracking server up?")
    return trials, changed


def _sync_trials(
    experiment_dir: Path, uri: str, client, parent_run_id: str, max_epochs: int, points: list[str]
) -> tuple[int, int]:
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    from fersearch.tracking import RETRIES_TAG, STATUS_TAG, MlflowTrialCallback, result_step

    experiment_id = client.get_run(parent_run_id).info.experiment_id
    callback = MlflowTrialCallback(uri, experiment_id, parent_run_id, max_epochs, points)
    callback._client = client
    changed = 0
    trials = ExperimentAnalysis(str(experiment_dir)).trials
    for trial in trials:
        rows = read_results(Path(trial.path) / "result.json")
        if not rows:
            continue  # never reported: nothing to send
        run_id = callback.run_id(trial)  # the trial's run, created when MLflow never got it
        logged = callback.logged_epochs(run_id)
        missing = [row for row in rows if result_step(row) not in logged]
        for row in missing:
            callback.on_trial_result(0, [], trial, row)
        run = client.get_run(run_id)
        if trial.num_failures and run.data.tags.get(RETRIES_TAG) != str(trial.num_failures):
            client.set_tag(run_id, RETRIES_TAG, str(trial.num_failures))
        ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
        unclosed = run.info.status == "RUNNING" or run.data.tags.get(STATUS_TAG) == "running"
        if ended and unclosed:
            if trial.status == Trial.ERROR:
                callback.on_trial_error(0, [], trial)
            else:
                callback.on_trial_complete(0, [], trial)
        changed += bool(missing or (ended and unclosed))
    return len(trials), changed


def sync_search(model: str, name: str, mlruns: Path) -> SyncResult:
    """Bring the MLflow runs of the search `name` up to date from its Ray results."""
    from fersearch.data import load_raw
    from fersearch.search import (
        SEARCH_STATE_FILE,
        SearchSettings,
        auto_report,
        check_search,
        parent_status,
        read_outcome,
        record_search,
        write_outcome,
    )
    from fersearch.tracking import STATUS_TAG, client_for, tracking_uri
    from fersearch.trainable import load_trainer

    settings = SearchSettings(model=model, data_dir=Path("."), name=name, mlruns=mlruns, resume=True)
    if not (settings.experiment_dir / SEARCH_STATE_FILE).is_file():
        raise FersearchError(f"no search named {name!r} under {settings.storage}")
    saved = check_search(settings)  # the name, the folder, the saved search and its model
    bound_mlflow_http()
    uri = tracking_uri(settings.mlruns)
    client = client_for(uri)
    parent_run_id = saved["parent_run_id"]
    try:
        parent = client.get_run(parent_run_id)
    except Exception as exc:  # noqa: BLE001 - unreachable server, missing run: one line either way
        raise FersearchError(f"cannot read the search's parent run {parent_run_id} from {uri} ({one_line(exc)})") from None
    trials, updated = sync_trials(settings.experiment_dir, uri, client, parent_run_id, settings.max_epochs, saved.get("points", []))
    outcome = read_outcome(settings.experiment_dir)
    recorded = False
    if outcome is not None:
        if parent.data.tags.get(STATUS_TAG) != parent_status(outcome) or parent.info.status == "RUNNING":
            best = None
            if outcome.best is not None:
                raw = load_raw(settings.data_dir)
                trainer = load_trainer(outcome.best["checkpoint"], raw)
                best = (trainer, trainer.final_report(raw))
            if not record_search(uri, client, outcome, best):
                raise FersearchError(f"MLflow at {uri} could not record the search's results; is the tracking server up?")
            outcome.recorded, outcome.mlflow_failures = True, 0
            if outcome.best is not None:
                outcome.report = auto_report(settings, client, parent_run_id)
            write_outcome(settings.experiment_dir, outcome)
            recorded = True
    return SyncResult(name, trials, updated, recorded)
