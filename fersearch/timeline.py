"""Time-to-accuracy of a search, from the MLflow store alone.

Every validation epoch of every trial is a metric row with its wall-clock timestamp (logged
by the driver as the epoch's result arrives). Sorted by time, their running maximum is the
best validation accuracy the study had found after so many minutes. A known point (seed,
modern) is passed when any epoch of the study scores above that point's best epoch. A known
point whose result was reused from an earlier search (its run tagged REUSED_TAG) sets its bar
but is none of this study's progress: its rows never count as passing or as the best so far.

A budgeted search's trials also report a decayed branch at the capped rung (Trainer.cooldown,
`val/cooled_accuracy`): a model trained and scored on the whole validation set, but not kept
(the trial's training went on undecayed). Those rows are a timeline of their own
(`timelines`): when a decayed branch first passed each point is stated beside, never
mixed into, when a kept epoch did.
"""

from __future__ import annotations

import math

import pandas as pd

from fersearch import metrics as M
from fersearch.tracking import POINT_TAG, REUSED_TAG, TRIAL_TAG

COLUMNS = ["minutes", "trial", "point", "reused", "epoch", "val_accuracy"]


def timelines(client, parent_run_id: str, metrics=(M.VAL_ACCURACY, M.COOLED_ACCURACY)) -> list[pd.DataFrame]:
    """For each per-epoch accuracy in `metrics`, one row per logged value of the search (the
    search's runs read once): minutes since the search began, trial, known point name ('' for
    the searcher's trials), whether it was reused, the accuracy and the best so far (this study's
    own rows only). The default pair: the kept epochs and the decayed branches."""
    parent = client.get_run(parent_run_id)
    start = parent.info.start_time
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000
    )
    frames = []
    for metric in metrics:
        rows = [
            {
                "minutes": (m.timestamp - start) / 60000.0,
                "trial": run.data.tags.get(TRIAL_TAG, run.info.run_name),
                "point": run.data.tags.get(POINT_TAG, ""),
                "reused": REUSED_TAG in run.data.tags,
                "epoch": m.step,
                "val_accuracy": m.value,
            }
            for run in runs
            for m in client.get_metric_history(run.info.run_id, metric)
        ]
        frame = pd.DataFrame(rows, columns=COLUMNS).sort_values("minutes", kind="stable").reset_index(drop=True)
        frame["best_so_far"] = frame["val_accuracy"].where(~frame["reused"].astype(bool)).cummax()
        frames.append(frame)
    return frames


def validation_timeline(client, parent_run_id: str) -> pd.DataFrame:
    """The kept epochs' timeline alone (timelines)."""
    return timelines(client, parent_run_id, (M.VAL_ACCURACY,))[0]


def point_scores(timeline: pd.DataFrame) -> dict[str, float]:
    """Each known point's best validation accuracy."""
    known = timeline[timeline["point"] != ""]
    return known.groupby("point")["val_accuracy"].max().to_dict()


def minutes_to_pass(timeline: pd.DataFrame, rows: pd.DataFrame | None = None) -> dict[str, float]:
    """For each known point (its bar from `timeline`), the minutes until an epoch of the study
    (or a row of `rows`: the decayed branches of `timelines`) scored above its best (NaN: never passed)."""
    out = {}
    rows = timeline if rows is None else rows
    for point, bar in point_scores(timeline).items():
        own = ~rows["reused"].astype(bool) if "reused" in rows else True
        above = rows.loc[own & (rows["val_accuracy"] > bar), "minutes"]
        out[point] = float(above.min()) if len(above) else math.nan
    return out
