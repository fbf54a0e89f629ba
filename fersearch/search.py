"""The search: Ray Tune + Optuna (seeded TPE, optional quasi-random start) + ASHA + MLflow.

Fixes over the stock glue (Ray 2.60, Optuna 5.0):
- a trial stopped early by ASHA reaches Optuna as PRUNED with its per-epoch intermediate values,
  not as COMPLETE with a 1-epoch score that looks like a full-budget result;
- a trial that fails (exception, divergence) is told to Optuna as FAIL; non-finite values are
  never reported, so no trial is left RUNNING (a zombie) in the study;
- a finished trial is worth its best validation epoch, and the best checkpoint is the
  best-scoring one (Ray's `result.checkpoint` is the latest);
- every path given to Ray and MLflow is absolute (trials run in their own working folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from fersearch import metrics as M
from fersearch.config import (
    IMAGE_SIZE,
    LOOPBACK_HOSTS,
    SEARCH_GRACE_PERIOD,
    SEARCH_MAX_EPOCHS,
    SEARCH_REDUCTION_FACTOR,
    SEARCH_TRIALS,
    bound_mlflow_http,
    resolve_config,
)
from fersearch.data import load_raw
from fersearch.errors import FersearchError, one_line
from fersearch.outcome import COMPLETED, FAILED, OUTCOMES, STOPPED_EARLY, UNFINISHED, trial_outcome
from fersearch.outputs import atomic_write, check_out_dir, sqlite_lock
from fersearch.space import SearchSpace, default_space_path, load_space
from fersearch.tracking import (
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    COMMAND_TAG,
    DATASET_TAG,
    FAILED_CALLS,
    FINGERPRINT_TAG,
    KIND_TAG,
    NEVER_PASSED_TAG,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_TAG,
    RESUMED_TAG,
    SPACE_FILE_TAG,
    STATUS_TAG,
    check_search_name,
)

log = logging.getLogger(__name__)

SEARCH_STATE_FILE = "fersearch_search.json"  # what --resume reads: the search's settings and parent run
# The Optuna study of every search (named after it) lives here, so Optuna's own tools open it:
# optuna.load_study(study_name=NAME, storage="sqlite:///mlruns/optuna.db"), optuna-dashboard.
OPTUNA_FILE = "optuna.db"


@dataclass
class SearchSettings:
    model: str
    data_dir: Path
    name: str
    mlruns: Path
    trials: int = SEARCH_TRIALS
    max_epochs: int = SEARCH_MAX_EPOCHS
    grace_period: int = SEARCH_GRACE_PERIOD
    reduction_factor: int = SEARCH_REDUCTION_FACTOR
    time_budget_s: float | None = None
    # All cores for one trial at a time (the CLI passes the machine's count). On 2 cores two
    # 1-thread trials train ~1.2x the samples/s of one 2-thread trial, but each trial runs 1.6x
    # slower (the modern point: 105 s an epoch against 65 s), so a time-budgeted study learns
    # its known points' results later and its rungs fill later.
    cpus_per_trial: float = 2
    gpus_per_trial: float = 0
    seed: int = 0
    quasi_random: int = 0
    space_path: Path | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    address: str | None = None
    resume: bool = False
    dataset_label: str = ""
    command: str = ""
    progress_every_s: float = 60.0
    optuna_storage: str | None = None  # an RDB URL; default: sqlite in mlruns (OPTUNA_FILE)

    @property
    def storage(self) -> Path:
        return (self.mlruns / "ray").resolve()

    @property
    def optuna_url(self) -> str:
        return self.optuna_storage or f"sqlite:///{(self.mlruns / OPTUNA_FILE).resolve()}"

    @property
    def experiment_dir(self) -> Path:
        return self.storage / self.name


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


def _phased_sampler(seed: int, quasi_random: int):
    """TPE (multivariate, grouped for conditional keys), after `quasi_random` QMC trials."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        # Optuna flags `group`, `constant_liar` and QMCSampler as experimental: a note that their
        # interface may change, not a problem with this search (Optuna is pinned in pyproject).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=max(5, quasi_random)
        )
        if quasi_random <= 0:
            return tpe
        qmc = optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)

    class PhasedSampler(optuna.samplers.BaseSampler):
        """Quasi-random exploration for the first trials, then TPE exploitation."""

        def _pick(self, trial):
            return qmc if trial.number < quasi_random else tpe

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

    return PhasedSampler()


def make_searcher(
    space: SearchSpace,
    seed: int,
    quasi_random: int,
    max_epochs: int,
    storage: str | None = None,
    study_name: str | None = None,
):
    """OptunaSearch that runs the space's known points first and tells Optuna the truth about
    pruned, failed and finished trials (and nothing about points outside its space). With
    `storage` (an RDB URL) the study is stored there under `study_name`; without, in memory."""
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class FerOptunaSearch(OptunaSearch):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # (name, whole config, its searched values or None when outside the space)
            self._pending_points = [
                (name, space.point(name), space.searched_values(space.point(name))) for name in space.points
            ]
            self._outside: dict[str, str] = {}  # trial id -> point name, for points Optuna never sees

        def suggest(self, trial_id: str) -> dict | None:
            if self._pending_points and trial_id not in self._ot_trials:
                name, config, values = self._pending_points.pop(0)
                if values is None:
                    log.info("known point %s lies outside the space: run, not told to Optuna", name)
                    self._outside[trial_id] = name
                    return dict(config)
                self._ot_study.enqueue_trial(values)
            return super().suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            value = result.get(self.metric)
            if trial_id in self._outside or value is None or not math.isfinite(float(value)):
                return
            super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            outcome = trial_outcome(result, max_epochs, error=error)
            if outcome == FAILED:
                self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
            elif outcome == COMPLETED:
                self._ot_study.tell(ot_trial, float(result[M.BEST_METRIC]), state=TrialState.COMPLETE)
            else:
                # Stopped by ASHA (or cut by the budget): pruned at its last intermediate value.
                self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)

        def restore(self, checkpoint_path: str) -> None:
            """The searcher as Ray last saved it. Trials it asked the study for after that save
            (the driver was killed) are unknown to the restored Ray search and never run: they
            are told FAIL, so none stays RUNNING in the stored study. Trials it told after
            that save count as told: a restored one that ends again keeps the first answer."""
            super().restore(checkpoint_path)
            known = {t.number: trial_id for trial_id, t in self._ot_trials.items()}
            for stored in self._ot_study.get_trials(deepcopy=False):
                if stored.state.is_finished() and stored.number in known:
                    self._completed_trials.add(known[stored.number])
                elif stored.state == TrialState.RUNNING and stored.number not in known:
                    log.warning("Optuna trial %d was asked for after the search's last saved state: told FAIL", stored.number)
                    self._ot_study.tell(stored.number, None, state=TrialState.FAIL)

    return FerOptunaSearch(
        space=space.sample,
        metric=M.SELECT_METRIC,
        mode=M.SELECT_MODE,
        sampler=_phased_sampler(seed, quasi_random),
        study_name=study_name,
        storage=_rdb(storage) if storage else None,
    )


def _rdb(url: str):
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types for a bad URL
        raise FersearchError(f"cannot open the Optuna storage {url} ({str(exc).splitlines()[0]})") from None


def fresh_study(url: str, name: str) -> None:
    """A new search starts a new study: a stale one of the same name (its search's Ray results
    were deleted) is removed first, so none of its trials enter the new history."""
    import optuna

    with sqlite_lock(url):  # a new database's tables: one process at a time
        storage = _rdb(url)
        if name in {s.study_name for s in storage.get_all_studies()}:
            log.warning("removing the stale Optuna study %r from %s", name, url)
            optuna.delete_study(study_name=name, storage=storage)


def make_scheduler(settings: SearchSettings, points: list[str]):
    """ASHA over training epochs; the first `points` trials (the known points) always run their
    whole budget, so the study keeps their full results as the bar to beat. Their epochs still
    enter ASHA's rungs, against which the searcher's trials are cut."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from fersearch.tracking import known_point

    class KnownPointsASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if known_point(trial, points) and action == TrialScheduler.STOP and result.get(M.TRAINING_ITERATION, 0) < settings.max_epochs:
                return TrialScheduler.CONTINUE
            return action

    return KnownPointsASHA(
        time_attr=M.TRAINING_ITERATION,
        metric=M.SELECT_METRIC,
        mode=M.SELECT_MODE,
        max_t=settings.max_epochs,
        grace_period=min(settings.grace_period, settings.max_epochs),
        reduction_factor=settings.reduction_factor,
    )


class ProgressCallback(tune.Callback):
    """Progress on the terminal: a line whenever a trial ends (done / running / stopped /
    failed, best so far), and at least every `every_s` seconds a status line with each running
    trial's epoch and validation accuracy so far, the best so far, the time spent and the time
    left in the budget (a trial's epoch can take minutes on a CPU)."""

    def __init__(
        self,
        emit: Callable[[str], None],
        total: int,
        max_epochs: int,
        budget_s: float | None = None,
        every_s: float = 60.0,
    ) -> None:
        self.emit, self.total, self.max_epochs = emit, total, max_epochs
        self.budget_s, self.every_s = budget_s, every_s
        self.best: tuple[float, str] | None = None
        self.start = self.last_status = time.monotonic()

    def setup(self, **info) -> None:
        self.start = self.last_status = time.monotonic()

    def _improve(self, score: Any, trial_id: str) -> None:
        if score is not None and math.isfinite(float(score)) and (self.best is None or score > self.best[0]):
            self.best = (float(score), trial_id)

    def _best(self) -> str:
        return f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"

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
        self.emit(
            f"[{len(ended)}/{self.total}] {trial.trial_id} {OUTCOME_WORDS[outcome]} after "
            f"{last.get(M.TRAINING_ITERATION, 0)} epoch(s){shown} | running {running}, stopped early "
            f"{ended.count(STOPPED_EARLY)}, failed {ended.count(FAILED)} | {self._best()}"
        )

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        epoch = (trial.last_result or {}).get(M.TRAINING_ITERATION, 0)
        self.emit(f"{trial.trial_id} stopped unexpectedly (its worker died or it raised); "
                  f"restarting it from its last checkpoint (epoch {epoch})")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if not result.get(M.DIVERGED):
            self._improve(result.get(M.BEST_METRIC), trial.trial_id)

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self.last_status < self.every_s:
            return
        self.last_status = now
        spent = now - self.start
        left = f", {_clock(self.budget_s - spent)} left" if self.budget_s else ""
        running = []
        for t in trials:
            if t.status != "RUNNING":
                continue
            last = t.last_result or {}
            epoch = last.get(M.TRAINING_ITERATION, 0)
            val = last.get(M.VAL_ACCURACY)
            running.append(
                f"{t.trial_id} epoch {epoch}/{self.max_epochs}" + (f" val {val:.4f}" if val is not None else " (first epoch)")
            )
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        self.emit(
            f"[{_clock(spent)} spent{left}] {ended}/{self.total} trials ended | running: "
            f"{'; '.join(running) or 'none'} | {self._best()}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, trial_outcome(trial.last_result, self.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, FAILED)


OUTCOME_WORDS = {COMPLETED: "finished", STOPPED_EARLY: "stopped by ASHA", FAILED: "failed", UNFINISHED: "cut short"}


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def resolve_space(settings: SearchSettings) -> SearchSpace:
    """The space file with `--fixed` values pinned and the budget (epochs) set."""
    path = settings.space_path or default_space_path(settings.model)
    space = load_space(path, settings.model)
    pins = {**settings.fixed, "epochs": settings.max_epochs}
    fixed = {**space.fixed, **pins}
    params = tuple(p for p in space.params if p.name not in fixed)
    pinned = dataclasses.replace(space, params=params, fixed=fixed, pinned=pins)
    resolve_config(space.model, fixed)  # fixed values must make a valid config on their own
    for name in pinned.points:
        try:
            pinned.point(name)
        except FersearchError as exc:
            raise FersearchError(f"known point {name} with --fixed and --max-epochs: {exc}") from None
    return pinned


def _preflight(space: SearchSpace) -> None:
    """Fail before Ray starts if a trial could never run (e.g. ImageNet weights offline)."""
    if space.model != "resnet18":
        return
    could_pretrain = space.fixed.get("pretrained", True) not in (False, "false")
    for p in space.params:
        if p.name == "pretrained":
            could_pretrain = True in p.args
    if could_pretrain:
        from fersearch.models import imagenet_state_dict

        try:
            imagenet_state_dict(str(space.fixed.get("pretrained_path", "")))
        except FersearchError as exc:
            raise FersearchError(f"{exc}; or search without them: --fixed pretrained=false") from None


def _init_ray(address: str | None) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or _on_loopback(address):
        _ray_on_loopback()
    else:
        log.warning(
            "joining the Ray cluster at %s: this search's driver listens on this machine's network "
            "address, as every node of the cluster does (README: On a Ray cluster, token authentication)",
            address,
        )
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except AuthenticationError:
        raise FersearchError(
            f"the Ray cluster at {address} refused this search's authentication token: set "
            "RAY_AUTH_MODE=token and give it the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH "
            "or RAY_AUTH_TOKEN; README: On a Ray cluster)"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise FersearchError(f"cannot start or reach {where} ({one_line(exc)})") from None


def _on_loopback(address: str) -> bool:
    """Whether a Ray address (host:port, [v6]:port or ray://host:port) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host.strip("[]") in LOOPBACK_HOSTS


def _ray_on_loopback() -> None:
    """Make Ray keep 127.0.0.1 as this machine's address, so every server binds to it.

    Ray binds its servers (GCS, raylet, object manager, workers) to the node's IP, and on Linux
    replaces a loopback address by the machine's network address: a local search (or a search
    on a cluster started on 127.0.0.1, as the cluster test does) would be reachable from the
    network, or could not reach its loopback-only cluster. Ray keeps the loopback address where
    clusters are off (its default on macOS and Windows); this switches that on, both in the
    environment (read when ray is imported, and by the processes Ray starts) and in the
    already-imported constant. A search on a networked cluster is left as Ray sets it up.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# Dependencies whose records below WARNING belong in the search's log file, not the terminal.
DEPENDENCY_LOGGERS = ("mlflow", "alembic", "optuna", "ray")
# Whose records, warnings included, go to the log file only: urllib3 warns of every retry of an
# MLflow call to a server that is down; the failed call itself is one fersearch warning.
FILE_ONLY_LOGGERS = ("urllib3.connectionpool",)
LOG_FILE = "driver.log"  # beside the Ray results of the search


@contextlib.contextmanager
def dependency_log(path: Path) -> Iterator[None]:
    """While a search runs, its dependencies' INFO chatter (MLflow creating its tables, Optuna
    creating its study) goes to `path`; their warnings and errors still reach the terminal."""
    import mlflow  # noqa: F401 - importing them installs their terminal handlers, quieted below
    import optuna  # noqa: F401

    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    quieted = []
    for name in DEPENDENCY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                quieted.append((handler, handler.level))
                handler.setLevel(max(handler.level, logging.WARNING))
        logger.addHandler(to_file)
    propagated = {}
    for name in FILE_ONLY_LOGGERS:
        logger = logging.getLogger(name)
        propagated[name] = logger.propagate
        logger.propagate = False
        logger.addHandler(to_file)
    try:
        yield
    finally:
        for handler, level in quieted:
            handler.setLevel(level)
        for name in DEPENDENCY_LOGGERS + FILE_ONLY_LOGGERS:
            logging.getLogger(name).removeHandler(to_file)
        for name, value in propagated.items():
            logging.getLogger(name).propagate = value
        to_file.close()


@dataclass
class SearchPlan:
    """What is checked before anything starts: the saved search to resume (None for a new
    one) and the space with its pins and known points."""

    saved: dict[str, Any] | None
    space: SearchSpace


def plan_search(settings: SearchSettings) -> SearchPlan:
    """All checks of a search's settings, once; nothing is started or written."""
    saved = check_search(settings)
    space = resolve_space(settings)
    _preflight(space)
    return SearchPlan(saved, space)


def run_search(
    settings: SearchSettings, emit: Callable[[str], None] = log.info, plan: SearchPlan | None = None
) -> SearchOutcome:
    """Runs the search `plan` was made for (planned here when not given)."""
    # Our own progress lines replace Ray's tables; per-epoch checkpoints are intended; MLflow's
    # download progress bars are not for a terminal that shows fersearch's progress.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ray saves the search's state (which trials exist, their checkpoints, the searcher) every
    # 10 s or more by default; after a kill -9 of the driver, --resume starts from that state.
    # Every second keeps the window small (the files are a few KB).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    bound_mlflow_http()
    plan = plan or plan_search(settings)
    created = not settings.experiment_dir.exists()
    try:
        with dependency_log(settings.experiment_dir / LOG_FILE):
            return _run_search(settings, plan, emit)
    except BaseException:
        if created and not (settings.experiment_dir / SEARCH_STATE_FILE).exists():
            # Nothing of the search started (e.g. Ray unreachable): its name stays free.
            shutil.rmtree(settings.experiment_dir, ignore_errors=True)
        raise


def _run_search(settings: SearchSettings, plan: SearchPlan, emit: Callable[[str], None]) -> SearchOutcome:
    from fersearch.tracking import client_for, get_experiment_id, tracking_uri

    saved, space = plan.saved, plan.space
    raw = load_raw(settings.data_dir)
    _init_ray(settings.address)  # before the store is touched: a bad --address leaves no search behind

    uri = tracking_uri(settings.mlruns)
    settings.mlruns.mkdir(parents=True, exist_ok=True)
    try:
        experiment_id = get_experiment_id(uri, settings.model, settings.mlruns)
        client = client_for(uri)
        if saved is not None:
            parent_run_id = saved["parent_run_id"]
            client.set_tag(parent_run_id, RESUMED_TAG, time.strftime("%Y-%m-%d %H:%M:%S"))
        else:
            parent_run_id = _open_search_run(settings, space, raw, client, experiment_id)
    except FersearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreachable server or a broken store: one line
        raise FersearchError(f"cannot use the MLflow store at {uri} ({one_line(exc)}); no trial was started") from None
    if saved is not None:
        # What the interrupted run could not log (its tracking server was down) goes first.
        from fersearch.sync import sync_trials

        sync_trials(settings.experiment_dir, uri, client, parent_run_id, settings.max_epochs, saved.get("points", []))
    tuner = _make_tuner(settings, space, raw, uri, experiment_id, parent_run_id, emit)
    failed_before = FAILED_CALLS[0]
    start = time.time()
    results = tuner.fit()
    wall = time.time() - start
    failures = FAILED_CALLS[0] - failed_before
    if failures:
        # The tracking server failed mid-search: if it is back, it gets what it missed before
        # the search's results are recorded (the best trial's run among them).
        from fersearch.sync import sync_trials

        try:
            sync_trials(settings.experiment_dir, uri, client, parent_run_id, settings.max_epochs, list(space.points))
            failures = 0
        except FersearchError as exc:
            log.warning("%s", exc)
    outcome = _finish(settings, results, raw, uri, client, parent_run_id, wall)
    outcome.mlflow_failures = failures
    if outcome.best is not None and outcome.recorded:
        outcome.report = auto_report(settings, client, parent_run_id)
    return outcome


def check_search(settings: SearchSettings) -> dict[str, Any] | None:
    """Check the name; resolve paths; for --resume load the saved search (and adopt its
    settings), else refuse a taken name. Nothing is started or written."""
    check_search_name(settings.name)
    # The MLflow store (when local) and Ray's results both live under --mlruns: a folder that
    # cannot be written is refused here, before Ray starts or a trial runs.
    settings.mlruns = check_out_dir(settings.mlruns, (), what="--mlruns")
    settings.data_dir = settings.data_dir.resolve()
    state_file = settings.experiment_dir / SEARCH_STATE_FILE
    if not settings.resume:
        if settings.experiment_dir.exists():
            raise FersearchError(
                f"a search named {settings.name!r} already exists in {settings.experiment_dir}; "
                "pass --resume or a new --name"
            )
        return None
    if not state_file.is_file():
        raise FersearchError(f"no search named {settings.name!r} to resume under {settings.storage}")
    try:
        saved = json.loads(state_file.read_text())
        saved["model"], saved["trials"], saved["max_epochs"], saved["data_dir"]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as exc:
        raise FersearchError(f"{state_file} is damaged ({exc}); the search cannot be resumed") from None
    if saved["model"] != settings.model:
        raise FersearchError(f"search {settings.name!r} is for model {saved['model']}, not {settings.model}")
    settings.trials, settings.max_epochs = saved["trials"], saved["max_epochs"]
    settings.data_dir = Path(saved["data_dir"])
    return saved


def _open_search_run(settings: SearchSettings, space: SearchSpace, raw, client, experiment_id: str) -> str:
    """The MLflow parent run of a new search, and the state file that --resume reads."""
    from fersearch.tracking import log_params

    parent = client.create_run(
        experiment_id,
        run_name=settings.name,
        tags={
            KIND_TAG: "search",
            DATASET_TAG: settings.dataset_label or str(settings.data_dir),
            FINGERPRINT_TAG: raw.fingerprint,
            COMMAND_TAG: settings.command,
            SPACE_FILE_TAG: space.source,
            OPTUNA_STORAGE_TAG: settings.optuna_url,
            OPTUNA_STUDY_TAG: settings.name,
        },
    )
    parent_run_id = parent.info.run_id
    log_params(
        client,
        parent_run_id,
        {
            "model": settings.model,
            "trials": settings.trials,
            "max_epochs": settings.max_epochs,
            "grace_period": settings.grace_period,
            "reduction_factor": settings.reduction_factor,
            "time_budget_s": settings.time_budget_s,
            "cpus_per_trial": settings.cpus_per_trial,
            "gpus_per_trial": settings.gpus_per_trial,
            "seed": settings.seed,
            "quasi_random": settings.quasi_random,
            "data_dir": str(settings.data_dir),
            "searched": ",".join(space.searched()),
            **{f"fixed.{k}": v for k, v in space.fixed.items()},
        },
    )
    client.log_text(parent_run_id, Path(space.source).read_text(), "search_space.yaml")
    settings.experiment_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": settings.model,
        "trials": settings.trials,
        "max_epochs": settings.max_epochs,
        "data_dir": str(settings.data_dir),
        "parent_run_id": parent_run_id,
        "points": list(space.points),  # the first trials, in order (their runs' point tags)
    }
    (settings.experiment_dir / SEARCH_STATE_FILE).write_text(json.dumps(state, indent=2))
    return parent_run_id


def _make_tuner(settings, space, raw, uri, experiment_id, parent_run_id, emit) -> tune.Tuner:
    """A new Tuner (Optuna searcher, ASHA, MLflow and progress callbacks), or the saved one restored."""
    import ray
    from ray.tune.search import ConcurrencyLimiter

    from fersearch.tracking import MlflowTrialCallback
    from fersearch.trainable import train_trial

    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial,
            raw=raw,
            model=settings.model,
            threads=max(1, int(settings.cpus_per_trial)),
        ),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    if settings.resume:
        return tune.Tuner.restore(
            str(settings.experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=False
        )
    total_cpus = ray.cluster_resources().get("CPU", 1)
    concurrency = max(1, int(total_cpus // max(settings.cpus_per_trial, 1e-9)))
    fresh_study(settings.optuna_url, settings.name)
    searcher = ConcurrencyLimiter(
        make_searcher(
            space, settings.seed, settings.quasi_random, settings.max_epochs, settings.optuna_url, settings.name
        ),
        max_concurrent=concurrency,
    )
    scheduler = make_scheduler(settings, list(space.points))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=settings.trials,
            time_budget_s=settings.time_budget_s,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=str(settings.storage),
            callbacks=[
                MlflowTrialCallback(uri, experiment_id, parent_run_id, settings.max_epochs, list(space.points)),
                ProgressCallback(emit, settings.trials, settings.max_epochs, settings.time_budget_s, settings.progress_every_s),
            ],
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute=M.SELECT_METRIC,
                checkpoint_score_order=M.SELECT_MODE,
            ),
            verbose=0,
        ),
    )


# A trial whose worker dies (killed, out of memory, a lost node) or that raises is restarted from
# its last checkpoint this many times before it counts as failed. A diverged trial does not
# raise (it ends failed at once: its weights would diverge again).
TRIAL_RETRIES = 2


def auto_report(settings: SearchSettings, client, parent_run_id: str) -> str | None:
    """Every finished search writes its study report beside its Ray results and into MLflow."""
    try:
        from fersearch.report import build_report

        path = build_report(settings.model, settings.experiment_dir / "report", settings.mlruns, settings.name)
        client.log_artifacts(parent_run_id, str(path.parent), "report")
        return str(path)
    except Exception as exc:  # noqa: BLE001 - the search's results stand without the report
        log.warning("study report failed: %s", exc)
        return None


def _close_unfinished_runs(client, parent_run_id: str) -> None:
    """Trials that Ray never ended (the time budget, Ctrl-C) get no callback: their MLflow runs
    would stay RUNNING. Mark them cut short and KILLED; `--resume` reopens the same run."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=5000,
    )
    for run in runs:
        client.set_tag(run.info.run_id, STATUS_TAG, UNFINISHED)
        client.set_terminated(run.info.run_id, "KILLED")


def _finish(settings, results, raw, uri, client, parent_run_id, wall) -> SearchOutcome:
    """Totals and the best trial scored on val and test, kept beside the Ray results
    (OUTCOME_FILE), then recorded in MLflow."""
    from fersearch.trainable import load_trainer

    outcomes = [trial_outcome(r.metrics, settings.max_epochs, error=r.error is not None) for r in results]
    counts = {"trials": len(results), **{name: outcomes.count(name) for name in OUTCOMES}}
    epochs_trained = sum(int((r.metrics or {}).get(M.TRAINING_ITERATION, 0)) for r in results)
    # Ctrl-C / SIGTERM make Ray return early, with trials it never ended (the time budget ends
    # its running trials: those count as cut short, but the search is complete).
    budget_spent = settings.time_budget_s is not None and wall >= 0.95 * settings.time_budget_s
    never_ended = len(results) - results.num_terminated - results.num_errors
    interrupted = never_ended > 0 or (len(results) < settings.trials and not budget_spent)
    outcome = SearchOutcome(
        settings.name, parent_run_id, counts, epochs_trained, counts["trials"] * settings.max_epochs, wall, None, interrupted
    )
    scored = [r for r, o in zip(results, outcomes, strict=True) if o != FAILED and (r.metrics or {}).get(M.BEST_METRIC) is not None]
    if not interrupted and scored:
        best = max(scored, key=lambda r: r.metrics[M.BEST_METRIC])
        checkpoint = best.get_best_checkpoint(M.SELECT_METRIC, M.SELECT_MODE) or best.checkpoint
        trainer = load_trainer(checkpoint.path, raw)
        report = trainer.final_report(raw)
        outcome.best = {
            "trial_id": best.metrics["trial_id"],
            "run_id": None,  # known once recorded in MLflow
            "epoch": trainer.epoch,
            "config": trainer.cfg.to_params(),
            "val": M.summary(report["val"]),
            "test": M.summary(report["test"]),
            "by_protocol": report["by_protocol"],
            "checkpoint": checkpoint.path,
        }
    write_outcome(settings.experiment_dir, outcome)  # kept even if the process dies while recording
    outcome.recorded = record_search(uri, client, outcome, (trainer, report) if outcome.best else None)
    write_outcome(settings.experiment_dir, outcome)  # with the best trial's MLflow run
    return outcome


OUTCOME_FILE = "outcome.json"  # beside the Ray results: what `fersearch sync` records in MLflow


def write_outcome(experiment_dir: Path, outcome: SearchOutcome) -> None:
    text = json.dumps(dataclasses.asdict(outcome), indent=2, default=str)
    atomic_write(experiment_dir / OUTCOME_FILE, lambda tmp: tmp.write_text(text))


def parent_status(outcome: SearchOutcome) -> str:
    """The status tag a search's parent run gets once its results are recorded."""
    if outcome.interrupted:
        return "interrupted"
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
    """`minutes_to_pass_<point>` on the parent run: when the study first beat each known point."""
    from fersearch.timeline import minutes_to_pass, validation_timeline

    try:
        passed = minutes_to_pass(validation_timeline(client, parent_run_id))
    except Exception as exc:  # noqa: BLE001 - the search's results stand without it
        log.warning("time-to-accuracy failed: %s", exc)
        return
    for point, minutes in passed.items():
        if math.isfinite(minutes):
            client.log_metric(parent_run_id, f"minutes_to_pass_{point}", minutes)
        else:
            client.set_tag(parent_run_id, NEVER_PASSED_TAG.format(point=point), "true")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in sys.argv)


