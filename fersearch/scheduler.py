"""When a search's trials stop: ASHA over the epochs a trial has seen, plus two protections.

- ASHA (asynchronous successive halving) compares trials by their score on the fixed validation
  subset (`val/judge_accuracy`) at rungs grace * factor^k epochs (fractional: with the defaults
  0.25, 0.75, 2.25, 6.75 and 20.25 of 24); a trial below the rung's top 1/factor stops there.
- The known points (the first trials, when they are run) are never stopped before the budget's
  end, and they set no bar at the rungs: the study keeps their full results as the bar to beat,
  but on schedules of their own (the seed's exponential decay, one-cycle) their early scores do
  not compare with the searched trials' (in a real study their quarter-epoch scores cut nearly
  every searched trial at the first rung).
- A time-budgeted search ends with its best configuration trained for the whole budget. After
  every result the scheduler looks at the leader (among the running searched trials that passed
  at least half of the rungs, are in the top 1/factor of every trial recorded at the highest of
  them, and could still reach `max_t` in the time left at their own measured pace: the one past
  the most rungs, best by its latest score among those) and at the time it needs. Once the budget left is no
  more than that (with a margin), the search switches from exploring to finishing: `Phase.finishing` makes the searcher propose
  nothing new, and the leader is never stopped by ASHA again. Once the leader has ended, the
  other searched trials still running stop at their next report (none of them could reach the
  budget any more; the search ends instead of idling to its deadline).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from fersearch import metrics as M
from fersearch.config import asha_rungs

log = logging.getLogger(__name__)

# The leader's time to finish, measured from its own epochs per second, is stretched by this
# margin; the best trial's final scoring (val and test under both protocols, with its TTA: about a
# third of a training epoch's compute) is reserved as one more epoch at the leader's pace, plus
# a fixed allowance for loading and recording.
FINISH_MARGIN = 1.15
FINAL_SCORING_S = 10.0


class Phase:
    """Exploring, or finishing one leader: decided by the scheduler, read by the searcher (which
    then proposes nothing new) and by the progress lines."""

    def __init__(self) -> None:
        self.finishing = False
        self.leader: str | None = None
        self.leader_done = False
        self.switched_at_s: float | None = None

    def describe(self) -> str:
        return f"finishing {self.leader}" if self.finishing else "exploring"


def trial_index(trial) -> str:
    """Ray numbers trials in the order the searcher suggested them (experiment_tag '3_lr=...')."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return head if head.isdigit() else ""


def known_point(trial, points: list[str]) -> str | None:
    """The known point a trial is: the searcher suggests the run points first, in order."""
    index = trial_index(trial)
    return points[int(index) - 1] if index.isdigit() and 0 < int(index) <= len(points) else None


class SearchASHA(ASHAScheduler):
    def __init__(
        self,
        *,
        max_epochs: int,
        grace: float,
        factor: float,
        points: list[str],
        budget_s: float | None = None,
        phase: Phase | None = None,
        emit: Callable[[str], None] = log.info,
    ) -> None:
        super().__init__(
            time_attr=M.EPOCHS_SEEN,
            metric=M.JUDGE_METRIC,
            mode="max",
            max_t=max_epochs,
            grace_period=min(grace, max_epochs),
            reduction_factor=factor,
        )
        self.max_epochs, self.points = max_epochs, list(points)
        self.budget_s, self.phase, self.emit = budget_s, phase or Phase(), emit
        self.rungs = asha_rungs(min(grace, max_epochs), factor, max_epochs)
        # A leader has passed at least half of the rungs (2.25 of 24 epochs by default): one
        # that only passed the first bars is no reason to stop exploring.
        self.min_rungs = math.ceil(len(self.rungs) / 2)
        self._start: float | None = None
        self._first: dict[str, tuple[float, float]] = {}  # trial id -> (epochs seen, seconds) at its first report

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start = None  # a resumed search's budget counts from its restart, as Ray's does

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._start is None:
            self._start = time.monotonic()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if known_point(trial, self.points):
            return TrialScheduler.CONTINUE  # never cut, never a bar (it ends by itself at the budget)
        action = super().on_trial_result(tune_controller, trial, result)
        if self.budget_s is not None and not self.phase.finishing and tune_controller is not None:
            self._maybe_finish(tune_controller.get_live_trials(), trial, result)
        if self.phase.leader_done:
            return TrialScheduler.STOP
        if trial.trial_id == self.phase.leader and action == TrialScheduler.STOP and int(result.get(M.EPOCH, 0)) < self.max_epochs:
            return TrialScheduler.CONTINUE
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id == self.phase.leader:
            self.phase.leader_done = True
        if known_point(trial, self.points):
            self._trial_info.pop(trial.trial_id, None)  # ASHA would record its last score at a rung
            return
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        if trial.trial_id == self.phase.leader:
            self.phase.leader_done = True
        super().on_trial_error(tune_controller, trial)

    def _maybe_finish(self, live, trial, result: dict) -> None:
        spent = time.monotonic() - (self._start or time.monotonic())
        left = self.budget_s - spent
        leader = self.leader(live, trial, result, left)
        if leader is None:
            return
        trial_id, seen, pace, need = leader
        if left > need:
            return
        self.phase.finishing, self.phase.leader, self.phase.switched_at_s = True, trial_id, spent
        self.emit(
            f"switching from exploring to finishing: {trial_id} (at {seen:.2f} of {self.max_epochs} epochs, "
            f"{pace * 60:.2f} epochs/min) needs ~{need / 60:.1f} min to reach the full budget and be scored, and "
            f"{left / 60:.1f} min are left; no new configurations from here"
        )

    def in_top(self, trial_id: str) -> bool:
        """Whether the trial's score at the highest rung it was recorded at is in the top
        1/factor of every trial recorded there (ASHA's own cut-off: finished and stopped trials
        count), so a trial that only scraped through a rung early is not finished for.
        (Ray's bracket keeps the rungs as (milestone, {trial id: score}), highest first.)"""
        bracket = self._trial_info.get(trial_id)
        for _milestone, recorded in bracket._rungs if bracket is not None else ():
            if trial_id in recorded:
                cutoff = bracket.cutoff(recorded)
                return cutoff is None or recorded[trial_id] >= cutoff
        return False

    def pace(self, trial_id: str, last: dict) -> float | None:
        """A trial's epochs per second between its first report and `last` (its start-up, model
        build and data hand-over, left out), or None before its second report."""
        seen, spent = float(last.get(M.EPOCHS_SEEN, 0)), float(last.get("time_total_s", 0))
        if seen <= 0:
            return None  # no report yet
        first = self._first.setdefault(trial_id, (seen, spent))
        if seen <= first[0] or spent <= first[1]:
            return None
        return (seen - first[0]) / (spent - first[1])

    def need_s(self, seen: float, pace: float, margin: float = FINISH_MARGIN) -> float:
        """Seconds a trial at `seen` epochs, training `pace` epochs a second, needs to reach the
        budget and have its best epoch scored (its training time stretched by `margin`)."""
        return (self.max_epochs - seen) / pace * margin + 1 / pace + FINAL_SCORING_S

    def leader(self, live, trial, result: dict, left: float = math.inf) -> tuple[str, float, float, float] | None:
        """(trial id, epochs seen, epochs per second, seconds needed with the margin) of the
        running searched trial, among those that can still finish in `left` seconds at their
        pace (without the margin), that passed the most rungs, the best by its latest subset
        score among those. The search switches to it once `left` is down to its need with the
        margin: a window of the margin's share of its remaining time, checked at every result."""
        best = None
        for t in live:
            last = result if t is trial else (t.last_result or {})
            if (t.status != "RUNNING" and t is not trial) or known_point(t, self.points) or last.get(M.DIVERGED):
                continue
            seen, pace = float(last.get(M.EPOCHS_SEEN, 0)), self.pace(t.trial_id, last)
            if pace is None:
                continue
            if self.need_s(seen, pace, margin=1.0) > left:
                continue  # too slow to finish in what is left: it cannot be the one finished
            need = self.need_s(seen, pace)
            passed = sum(seen >= r for r in self.rungs)
            if passed < self.min_rungs or not self.in_top(t.trial_id):
                continue  # not yet promising enough to stop exploring for
            key = (passed, float(last.get(M.JUDGE_METRIC, 0)))
            if best is None or key > best[0]:
                best = (key, (t.trial_id, seen, pace, need))
        return best[1] if best else None
