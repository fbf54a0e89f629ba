"""When a search's trials stop or wait: ASHA with promotions over the epochs a trial has seen.

- Asynchronous successive halving as its paper states it (Li et al., "A System for Massively
  Parallel Hyperparameter Tuning", 2020): rungs at grace * factor^k epochs (fractional: with the
  defaults 0.25, 1, 4 and 16 of 24), trials compared by their score on the fixed
  validation subset (`val/judge_accuracy`). A trial that reaches a rung goes on only when it is
  in the top floor(n/factor) of the n trials recorded there; otherwise it is PAUSED and waits.
  Whenever a slot is free, a paused trial that has become promotable (more trials recorded at
  its rung raise the quota) is resumed first, highest rung first; only when none is does a new
  configuration start. Ray's stock ASHA decides stop-or-continue at once, so on 2 slots the first
  trials pass empty rungs unopposed and one expensive configuration holds a core for most of a
  study (a real 45-minute study judged 4 configurations); here an empty rung promotes nobody.
- One departure from the paper: at most floor(n/factor) trials go on from a rung of n (the paper
  promotes any trial in the top floor(n/factor) not yet promoted, so promotions outgrow the
  quota when later trials are better). With TPE proposing ever better configurations, most
  arrivals rank in the top quarter: the 2-hour study before this bound promoted 59% of its
  trials past the first rung and 24% to the capped rung (quotas 25% and 6%), and those 16
  trials took 87 of its 135 exploring slot-minutes. With the bound, a trial in the quota waits
  for a free place, and the best trial waiting at the rung takes it.
- A paused trial resumes from its last checkpoint (a whole epoch, or its start): checkpoints at
  the rungs themselves would be mid-epoch, and a Ray checkpoint without the validation score
  would displace the best epoch's; it repeats at most 0.75 epochs (its reports are logged once).
- When no new configuration can start (the trial cap is reached) and nothing runs, the quota is
  relaxed to ceil(n/factor), so a small search still trains its best configuration to the
  budget; when nothing is promotable even so, the paused trials end (stopped early).
- The known points (the first trials, when they are run) are never paused or stopped before the
  budget's end, and they set no bar at the rungs: the study keeps their full results as the bar
  to beat, but on schedules of their own (the seed's exponential decay, one-cycle) their early
  scores do not compare with the searched trials' (in a real study their quarter-epoch scores
  cut nearly every searched trial at the first rung).
- A time-budgeted search explores only up to a capped rung (config.explore_cap: 4 of 24 epochs
  by default): a trial that reaches it pauses there, however it ranks. The 2-hour study without
  the cap spent 120 of its 233 slot-minutes on the 8 trials promoted past 6.75 epochs and judged
  44 configurations; as TPE improved, each new configuration ranked in the top third on arrival
  and went on, so the deep rungs filled with near-copies of the leader at 10-20 minutes each.
  Their order past the cap is left to the finishing phase, which trains the best of them to
  the budget on every slot.
- A time-budgeted search ends with its best configurations trained for the whole budget. After
  every result the scheduler ranks the candidates (the running or paused searched trials that
  passed at least half of the explored rungs, are in the top 1/factor of every trial recorded
  at one of those rungs or a higher one, and could still reach `max_t` in the time left at
  their own measured pace, and would not end their slot's exploring within the budget's first
  third (EXPLORE_FIRST) unless no faster trial has been seen: the ones past the most rungs
  first, then by their latest score) and the first is the leader. Once the budget left is no
  more than the time the leader needs (with a margin), the leader's slot switches from
  exploring to finishing, and the other free slots take the next best candidates that need no
  more time than it. Slots left without one keep exploring beside the finishers (the searcher
  still proposes), each switching when the budget left is down to what its own best candidate
  needs; a slow leader chosen early would otherwise idle them for the rest of the budget. Once every slot has a finisher, or no other
  trial (running, paused, or a new one at the fastest pace seen) could still reach the budget,
  exploring is over: `Phase.finishing` makes the searcher propose nothing new, the other paused
  trials end, a searched trial not yet reported stops at once and the others still running at
  their next report (none of them could reach the budget, and beside a finisher they slow it),
  and the finishers are never stopped again.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from fersearch import metrics as M
from fersearch.config import asha_rungs, explore_cap, rungs_passed

log = logging.getLogger(__name__)

# A finisher's time to finish, measured from its own epochs per second, is stretched by this
# margin; the best trial's final scoring (val and test under both protocols, with its TTA: about a
# third of a training epoch's compute) is reserved as one more epoch at the finisher's pace, plus
# a fixed allowance for loading and recording. The pace is measured while exploring, beside a slot
# that keeps starting small and short trials; two finishers of the same size contend for the memory
# bus: in the 2-hour study of 2026-11-30 (accept-2h-quota) both finishers measured 0.61 epochs/min
# and trained 0.46 finishing (1.32x slower), and a margin of 1.15 left them 2 epochs short.
FINISH_MARGIN = 1.4
FINAL_SCORING_S = 10.0
# Every slot explores for at least this share of a time budget: a candidate so slow that finishing
# it would end its slot's exploring sooner is not finished for, unless no trial of the search has
# trained fast enough for a new configuration to need less. TPE's best-scoring nets per epoch are
# the wide ones: in the 30-minute TPE study of seed 2, nets at 0.39-0.45 epochs a minute, chosen at
# minutes 2.5-5.5, ended both slots' exploring after 9-10 configurations (best val 0.7531), where
# the random search of the same seed finished two nets of 0.75-0.92 epochs a minute from minute
# 15.5 (0.8151). The share is a judgement on those studies, not yet measured against others.
EXPLORE_FIRST = 1 / 3


class Phase:
    """What the scheduler decided, read by the searcher and the callbacks: exploring or finishing
    one leader (the searcher then proposes nothing new), and which trials wait paused at a rung
    (the searcher tells Optuna they were pruned there and frees their slot; `PauseMarker` flags
    the report they paused at)."""

    def __init__(self) -> None:
        self.finishing = False  # exploring is over: every slot finishes (or nothing more could)
        self.finishers: list[str] = []  # trained to the budget, in the order they were chosen
        self.ended: set[str] = set()  # the finishers that have ended
        self.switched_at_s: float | None = None
        self.paused: dict[str, int] = {}  # trial id -> the report (index) it paused at
        self.resuming: set[str] = set()  # promoted from a pause, not yet reported again

    @property
    def leader(self) -> str | None:
        return self.finishers[0] if self.finishers else None

    @property
    def active(self) -> list[str]:
        """The finishers still training."""
        return [f for f in self.finishers if f not in self.ended]

    def describe(self) -> str:
        if self.finishing:
            return f"finishing {', '.join(self.finishers)}"
        return f"exploring, finishing {', '.join(self.finishers)}" if self.finishers else "exploring"


def trial_index(trial) -> str:
    """Ray numbers trials in the order the searcher suggested them (experiment_tag '3_lr=...')."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return head if head.isdigit() else ""


def known_point(trial, points: list[str]) -> str | None:
    """The known point a trial is: the searcher suggests the run points first, in order."""
    index = trial_index(trial)
    return points[int(index) - 1] if index.isdigit() and 0 < int(index) <= len(points) else None


def reported(trial) -> bool:
    """Whether a trial has reported (or was restored from a report). Not `bool(trial.last_result)`:
    Ray's Trial fills a trial's last result with its id (and default fields) before any report, so
    that test is always true of a real trial and the trials proposed before a switch to finishing
    ran to their first report instead of ending with it."""
    return M.EPOCHS_SEEN in (trial.last_result or {})


class Candidate(NamedTuple):
    """A trial the finishing phase could train to the budget, and what that takes."""

    trial_id: str
    seen: float  # epochs
    pace: float  # epochs per second
    need: float  # seconds to reach the budget and be scored, with the margin


class SearchASHA(FIFOScheduler):
    def __init__(
        self,
        *,
        max_epochs: int,
        grace: float,
        factor: float,
        points: list[str],
        trials: int | None = None,
        budget_s: float | None = None,
        slots: int = 1,
        phase: Phase | None = None,
        emit: Callable[[str], None] = log.info,
    ) -> None:
        super().__init__()
        self.max_epochs, self.factor, self.points = max_epochs, float(factor), list(points)
        self.trials = trials  # the cap on new configurations (None: no cap but the budget)
        self.budget_s, self.phase, self.emit = budget_s, phase or Phase(), emit
        self.slots = max(1, int(slots))  # trials at a time: the finishing phase finishes this many
        self.rungs = asha_rungs(grace, factor, max_epochs)
        # The rung (index) where exploring trials stop going on: the capped rung with a budget
        # (a finishing phase takes them further), none without (len: no such rung).
        self.cap = explore_cap(self.rungs, max_epochs) if budget_s is not None else len(self.rungs)
        # recorded[k]: trial id -> its score at rung k (searched trials only); promoted[k]: those
        # that went on from rung k; waiting: paused trial id -> the rung it waits at, while it
        # may still be promoted. (Phase.paused is another fact: the report a trial paused at,
        # kept after the trial ends there, so the searcher and the callbacks know its last
        # report was a pause.)
        self.recorded: list[dict[str, float]] = [{} for _ in self.rungs]
        self.promoted: list[set[str]] = [set() for _ in self.rungs]
        self.waiting: dict[str, int] = {}
        self.added = 0
        # A finisher has passed at least half of the explored rungs (1 of 24 epochs by default):
        # one that only passed the first bar is no reason to stop exploring.
        self.min_rungs = math.ceil(min(self.cap + 1, len(self.rungs)) / 2)
        self.qualified: set[str] = set()  # trials once in the top at such a rung (in_top)
        self._start: float | None = None
        self._first: dict[str, tuple[float, float]] = {}  # trial id -> (epochs seen, seconds) at its first report
        self._fastest = 0.0  # the fastest pace (epochs/s) a trial of the search has trained at
        # trial id -> seconds it spent on decayed branches (M.COOLED_SECONDS): no epochs seen in
        # them, so they are left out of its pace (a finisher trains none past the cap).
        self._aside: dict[str, float] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_fastest": 0.0, "qualified": set(), "_aside": {}, **state})  # (a search saved before they were kept)
        self._start = None  # a resumed search's budget counts from its restart, as Ray's does

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as stored:
            self.__setstate__(pickle.load(stored))

    def debug_string(self) -> str:
        return "ASHA with promotions: " + ", ".join(
            f"rung {r:g}: {len(rec)} recorded, {len(pro)} promoted" for r, rec, pro in zip(self.rungs, self.recorded, self.promoted, strict=True)
        )

    # ----------------------------------------------------------------- the rule

    def rung_reached(self, seen: float) -> int:
        """The highest rung (index) at or below `seen` epochs; -1 before the first."""
        return rungs_passed(seen, self.rungs) - 1

    def rank(self, trial_id: str, k: int) -> int:
        """How many trials recorded at rung k rank above `trial_id` there: those that scored
        better, and those with the same score recorded before it (on a small validation subset
        ties are common, e.g. every net still predicting the majority class: without the order,
        a tie would fill the quota with all of them)."""
        scores = self.recorded[k]
        mine, order = scores[trial_id], list(scores)
        earlier = order[: order.index(trial_id)]
        return sum(v > mine for v in scores.values()) + sum(scores[o] == mine for o in earlier)

    def in_quota(self, trial_id: str, k: int, *, relaxed: bool = False) -> bool:
        """In the top floor(n/factor) of the n trials recorded at rung k (ceil when relaxed)."""
        n = len(self.recorded[k])
        quota = math.ceil(n / self.factor) if relaxed else math.floor(n / self.factor)
        return trial_id in self.recorded[k] and self.rank(trial_id, k) < quota

    def promotable(self, trial_id: str, k: int, *, relaxed: bool = False) -> bool:
        """In the quota at rung k, a place is free there (fewer than floor(n/factor) trials have
        gone on from it) and no better trial waiting there claims it; relaxed: the quota alone."""
        if not self.in_quota(trial_id, k, relaxed=relaxed):
            return False
        if relaxed:
            return True
        if len(self.promoted[k]) >= math.floor(len(self.recorded[k]) / self.factor):
            return False
        # Ranked as `rank` ranks (score, then arrival: the sort is stable, reversed or not).
        order = sorted(self.recorded[k], key=self.recorded[k].__getitem__, reverse=True)
        return not any(self.waiting.get(other) == k for other in order[: order.index(trial_id)])

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._start is None:
            self._start = time.monotonic()
        self.added += 1
        # Name the trial's folder now. Ray 2.60 names it when it stages a trial, but one of its
        # paths hands a cached actor (reuse_actors) to a pending trial it never staged; the
        # actor's reset then fails for want of the name, Ray's handler of that error fails the
        # same way, and the search ends with a traceback: the 2-hour study of seed 1 did, at
        # minute 69 of 120, after 257 configurations. Naming it twice is a no-op in Ray.
        name_folder = getattr(trial, "init_local_path", None)
        if name_folder is not None:
            name_folder()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if known_point(trial, self.points):
            return TrialScheduler.CONTINUE  # never cut, never a bar (it ends by itself at the budget)
        trial_id = trial.trial_id
        self.phase.resuming.discard(trial_id)
        self._measure(trial_id, result)
        if self.budget_s is not None and not self.phase.finishing and tune_controller is not None:
            self._maybe_finish(tune_controller, trial, result)
        if trial_id not in self.phase.finishers and any(f in self.waiting for f in self.phase.finishers):
            # A finisher waits paused for a slot while exploring trials hold them all (the
            # 2-hour study: it waited 3 of its 7.7 minutes): the first to report gives up its slot.
            return TrialScheduler.STOP
        score = result.get(M.JUDGE_METRIC)
        k = self.rung_reached(float(result.get(M.EPOCHS_SEEN, 0)))
        # Not below the first rung, ending by itself, or a repeated report: recorded at its rung.
        fresh = k >= 0 and not result.get(M.DIVERGED) and score is not None and trial_id not in self.recorded[k]
        if fresh:
            self.recorded[k][trial_id] = float(score)
            if k >= self.min_rungs - 1:
                self.qualified.update(self.top(k))  # eligible to be finished from now on (in_top)
        if trial_id in self.phase.finishers:
            if fresh:
                self.promoted[k].add(trial_id)
            return TrialScheduler.CONTINUE
        if self.phase.finishing:
            # Exploring is over: an explorer stops at its next report, not its next rung (it could
            # not reach the budget, and beside a finisher it slows it: two nets side by side train
            # 1.32x slower).
            return TrialScheduler.STOP
        if not fresh:
            return TrialScheduler.CONTINUE
        if k < self.cap and self.promotable(trial_id, k):
            self.promoted[k].add(trial_id)
            return TrialScheduler.CONTINUE
        self.waiting[trial_id] = k
        self.phase.paused[trial_id] = int(result.get(M.REPORT, 0))
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """A paused trial that has become promotable (highest rung first, best score first), else
        a new configuration; when neither can come and nothing runs, the relaxed quota, and
        then the paused trials end."""
        trials = tune_controller.get_trials()
        paused = [t for t in trials if t.status == Trial.PAUSED and t.trial_id in self.waiting]
        for trial in paused:
            if trial.trial_id in self.phase.finishers:  # a finisher was waiting at a rung
                self._resume(trial, self.waiting[trial.trial_id])
                return trial
        if not self.phase.finishing:
            chosen = self._promotion(paused)
            if chosen is not None:
                return chosen
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        if not paused or any(t.status == Trial.RUNNING for t in trials):
            return None
        if not self.phase.finishing and (self.trials is None or self.added < self.trials):
            return None  # the searcher will propose a new configuration
        if not self.phase.finishing:
            chosen = self._promotion(paused, relaxed=True)
            if chosen is not None:
                return chosen
        self.end_exploring(tune_controller)
        return None

    def _promotion(self, paused: list, *, relaxed: bool = False) -> Trial | None:
        """The best promotable paused trial, highest rung first; none from the capped rung on
        while exploring (but with the relaxed quota: nothing new can come then)."""
        for k in reversed(range(len(self.rungs) if relaxed else self.cap)):
            ready = [t for t in paused if self.waiting[t.trial_id] == k and self.promotable(t.trial_id, k, relaxed=relaxed)]
            if ready:
                trial = max(ready, key=lambda t: self.recorded[k][t.trial_id])
                self._resume(trial, k)
                return trial
        return None

    def _resume(self, trial, k: int) -> None:
        del self.waiting[trial.trial_id]
        self.phase.paused.pop(trial.trial_id, None)
        self.phase.resuming.add(trial.trial_id)
        self.promoted[k].add(trial.trial_id)
        log.info("promoting %s from rung %g", trial.trial_id, self.rungs[k])

    def end_exploring(self, tune_controller, reporting=None) -> None:
        """End what exploring left: every trial still waiting at a rung (stopped early there: its
        last result says so) but a finisher that waits (it resumes for the finishing phase), and
        every searched trial proposed but not yet reported, started or not (Ray asks the searcher
        as soon as a slot frees, before a paused trial is resumed into it: the 1-hour ResNet-18
        study started one when its finisher ended, for nothing; the 30-minute TPE study of seed 2
        ran one started just before the switch for a quarter epoch). A trial Ray is resuming is
        PENDING too, but has reports: it is not one of them; nor is `reporting`, the trial whose
        first report is being decided (it stops by that decision)."""
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PAUSED and trial.trial_id in self.waiting and trial.trial_id not in self.phase.finishers:
                del self.waiting[trial.trial_id]
                tune_controller.stop_trial(trial)
            elif trial.status in (Trial.PENDING, Trial.RUNNING) and not reported(trial) and trial is not reporting \
                    and not known_point(trial, self.points):
                tune_controller.stop_trial(trial)  # a running one's actor and its task are ended with it

    def _ended(self, trial) -> None:
        if trial.trial_id in self.phase.finishers:
            self.phase.ended.add(trial.trial_id)
        self.waiting.pop(trial.trial_id, None)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._ended(trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.waiting.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._ended(trial)

    # ----------------------------------------------------------------- the finishing phase

    def _maybe_finish(self, tune_controller, trial, result: dict) -> None:
        spent = time.monotonic() - (self._start or time.monotonic())
        left = self.budget_s - spent
        live = tune_controller.get_live_trials()
        ranked = [c for c in self.candidates(live, trial, result, left) if c.trial_id not in self.phase.finishers]
        if not ranked or left > ranked[0].need:
            if self.phase.finishers and not ranked and not self._could_finish(live, trial, result, left):
                # A slot explored beside a finisher, and nothing more could reach the budget now
                # (no candidate, no trial running, nor a new one at the fastest pace seen).
                self.phase.finishing = True
                self.emit(f"exploring ends: no other configuration could reach the full budget in the "
                          f"{left / 60:.1f} min left; finishing {', '.join(self.phase.finishers)}")
                self.end_exploring(tune_controller, trial)
            return
        # The best candidate times the switch of a slot; the other free slots take the best
        # candidates that need no more time than it (the switch comes at the first result past its
        # need, so one as fast is a few seconds over `left`: the margin covers them). Timed by the
        # slowest of the best `slots`, the 30-minute random search switched after 6 of its 30
        # minutes for a second finisher at 0.38 epochs a minute, when the leader needed 10.
        free = self.slots - len(self.phase.active)
        chosen = [ranked[0], *[c for c in ranked[1:] if c.need <= ranked[0].need][: free - 1]]
        if self.phase.switched_at_s is None:
            self.phase.switched_at_s = spent
        self.phase.finishers += [c.trial_id for c in chosen]
        named = "; ".join(f"{c.trial_id} (at {c.seen:.2f} of {self.max_epochs} epochs, {c.pace * 60:.2f} epochs/min)" for c in chosen)
        need = max(c.need for c in chosen)
        says = (f"{named} need{'s' if len(chosen) == 1 else ''} ~{need / 60:.1f} min to reach the full budget "
                f"and be scored, and {left / 60:.1f} min are left")
        if len(self.phase.active) < self.slots:
            # A slow leader chosen early (the 30-minute TPE study of seed 2 switched at minute 4
            # for a net at 0.45 epochs a minute) must not idle the other slots for the rest.
            self.emit(f"finishing on {len(self.phase.active)} of {self.slots} slots: {says}; the other slot(s) keep exploring")
            return
        self.phase.finishing = True
        ending = sum(t not in self.phase.finishers for t in self.waiting)
        self.emit(f"switching from exploring to finishing: {says}; no new configurations from here, "
                  f"{ending} paused trial(s) end")
        self.end_exploring(tune_controller, trial)

    def _could_finish(self, live, trial, result: dict, left: float) -> bool:
        """Whether a searched trial other than the finishers could still reach the budget in
        `left` seconds at its own pace (without the margin): one running (it may yet pass the
        rungs a candidate needs; a paused one that could is a candidate already), or a new one
        at the fastest pace any trial of the search has trained at."""
        if self._fastest > 0 and self.need_s(0.0, self._fastest, margin=1.0) <= left:
            return True
        return any(t.trial_id not in self.phase.finishers and self.need_s(seen, pace, margin=1.0) <= left
                   for t, _, seen, pace in self._measured(live, trial, result, waiting_too=False))

    def in_top(self, trial_id: str) -> bool:
        """Whether the trial is, or once was, in the top floor(n/factor) of the n trials recorded
        at one of the rungs a leader must pass (`min_rungs`) or a higher one (finished, paused and
        stopped trials count; ties ranked by arrival): the evidence of several trials at a rung
        ranks it first, so a trial that passed a rung still nearly empty, or one still at the
        majority class's score, is not finished for. Once in, it stays eligible: the trials that
        outrank it later are candidates themselves when they could reach the budget, and ranked
        above it; when they could not (TPE's later proposals tend to be better and slower nets),
        dropping it would leave its slot with nothing to finish."""
        # `qualified` is kept at every record (on_trial_result); the live check covers a search
        # saved before it was kept.
        return trial_id in self.qualified or any(self.in_quota(trial_id, k) for k in range(self.min_rungs - 1, len(self.rungs)))

    def top(self, k: int) -> list[str]:
        """The trials in the top floor(n/factor) of the n recorded at rung k, best first (ties by
        arrival, as `rank` orders them: a reversed sort is stable)."""
        scores = self.recorded[k]
        return sorted(scores, key=scores.__getitem__, reverse=True)[: math.floor(len(scores) / self.factor)]

    def _measure(self, trial_id: str, result: dict) -> None:
        """Keep a searched trial's first report (its pace counts from there) and the fastest pace
        any searched trial has trained at: between its reports, or from its start to its first
        report (its start-up in it: a lower bound, but most trials pause at the first rung and
        report once; in the 30-minute TPE study of seed 2, the leaders chosen at minutes 2.5 and
        5.5 were the only trials with a second report)."""
        if result.get(M.COOLED_SECONDS):
            self._aside[trial_id] = self._aside.get(trial_id, 0.0) + float(result[M.COOLED_SECONDS])
        seen, spent = float(result.get(M.EPOCHS_SEEN, 0)), self._training_s(trial_id, result)
        if seen > 0 and spent > 0:
            self._first.setdefault(trial_id, (seen, spent))
            self._fastest = max(self._fastest, seen / spent, self.pace(trial_id, result) or 0.0)

    def pace(self, trial_id: str, last: dict) -> float | None:
        """A trial's epochs per second between its first report and `last` (its start-up, model
        build and data hand-over, left out), or None before its second report."""
        seen, spent = float(last.get(M.EPOCHS_SEEN, 0)), self._training_s(trial_id, last)
        first = self._first.get(trial_id)
        if first is None or seen <= first[0] or spent <= first[1]:
            return None
        return (seen - first[0]) / (spent - first[1])

    def _training_s(self, trial_id: str, result: dict) -> float:
        """A trial's seconds as of `result`, less those it spent on decayed branches."""
        return float(result.get("time_total_s", 0)) - self._aside.get(trial_id, 0.0)

    def need_s(self, seen: float, pace: float, margin: float = FINISH_MARGIN) -> float:
        """Seconds a trial at `seen` epochs, training `pace` epochs a second, needs to reach the
        budget and have its best epoch scored (its training time stretched by `margin`)."""
        return (self.max_epochs - seen) / pace * margin + 1 / pace + FINAL_SCORING_S

    def longest_need(self) -> float:
        """The most time a finisher may need: the budget after its EXPLORE_FIRST share, or what a
        new configuration at the fastest pace seen would need when that is longer (seconds)."""
        if self.budget_s is None or self._fastest <= 0:
            return math.inf
        return max((1 - EXPLORE_FIRST) * self.budget_s, self.need_s(0.0, self._fastest))

    def _measured(self, live, trial, result: dict, *, waiting_too: bool) -> Iterator[tuple[Any, dict, float, float]]:
        """(trial, its latest result, epochs seen, pace) of each searched trial running now (the one
        reporting `result` included) and, with `waiting_too`, each paused at a rung (it may lead:
        it resumes then), that has not diverged and has a measured pace."""
        for t in live:
            last = result if t is trial else (t.last_result or {})
            waiting = waiting_too and t.status == Trial.PAUSED and t.trial_id in self.waiting
            if (t.status != Trial.RUNNING and t is not trial and not waiting) or known_point(t, self.points) \
                    or last.get(M.DIVERGED):
                continue
            pace = self.pace(t.trial_id, last)
            if pace is not None:
                yield t, last, float(last.get(M.EPOCHS_SEEN, 0)), pace

    def candidates(self, live, trial, result: dict, left: float = math.inf) -> list[Candidate]:
        """The running (or paused) searched trials that can still finish in `left` seconds at their pace
        (without the margin) and are promising enough (min_rungs, in_top): those past the most
        rungs first, then by their latest subset score. The search switches to the first ones
        once `left` is down to their need with the margin: a window of the margin's share of
        their remaining time, checked at every result."""
        longest, ranked = self.longest_need(), []
        for t, last, seen, pace in self._measured(live, trial, result, waiting_too=True):
            if self.need_s(seen, pace, margin=1.0) > left:
                continue  # too slow to finish in what is left: it cannot be the one finished
            need = self.need_s(seen, pace)
            if need > longest:
                continue  # finishing it would cut its slot's exploring short (EXPLORE_FIRST)
            passed = rungs_passed(seen, self.rungs)
            if passed < self.min_rungs or not self.in_top(t.trial_id):
                continue  # not yet promising enough to stop exploring for
            ranked.append(((passed, float(last.get(M.JUDGE_METRIC, 0))), Candidate(t.trial_id, seen, pace, need)))
        return [info for _, info in sorted(ranked, key=lambda r: r[0], reverse=True)]


class PauseMarker(tune.Callback):
    """Flags the report a trial was paused at (`paused: 1`) before the other callbacks and Ray's
    result files see it, so its outcome, MLflow status and progress line say it stopped there
    (a promoted trial's later reports carry no flag). First in the callback list."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.phase.paused.get(trial.trial_id) == result.get(M.REPORT):
            result[M.PAUSED] = 1
