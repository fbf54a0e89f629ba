"""A trial's outcome is one pure function of its last result (issue 14), used by the searcher,
the progress lines, MLflow and the study's totals."""

from types import SimpleNamespace

import pytest

from fersearch import metrics as M
from fersearch.outcome import COMPLETED, FAILED, STOPPED_EARLY, UNFINISHED, trial_outcome
from fersearch.progress import ProgressCallback
from fersearch.scheduler import Phase


def _last(epochs, best=0.7, done=True, **extra):
    return {M.EPOCH: int(epochs), M.EPOCHS_SEEN: epochs, M.BEST_METRIC: best, M.DONE: done, **extra}


def _between_epochs(seen, judge=0.4, done=True):
    """A sub-epoch report before the first whole epoch: only the subset score is known."""
    return {M.EPOCH: int(seen), M.EPOCHS_SEEN: seen, M.JUDGE_METRIC: judge, M.DONE: done}


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
        (_between_epochs(0.25), False, STOPPED_EARLY),  # cut by ASHA at a quarter epoch
        (_between_epochs(0.25, done=False), False, UNFINISHED),
        (_between_epochs(0.25, judge=float("nan")), False, FAILED),
        ({**_last(5.75, done=False), M.EPOCH: 5}, False, UNFINISHED),  # between its last two epochs
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
    assert lines == ["[4 ended] e failed after 1 epoch(s) | running 1, stopped early 1, failed 2 | best -"]
    progress.on_trial_complete(0, trials, trials[1])
    assert lines[-1] == "[3 ended] b stopped by ASHA after 2 epoch(s) val 0.5000 | running 2, stopped early 1, failed 1 | best val 0.5000 (b)"


def test_status_line_counts_judged_configurations_and_shows_each_running_trials_rung():
    phase = Phase()
    progress = ProgressCallback(lambda line: None, total=100, max_epochs=24, budget_s=3600,
                                rungs=[0.25, 0.75, 2.25, 6.75, 20.25], phase=phase)
    trials = [
        _trial("a", "TERMINATED", _between_epochs(0.25)),  # judged at the first rung, stopped
        _trial("b", "TERMINATED", _last(2.25, best=0.6)),
        _trial("c", "RUNNING", {**_between_epochs(7.5, judge=0.71, done=False), M.BEST_METRIC: 0.7}),
        _trial("d", "RUNNING", _between_epochs(0.0, done=False) | {M.EPOCHS_SEEN: 0.0}),  # not yet judged
        _trial("e", "PENDING", None),
    ]
    line = progress.status(trials)
    assert "3 configurations judged, 2 ended" in line
    assert "running 2: c rung 4 (7.5/24 ep, subset 0.710); d rung 0 (0/24 ep, subset 0.400)" in line
    assert line.endswith("| exploring")
    phase.finishing, phase.finishers = True, ["c", "d"]
    assert progress.status(trials).endswith("| finishing c, d")
