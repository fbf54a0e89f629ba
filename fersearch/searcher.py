"""What a search tries next: Optuna (seeded TPE, or random search) behind Ray's OptunaSearch.

Fixes over the stock glue (Ray 2.60, Optuna 5.0):
- the space's known points are proposed first (exactly their values); a point outside the
  space is run but never told to Optuna, whose model then holds only configurations of its space;
- a trial stopped early by ASHA, or paused at a rung (scheduler.py), reaches Optuna as PRUNED
  with its intermediate values (the subset score at every report, step = the report's index),
  not as COMPLETE with an early score; a paused trial is told at once, so TPE learns from it
  while it waits. Optuna cannot reopen a finished trial: when a paused trial is promoted and
  ends again (at a higher rung or the budget), the study gets one more trial with the same
  values, all its intermediate values and its new state (`PROPOSED_BY` "promoted", `CONTINUES`
  = the first one's number). TPE then counts a promoted configuration more than once, with the
  furthest record the strongest: promotion is evidence of quality, as in BOHB's per-budget models;
- the searcher limits the trials in flight itself (a paused trial frees its slot; Ray's
  ConcurrencyLimiter would count it live until the search's end);
- a trial that fails (exception, divergence) is told FAIL; non-finite values are never reported;
- a finished trial is worth its best validation epoch (the whole validation set);
- every proposal is labelled by who made it (`PROPOSED_BY`: tpe, random, qmc, point, warm_start),
  so a study says how many configurations TPE's model chose;
- once the scheduler switches to finishing (scheduler.Phase), nothing new is proposed.

TPE's random start-up is sized to the budget (`startup_trials`), and earlier studies of the same
model and data can be given to the sampler before its first proposal (`warm_start`).
"""

from __future__ import annotations

import logging
import math
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from fersearch import metrics as M
from fersearch.config import FIDELITY
from fersearch.errors import FersearchError, one_line
from fersearch.outcome import COMPLETED, FAILED, trial_outcome
from fersearch.outputs import sqlite_lock
from fersearch.space import SearchSpace
from fersearch.study_records import (  # noqa: F401 - searcher's users import them from here too
    CONTINUES,
    FIDELITY_ATTR,
    OWNER_ATTR,
    PROPOSED_BY,
    REUSED_FROM,
    WARM_START_FROM,
    latest_records,
    proposals,
)

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")
# TPE's random start-up: a tenth of the configurations the search may judge, at least
# STARTUP_MIN and at most STARTUP_MAX (Optuna's default is 10 whatever the budget). Without a
# time budget that is a tenth of the trial cap. With one, the cap is large and says nothing: the
# start-up is STARTUP_PER_SLOT_HOUR per trial slot and hour of budget, a tenth of the ~50
# configurations an exploring slot-hour judges on a CPU with ASHA's promotions bounded by the
# quota (the slot-minutes of the 2-hour study, per configuration and rung: ~1 slot-minute a
# configuration): 5 for a 30-minute study on 2 slots, 20 for 2 hours. The known points and
# warm-start trials count towards it, as every finished or pruned trial of the study does for TPE.
STARTUP_MIN, STARTUP_MAX = 5, 20
STARTUP_PER_SLOT_HOUR = 5


def startup_trials(trials: int, quasi_random: int = 0, budget_s: float | None = None, slots: int = 1) -> int:
    if quasi_random > 0:
        return quasi_random  # the QMC phase is the start-up: TPE's model takes over after it
    judged = trials // 10
    if budget_s is not None:
        judged = min(judged, round(budget_s / 3600 * max(1, slots) * STARTUP_PER_SLOT_HOUR))
    return min(STARTUP_MAX, max(STARTUP_MIN, judged))


class PhasedSampler(optuna.samplers.BaseSampler):
    """The search's sampler: `quasi_random` QMC trials first, then TPE (multivariate, grouped for
    conditional keys, constant liar for trials in flight) or random search. A module-level class,
    so Ray's saved searcher state (a pickle) can be restored."""

    def __init__(self, seed: int, kind: str = "tpe", startup: int = 10, quasi_random: int = 0) -> None:
        if kind not in SAMPLERS:
            raise FersearchError(f"unknown sampler {kind!r} (choose from {', '.join(SAMPLERS)})")
        self.kind, self.startup, self.quasi_random = kind, startup, quasi_random
        with warnings.catch_warnings():
            # Optuna flags `group`, `constant_liar` and QMCSampler as experimental: a note that
            # their interface may change (Optuna is pinned in pyproject).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if kind == "random":
                self.main: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
            else:
                self.main = optuna.samplers.TPESampler(
                    seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=startup
                )
            self.qmc = (
                optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
                if quasi_random > 0
                else None
            )

    def _pick(self, trial) -> optuna.samplers.BaseSampler:
        return self.qmc if self.qmc is not None and trial.number < self.quasi_random else self.main

    def source(self, study: optuna.Study, number: int) -> str:
        """Who proposes trial `number`: qmc, random, or TPE's model (once the study holds
        `startup` finished or pruned trials, as TPE counts them)."""
        if self.qmc is not None and number < self.quasi_random:
            return "qmc"
        if self.kind == "random":
            return "random"
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return "tpe" if len(done) >= self.startup else "random"

    def infer_relative_search_space(self, study, trial):
        return self._pick(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._pick(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        return self._pick(trial).sample_independent(study, trial, name, distribution)

    def before_trial(self, study, trial):
        self._pick(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._pick(trial).after_trial(study, trial, state, values)


class FerOptunaSearch(OptunaSearch):
    """OptunaSearch that runs the known points first, labels every proposal and tells Optuna the
    truth about pruned, failed and finished trials (see the module's docstring)."""

    def __init__(
        self,
        *,
        space: SearchSpace,
        points: list[str],
        max_epochs: int,
        sampler: PhasedSampler,
        phase: Any = None,
        storage: str | None = None,
        study_name: str | None = None,
        max_concurrent: int = 0,
    ) -> None:
        super().__init__(
            space=space.sample,
            metric=M.JUDGE_METRIC,
            mode=M.SELECT_MODE,
            sampler=sampler,
            study_name=study_name,
            storage=rdb(storage) if storage else None,
        )
        self.max_epochs, self.phase = max_epochs, phase
        # (name, whole config, its searched values or None when outside the space)
        self._pending_points = [(name, space.point(name), space.searched_values(space.point(name))) for name in points]
        self._outside: dict[str, str] = {}  # trial id -> point name, for points Optuna never sees
        self._values: dict[str, dict[int, float]] = {}  # trial id -> every report's value (step -> value)
        self._told_upto: dict[str, int] = {}  # trial id -> the last step its latest Optuna record holds
        self.max_concurrent = max_concurrent  # 0: no limit
        self._live: set[str] = set()  # suggested, not ended, not paused

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.phase is not None and self.phase.finishing:
            return Searcher.FINISHED
        resuming = len(self.phase.resuming) if self.phase is not None else 0
        if self.max_concurrent and len(self._live) + resuming >= self.max_concurrent:
            return None  # every slot is taken (a promoted trial about to resume holds one)
        self._live.add(trial_id)
        point = None
        if self._pending_points and trial_id not in self._ot_trials:
            point, config, values = self._pending_points.pop(0)
            if values is None:
                log.info("known point %s lies outside the space: run, not told to Optuna", point)
                self._outside[trial_id] = point
                return dict(config)
            self._ot_study.enqueue_trial(values)
        fresh = trial_id not in self._ot_trials
        suggestion = super().suggest(trial_id)
        if not isinstance(suggestion, dict):
            self._live.discard(trial_id)
        if fresh and trial_id in self._ot_trials:
            ot_trial = self._ot_trials[trial_id]
            sampler = self._ot_study.sampler
            source = "point" if point else sampler.source(self._ot_study, ot_trial.number) if isinstance(sampler, PhasedSampler) else "optuna"
            ot_trial.set_user_attr(PROPOSED_BY, source)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        paused = self.phase is not None and trial_id in self.phase.paused
        if paused:
            self._live.discard(trial_id)  # its slot is free until it is promoted
        else:
            self._live.add(trial_id)  # running (again, after a promotion)
        value = result.get(self.metric)
        if trial_id in self._outside or trial_id not in self._ot_trials:
            return
        if value is None or not math.isfinite(float(value)):
            return
        step = int(result[M.REPORT])  # every report carries its index (trainable.fidelity)
        values = self._values.setdefault(trial_id, {})
        if step not in values:  # a repeated report (a restart, a resume) keeps the first
            values[step] = float(value)
            if trial_id not in self._completed_trials:
                self._ot_trials[trial_id].report(float(value), step)
        if paused:
            self._settle(trial_id, TrialState.PRUNED)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._live.discard(trial_id)
        if trial_id not in self._ot_trials:
            return
        outcome = trial_outcome(result, self.max_epochs, error=error)
        if outcome == FAILED:
            if trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.FAIL)
                self._completed_trials.add(trial_id)
        elif outcome == COMPLETED:
            self._settle(trial_id, TrialState.COMPLETE, float(result[M.BEST_METRIC]))
        elif result or self._values.get(trial_id):
            # Stopped by ASHA (or cut by the budget), or a paused trial the scheduler ended (told
            # when it paused, unless the search was resumed since): pruned at its last value.
            self._settle(trial_id, TrialState.PRUNED)
        elif trial_id not in self._completed_trials:
            # Ended before any report (stopped unstarted, or running when exploring ended: Ray
            # passes its empty last result): no evidence, so not a pruned trial TPE would rank last.
            self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.FAIL)
            self._completed_trials.add(trial_id)

    def _settle(self, trial_id: str, state: TrialState, value: float | None = None) -> None:
        """Tell Optuna how the trial stands now: its own record the first time; after a
        promotion, one more record holding every report since its start (module docstring)."""
        ot_trial = self._ot_trials[trial_id]
        values = self._values.get(trial_id, {})
        last = max(values, default=-1)
        if trial_id not in self._completed_trials:
            self._ot_study.tell(ot_trial, value, state=state)
            self._completed_trials.add(trial_id)
        elif last > self._told_upto.get(trial_id, -1):
            self._ot_study.add_trial(
                optuna.trial.create_trial(
                    state=state,
                    value=value,
                    params=ot_trial.params,
                    distributions=ot_trial.distributions,
                    intermediate_values=dict(values),
                    user_attrs={PROPOSED_BY: "promoted", CONTINUES: ot_trial.number},
                )
            )
        self._told_upto[trial_id] = last

    def restore(self, checkpoint_path: str) -> None:
        """The searcher as Ray last saved it. Trials it asked the study for after that save
        (the driver was killed) are unknown to the restored Ray search and never run: they
        are told FAIL, so none stays RUNNING in the stored study. Trials it told after
        that save count as told: a restored one that ends again keeps the first answer."""
        phase = self.phase
        super().restore(checkpoint_path)
        self.phase = phase  # the one the scheduler and callbacks restored with the Tuner share
        known = {t.number: trial_id for trial_id, t in self._ot_trials.items()}
        for stored in self._ot_study.get_trials(deepcopy=False):
            if stored.state.is_finished() and stored.number in known:
                trial_id = known[stored.number]
                self._completed_trials.add(trial_id)
                told = max(stored.intermediate_values, default=-1)
                self._told_upto[trial_id] = max(self._told_upto.get(trial_id, -1), told)
            elif stored.state == TrialState.RUNNING and stored.number not in known:
                log.warning("Optuna trial %d was asked for after the search's last saved state: told FAIL", stored.number)
                self._ot_study.tell(stored.number, None, state=TrialState.FAIL)


def make_searcher(
    space: SearchSpace,
    seed: int,
    quasi_random: int,
    max_epochs: int,
    storage: str | None = None,
    study_name: str | None = None,
    *,
    points: list[str] | None = None,
    sampler: str = "tpe",
    startup: int | None = None,
    phase: Any = None,
    max_concurrent: int = 0,
    owner: str = "",
) -> FerOptunaSearch:
    """The search's searcher. With `storage` (an RDB URL) its study is stored there under
    `study_name`; without, in memory. `points`: the known points to run (default: all)."""
    searcher = FerOptunaSearch(
        space=space,
        points=list(space.points) if points is None else points,
        max_epochs=max_epochs,
        sampler=PhasedSampler(seed, sampler, startup if startup is not None else 10, quasi_random),
        phase=phase,
        storage=storage,
        study_name=study_name,
        max_concurrent=max_concurrent,
    )
    if not searcher._ot_study.user_attrs.get(FIDELITY_ATTR):
        searcher._ot_study.set_user_attr(FIDELITY_ATTR, FIDELITY)
    if owner and not searcher._ot_study.user_attrs.get(OWNER_ATTR):
        searcher._ot_study.set_user_attr(OWNER_ATTR, owner)
    return searcher


def rdb(url: str):
    """The Optuna storage at `url`, opened (its tables created when new), or one line saying why not."""
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types for a bad URL
        raise FersearchError(f"cannot open the Optuna storage {shown_url(url)} ({one_line(exc)})") from None


def shown_url(url: str) -> str:
    """A storage URL as messages show it: without its password."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparseable URL is shown as given (it holds no parsed password)
        return url


def study_owner(experiment_dir: Path) -> str:
    """Who a search's Optuna study belongs to: the host and the search's Ray folder. A study of
    the same name with another owner is someone else's (a shared --optuna-storage)."""
    return f"{socket.gethostname()}:{Path(experiment_dir).resolve()}"


def check_study_name(url: str, name: str, owner: str) -> None:
    """A new search's study name must be free in the storage, or hold this search's own stale
    study (its Ray folder was deleted; `fresh_study` removes it). Anything else is refused in one
    line: deleting it would lose another user's study. A local sqlite file that does not
    exist yet holds no study, and is not created here."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return
    with sqlite_lock(url):  # a new database's tables: one process at a time
        _own_study_exists(rdb(url), url, name, owner)


def _own_study_exists(storage, url: str, name: str, owner: str) -> bool:
    """Whether `storage` holds this search's own study `name`; another owner's is one line."""
    for summary in storage.get_all_studies():
        if summary.study_name != name:
            continue
        theirs = summary.user_attrs.get(OWNER_ATTR)
        if theirs != owner:
            raise FersearchError(
                f"the Optuna storage {shown_url(url)} already holds a study named {name!r} "
                f"({'from the search at ' + theirs if theirs else 'not made by this search'}); "
                f"choose another --name, or delete it: optuna delete-study --study-name {name} --storage URL"
            )
        return True
    return False


def fresh_study(url: str, name: str, owner: str) -> None:
    """A new search starts a new study: its own stale one (same owner: its search's Ray results
    were deleted) is removed first, so none of its trials enter the new history. Another owner's
    study is never removed (`check_study_name` refused the name before anything started)."""
    with sqlite_lock(url):
        storage = rdb(url)
        if _own_study_exists(storage, url, name, owner):
            log.warning("removing this search's stale Optuna study %r from %s", name, shown_url(url))
            optuna.delete_study(study_name=name, storage=storage)


def warm_start(study: optuna.Study, space: SearchSpace, earlier: dict[str, optuna.Study]) -> dict[str, int]:
    """Give `study` the finished and pruned trials of `earlier` studies (name -> study), before
    its first proposal. Parameters the current space does not search are dropped; a trial with a
    value outside the current space is skipped whole; a pruned trial's intermediate values are
    used only when its study reported at the same fidelity (else it is skipped: its rung scores
    would not compare). Returns how many trials of each study were used."""
    params = {p.name: p for p in space.params}
    used: dict[str, int] = {}
    for name, old in earlier.items():
        same_fidelity = old.user_attrs.get(FIDELITY_ATTR) == FIDELITY
        count = 0
        for t in old.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            kept = {k: v for k, v in t.params.items() if k in params}
            if not kept or any(not params[k].contains(v) for k, v in kept.items()):
                continue
            if t.state == TrialState.PRUNED and not (same_fidelity and t.intermediate_values):
                continue
            study.add_trial(
                optuna.trial.create_trial(
                    state=t.state,
                    value=t.value if t.state == TrialState.COMPLETE else None,
                    params=kept,
                    distributions={k: params[k].distribution for k in kept},
                    intermediate_values=dict(t.intermediate_values) if same_fidelity else {},
                    user_attrs={PROPOSED_BY: "warm_start", WARM_START_FROM: name},
                )
            )
            count += 1
        used[name] = count
    return used
