"""What a search shows on the terminal while it runs (a Ray Tune callback).

A line whenever a trial ends (finished / stopped by ASHA / failed / cut short, with the totals and
the best so far) or pauses at a rung (it waits there for a promotion), a line when a trial is
restarted after a fault, and at least every `every_s` seconds a status line: the configurations
judged so far (those that reached ASHA's first rung), the trials running with the rung each has
passed, how many wait paused, the best so far, the time spent and left, and whether the search
is still exploring or finishing its leader (scheduler.Phase).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from ray import tune
from ray.tune.progress_reporter import TrialProgressCallback

from fersearch import metrics as M
from fersearch.config import rungs_passed
from fersearch.outcome import COMPLETED, FAILED, STOPPED_EARLY, UNFINISHED, trial_outcome

OUTCOME_WORDS = {COMPLETED: "finished", STOPPED_EARLY: "stopped by ASHA", FAILED: "failed", UNFINISHED: "cut short"}


class RayTrialLines(TrialProgressCallback):
    """Ray Tune's own per-trial lines ("Trial ... completed. Last result: ..."), which it prints
    whatever the verbosity (a trial cut before its first report prints an empty one), go to the
    search's log file: the terminal has ProgressCallback's. Given to the Tuner, it stands in for
    the one Ray would add."""

    def _print(self, msg: str) -> None:
        logging.getLogger("ray.tune.progress_reporter").info("%s", msg)


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressCallback(tune.Callback):
    def __init__(
        self,
        emit: Callable[[str], None],
        total: int,
        max_epochs: int,
        budget_s: float | None = None,
        every_s: float = 60.0,
        rungs: Sequence[float] = (),
        phase: Any = None,
    ) -> None:
        self.emit, self.total, self.max_epochs = emit, total, max_epochs
        self.budget_s, self.every_s = budget_s, every_s
        self.rungs, self.phase = list(rungs), phase
        self.best: tuple[float, str] | None = None
        self.start = self.last_status = time.monotonic()

    def setup(self, **info) -> None:
        self.start = self.last_status = time.monotonic()

    def _improve(self, score: Any, trial_id: str) -> None:
        if score is not None and math.isfinite(float(score)) and (self.best is None or score > self.best[0]):
            self.best = (float(score), trial_id)

    def _best(self) -> str:
        return f"best val {self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"

    def _judged(self, trials) -> int:
        first = self.rungs[0] if self.rungs else 0.0
        return sum(float((t.last_result or {}).get(M.EPOCHS_SEEN, 0)) >= first for t in trials)

    def _line(self, trials, trial, outcome: str) -> None:
        # Callbacks run before Ray updates the ending trial's status: it counts by `outcome`.
        others = [t for t in trials if t is not trial and t.status in ("TERMINATED", "ERROR")]
        ended = [outcome] + [trial_outcome(t.last_result, self.max_epochs, error=t.status == "ERROR") for t in others]
        running = sum(t.status == "RUNNING" for t in trials if t is not trial)
        last = trial.last_result or {}
        score = last.get(M.BEST_METRIC)
        if outcome != FAILED:
            self._improve(score, trial.trial_id)
        shown = f" val {score:.4f}" if score is not None and outcome != FAILED else ""
        if M.BEST_METRIC not in last and M.JUDGE_METRIC in last and outcome != FAILED:
            shown = f" subset {last[M.JUDGE_METRIC]:.4f}"
        if last.get(M.ERROR):
            shown = f" ({last[M.ERROR]})"  # an invalid configuration: why
        self.emit(
            f"[{len(ended)} ended] {trial.trial_id} {OUTCOME_WORDS[outcome]} after "
            f"{round(float(last.get(M.EPOCHS_SEEN, 0)), 2):g} epoch(s){shown} | running {running}, stopped early "
            f"{ended.count(STOPPED_EARLY)}, failed {ended.count(FAILED)} | {self._best()}"
        )

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        epoch = (trial.last_result or {}).get(M.EPOCH, 0)
        self.emit(f"{trial.trial_id} stopped unexpectedly (its worker died or it raised); "
                  f"restarting it from its last checkpoint (epoch {epoch})")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if not result.get(M.DIVERGED):
            self._improve(result.get(M.BEST_METRIC), trial.trial_id)
        if result.get(M.PAUSED):
            seen = float(result.get(M.EPOCHS_SEEN, 0))
            waiting = sum(t.status == "PAUSED" for t in trials if t is not trial) + 1
            self.emit(f"{trial.trial_id} waits at rung {rungs_passed(seen, self.rungs)} ({round(seen, 2):g} epochs, "
                      f"subset {float(result.get(M.JUDGE_METRIC, 0)):.4f}) for a promotion | paused {waiting} | {self._best()}")

    def status(self, trials) -> str:
        spent = time.monotonic() - self.start
        left = f", {clock(self.budget_s - spent)} left" if self.budget_s else ""
        running = []
        for t in trials:
            if t.status != "RUNNING":
                continue
            last = t.last_result or {}
            seen = float(last.get(M.EPOCHS_SEEN, 0))
            judge = last.get(M.JUDGE_METRIC)
            shown = f", subset {judge:.3f}" if judge is not None else ""
            running.append(f"{t.trial_id} rung {rungs_passed(seen, self.rungs)} ({round(seen, 2):g}/{self.max_epochs} ep{shown})")
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        paused = sum(t.status == "PAUSED" for t in trials)
        phase = f" | {self.phase.describe()}" if self.phase is not None else ""
        return (
            f"[{clock(spent)} spent{left}] {self._judged(trials)} configurations judged, {ended} ended, "
            f"{paused} paused at a rung | running {len(running)}: {'; '.join(running) or 'none'} | {self._best()}{phase}"
        )

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self.last_status < self.every_s:
            return
        self.last_status = now
        self.emit(self.status(trials))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if (trial.last_result or {}).get(M.PAUSED):
            return  # said when it paused; the scheduler ends the paused trials that were never promoted
        self._line(trials, trial, trial_outcome(trial.last_result, self.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, FAILED)
