"""A search: Ray Tune runs the trials, the searcher (searcher.py) chooses them, ASHA
(scheduler.py) stops them, MLflow records them (trial_runs.py, record.py).

This module holds the search's settings, the checks made before anything starts, and the
orchestration: data loaded once, Ray started (ray_runtime.py), the parent run opened, known
points with a stored result taken from the store instead of trained again, earlier studies
given to the sampler (`--warm-start`), the Tuner run, and the best trial scored and recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from fersearch import metrics as M
from fersearch.config import (
    FIDELITY,
    SEARCH_CPUS_PER_TRIAL,
    SEARCH_MAX_EPOCHS,
    SEARCH_REDUCTION_FACTOR,
    SEARCH_TRIALS,
    bound_mlflow_http,
    explore_cap_epochs,
    first_rung,
    typed_params,
)
from fersearch.data import check_same_data, load_raw
from fersearch.errors import FersearchError, one_line
from fersearch.outcome import COMPLETED, FAILED, OUTCOMES, trial_outcome
from fersearch.outputs import check_out_dir
from fersearch.ray_runtime import (
    FAULT_LOGGER,
    LOG_FILE,
    check_trial_resources,
    dependency_log,
    init_ray,
)
from fersearch.record import (
    SEARCH_STATE_FILE,
    STATE_VERSION,
    SearchOutcome,
    auto_report,
    experiment_path,
    read_state,
    record_fault,
    record_search,
    write_outcome,
    write_state,
)
from fersearch.space import SearchSpace, default_space_path, first_error, load_space
from fersearch.tracking import (
    COMMAND_TAG,
    CONFIG_TAG,
    DATASET_TAG,
    FINGERPRINT_TAG,
    KIND_TAG,
    OPTUNA_FILE,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_TAG,
    POINT_TAG,
    RESUMED_TAG,
    REUSED_TAG,
    SPACE_FILE_TAG,
    STATUS_TAG,
    check_search_name,
    config_key,
)

log = logging.getLogger(__name__)

# The Optuna study of every search (named after it) lives here, so Optuna's own tools open it:
# optuna.load_study(study_name=NAME, storage="sqlite:///mlruns/optuna.db"), optuna-dashboard.
# A trial whose worker dies (killed, out of memory, a lost node) or that raises is restarted from
# its last checkpoint this many times before it counts as failed. A diverged trial does not
# raise (it ends failed at once: its weights would diverge again).
TRIAL_RETRIES = 2


@dataclass
class SearchSettings:
    model: str
    data_dir: Path
    name: str
    mlruns: Path
    trials: int = SEARCH_TRIALS
    max_epochs: int = SEARCH_MAX_EPOCHS
    grace_period: float | None = None  # epochs (fractional) before ASHA's first rung; None: config.first_rung of the data
    reduction_factor: int = SEARCH_REDUCTION_FACTOR
    time_budget_s: float | None = None
    # One 1-thread trial per core: on 2 cores two 1-thread trials train ~1.2x the samples/s of
    # one 2-thread trial, and asynchronous ASHA needs trials in flight to promote.
    cpus_per_trial: float = SEARCH_CPUS_PER_TRIAL
    gpus_per_trial: float = 0
    seed: int = 0
    quasi_random: int = 0
    sampler: str = "tpe"  # searcher.SAMPLERS
    warm_start: list[str] = field(default_factory=list)  # earlier searches given to the sampler
    space_path: Path | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    address: str | None = None
    resume: bool = False
    dataset_label: str = ""
    command: str = ""
    progress_every_s: float = 60.0
    optuna_storage: str | None = None  # an RDB URL; default: sqlite in mlruns (OPTUNA_FILE)
    allow_other_data: bool = False  # --resume on data whose fingerprint changed since the search began

    @property
    def storage(self) -> Path:
        return self.experiment_dir.parent

    @property
    def optuna_url(self) -> str:
        return self.optuna_storage or f"sqlite:///{(self.mlruns / OPTUNA_FILE).resolve()}"

    @property
    def experiment_dir(self) -> Path:
        return experiment_path(self.mlruns, self.name)


def resolve_space(settings: SearchSettings) -> SearchSpace:
    """The space file with `--fixed` values pinned and the budget (epochs) set."""
    path = settings.space_path or default_space_path(settings.model)
    space = load_space(path, settings.model)
    pins = {**typed_params(settings.model, settings.fixed), "epochs": settings.max_epochs}
    fixed = {**space.fixed, **pins}
    params = tuple(p for p in space.params if p.name not in fixed)
    pinned = dataclasses.replace(space, params=params, fixed=fixed, pinned=pins)
    error = first_error(pinned, dict(fixed))  # fixed values must make a valid config with some draw
    if error is not None:
        raise FersearchError(f"{path} with --fixed and --max-epochs: {error}")
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


def check_search(settings: SearchSettings) -> dict[str, Any] | None:
    """Check the name; resolve paths; for --resume load the saved search (and adopt its
    settings), else refuse a taken name. Nothing is started or written."""
    check_search_name(settings.name)
    # The MLflow store (when local) and Ray's results both live under --mlruns: a folder that
    # cannot be written is refused here, before Ray starts or a trial runs.
    settings.mlruns = check_out_dir(settings.mlruns, (), what="--mlruns")
    settings.data_dir = settings.data_dir.resolve()
    if not settings.resume:
        if settings.experiment_dir.exists():
            raise FersearchError(
                f"a search named {settings.name!r} already exists in {settings.experiment_dir}; "
                "pass --resume or a new --name"
            )
        return None
    if not (settings.experiment_dir / SEARCH_STATE_FILE).is_file():
        raise FersearchError(f"no search named {settings.name!r} to resume under {settings.storage}")
    check_private(settings.experiment_dir)
    saved = read_state(settings.experiment_dir)
    version = saved.get("state_version", 1)
    if version != STATE_VERSION:
        raise FersearchError(
            f"search {settings.name!r} was saved by another version of fersearch (state {version}, "
            f"this one resumes {STATE_VERSION}) and cannot be resumed; its trials can start a new search: --warm-start {settings.name}"
        )
    check_tuner_state(settings.experiment_dir)
    if saved["model"] != settings.model:
        raise FersearchError(f"search {settings.name!r} is for model {saved['model']}, not {settings.model}")
    settings.trials, settings.max_epochs = saved["trials"], saved["max_epochs"]
    settings.grace_period = saved.get("grace_period")  # a state written before it was saved: from the data
    settings.cpus_per_trial = saved.get("cpus_per_trial", settings.cpus_per_trial)
    settings.gpus_per_trial = saved.get("gpus_per_trial", settings.gpus_per_trial)
    settings.data_dir = Path(saved["data_dir"])
    return saved


TUNER_FILE = "tuner.pkl"  # Ray's saved Tuner, which --resume restores


def check_private(experiment_dir: Path) -> None:
    """--resume unpickles Ray's saved state (the Tuner, the searcher), and unpickling runs code:
    the folder and every file in it must be this user's and writable by no one else (on a
    cluster's shared filesystem anyone who could write there could run code in this driver)."""
    import stat

    if not hasattr(os, "getuid"):
        return  # no POSIX owners and modes to check
    uid = os.getuid()
    for path in [experiment_dir, *sorted(experiment_dir.iterdir())]:
        if path.is_symlink():
            raise FersearchError(f"{path} is a symbolic link; a search is resumed only from its own files")
        info = path.stat()
        writers = stat.S_IWOTH | (0 if _private_group(info.st_gid) else stat.S_IWGRP)
        others = info.st_mode & writers
        if info.st_uid != uid or others:
            who = "writable by other users" if others else f"owned by user {info.st_uid}"
            raise FersearchError(
                f"{path} is {who}: resuming would run code from it (Ray's saved state is a pickle); "
                f"if you trust everyone who can write there, make it yours alone (chmod -R go-w {experiment_dir}) and resume"
            )


def _private_group(gid: int) -> bool:
    """Whether group `gid` is this user's own (a user private group: named after the user, no
    other members), so that a group-writable file (umask 002) lets no one else write it."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}


def check_tuner_state(experiment_dir: Path) -> None:
    """Ray's saved Tuner must be a whole pickle before --resume hands it to Ray (which would
    fail with a traceback, after starting). Read as opcodes only: nothing in it is run."""
    import pickletools

    path = experiment_dir / TUNER_FILE
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
    except OSError as exc:
        raise FersearchError(f"{path} cannot be read ({exc.strerror or exc}); the search cannot be resumed") from None
    except Exception:  # noqa: BLE001 - any malformed pickle: truncated, garbage, empty
        raise FersearchError(f"{path} is damaged; the search cannot be resumed") from None


@dataclass
class SearchPlan:
    """What is checked before anything starts: the saved search to resume (None for a new
    one) and the space with its pins and known points."""

    saved: dict[str, Any] | None
    space: SearchSpace


def plan_search(settings: SearchSettings) -> SearchPlan:
    """All checks of a search's settings, once; nothing is started or written."""
    from fersearch.searcher import SAMPLERS, check_study_name, rdb, study_owner

    if settings.sampler not in SAMPLERS:
        raise FersearchError(f"unknown --sampler {settings.sampler!r} (choose from {', '.join(SAMPLERS)})")
    for name in settings.warm_start:
        check_search_name(name)
    saved = check_search(settings)
    space = resolve_space(settings)
    _preflight(space)
    # Last, once nothing else can refuse the search: the Optuna storage answers, and a new
    # search's study name is free in it (or holds this search's own stale study).
    if saved is None:
        check_study_name(settings.optuna_url, settings.name, study_owner(settings.experiment_dir))
    elif settings.optuna_storage:
        rdb(settings.optuna_storage)
    return SearchPlan(saved, space)


def run_search(
    settings: SearchSettings, emit: Callable[[str], None] = log.info, plan: SearchPlan | None = None
) -> SearchOutcome:
    """Runs the search `plan` was made for (planned here when not given). The caller's process is
    left as it was: its environment variables, and no Ray runtime unless it had one already."""
    with _process_state_restored():
        return _run_planned(settings, emit, plan)


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    import ray

    before = dict(os.environ)
    had_ray = ray.is_initialized()
    try:
        yield
    finally:
        if not had_ray and ray.is_initialized():
            ray.shutdown()
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _run_planned(settings: SearchSettings, emit: Callable[[str], None], plan: SearchPlan | None) -> SearchOutcome:
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
    if saved is not None:
        check_same_data(raw, saved.get("fingerprint"), f"search {settings.name!r}", settings.allow_other_data, "--allow-other-data")
    if settings.grace_period is None:
        settings.grace_period = first_rung(raw.count("train"), settings.max_epochs, settings.reduction_factor)
    uri = tracking_uri(settings.mlruns)
    earlier = _earlier_studies(settings, uri, raw.fingerprint) if settings.warm_start and saved is None else {}
    init_ray(settings.address)  # before the store is written: a bad --address leaves no search behind
    check_trial_resources(settings.cpus_per_trial, settings.gpus_per_trial)  # else no trial would ever start

    settings.mlruns.mkdir(parents=True, exist_ok=True)
    try:
        experiment_id = get_experiment_id(uri, settings.model, settings.mlruns)
        client = client_for(uri)
        if saved is not None:
            parent_run_id = saved["parent_run_id"]
            client.set_tag(parent_run_id, RESUMED_TAG, time.strftime("%Y-%m-%d %H:%M:%S"))
            stored, points = {}, saved.get("points", [])
        else:
            stored = _stored_points(client, experiment_id, space, raw.fingerprint)
            points = [name for name in space.points if name not in stored]
            parent_run_id = _open_search_run(settings, space, raw, client, experiment_id, points)
            _copy_stored_points(client, experiment_id, parent_run_id, stored)
    except FersearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreachable server or a broken store: one line
        raise FersearchError(f"cannot use the MLflow store at {uri} ({one_line(exc)}); no trial was started") from None
    for name, run in stored.items():
        emit(f"known point {name}: taken from run {run.info.run_id} of an earlier search on the same data "
             f"(best val {run.data.metrics.get(M.BEST_METRIC, float('nan')):.4f}), not trained again")
    if saved is not None:
        # What the interrupted run could not log (its tracking server was down) goes first.
        from fersearch.record import sync_trials

        sync_trials(settings.experiment_dir, uri, client, parent_run_id, settings.max_epochs, points)
    from fersearch.scheduler import Phase

    phase = Phase()
    cool_at = saved.get("cool_at") if saved is not None else _cool_at(settings)
    tuner = _make_tuner(settings, space, raw, uri, experiment_id, parent_run_id, emit, points, phase, stored, earlier, client,
                        cool_at)
    from fersearch.trial_runs import FAILED_CALLS

    failed_before = FAILED_CALLS[0]
    start = time.time()
    try:
        results = tuner.fit()
    except FersearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a fault inside Ray Tune's controller: one line
        # Trials' own errors are caught per trial; what reaches here is Ray Tune's controller
        # failing (Ray 2.60's reuse_actors fault ended a 2-hour study at minute 69 with a
        # TypeError from its error handler). The trials' checkpoints and the search's state are
        # saved as it goes; the traceback goes to the search's log file, the reason to the user.
        logging.getLogger(FAULT_LOGGER).error("Ray Tune's controller raised", exc_info=True)
        record_fault(client, parent_run_id)
        raise FersearchError(
            f"the search stopped on an error inside Ray Tune ({type(exc).__name__}: "
            f"{one_line(exc)}; traceback in {settings.experiment_dir / LOG_FILE}); "
            f"what it trained is kept: continue it with fersearch search --resume {settings.name}"
        ) from None
    wall = time.time() - start
    failures = FAILED_CALLS[0] - failed_before
    if failures:
        # The tracking server failed mid-search: if it is back, it gets what it missed before
        # the search's results are recorded (the best trial's run among them).
        from fersearch.record import sync_trials

        try:
            sync_trials(settings.experiment_dir, uri, client, parent_run_id, settings.max_epochs, points)
            failures = 0
        except FersearchError as exc:
            log.warning("%s", exc)
    outcome = _finish(settings, results, raw, uri, client, parent_run_id, wall, phase)
    outcome.mlflow_failures = failures
    if outcome.best is not None and outcome.recorded:
        outcome.report = auto_report(settings.model, settings.name, settings.mlruns, settings.experiment_dir, client, parent_run_id)
    return outcome


def _earlier_studies(settings: SearchSettings, uri: str, fingerprint: str) -> dict[str, Any]:
    """The Optuna studies of the `--warm-start` searches (same model, same data), by name."""
    import optuna

    from fersearch.tracking import client_for, existing_store_uri, find_search

    existing_store_uri(settings.mlruns)  # a local store must exist: earlier searches live in it
    client = client_for(uri)
    studies = {}
    for name in settings.warm_start:
        try:
            parent = find_search(client, settings.model, name, None)
        except FersearchError as exc:
            raise FersearchError(f"--warm-start {name}: {exc}") from None
        tags = parent.data.tags
        if tags.get(FINGERPRINT_TAG) != fingerprint:
            raise FersearchError(
                f"--warm-start {name}: that search ran on other data (fingerprint "
                f"{tags.get(FINGERPRINT_TAG, '?')}, this one {fingerprint})"
            )
        try:
            studies[name] = optuna.load_study(study_name=tags[OPTUNA_STUDY_TAG], storage=tags[OPTUNA_STORAGE_TAG])
        except (KeyError, Exception) as exc:  # noqa: BLE001 - a missing study or storage: one line
            raise FersearchError(f"--warm-start {name}: cannot open its Optuna study ({one_line(exc)})") from None
    return studies


def _stored_points(client, experiment_id: str, space: SearchSpace, fingerprint: str) -> dict[str, Any]:
    """Known points with a completed run of the same config, data and fidelity in the store
    (the latest one each): their results are reused instead of trained again."""
    found = {}
    for name in space.points:
        key = config_key(space.model, space.point(name), fingerprint)
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{CONFIG_TAG}` = '{key}' and tags.`{STATUS_TAG}` = '{COMPLETED}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs and M.BEST_METRIC in runs[0].data.metrics:
            found[name] = runs[0]
    return found


def _copy_stored_points(client, experiment_id: str, parent_run_id: str, stored: dict[str, Any]) -> None:
    """A run under this search for each reused known point (tagged REUSED_TAG with its source):
    its config, best validation and learning curves, so the report and MLflow show the bar. The
    copied metrics keep their original times: they are not this study's progress."""
    from mlflow.entities import Metric

    from fersearch.tracking import EPOCH_KEYS, log_params

    for name, source in stored.items():
        run = client.create_run(
            experiment_id,
            run_name=f"{name} (reused)",
            tags={"mlflow.parentRunId": parent_run_id, POINT_TAG: name, REUSED_TAG: source.info.run_id,
                  STATUS_TAG: COMPLETED, CONFIG_TAG: source.data.tags.get(CONFIG_TAG, "")},
        )
        log_params(client, run.info.run_id, source.data.params)
        rows = [Metric(m.key, m.value, m.timestamp, m.step)
                for key in (*EPOCH_KEYS, M.JUDGE_METRIC, M.BEST_METRIC, M.EPOCHS_TRAINED)
                for m in client.get_metric_history(source.info.run_id, key)]
        for start in range(0, len(rows), 1000):
            client.log_batch(run.info.run_id, metrics=rows[start : start + 1000])
        client.set_terminated(run.info.run_id, "FINISHED")


def _open_search_run(settings: SearchSettings, space: SearchSpace, raw, client, experiment_id: str, points: list[str]) -> str:
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
            "sampler": settings.sampler,
            "quasi_random": settings.quasi_random,
            "warm_start": ",".join(settings.warm_start),
            "fidelity": FIDELITY,
            "data_dir": str(settings.data_dir),
            "searched": ",".join(space.searched()),
            **{f"fixed.{k}": v for k, v in space.fixed.items()},
        },
    )
    client.log_text(parent_run_id, Path(space.source).read_text(), "search_space.yaml")
    write_state(
        settings.experiment_dir,
        {
            "state_version": STATE_VERSION,
            "model": settings.model,
            "trials": settings.trials,
            "max_epochs": settings.max_epochs,
            "grace_period": settings.grace_period,
            "data_dir": str(settings.data_dir),
            "fingerprint": raw.fingerprint,  # --resume and sync refuse other data
            "cpus_per_trial": settings.cpus_per_trial,
            "gpus_per_trial": settings.gpus_per_trial,
            "parent_run_id": parent_run_id,
            "points": points,  # the first trials, in order (their runs' point tags)
            "cool_at": _cool_at(settings),  # a resumed search's trials report as its first ones did
        },
    )
    return parent_run_id


def _cool_at(settings: SearchSettings) -> float | None:
    """The epochs at which a trial reports a decayed branch (trainable.cools_at): the capped rung,
    which only a time-budgeted search has (its explorers stop there)."""
    if settings.time_budget_s is None:
        return None
    return explore_cap_epochs(settings.grace_period, settings.reduction_factor, settings.max_epochs)


def _make_tuner(
    settings, space, raw, uri, experiment_id, parent_run_id, emit, points, phase, stored, earlier, client, cool_at
) -> tune.Tuner:
    """A new Tuner (Optuna searcher, ASHA, MLflow and progress callbacks), or the saved one restored."""
    import ray

    from fersearch.progress import ProgressCallback, RayTrialLines
    from fersearch.scheduler import PauseMarker, SearchASHA
    from fersearch.searcher import (
        fresh_study,
        make_searcher,
        startup_trials,
        study_owner,
        warm_start,
    )
    from fersearch.trainable import train_trial
    from fersearch.trial_runs import MlflowTrialCallback

    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial,
            raw=raw,
            model=settings.model,
            threads=max(1, int(settings.cpus_per_trial)),
            cool_at=cool_at,
        ),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    if settings.resume:
        return tune.Tuner.restore(
            str(settings.experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=False
        )
    total_cpus = ray.cluster_resources().get("CPU", 1)
    concurrency = max(1, int(total_cpus // max(settings.cpus_per_trial, 1e-9)))
    owner = study_owner(settings.experiment_dir)
    fresh_study(settings.optuna_url, settings.name, owner)
    startup = startup_trials(settings.trials, settings.quasi_random, settings.time_budget_s, concurrency)
    searcher = make_searcher(
        space, settings.seed, settings.quasi_random, settings.max_epochs, settings.optuna_url, settings.name,
        points=points, sampler=settings.sampler, startup=startup, phase=phase, max_concurrent=concurrency,
        owner=owner,
    )
    _tell_stored_points(searcher._ot_study, space, stored, client)
    if earlier:
        used = warm_start(searcher._ot_study, space, earlier)
        emit("warm start: " + ", ".join(f"{n} trial(s) of {name}" for name, n in used.items())
             + " given to the sampler before its first proposal")
    rule = "random search" if settings.sampler == "random" else (
        f"TPE after {startup} {'quasi-random' if settings.quasi_random else 'random'} start-up trial(s) "
        "(finished or pruned trials of the study, known points and warm start included)")
    emit(f"searcher: {rule}; {concurrency} trial(s) at a time, {settings.cpus_per_trial:g} CPU(s) each")
    scheduler = SearchASHA(
        max_epochs=settings.max_epochs, grace=settings.grace_period, factor=settings.reduction_factor,
        points=points, trials=settings.trials, budget_s=settings.time_budget_s, slots=concurrency, phase=phase,
        emit=emit,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,  # it limits the trials in flight itself (paused ones free their slot)
            scheduler=scheduler,
            num_samples=settings.trials,
            time_budget_s=settings.time_budget_s,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=str(settings.storage),
            callbacks=[
                PauseMarker(phase),  # first: the others see a paused trial's flag
                MlflowTrialCallback(uri, experiment_id, parent_run_id, settings.max_epochs, points,
                                    settings.model, raw.fingerprint),
                ProgressCallback(emit, settings.trials, settings.max_epochs, settings.time_budget_s,
                                 settings.progress_every_s, scheduler.rungs, phase),
                RayTrialLines(metric=M.SELECT_METRIC),
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


def _tell_stored_points(study, space: SearchSpace, stored: dict[str, Any], client) -> None:
    """A reused known point inside the space enters the study as the trial it was: its values,
    its best validation, its subset scores at every report."""
    import optuna

    from fersearch.searcher import PROPOSED_BY, REUSED_FROM

    params = {p.name: p for p in space.params}
    for name, run in stored.items():
        values = space.searched_values(space.point(name))
        if values is None:
            continue  # outside the space: Optuna never hears of it, as when it is run
        steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, M.JUDGE_METRIC)}
        study.add_trial(
            optuna.trial.create_trial(
                value=float(run.data.metrics[M.BEST_METRIC]),
                params=values,
                distributions={k: params[k].distribution for k in values},
                intermediate_values=steps,
                user_attrs={PROPOSED_BY: "point", REUSED_FROM: run.info.run_id},
            )
        )


def _finish(settings, results, raw, uri, client, parent_run_id, wall, phase) -> SearchOutcome:
    """Totals and the best trial scored on val and test, kept beside the Ray results
    (OUTCOME_FILE), then recorded in MLflow. The best trial is the best by validation among the
    trials that trained the whole budget (a time-budgeted search finishes its leader for this),
    or among all scored trials when none did."""
    from fersearch.trainable import load_trainer

    outcomes = [trial_outcome(r.metrics, settings.max_epochs, error=r.error is not None) for r in results]
    counts = {"trials": len(results), **{name: outcomes.count(name) for name in OUTCOMES}}
    epochs_trained = sum(float((r.metrics or {}).get(M.EPOCHS_SEEN, 0)) for r in results)
    # Ctrl-C / SIGTERM make Ray return early, with trials it never ended (the time budget ends
    # its running trials: those count as cut short, but the search is complete; so does a
    # search that stopped proposing to finish its leader).
    budget_spent = settings.time_budget_s is not None and wall >= 0.95 * settings.time_budget_s
    never_ended = len(results) - results.num_terminated - results.num_errors
    interrupted = never_ended > 0 or (len(results) < settings.trials and not budget_spent and not phase.finishing)
    outcome = SearchOutcome(
        settings.name, parent_run_id, counts, round(epochs_trained, 2), counts["trials"] * settings.max_epochs, wall,
        None, interrupted, finishing_at_s=phase.switched_at_s,
    )
    outcome.proposals = _proposals(settings)
    scored = [r for r, o in zip(results, outcomes, strict=True) if o != FAILED and (r.metrics or {}).get(M.BEST_METRIC) is not None]
    full = [r for r, o in zip(results, outcomes, strict=True) if o == COMPLETED and r in scored]
    if not interrupted and scored:
        best = max(full or scored, key=lambda r: r.metrics[M.BEST_METRIC])
        checkpoint = best.get_best_checkpoint(M.SELECT_METRIC, M.SELECT_MODE) or best.checkpoint
        trainer = load_trainer(checkpoint.path, raw)
        report = trainer.final_report(raw)
        outcome.best = {
            "trial_id": best.metrics["trial_id"],
            "run_id": None,  # known once recorded in MLflow
            "best_val": best.metrics[M.BEST_METRIC],  # its best epoch's validation accuracy, without TTA
            "epoch": trainer.epoch,
            "config": trainer.cfg.to_params(),
            "val": M.summary(report["val"]),
            "test": M.summary(report["test"]),
            "by_protocol": report["by_protocol"],
            "checkpoint": checkpoint.path,
        }
        outcome.stored_above_best = _stored_above(client, parent_run_id, outcome.best["best_val"])
    write_outcome(settings.experiment_dir, outcome)  # kept even if the process dies while recording
    outcome.recorded = record_search(uri, client, outcome, (trainer, report) if outcome.best else None)
    write_outcome(settings.experiment_dir, outcome)  # with the best trial's MLflow run
    return outcome


def _stored_above(client, parent_run_id: str, best_val: float) -> dict[str, dict[str, Any]]:
    """The known points this search took from the store (its runs tagged REUSED_TAG) whose best
    validation accuracy is above `best_val` (both without TTA); {} when MLflow cannot say."""
    try:
        runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    except Exception as exc:  # noqa: BLE001 - a tracking server that is down: the search's results still count
        log.warning("MLflow could not say whether a stored known point scored above the best trial: %s", one_line(exc))
        return {}
    return {
        run.data.tags.get(POINT_TAG, run.info.run_name): {"run_id": run.data.tags[REUSED_TAG], "val": value}
        for run in runs
        if REUSED_TAG in run.data.tags and (value := run.data.metrics.get(M.BEST_METRIC)) is not None and value > best_val
    }


def _proposals(settings: SearchSettings) -> dict[str, int]:
    """Who chose the values of the study's trials (searcher.proposals), from the stored study."""
    import optuna

    from fersearch.searcher import proposals

    try:
        return proposals(optuna.load_study(study_name=settings.name, storage=settings.optuna_url))
    except Exception as exc:  # noqa: BLE001 - the search's results stand without the count
        log.warning("could not count the study's proposals: %s", one_line(exc))
        return {}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in sys.argv)
