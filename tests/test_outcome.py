"""A trial's outcome is one pure function of its last result (issue 14), used by the searcher,
the progress lines, MLflow and the study's totals."""

from types import SimpleNamespace

import pytest

from fersearch import metrics as M
from fersearch.outcome import COMPLETED, FAILED, STOPPED_EARLY, UNFINISHED, trial_outcome
from fersearch.search import ProgressCallback


def _last(epochs, best=0.7, done=True, **extra):
    return {M.TRAINING_ITERATION: epochs, M.BEST_METRIC: best, M.DONE: done, **extra}


@pytest.mark.parametrize(
    "last, error, expected",
    [
        (_last(6), False, COMPLETED),  # the whole budget
        (_last(6, done=False), False, COMPLETED),  # its last epoch reported, not yet marked done
        (_last(2), False, STOPPED_EARLY),  # ASHA's STOP marks the result done
        (_last(2, done=False), False, UNFINISHED),  # the budget or Ctrl-C ended it
        (_last(1, best=0.0, **{M.DIVERGED: 1}), False, FAILED),  # diverged, then cut by ASHA
        (_last(3), True, FAILED),  # raised
        (_last(2, best=float("nan")), False, FAILED),
        (None, True, FAILED),  # failed before its first report
        (None, False, UNFINISHED),  # never reported, never ended
    ],
)
def test_each_outcome(last, error, expected):
    assert trial_outcome(last, 6, error=error) == expected


def _trial(trial_id, status, last):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last)


def test_progress_line_counts_a_diverged_trial_as_failed():
    lines = []
    progress = ProgressCallback(lines.append, total=5, max_epochs=6)
    trials = [
        _trial("a", "TERMINATED", _last(6, best=0.8)),
        _trial("b", "TERMINATED", _last(2, best=0.5)),
        _trial("c", "ERROR", _last(1)),
        _trial("d", "RUNNING", _last(3, done=False)),
        _trial("e", "RUNNING", _last(1, best=0.0, **{M.DIVERGED: 1})),  # ending now, stopped by ASHA
    ]
    progress.on_trial_complete(0, trials, trials[-1])
    assert lines == ["[4/5] e failed after 1 epoch(s) | running 1, stopped early 1, failed 2 | best -"]
    progress.on_trial_complete(0, trials, trials[1])
    assert lines[-1] == "[3/5] b stopped by ASHA after 2 epoch(s) val 0.5000 | running 2, stopped early 1, failed 1 | best 0.5000 (b)"
