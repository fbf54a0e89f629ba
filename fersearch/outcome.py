"""What became of a trial, decided in one place from its last result.

The searcher (what Optuna is told), the progress lines, the MLflow status tag and the study's
totals all call `trial_outcome`, so a trial is counted the same way everywhere:

- `failed`: the trial raised, diverged (its last result carries `diverged: 1`, a finite worst
  score reported so that no NaN reaches ASHA; ASHA may even stop it on that report), had an
  invalid configuration (`invalid_config: 1`, reported instead of raising: a retry could never
  pass), or never produced a finite score;
- `completed`: it trained the whole budget (`max_epochs` whole epochs);
- `stopped_early`: it ended before the budget, cut by ASHA at a rung (between epochs, too:
  then only its score on the validation subset is known), or paused at a rung and never
  promoted (its last result carries `paused: 1`; a promoted trial reports again after it);
- `unfinished`: it had not ended when the search did (time budget or an interruption).

Ray marks the last result of every trial that ended (finished, or stopped by the scheduler)
with `done: True`; an errored trial is known by its error, not by its result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fersearch import metrics as M

COMPLETED = "completed"
STOPPED_EARLY = "stopped_early"
FAILED = "failed"
UNFINISHED = "unfinished"
OUTCOMES = (COMPLETED, STOPPED_EARLY, FAILED, UNFINISHED)


def trial_outcome(last: Mapping[str, Any] | None, max_epochs: int, *, error: bool = False) -> str:
    """The outcome of a trial from its last result (`trial.last_result`, `Result.metrics`)."""
    last = last or {}
    ended = bool(last.get(M.DONE))
    if error or last.get(M.DIVERGED) or last.get(M.INVALID):
        return FAILED
    if last.get(M.PAUSED):
        return STOPPED_EARLY if _finite(last.get(M.JUDGE_METRIC)) else FAILED
    if int(last.get(M.EPOCH, 0)) >= max_epochs and _finite(last.get(M.BEST_METRIC)):
        return COMPLETED
    if not ended:
        return UNFINISHED
    return STOPPED_EARLY if _finite(last.get(M.BEST_METRIC, last.get(M.JUDGE_METRIC))) else FAILED


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
