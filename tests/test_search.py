"""End-to-end searches with a real local Ray runtime and a real MLflow store in a temp dir."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fersearch import metrics as M
from fersearch.config import resolve_config
from fersearch.search import SearchSettings, make_searcher, resolve_space, run_search
from fersearch.space import SPACES_DIR as SPACES
from fersearch.space import load_space
from fersearch.tracking import (
    BEST_TRIAL_TAG,
    INDEX_TAG,
    MODEL_FLOPS,
    MODEL_PARAMS,
    NEVER_PASSED_TAG,
    OPTUNA_STORAGE_TAG,
    POINT_TAG,
    STATUS_TAG,
    tracking_uri,
)
from tests.test_space import MODERN


def _settings(data, tmp_path, name, **kw):
    kw.setdefault("cpus_per_trial", 1)
    return SearchSettings(model="cnn", data_dir=data, name=name, mlruns=tmp_path / "mlruns", **kw)


def _children(mlruns, parent_run_id):
    client = MlflowClient(tracking_uri(mlruns))
    exp = client.get_experiment_by_name("cnn")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_smoke_search_4_trials_2_epochs(smoke_search, tmp_path):
    out, mlruns, lines = smoke_search
    assert out.counts["trials"] == 4 and out.counts["failed"] == 0
    assert out.counts["completed"] + out.counts["stopped_early"] == 4
    ended = [line for line in lines if line.startswith("[") and "/4]" in line.split()[0]]
    assert len(ended) == 4 and ended[-1].startswith("[4/4]")
    # Status lines while trials run: a running trial's epoch and val accuracy, the best so far,
    # time spent and time left in the budget.
    status = [line for line in lines if " spent, " in line]
    assert status and all(" left] " in line and "| best " in line for line in status)
    assert any(re.search(r"running: \w+ epoch [12]/2 val 0\.\d{4}", line) for line in status), status
    client, runs = _children(mlruns, out.parent_run_id)
    assert len(runs) == 4
    statuses = {r.data.tags[STATUS_TAG] for r in runs}
    assert statuses <= {"completed", "stopped_early"}
    # Per-epoch metrics with epoch steps; the first trial is the seed baseline.
    first = next(r for r in runs if r.data.tags[INDEX_TAG] == "1")
    assert first.data.params["lr"] == "0.01" and first.data.params["channels"] == "6,16"
    # The known points are labelled; every trial logs its model's size.
    labels = {r.data.tags[INDEX_TAG]: r.data.tags.get(POINT_TAG) for r in runs}
    assert labels == {"1": "seed", "2": "modern", "3": None, "4": None}
    assert first.data.params[MODEL_PARAMS] == "169100"
    modern = next(r for r in runs if r.data.tags.get(POINT_TAG) == "modern")
    assert modern.data.params["channels"] == "32,64,128" and int(modern.data.params[MODEL_FLOPS]) > 10**8
    history = client.get_metric_history(first.info.run_id, M.VAL_ACCURACY)
    assert [m.step for m in history] == list(range(1, len(history) + 1))
    # The best trial's model and artifacts are stored, and the best is the best-scoring trial.
    best = out.best
    assert best["val"]["accuracy"] == pytest.approx(max(r.data.metrics[M.BEST_METRIC] for r in runs))
    artifacts = {a.path for a in client.list_artifacts(best["run_id"], "best")}
    assert {"best/curves.png", "best/confusion_matrix.png", "best/classification_report.json", "best/config.yaml"} <= artifacts
    import mlflow

    from fersearch.tracking import using_uri

    with using_uri(tracking_uri(mlruns)):
        model = mlflow.pytorch.load_model(f"runs:/{best['run_id']}/model")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # The registered-to-be MLflow model holds exactly the best trial's chosen weights.
    import torch

    payload = torch.load(client.download_artifacts(best["run_id"], "best/model.pt", str(tmp_path)), weights_only=True)
    weights = model.state_dict()
    assert set(weights) == set(payload["state_dict"])
    assert all(torch.equal(weights[k].cpu(), v) for k, v in payload["state_dict"].items())
    with torch.no_grad():  # any batch size, not only the example's
        assert model(torch.zeros(3, 1, 48, 48)).shape == (3, 8)
    parent = client.get_run(out.parent_run_id)
    assert parent.data.tags[BEST_TRIAL_TAG] == best["trial_id"]
    assert parent.data.metrics["trials_trials"] == 4
    # The Optuna study is stored where the parent run says, and Optuna's own tools open it; its
    # trial states are MLflow's (the seed point lies outside the focused space: never told).
    import optuna

    assert parent.data.tags[OPTUNA_STORAGE_TAG] == f"sqlite:///{mlruns.resolve() / 'optuna.db'}"
    study = optuna.load_study(study_name="smoke", storage=parent.data.tags[OPTUNA_STORAGE_TAG])
    names = {optuna.trial.TrialState.COMPLETE: "completed", optuna.trial.TrialState.PRUNED: "stopped_early",
             optuna.trial.TrialState.FAIL: "failed"}
    told = [r for r in runs if r.data.tags.get(POINT_TAG) != "seed"]
    assert sorted(names[t.state] for t in study.trials) == sorted(r.data.tags[STATUS_TAG] for r in told)
    modern = next(r for r in runs if r.data.tags.get(POINT_TAG) == "modern")
    assert study.trials[0].value == pytest.approx(modern.data.metrics[M.BEST_METRIC])


def test_time_to_accuracy_comes_from_the_store(smoke_search):
    from fersearch.timeline import minutes_to_pass, validation_timeline

    out, mlruns, _ = smoke_search
    client, runs = _children(mlruns, out.parent_run_id)
    parent = client.get_run(out.parent_run_id)
    timeline = validation_timeline(client, out.parent_run_id)
    # One row per logged validation epoch, in time order, with its running best.
    histories = {r.info.run_id: client.get_metric_history(r.info.run_id, M.VAL_ACCURACY) for r in runs}
    assert len(timeline) == sum(len(h) for h in histories.values()) == sum(int(r.data.metrics[M.EPOCHS_TRAINED]) for r in runs)
    assert timeline["minutes"].is_monotonic_increasing and timeline["best_so_far"].is_monotonic_increasing
    assert timeline["best_so_far"].iloc[-1] == pytest.approx(max(r.data.metrics[M.BEST_METRIC] for r in runs))
    # Minutes to pass each known point, recomputed here from the raw histories.
    start = parent.info.start_time
    for run in runs:
        point = run.data.tags.get(POINT_TAG)
        if not point:
            continue
        bar = max(m.value for m in histories[run.info.run_id])
        above = [(m.timestamp - start) / 60000 for h in histories.values() for m in h if m.value > bar]
        key = f"minutes_to_pass_{point}"
        if above:
            assert parent.data.metrics[key] == pytest.approx(min(above))
            assert minutes_to_pass(timeline)[point] == pytest.approx(min(above))
        else:
            assert key not in parent.data.metrics and parent.data.tags[NEVER_PASSED_TAG.format(point=point)] == "true"


def _space_file(tmp_path, doc):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_trials_that_raise_or_diverge_do_not_stop_the_search(ray_runtime, synthetic_dir, tmp_path):
    # The seed point runs; every searched trial raises (5 valid 5x5 conv blocks do not fit 48x48).
    raising = _space_file(tmp_path, {
        "model": "cnn",
        "params": {"channels": {"choice": ["6,8,10,12,14"]}, "flip": {"choice": [True, False]}},
    })
    out = run_search(_settings(synthetic_dir, tmp_path, "raise", trials=3, max_epochs=1, space_path=raising,
                                seed=2, cpus_per_trial=2))
    assert out.counts["trials"] == 3 and out.counts["failed"] == 2
    assert out.best is not None and out.best["config"]["channels"] == "6,16"
    # Every trial diverges (huge lr, no batch norm): all are failed, none left running.
    nan = tmp_path / "nan"
    nan.mkdir()
    diverging = _space_file(nan, {"model": "cnn", "params": {"lr": 10.0, "momentum": 0.99, "batch_norm": False,
                                                             "flip": {"choice": [True]}},
                                  "points": {"diverging": {"lr": 10.0, "momentum": 0.99, "batch_norm": False}}})
    out = run_search(_settings(synthetic_dir, tmp_path, "nan", trials=2, max_epochs=2, space_path=diverging))
    assert out.counts == {"trials": 2, "completed": 0, "stopped_early": 0, "failed": 2, "unfinished": 0}
    assert out.best is None
    _, runs = _children(tmp_path / "mlruns", out.parent_run_id)
    assert sorted(r.data.tags[STATUS_TAG] for r in runs) == ["failed", "failed"]


def test_optuna_sees_pruned_failed_and_completed_trials_truthfully(synthetic_dir):
    from optuna.trial import TrialState

    space = dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={})
    searcher = make_searcher(space, seed=0, quasi_random=0, max_epochs=9)
    for tid in ("a", "b", "c", "d"):
        assert searcher.suggest(tid) is not None
    for step, value in enumerate([0.5, 0.6], start=1):
        searcher.on_trial_result("a", {M.VAL_ACCURACY: value, M.TRAINING_ITERATION: step})
    searcher.on_trial_complete("a", {M.VAL_ACCURACY: 0.6, M.BEST_METRIC: 0.6, M.TRAINING_ITERATION: 2})
    searcher.on_trial_result("b", {M.VAL_ACCURACY: float("nan"), M.TRAINING_ITERATION: 1})
    searcher.on_trial_complete("b", None, error=True)
    searcher.on_trial_complete("c", {M.VAL_ACCURACY: 0.7, M.BEST_METRIC: 0.72, M.TRAINING_ITERATION: 9})
    searcher.on_trial_complete("d", {M.VAL_ACCURACY: 0.0, M.BEST_METRIC: 0.0, M.TRAINING_ITERATION: 1, M.DIVERGED: 1})
    trials = searcher._ot_study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states == [TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[0].intermediate_values == {1: 0.5, 2: 0.6}
    assert trials[2].value == 0.72  # a finished trial is worth its best validation epoch


def test_known_points_come_first_and_optuna_sees_only_those_in_its_space():
    from optuna.trial import TrialState

    space = resolve_space(SearchSettings(model="cnn", data_dir=Path("."), name="x", mlruns=Path("m"), max_epochs=9))
    searcher = make_searcher(space, seed=0, quasi_random=0, max_epochs=9)
    seed, modern, third = (searcher.suggest(t) for t in ("s", "m", "t"))
    # Whole configurations, with the search's epochs: the seed's, then the modern baseline.
    assert resolve_config("cnn", seed) == resolve_config("cnn", {"epochs": 9})
    assert resolve_config("cnn", modern) == resolve_config("cnn", {**MODERN, "epochs": 9})
    assert resolve_config("cnn", third) != resolve_config("cnn", modern)
    for trial_id, best in (("s", 0.70), ("m", 0.80), ("t", 0.75)):
        for epoch in range(1, 10):
            searcher.on_trial_result(trial_id, {M.VAL_ACCURACY: best - 0.01 * (9 - epoch), M.TRAINING_ITERATION: epoch})
        searcher.on_trial_complete(trial_id, {M.BEST_METRIC: best, M.TRAINING_ITERATION: 9})
    trials = searcher._ot_study.get_trials(deepcopy=False)
    # The seed's configuration lies outside the focused space: never told. The modern point is
    # the study's first trial, with exactly its values and its full result.
    assert len(trials) == 2 and [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].value == 0.80 and trials[0].params == space.searched_values(space.point("modern"))
    assert len(trials[0].intermediate_values) == 9


class _Trial:
    """What ASHA reads of a Ray trial: its id, and the tag that numbers it in suggestion order."""

    def __init__(self, index: int) -> None:
        self.trial_id, self.experiment_tag = f"t{index}", f"{index}_lr=0.1"


def test_asha_never_stops_a_known_point():
    from ray.tune.schedulers import TrialScheduler

    from fersearch.search import make_scheduler

    settings = SearchSettings(model="cnn", data_dir=Path("."), name="x", mlruns=Path("m"), max_epochs=9,
                              grace_period=1, reduction_factor=3)
    asha = make_scheduler(settings, ["seed", "modern"])
    seed, modern, *searched = trials = [_Trial(i) for i in range(1, 8)]
    for trial in trials:
        asha.on_trial_add(None, trial)

    def report(trial, epoch, value):
        return asha.on_trial_result(None, trial, {M.TRAINING_ITERATION: epoch, M.VAL_ACCURACY: value})

    # Five searched trials set high bars at every rung; then the known points score far below.
    for epoch in range(1, 9):
        for trial in searched:
            report(trial, epoch, 0.9)
    decisions = [report(point, epoch, 0.1) for epoch in range(1, 9) for point in (seed, modern)]
    assert decisions == [TrialScheduler.CONTINUE] * 16
    assert report(seed, 9, 0.1) == report(modern, 9, 0.1) == TrialScheduler.STOP  # the budget's end
    # The same score from a searched trial is cut at the first rung.
    late = _Trial(8)
    asha.on_trial_add(None, late)
    assert report(late, 1, 0.1) == TrialScheduler.STOP


def test_a_restored_searcher_proposes_what_an_uninterrupted_one_would(tmp_path):
    """--resume restores the searcher Ray saved, over the stored study: TPE goes on from the
    same history and random state, so the trials after the resume are the ones the search would
    have proposed without the interruption. A trial asked for after the save (the driver was
    killed before Ray saved again) is told FAIL: none stays RUNNING, none is counted twice."""
    from optuna.trial import TrialState

    space = dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={})

    def score(config):  # a deterministic objective of the proposal
        return round(0.5 + 0.01 * len(str(sorted(config.items()))) % 0.4, 4)

    def run(searcher, ids):
        proposals = []
        for tid in ids:
            config = searcher.suggest(tid)
            proposals.append(config)
            searcher.on_trial_complete(tid, {M.BEST_METRIC: score(config), M.TRAINING_ITERATION: 3})
        return proposals

    def searcher_on(db):
        return make_searcher(space, 3, 0, 3, f"sqlite:///{tmp_path / db}", "study")

    whole = run(searcher_on("whole.db"), [f"t{i}" for i in range(12)])
    first = searcher_on("cut.db")
    before = run(first, [f"t{i}" for i in range(7)])
    first.save(str(tmp_path / "searcher.pkl"))
    first.suggest("lost")  # asked for after the save; its driver dies here
    restored = searcher_on("cut.db")
    restored.restore(str(tmp_path / "searcher.pkl"))
    after = run(restored, [f"t{i}" for i in range(7, 12)])
    assert before + after == whole
    states = [t.state for t in restored._ot_study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == 12 and states.count(TrialState.FAIL) == 1
    assert TrialState.RUNNING not in states


def test_same_seed_single_worker_gives_same_trial_sequence():
    space = load_space(SPACES / "cnn.yaml", "cnn")
    sequences = []
    for _ in range(2):
        searcher = make_searcher(space, seed=7, quasi_random=3, max_epochs=3)
        seq = []
        for i in range(6):
            seq.append(searcher.suggest(str(i)))
            searcher.on_trial_complete(str(i), {M.BEST_METRIC: 0.1 * i, M.TRAINING_ITERATION: 3})
        sequences.append(seq)
    assert sequences[0] == sequences[1]
    assert sequences[0][0]["lr"] == 0.01 and sequences[0][0]["channels"] == "6,16"


def test_resume_after_interrupted_search(ray_runtime, synthetic_dir, tmp_path):
    mlruns = tmp_path / "mlruns"
    env = {**os.environ, "FERSEARCH_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--trials", "4",
           "--max-epochs", "3", "--reduction-factor", "10", "--name", "resumable", "--mlruns", str(mlruns),
           "--cpus-per-trial", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[1/4]") or time.time() > deadline:
            break
    assert any(s.startswith("[1/4]") for s in seen), "".join(seen)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, rest
    state = json.loads((mlruns / "ray" / "resumable" / "fersearch_search.json").read_text())
    client = MlflowClient(tracking_uri(mlruns))
    exp = client.get_experiment_by_name("cnn")
    first_done = [r for r in client.search_runs([exp.experiment_id],
                                                filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
                  if r.data.tags.get(STATUS_TAG) in ("completed", "stopped_early")]
    assert first_done
    # No run of the interrupted search is left RUNNING: the cut ones are KILLED, "unfinished".
    _, interrupted = _children(mlruns, state["parent_run_id"])
    assert all(r.info.status != "RUNNING" for r in interrupted)
    assert {r.data.tags[STATUS_TAG] for r in interrupted if r.info.status == "KILLED"} <= {"unfinished"}
    settings = SearchSettings(model="cnn", data_dir=Path("."), name="resumable", mlruns=mlruns, resume=True,
                              cpus_per_trial=2)
    out = run_search(settings)
    assert not out.interrupted and out.counts["trials"] == 4 and out.counts["failed"] == 0
    _, runs = _children(mlruns, state["parent_run_id"])
    assert len(runs) == 4  # finished trials were neither lost nor repeated
    assert {r.info.status for r in runs} == {"FINISHED"}  # the resumed ones reopened and finished
    by_id = {r.info.run_id: r for r in runs}
    for done in first_done:
        assert by_id[done.info.run_id].data.metrics[M.EPOCHS_TRAINED] == done.data.metrics[M.EPOCHS_TRAINED]
    assert out.best is not None
    # The stored Optuna study went on where it stopped: each trial it was told of is there once
    # (the seed point lies outside the space: never told), and none is left running.
    import optuna

    study = optuna.load_study(study_name="resumable", storage=f"sqlite:///{mlruns / 'optuna.db'}")
    told = [r for r in runs if r.data.tags.get(POINT_TAG) != "seed"]
    assert len(study.trials) == len(told)
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)


# What a user's terminal shows during `fersearch search`: fersearch's own lines, and only the
# dependency lines this list names, each with the reason it stays.
FERSEARCH_LINES = (
    r"search \S+: model \w+, \d+ trials, up to \d+ epochs each$",
    r"\[\d+/\d+\] \w+ (finished|stopped by ASHA|failed|cut short) after \d+ epoch\(s\)",
    r"\[\d+:\d\d:\d\d spent",
    r"trials \d+: completed \d+, stopped early by ASHA \d+, failed \d+",
    r"best trial \w+ \(MLflow run \w+\), epoch \d+:$",
    r"\s+(ferplus8|seed10): val accuracy [01]\.\d{4}, test accuracy [01]\.\d{4}, test f1_macro [01]\.\d{4}$",
    r"study report: \S+report\.md$",
    r"MLflow store: \S+ \(make ui\)$",
    r"\w+ stopped unexpectedly \(its worker died or it raised\); restarting it from its last checkpoint",
)
ALLOWED_DEPENDENCY_LINES = (
    # Ray 2.60's notice that token authentication is on: a security setting a user should know
    # of (README's cluster section says what to do about it), so it stays visible.
    r".*WARNING authentication_token_setup\.py:\d+ -- Token authentication is enabled",
)


def test_the_terminal_shows_fersearch_not_its_dependencies(synthetic_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["FERSEARCH_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--trials", "2",
         "--max-epochs", "1", "--grace-period", "1", "--name", "terminal", "--mlruns", str(tmp_path / "m")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    patterns = [re.compile(p) for p in FERSEARCH_LINES + ALLOWED_DEPENDENCY_LINES]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert [line for line in lines if not any(p.match(line) for p in patterns)] == []
    assert any(line.startswith("trials 2: completed 2") for line in lines)
    # The dependencies' chatter went to the search's log file instead (Optuna's study line was on
    # the terminal before).
    log_text = (tmp_path / "m" / "ray" / "terminal" / "driver.log").read_text()
    assert "A new study created" in log_text and "A new study created" not in proc.stdout + proc.stderr


def test_a_trial_cut_by_the_time_budget_leaves_no_run_running(ray_runtime, synthetic_dir, tmp_path):
    """Ray ends the search at its budget without a callback for the running trial: its MLflow
    run is closed as KILLED, tagged unfinished (issue 13)."""
    out = run_search(_settings(synthetic_dir, tmp_path, "budget", trials=2, max_epochs=40, time_budget_s=20,
                               cpus_per_trial=2))
    assert out.counts["unfinished"] >= 1
    _, runs = _children(tmp_path / "mlruns", out.parent_run_id)
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    cut = [r for r in runs if r.data.tags.get(STATUS_TAG) == "unfinished"]
    assert len(cut) == out.counts["unfinished"] and {r.info.status for r in cut} == {"KILLED"}
