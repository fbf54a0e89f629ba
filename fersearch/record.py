"""What a search leaves behind, read by the search and by `fersearch sync` alike.

- the state file (SEARCH_STATE_FILE, beside the Ray results): the settings `--resume` needs and
  the MLflow parent run;
- the outcome (OUTCOME_FILE): the totals and the best trial, written before MLflow records them;
- the MLflow parent run's record: totals, best trial, time to accuracy, status;
- the catch-up sync: each trial's run, reports and end sent to MLflow from the Ray results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fersearch import metrics as M
from fersearch.config import IMAGE_SIZE
from fersearch.errors import FersearchError, one_line
from fersearch.outcome import UNFINISHED
from fersearch.outputs import atomic_write
from fersearch.tracking import BEST_RUN_TAG, BEST_TRIAL_TAG, NEVER_PASSED_TAG, STATUS_TAG

log = logging.getLogger(__name__)

SEARCH_STATE_FILE = "fersearch_search.json"  # what --resume reads: the search's settings and parent run
# The shape of what Ray pickles for --resume (the scheduler, its Phase, the searcher): a search
# saved under another shape fails inside Ray when resumed. Bump it when one of them gains or
# loses an attribute; state files without it are 1.
STATE_VERSION = 2
OUTCOME_FILE = "outcome.json"  # beside the Ray results: what `fersearch sync` records in MLflow


RAY_FOLDER = "ray"  # under --mlruns: each search's Ray results, in a folder named after it


def experiment_path(mlruns: Path, name: str) -> Path:
    return (Path(mlruns) / RAY_FOLDER).resolve() / name


def write_state(experiment_dir: Path, state: dict[str, Any]) -> None:
    experiment_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(state, indent=2)
    atomic_write(experiment_dir / SEARCH_STATE_FILE, lambda tmp: tmp.write_text(text))


def read_state(experiment_dir: Path) -> dict[str, Any]:
    """The saved search (`--resume`, sync), or one line saying why it cannot be read."""
    state_file = experiment_dir / SEARCH_STATE_FILE
    try:
        saved = json.loads(state_file.read_text())
        saved["model"], saved["trials"], saved["max_epochs"], saved["data_dir"]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as exc:
        raise FersearchError(f"{state_file} is damaged ({exc}); the search cannot be resumed") from None
    return saved


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str
    counts: dict[str, int]
    epochs_trained: int
    epochs_without_asha: int
    wall_s: float
    best: dict[str, Any] | None
    interrupted: bool = False
    report: str | None = None
    recorded: bool = True  # False: MLflow was unreachable when the search ended (fersearch sync)
    mlflow_failures: int = 0  # MLflow calls that failed while the trials ran
    proposals: dict[str, int] = field(default_factory=dict)  # who chose the trials' values (searcher.PROPOSED_BY)
    finishing_at_s: float | None = None  # when the search switched from exploring to finishing
    # Known points taken from the store whose validation accuracy is above the best trial's:
    # name -> {"run_id": the stored run's id, "val": its best}. The search exports and scores only
    # what it trained itself, so the user is told.
    stored_above_best: dict[str, dict[str, Any]] = field(default_factory=dict)


def write_outcome(experiment_dir: Path, outcome: SearchOutcome) -> None:
    text = json.dumps(dataclasses.asdict(outcome), indent=2, default=str)
    atomic_write(experiment_dir / OUTCOME_FILE, lambda tmp: tmp.write_text(text))


INTERRUPTED = "interrupted"  # the parent run's status tag while `--resume` can continue the search


def parent_status(outcome: SearchOutcome) -> str:
    """The status tag a search's parent run gets once its results are recorded."""
    if outcome.interrupted:
        return INTERRUPTED
    return "finished" if outcome.best is not None else "no successful trial"


def read_outcome(experiment_dir: Path) -> SearchOutcome | None:
    try:
        return SearchOutcome(**json.loads((experiment_dir / OUTCOME_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise FersearchError(f"{experiment_dir / OUTCOME_FILE} is damaged ({exc})") from None


def record_search(uri: str, client, outcome: SearchOutcome, best=None) -> bool:
    """The search's totals and its best trial (`best`: its trainer and final report) on the
    MLflow parent run, which ends FINISHED (or FAILED: no successful trial). False, after one
    warning line, when MLflow could not be reached: `fersearch sync` records it later."""
    from fersearch.tracking import TRIAL_TAG, log_best_trial

    parent_run_id = outcome.parent_run_id
    try:
        _close_unfinished_runs(client, parent_run_id)
        for key, value in outcome.counts.items():
            client.log_metric(parent_run_id, f"trials_{key}", value)
        client.log_metric(parent_run_id, M.EPOCHS_TRAINED, outcome.epochs_trained)
        client.log_metric(parent_run_id, "epochs_without_asha", outcome.epochs_without_asha)
        client.log_metric(parent_run_id, "wall_s", outcome.wall_s)
        for source, count in outcome.proposals.items():  # who chose the trials (searcher.PROPOSED_BY)
            client.log_metric(parent_run_id, f"proposed_{source}", count)
        if outcome.finishing_at_s is not None:
            client.log_metric(parent_run_id, "finishing_from_s", outcome.finishing_at_s)
        _log_time_to_accuracy(client, parent_run_id)
        if outcome.best is None:  # interrupted, or no successful trial
            client.set_tag(parent_run_id, STATUS_TAG, parent_status(outcome))
            if not outcome.interrupted:
                client.set_terminated(parent_run_id, "FAILED")
            return True
        trainer, report = best
        trial_id = outcome.best["trial_id"]
        runs = client.search_runs(
            [client.get_run(parent_run_id).info.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        )
        run_ids = [r.info.run_id for r in runs] + [parent_run_id]
        # Two faces, not one: MLflow saves the model with torch.export, which fixes a dimension
        # of size 1 in the example ("0/1 specialized"), and the logged model would then take one
        # face at a time only.
        example = np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        log_best_trial(uri, run_ids, trainer, report, example)
        outcome.best["run_id"] = run_ids[0]
        client.set_tag(parent_run_id, BEST_TRIAL_TAG, trial_id)
        client.set_tag(parent_run_id, BEST_RUN_TAG, run_ids[0])
        client.set_tag(parent_run_id, STATUS_TAG, parent_status(outcome))
        client.set_terminated(parent_run_id, "FINISHED")
        return True
    except Exception as exc:  # noqa: BLE001 - the results stand in the Ray folder; sync records them
        log.warning("MLflow could not record the search's results: %s", one_line(exc))
        return False


def _log_time_to_accuracy(client, parent_run_id: str) -> None:
    """`minutes_to_pass_<point>` on the parent run: when the study first beat each known point;
    `minutes_to_pass_<point>_cooled`: when a decayed branch at the capped rung first did (timeline)."""
    from fersearch.timeline import minutes_to_pass, timelines

    try:
        timeline, branches = timelines(client, parent_run_id)
        passed = minutes_to_pass(timeline)
        cooled = minutes_to_pass(timeline, branches)
    except Exception as exc:  # noqa: BLE001 - the search's results stand without it
        log.warning("time-to-accuracy failed: %s", exc)
        return
    for point, minutes in passed.items():
        if math.isfinite(minutes):
            client.log_metric(parent_run_id, f"minutes_to_pass_{point}", minutes)
        else:
            client.set_tag(parent_run_id, NEVER_PASSED_TAG.format(point=point), "true")
    for point, minutes in cooled.items():
        if math.isfinite(minutes):
            client.log_metric(parent_run_id, f"minutes_to_pass_{point}_cooled", minutes)


def record_fault(client, parent_run_id: str) -> None:
    """A search that a fault inside Ray Tune ended before its results: its trials' runs still
    open are closed as cut short (`--resume` reopens them) and the parent run says interrupted."""
    try:
        _close_unfinished_runs(client, parent_run_id)
        client.set_tag(parent_run_id, STATUS_TAG, INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the fault's own line matters more
        log.warning("MLflow could not record that the search stopped: %s", one_line(exc))


def _close_unfinished_runs(client, parent_run_id: str) -> None:
    """Trials that Ray never ended (the time budget, Ctrl-C) get no callback: their MLflow runs
    would stay RUNNING. Mark them cut short and KILLED; `--resume` reopens the same run. Their
    epochs trained and best validation are those of their last report (trial_runs.current_totals)."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=5000,
    )
    for run in runs:
        client.set_tag(run.info.run_id, STATUS_TAG, UNFINISHED)
        client.set_terminated(run.info.run_id, "KILLED")


def auto_report(model: str, name: str, mlruns: Path, experiment_dir: Path, client, parent_run_id: str) -> str | None:
    """Every finished search writes its study report beside its Ray results and into MLflow."""
    try:
        from fersearch.report import build_report

        path = build_report(model, experiment_dir / "report", mlruns, name)
        client.log_artifacts(parent_run_id, str(path.parent), "report")
        return str(path)
    except Exception as exc:  # noqa: BLE001 - the search's results stand without the report
        log.warning("study report failed: %s", exc)
        return None


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
    from fersearch.trial_runs import FAILED_CALLS

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

    from fersearch.tracking import RETRIES_TAG, STATUS_TAG
    from fersearch.trial_runs import MlflowTrialCallback, result_step

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
        logged = callback.logged_reports(run_id)
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
