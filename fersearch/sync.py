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


def sync_search(model: str, name: str, mlruns: Path, allow_other_data: bool = False) -> SyncResult:
    """Bring the MLflow runs of the search `name` up to date from its Ray results."""
    from fersearch.data import check_same_data, load_raw
    from fersearch.outputs import check_out_dir
    from fersearch.record import (
        SEARCH_STATE_FILE,
        auto_report,
        experiment_path,
        parent_status,
        read_outcome,
        read_state,
        record_search,
        sync_trials,
        write_outcome,
    )
    from fersearch.tracking import (
        FINGERPRINT_TAG,
        STATUS_TAG,
        check_search_name,
        client_for,
        tracking_uri,
    )
    from fersearch.trainable import load_trainer

    check_search_name(name)
    mlruns = check_out_dir(mlruns, (), what="--mlruns")
    experiment_dir = experiment_path(mlruns, name)
    if not (experiment_dir / SEARCH_STATE_FILE).is_file():
        raise FersearchError(f"no search named {name!r} under {experiment_dir.parent}")
    saved = read_state(experiment_dir)
    if saved["model"] != model:
        raise FersearchError(f"search {name!r} is for model {saved['model']}, not {model}")
    bound_mlflow_http()
    uri = tracking_uri(mlruns)
    client = client_for(uri)
    parent_run_id = saved["parent_run_id"]
    try:
        parent = client.get_run(parent_run_id)
    except Exception as exc:  # noqa: BLE001 - unreachable server, missing run: one line either way
        raise FersearchError(f"cannot read the search's parent run {parent_run_id} from {uri} ({one_line(exc)})") from None
    trials, updated = sync_trials(experiment_dir, uri, client, parent_run_id, saved["max_epochs"], saved.get("points", []))
    outcome = read_outcome(experiment_dir)
    recorded = False
    if outcome is not None:
        if parent.data.tags.get(STATUS_TAG) != parent_status(outcome) or parent.info.status == "RUNNING":
            best = None
            if outcome.best is not None:
                raw = load_raw(saved["data_dir"])
                # The best checkpoint is scored again on this data: it must be the search's.
                recorded = saved.get("fingerprint") or parent.data.tags.get(FINGERPRINT_TAG)
                check_same_data(raw, recorded, f"search {name!r}", allow_other_data, "--allow-other-data")
                trainer = load_trainer(outcome.best["checkpoint"], raw)
                best = (trainer, trainer.final_report(raw))
            if not record_search(uri, client, outcome, best):
                raise FersearchError(f"MLflow at {uri} could not record the search's results; is the tracking server up?")
            outcome.recorded, outcome.mlflow_failures = True, 0
            if outcome.best is not None:
                outcome.report = auto_report(model, name, mlruns, experiment_dir, client, parent_run_id)
            write_outcome(experiment_dir, outcome)
            recorded = True
    return SyncResult(name, trials, updated, recorded)
