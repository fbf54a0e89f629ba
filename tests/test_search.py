"""End-to-end searches with a real local Ray runtime and a real MLflow store in a temp dir."""

import dataclasses
import json
import logging
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
from fersearch.search import SearchSettings, resolve_space, run_search
from fersearch.searcher import PROPOSED_BY, latest_records, make_searcher, proposals
from fersearch.space import SPACES_DIR as SPACES
from fersearch.space import load_space
from fersearch.tracking import (
    BEST_TRIAL_TAG,
    INDEX_TAG,
    MODEL_FLOPS,
    MODEL_PARAMS,
    MODEL_URI_TAG,
    NEVER_PASSED_TAG,
    OPTUNA_STORAGE_TAG,
    POINT_TAG,
    STATUS_TAG,
    tracking_uri,
)
from tests.conftest import DIVERGES
from tests.test_space import MODERN


def _settings(data, tmp_path, name, **kw):
    kw.setdefault("cpus_per_trial", 1)
    # These tests check mechanisms at rungs a quarter epoch apart; on their 240 training faces
    # the data's own first rung (config.first_rung) would come as late as the budget lets it.
    # The smoke search (conftest) runs with the data's first rung.
    kw.setdefault("grace_period", 0.25)
    return SearchSettings(model="cnn", data_dir=data, name=name, mlruns=tmp_path / "mlruns", **kw)


def _children(mlruns, parent_run_id):
    client = MlflowClient(tracking_uri(mlruns))
    exp = client.get_experiment_by_name("cnn")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_smoke_search_4_trials_2_epochs(smoke_search, tmp_path):
    out, mlruns, lines = smoke_search
    assert out.counts["trials"] == 4 and out.counts["failed"] == 0
    assert out.counts["completed"] + out.counts["stopped_early"] == 4
    # A line for every trial that ended, and for every pause at a rung (a trial never promoted
    # from there gets no second line when the scheduler ends it).
    ended = [line for line in lines if re.match(r"\[\d+ ended\]", line)]
    waited = {line.split()[0] for line in lines if re.match(r"\w+ waits at rung \d \([\d.]+ epochs, subset 0\.\d{4}\)", line)}
    finished = {line.split()[2] for line in ended}
    assert len(finished) == len(ended) and len(finished | waited) == 4
    assert ended[-1].startswith(f"[{len(ended)} ended]")
    # Status lines while trials run: configurations judged, each running trial's rung, epochs
    # seen and subset score, the best so far, time spent and left, and the phase.
    status = [line for line in lines if " spent, " in line]
    assert status and all(" left] " in line and "configurations judged" in line and "| best " in line for line in status)
    assert any(re.search(r"running [12]: \w+ rung \d \([\d.]+/2 ep, subset 0\.\d{3}\)", line) for line in status), status
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
    # The subset score of every report, at its index (4 a epoch): 8 for the seed's 2 epochs.
    judged = client.get_metric_history(first.info.run_id, M.JUDGE_METRIC)
    assert sorted(m.step for m in judged) == list(range(1, 9))
    # The best trial's model and artifacts are stored, and the best is the best-scoring trial of
    # those that trained the whole budget.
    best = out.best
    full = [r for r in runs if r.data.tags[STATUS_TAG] == "completed"]
    assert best["val"]["accuracy"] == pytest.approx(max(r.data.metrics[M.BEST_METRIC] for r in full))
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
    told = [r for r in runs if not r.data.tags.get(POINT_TAG)]  # both points lie outside the focused space
    # (a promoted trial's latest record stands for it: searcher.latest_records)
    assert sorted(names[t.state] for t in latest_records(study)) == sorted(r.data.tags[STATUS_TAG] for r in told)
    # Every proposal says who made it: TPE's start-up (5 trials for a 4-trial search) is random.
    assert {t.user_attrs[PROPOSED_BY] for t in study.trials} <= {"random", "promoted"}
    assert proposals(study) == {"random": 2}
    assert out.proposals == {"random": 2}


def test_trials_report_between_epochs_and_checkpoint_only_at_whole_epochs(smoke_search):
    """Sub-epoch reports: epochs seen grow by a quarter epoch (batch-rounded), the report index
    is their count, whole-validation metrics and a checkpoint come at whole epochs only, and a
    trial stopped by ASHA stops at a rung. The search was given no grace period: its first rung
    is the data's (240 training faces, 2 epochs, a quarter kept at each rung: capped at 0.5)."""
    from fersearch.config import REPORTS_PER_EPOCH, asha_rungs, first_rung
    from tests.helpers import trial_results

    out, mlruns, _ = smoke_search
    params = MlflowClient(tracking_uri(mlruns)).get_run(out.parent_run_id).data.params
    grace, factor = float(params["grace_period"]), int(params["reduction_factor"])
    assert grace == first_rung(240, 2, factor) == 0.5
    rungs = asha_rungs(grace, factor, 2)
    assert rungs == [0.5]
    results = trial_results(mlruns / "ray" / "smoke")
    assert len(results) == 4
    for rows in results.values():
        seen = [r[M.EPOCHS_SEEN] for r in rows]
        assert seen == sorted(seen) and seen[0] >= 0.25 and seen[0] < 0.75
        assert [r[M.REPORT] for r in rows] == [round(s * REPORTS_PER_EPOCH) for s in seen]
        for r in rows:
            whole = float(r[M.EPOCHS_SEEN]).is_integer()
            assert (M.VAL_ACCURACY in r) == whole and (r.get("checkpoint_dir_name") is not None) == whole
            assert r[M.EPOCH] == int(r[M.EPOCHS_SEEN]) and 0 <= r[M.JUDGE_METRIC] <= 1
        if rows[-1][M.EPOCHS_SEEN] < 2:  # stopped by ASHA: at its first report at or past a rung
            before = rows[-2][M.EPOCHS_SEEN] if len(rows) > 1 else 0.0
            assert any(before < rung <= rows[-1][M.EPOCHS_SEEN] for rung in rungs), [r[M.EPOCHS_SEEN] for r in rows]


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
    assert timeline["best_so_far"].iloc[-1] == pytest.approx(max(r.data.metrics[M.BEST_METRIC] for r in runs if M.BEST_METRIC in r.data.metrics))
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


@pytest.mark.slow
def test_trials_that_raise_or_diverge_do_not_stop_the_search(ray_runtime, synthetic_dir, tmp_path):
    # A searched trial that draws 5x5 kernels with valid padding fails (four such stages do not
    # fit 48x48): at once, without retries (test_bad_input_round2); seed 0 draws it once.
    raising = _space_file(tmp_path, {
        "model": "cnn",
        "params": {"channels": "6,8,10,12", "kernel_size": {"choice": [3, 5]}, "padding": {"choice": ["valid", "same"]},
                   "lr": {"loguniform": [0.001, 0.01]}},
        "points": {},
    })
    out = run_search(_settings(synthetic_dir, tmp_path, "raise", trials=4, max_epochs=1, space_path=raising, seed=0))
    _, runs = _children(tmp_path / "mlruns", out.parent_run_id)
    invalid = [r for r in runs if (r.data.params["kernel_size"], r.data.params["padding"]) == ("5", "valid")]
    assert out.counts["trials"] == 4 and out.counts["failed"] == len(invalid) == 1
    assert out.best is not None  # the failures did not stop the search
    # Every trial diverges (conftest.DIVERGES): all are failed, none left running.
    nan = tmp_path / "nan"
    nan.mkdir()
    diverging = _space_file(nan, {"model": "cnn", "params": {**DIVERGES, "flip": {"choice": [True]}},
                                  "points": {"diverging": DIVERGES}})
    out = run_search(_settings(synthetic_dir, tmp_path, "nan", trials=2, max_epochs=2, space_path=diverging))
    assert out.counts == {"trials": 2, "completed": 0, "stopped_early": 0, "failed": 2, "unfinished": 0}
    assert out.best is None
    _, runs = _children(tmp_path / "mlruns", out.parent_run_id)
    assert sorted(r.data.tags[STATUS_TAG] for r in runs) == ["failed", "failed"]


def test_optuna_sees_pruned_failed_and_completed_trials_truthfully(synthetic_dir):
    from optuna.trial import TrialState

    space = dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={})
    searcher = make_searcher(space, seed=0, quasi_random=0, max_epochs=9)
    for tid in ("a", "b", "c", "d", "e"):
        assert searcher.suggest(tid) is not None
    for step, value in enumerate([0.5, 0.6, 0.6], start=1):  # the third: a retried report, told once
        searcher.on_trial_result("a", {M.JUDGE_METRIC: value - 0.1 * (step == 3), M.REPORT: min(step, 2)})
    searcher.on_trial_complete("a", {M.JUDGE_METRIC: 0.6, M.EPOCHS_SEEN: 0.5, M.EPOCH: 0, M.DONE: True})
    searcher.on_trial_result("b", {M.JUDGE_METRIC: float("nan"), M.REPORT: 1})
    searcher.on_trial_complete("b", None, error=True)
    searcher.on_trial_complete("c", {M.VAL_ACCURACY: 0.7, M.BEST_METRIC: 0.72, M.EPOCH: 9, M.JUDGE_METRIC: 0.7})
    searcher.on_trial_complete("d", {M.VAL_ACCURACY: 0.0, M.BEST_METRIC: 0.0, M.EPOCH: 1, M.DIVERGED: 1})
    searcher.on_trial_complete("e", {})  # stopped running before its first report: Ray passes {}
    trials = searcher._ot_study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states == [TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert trials[0].intermediate_values == {1: 0.5, 2: 0.6}  # the subset score at each report
    assert trials[2].value == 0.72  # a finished trial is worth its best validation epoch


def test_a_paused_trial_is_told_pruned_at_once_and_its_promotion_adds_a_record(synthetic_dir):
    """A trial paused at a rung is PRUNED in Optuna at once (TPE learns from it while it waits)
    and frees its slot; promoted, resumed (repeating reports) and finished, it adds one record
    with all its reports and its final value, which the proposal count leaves out."""
    from optuna.trial import TrialState

    from fersearch.scheduler import Phase
    from fersearch.searcher import CONTINUES

    phase = Phase()
    space = dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={})
    searcher = make_searcher(space, seed=0, quasi_random=0, max_epochs=2, phase=phase, max_concurrent=1)
    assert searcher.suggest("a") is not None
    assert searcher.suggest("b") is None  # the one slot is taken
    searcher.on_trial_result("a", {M.JUDGE_METRIC: 0.4, M.REPORT: 1})
    phase.paused["a"] = 2  # the scheduler pauses it at its second report
    searcher.on_trial_result("a", {M.JUDGE_METRIC: 0.5, M.REPORT: 2})
    [first] = searcher._ot_study.get_trials(deepcopy=False)
    assert first.state == TrialState.PRUNED and first.intermediate_values == {1: 0.4, 2: 0.5}
    assert searcher.suggest("b") is not None  # its slot is free while it waits
    # Promoted while b runs: the promoted trial holds a slot before it reports again.
    phase.paused.pop("a")
    phase.resuming.add("a")
    searcher.on_trial_complete("b", {M.JUDGE_METRIC: 0.3, M.EPOCHS_SEEN: 0.5, M.EPOCH: 0, M.DONE: True})
    assert searcher.suggest("c") is None
    phase.resuming.discard("a")
    for step, value in ((1, 0.41), (2, 0.51), (3, 0.6), (4, 0.7)):  # from its start again, then on
        searcher.on_trial_result("a", {M.JUDGE_METRIC: value, M.REPORT: step})
    searcher.on_trial_complete("a", {M.BEST_METRIC: 0.72, M.EPOCH: 2, M.JUDGE_METRIC: 0.7})
    records = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.state for t in records] == [TrialState.PRUNED, TrialState.PRUNED, TrialState.COMPLETE]
    again = records[-1]
    assert again.value == 0.72 and again.params == first.params and again.user_attrs[CONTINUES] == first.number
    assert again.intermediate_values == {1: 0.4, 2: 0.5, 3: 0.6, 4: 0.7}  # a repeated report keeps the first
    assert proposals(searcher._ot_study) == {"random": 2}
    assert [t.number for t in latest_records(searcher._ot_study)] == [again.number, records[1].number]
    # A paused trial the scheduler ends later (no result) adds nothing.
    searcher.on_trial_complete("a")
    assert len(searcher._ot_study.get_trials(deepcopy=False)) == 3


def _callback_on_a_store(tmp_path, max_epochs: int):
    """An MLflow trial callback on a real store under a parent run, and a stub trial t1."""
    from ray.tune.experiment import Trial

    from fersearch.tracking import get_experiment_id
    from fersearch.trial_runs import MlflowTrialCallback

    uri = tracking_uri(tmp_path / "mlruns")
    experiment = get_experiment_id(uri, "cnn", tmp_path / "mlruns")
    client = MlflowClient(uri)
    parent = client.create_run(experiment).info.run_id
    callback = MlflowTrialCallback(uri, experiment, parent, max_epochs=max_epochs)
    return client, experiment, parent, callback, Trial("trainable", config={"lr": 0.01}, trial_id="t1", stub=True)


def test_a_promoted_trial_that_replays_its_reports_on_another_node_is_tagged_with_it(tmp_path):
    """A paused trial promoted onto another node first repeats reports it logged before; the
    run's node tags follow the node it trains on now, even on a repeated report (CI caught a
    cluster run whose worker node was never named)."""
    from fersearch.tracking import NODE_TAG, NODES_TAG

    client, _, _, callback, trial = _callback_on_a_store(tmp_path, max_epochs=2)
    report = {M.JUDGE_METRIC: 0.4, M.REPORT: 1, M.NODE: "head", M.NODE_IP: "127.0.0.1"}
    callback.on_trial_result(0, [], trial, report)
    callback.on_trial_result(0, [], trial, {**report, M.REPORT: 2, M.PAUSED: 1})
    callback.on_trial_result(0, [], trial, {**report, M.NODE: "worker"})  # promoted, replays report 1
    run = client.get_run(callback.run_id(trial))
    assert run.data.tags[NODES_TAG] == "head,worker" and run.data.tags[NODE_TAG] == "worker"
    assert run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run.info.run_id, M.JUDGE_METRIC)] == [1, 2]


def test_fixed_values_given_as_text_reach_the_trials_typed():
    """`--fixed erasing=0 channels="32, 64"` arrives as text; the trials' configs (Ray's
    params.json, MLflow's params) hold the values as the space file would: a float, a list."""
    space = resolve_space(SearchSettings(model="cnn", data_dir=Path("."), name="x", mlruns=Path("m"), max_epochs=9,
                                         fixed={"erasing": "0", "channels": "32, 64", "flip": "no"}))
    config = make_searcher(space, seed=0, quasi_random=0, max_epochs=9).suggest("a")  # the seed point
    assert {k: config[k] for k in ("erasing", "channels", "flip", "epochs")} == {
        "erasing": 0.0, "channels": "32,64", "flip": False, "epochs": 9}
    assert isinstance(config["erasing"], float) and space.fixed["erasing"] == 0.0


def test_known_points_come_first_and_optuna_sees_only_those_in_its_space():
    from optuna.trial import TrialState

    space = resolve_space(SearchSettings(model="cnn", data_dir=Path("."), name="x", mlruns=Path("m"), max_epochs=9,
                                         space_path=SPACES / "cnn-broad.yaml"))
    searcher = make_searcher(space, seed=0, quasi_random=0, max_epochs=9)
    seed, modern, third = (searcher.suggest(t) for t in ("s", "m", "t"))
    # Whole configurations, with the search's epochs: the seed's, then the modern baseline.
    assert resolve_config("cnn", seed) == resolve_config("cnn", {"epochs": 9})
    assert resolve_config("cnn", modern) == resolve_config("cnn", {**MODERN, "epochs": 9})
    assert resolve_config("cnn", third) != resolve_config("cnn", modern)
    for trial_id, best in (("s", 0.70), ("m", 0.80), ("t", 0.75)):
        for report in range(1, 37):
            searcher.on_trial_result(trial_id, {M.JUDGE_METRIC: best - 0.001 * (36 - report), M.REPORT: report})
        searcher.on_trial_complete(trial_id, {M.BEST_METRIC: best, M.EPOCH: 9})
    trials = searcher._ot_study.get_trials(deepcopy=False)
    # The modern point (one-cycle) lies outside the broad space: never told. The seed's point
    # is the study's first trial, with exactly its values, its full result and a label.
    assert len(trials) == 2 and [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].value == 0.70 and trials[0].params == space.searched_values(space.point("seed"))
    assert len(trials[0].intermediate_values) == 36
    assert [t.user_attrs[PROPOSED_BY] for t in trials] == ["point", "random"]


class _Trial:
    """What ASHA reads of a Ray trial: its id, and the tag that numbers it in suggestion order."""

    def __init__(self, index: int) -> None:
        self.trial_id, self.experiment_tag = f"t{index}", f"{index}_lr=0.1"


def test_a_trial_has_its_folder_named_as_soon_as_the_scheduler_sees_it(ray_runtime, tmp_path):
    """Ray 2.60 can hand a cached actor to a pending trial it never staged, whose folder has no
    name yet: the actor's reset and Ray's handler of its failure both raise, and the search
    ends (the 2-hour study of seed 1, at minute 69). The scheduler names it when it is added."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from fersearch.scheduler import SearchASHA

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="named")
    trial = Trial("train_trial", config={"lr": 0.1}, experiment_tag="1_lr=0.1", storage=storage, stub=True)
    assert trial.storage.trial_dir_name is None  # what the reused actor's reset needs
    SearchASHA(max_epochs=4, grace=1, factor=2, points=[]).on_trial_add(None, trial)
    assert trial.storage.trial_dir_name and trial.storage.trial_dir_name.startswith("train_trial")
    named = trial.storage.trial_dir_name
    trial.init_local_path()  # Ray's own call when it stages the trial keeps the name
    assert trial.storage.trial_dir_name == named


def test_a_real_trial_counts_as_reported_only_once_it_has_reported(ray_runtime, tmp_path):
    """Ray's Trial fills its last result with its id before any report: the switch to finishing
    ends the trials proposed but not yet reported by `scheduler.reported`, not by the truth of
    that dict (always true of a real trial)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from fersearch.scheduler import Phase, SearchASHA, reported

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="reported")
    fresh = Trial("train_trial", config={"lr": 0.1}, experiment_tag="2_lr=0.1", storage=storage, stub=True)
    assert fresh.last_result and not reported(fresh)  # {'trial_id': ...} before any report
    fresh.set_status(Trial.RUNNING)
    done = Trial("train_trial", config={"lr": 0.2}, experiment_tag="3_lr=0.2", storage=storage, stub=True)
    done.update_last_result({M.EPOCHS_SEEN: 0.25, M.JUDGE_METRIC: 0.5, "time_total_s": 5.0})
    done.set_status(Trial.RUNNING)
    assert reported(done)
    controller = _Controller([fresh, done])
    controller.stop_trial = lambda trial: trial.set_status(Trial.TERMINATED)
    SearchASHA(max_epochs=4, grace=1, factor=2, points=["seed"], phase=Phase()).end_exploring(controller)
    assert fresh.status == Trial.TERMINATED and done.status == Trial.RUNNING


def test_asha_never_stops_a_known_point():
    from ray.tune.schedulers import TrialScheduler

    from fersearch.scheduler import SearchASHA

    asha = SearchASHA(max_epochs=9, grace=1, factor=3, points=["seed", "modern"])
    seed, modern, *searched = trials = [_Trial(i) for i in range(1, 8)]
    for trial in trials:
        asha.on_trial_add(None, trial)

    def report(trial, epoch, value):
        return asha.on_trial_result(None, trial, {M.EPOCHS_SEEN: epoch, M.EPOCH: int(epoch), M.JUDGE_METRIC: value})

    # Five searched trials set high bars at every rung; then the known points score far below.
    for epoch in range(1, 9):
        for trial in searched:
            report(trial, epoch, 0.9)
    decisions = [report(point, epoch, 0.1) for epoch in range(1, 10) for point in (seed, modern)]
    assert decisions == [TrialScheduler.CONTINUE] * 18  # a point ends by itself at the budget
    # The same score from a searched trial waits at the first rung.
    late = _Trial(8)
    asha.on_trial_add(None, late)
    assert report(late, 1, 0.1) == TrialScheduler.PAUSE
    # A known point sets no bar: on a schedule of its own, its early scores do not compare.
    fresh = SearchASHA(max_epochs=9, grace=1, factor=3, points=["seed"])
    point, *others = [_Trial(i) for i in range(1, 5)]
    for trial in (point, *others):
        fresh.on_trial_add(None, trial)
    fresh.on_trial_result(None, point, {M.EPOCHS_SEEN: 1, M.EPOCH: 1, M.JUDGE_METRIC: 0.99})
    fresh.on_trial_complete(None, point, {M.EPOCHS_SEEN: 9, M.EPOCH: 9, M.JUDGE_METRIC: 0.99})
    for trial, score in zip(others, (0.5, 0.4, 0.6), strict=True):
        fresh.on_trial_result(None, trial, {M.EPOCHS_SEEN: 1, M.EPOCH: 1, M.JUDGE_METRIC: score})
    assert point.trial_id not in fresh.recorded[0] and len(fresh.recorded[0]) == 3
    assert fresh.promoted[0] == {others[2].trial_id}  # the third, best of three, goes on at once


class _Paused(_Trial):
    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.status, self.last_result = "PENDING", {}


class _Runner:
    """What the scheduler calls on Ray's controller: the trials, and ending one."""

    def __init__(self, trials) -> None:
        self.trials, self.stopped = trials, []

    def get_trials(self):
        return self.trials

    get_live_trials = get_trials

    def stop_trial(self, trial) -> None:
        trial.status = "TERMINATED"
        self.stopped.append(trial.trial_id)


def test_asha_promotes_from_a_rung_only_with_evidence_and_resumes_paused_trials_first():
    """The paper's rule: a trial at a rung goes on only in the top floor(n/3) of the n trials
    recorded there, else it pauses; a free slot resumes a paused trial that has become
    promotable (highest rung first) before a new configuration; with no new configuration to
    come, the quota relaxes to ceil(n/3), and then the paused trials end."""
    from ray.tune.schedulers import TrialScheduler

    from fersearch.scheduler import PauseMarker, Phase, SearchASHA

    phase = Phase()
    asha = SearchASHA(max_epochs=9, grace=1, factor=3, points=[], trials=7, phase=phase)
    trials = [_Paused(i) for i in range(1, 8)]
    runner = _Runner(trials[:6])  # the seventh is proposed later

    def report(trial, seen, value, index):
        trial.status = "RUNNING"
        decision = asha.on_trial_result(runner, trial, {M.EPOCHS_SEEN: seen, M.EPOCH: int(seen),
                                                        M.JUDGE_METRIC: value, M.REPORT: index})
        trial.status = {TrialScheduler.PAUSE: "PAUSED", TrialScheduler.STOP: "TERMINATED"}.get(decision, "RUNNING")
        return decision

    a, b, c, d, e, f, g = trials
    for t in trials[:6]:
        asha.on_trial_add(runner, t)
    # An empty rung promotes nobody: the first two wait (a sub-rung report goes on).
    assert report(a, 0.5, 0.9, 2) == TrialScheduler.CONTINUE
    assert report(a, 1, 0.60, 4) == TrialScheduler.PAUSE and phase.paused == {a.trial_id: 4}
    assert report(b, 1, 0.50, 4) == TrialScheduler.PAUSE
    # The callback flags the report the trial paused at, and only that one.
    result = {M.REPORT: 4}
    PauseMarker(phase).on_trial_result(0, trials, a, result)
    assert result[M.PAUSED] == 1
    result = {M.REPORT: 3}
    PauseMarker(phase).on_trial_result(0, trials, a, result)
    assert M.PAUSED not in result
    # A third, worse one: floor(3/3) = 1 place, taken by a, which is resumed before anything new.
    c.status = "PENDING"
    assert report(c, 1, 0.40, 4) == TrialScheduler.PAUSE
    d.status = "PENDING"
    assert asha.choose_trial_to_run(runner) is a and a.trial_id in asha.promoted[0]
    assert a.trial_id not in phase.paused and a.trial_id in phase.resuming
    # Its repeated reports (it resumes from its last checkpoint) go on; the next rung waits.
    assert report(a, 0.25, 0.9, 1) == TrialScheduler.CONTINUE and a.trial_id not in phase.resuming
    assert report(a, 1, 0.60, 4) == TrialScheduler.CONTINUE
    assert report(a, 3, 0.70, 12) == TrialScheduler.PAUSE
    # Nothing else is promotable now: the pending new configuration runs.
    assert asha.choose_trial_to_run(runner) is d
    # The best so far at its rung still waits while no place is free there: 4 recorded, 1 place, a's.
    assert report(d, 1, 0.95, 4) == TrialScheduler.PAUSE
    for t, score in ((e, 0.1), (f, 0.2)):
        report(t, 1, score, 4)
    assert e.status == f.status == "PAUSED" and d.trial_id not in asha.promoted[0]
    # Six recorded at rung 1: two places, a and d; b is next only when the quota relaxes.
    assert asha.choose_trial_to_run(runner) is d and asha.promoted[0] == {a.trial_id, d.trial_id}
    assert report(d, 3, 0.80, 12) == TrialScheduler.PAUSE
    # The cap of new configurations not reached (7): a free slot waits for the searcher.
    assert asha.choose_trial_to_run(runner) is None and not runner.stopped
    runner.trials.append(g)
    asha.on_trial_add(runner, g)
    assert report(g, 1, 0.05, 4) == TrialScheduler.PAUSE
    # Nothing runs and nothing new can come: rung 3 holds a and d, ceil(2/3) = 1 place: d.
    assert asha.choose_trial_to_run(runner) is d
    report(d, 9, 0.85, 36)
    asha.on_trial_complete(runner, d, {})
    d.status = "TERMINATED"
    # Rung 3: ceil(2/3) = 1, taken (d); rung 1: ceil(7/3) = 3: a, d taken, b (0.50) next.
    assert asha.choose_trial_to_run(runner) is b
    report(b, 3, 0.20, 12)
    b.status = "PAUSED"
    # Rung 3 now holds 3 (ceil 1, d), rung 1 ceil 3 (a, d, b): nothing left; the paused end.
    assert asha.choose_trial_to_run(runner) is None
    assert sorted(runner.stopped) == sorted(t.trial_id for t in (a, b, c, e, f, g))
    assert not asha.waiting
    # Ties (every net still at the majority class) rank by arrival: one place goes to the first.
    tied = SearchASHA(max_epochs=9, grace=1, factor=3, points=[], trials=9)
    same = [_Trial(i) for i in range(11, 14)]
    for t in same:
        tied.on_trial_add(None, t)
        assert tied.on_trial_result(None, t, {M.EPOCHS_SEEN: 1, M.EPOCH: 1, M.JUDGE_METRIC: 0.43, M.REPORT: 4}) == TrialScheduler.PAUSE
    assert [tied.promotable(t.trial_id, 0) for t in same] == [True, False, False]


def test_asha_promotes_no_more_than_a_rungs_quota_and_the_best_waiting_trial_first():
    """At most floor(n/factor) trials go on from a rung of n, however well later ones rank; when
    a place opens, the best trial waiting in the quota takes it, not the one that just arrived."""
    from ray.tune.schedulers import TrialScheduler

    from fersearch.scheduler import SearchASHA

    asha = SearchASHA(max_epochs=8, grace=1, factor=2, points=[], trials=9)
    trials = [_Paused(i) for i in range(1, 7)]
    runner = _Runner(trials)
    for t in trials:
        asha.on_trial_add(runner, t)

    def report(trial, value):
        decision = asha.on_trial_result(runner, trial, {M.EPOCHS_SEEN: 1, M.EPOCH: 1, M.JUDGE_METRIC: value, M.REPORT: 4})
        trial.status = {TrialScheduler.PAUSE: "PAUSED"}.get(decision, "RUNNING")
        return decision

    t1, t2, t3, t4, t5, t6 = trials
    assert report(t1, 0.6) == report(t2, 0.5) == TrialScheduler.PAUSE
    assert asha.choose_trial_to_run(runner) is t1  # 2 recorded, 1 place
    # Each new arrival is the best so far, yet the places (1 at 3 recorded) are taken.
    assert report(t3, 0.7) == TrialScheduler.PAUSE
    assert asha.in_quota(t3.trial_id, 0) and not asha.promotable(t3.trial_id, 0)
    # 4 recorded, 2 places, one free: t4 is in the quota, but t3 (better, waiting) claims it.
    assert report(t4, 0.65) == TrialScheduler.PAUSE
    assert asha.choose_trial_to_run(runner) is t3
    # 5 recorded: still 2 places, both taken, so the best so far waits; 6 recorded: 3 places, and
    # the third goes to it (t4, also in the quota now, ranks below it).
    assert report(t5, 0.9) == TrialScheduler.PAUSE
    assert report(t6, 0.1) == TrialScheduler.PAUSE  # not in the quota
    assert asha.choose_trial_to_run(runner) is t5
    assert asha.promoted[0] == {t1.trial_id, t3.trial_id, t5.trial_id}  # 3 of 6: floor(6/2)
    assert sum(asha.promotable(t.trial_id, 0) for t in trials) == 0


class _Running(_Trial):
    def __init__(self, index: int, seen: float, spent: float, judge: float) -> None:
        super().__init__(index)
        self.status = "RUNNING"
        self.last_result = {M.EPOCHS_SEEN: seen, "time_total_s": spent, M.JUDGE_METRIC: judge, M.EPOCH: int(seen)}


class _Controller:
    def __init__(self, trials):
        self.trials = trials

    def get_live_trials(self):
        return self.trials

    get_trials = get_live_trials

    def stop_trial(self, trial) -> None:
        trial.status = "TERMINATED"


def test_a_trials_pace_leaves_out_the_seconds_of_its_decayed_branch():
    """The branch at the capped rung trains no epoch the trial keeps: its seconds (reported as
    M.COOLED_SECONDS) are left out of the pace that times the finishers, before and after a
    save (a resumed search's scheduler is unpickled)."""
    import pickle

    from fersearch.scheduler import SearchASHA

    asha = SearchASHA(max_epochs=24, grace=0.25, factor=4, points=[], budget_s=7200, slots=2)
    trial = _Running(1, 0.0, 0, 0.0)
    controller = _Controller([trial])
    asha.on_trial_add(controller, trial)
    for seen, spent, extra in ((0.25, 25, {}), (1, 100, {}), (4, 470, {M.COOLED_SECONDS: 70.0})):
        result = {M.EPOCHS_SEEN: seen, "time_total_s": spent, M.JUDGE_METRIC: 0.7, M.EPOCH: int(seen), **extra}
        asha.on_trial_result(controller, trial, result)
        trial.last_result = result
    assert asha.pace(trial.trial_id, trial.last_result) == pytest.approx(3.75 / 375)  # not 3.75 / 445
    restored = pickle.loads(pickle.dumps(asha))
    assert restored.pace(trial.trial_id, trial.last_result) == pytest.approx(3.75 / 375)


def test_the_budget_ends_by_finishing_the_leader():
    """Exploring until the budget left is what the leader needs to reach max_t at its own pace
    (with the margin and the final scoring), then finishing: the searcher proposes nothing, the
    leader is never cut, and the others stop once it has ended."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from fersearch.scheduler import FINAL_SCORING_S, FINISH_MARGIN, Phase, SearchASHA

    phase, lines = Phase(), []
    asha = SearchASHA(max_epochs=24, grace=0.25, factor=4, points=["seed"], budget_s=7200, phase=phase, emit=lines.append)
    assert asha.rungs == [0.25, 1, 4, 16] and asha.cap == 2 and asha.min_rungs == 2  # explored to 4 epochs
    seed = _Running(1, 10.0, 600, 0.60)  # a known point is never the leader
    leader = _Running(2, 4.0, 400, 0.70)  # paused at the capped rung, 0.01 epochs/s: 2000 s for the rest
    quick = _Running(3, 1.0, 30, 0.90)  # better now, but fewer rungs passed
    controller = _Controller([seed, leader, quick])
    for trial in controller.trials:
        asha.on_trial_add(controller, trial)
        trial.last_result = {}  # nothing reported yet

    def report(trial, seen, spent, judge):
        result = {M.EPOCHS_SEEN: seen, "time_total_s": spent, M.JUDGE_METRIC: judge, M.EPOCH: int(seen)}
        decision = asha.on_trial_result(controller, trial, result)
        trial.last_result = result  # as Ray does after the scheduler's decision
        return decision

    # Their reports so far (the first one after each trial's start-up): still exploring.
    for seen, spent in ((0.25, 25), (1, 100), (4, 400)):
        report(leader, seen, spent, 0.70)
    for seen, spent in ((0.25, 5), (1, 30)):
        report(quick, seen, spent, 0.90)
    report(seed, 10.0, 600, 0.60)
    assert not phase.finishing and phase.describe() == "exploring"
    asha.recorded[1].update({"x1": 0.3, "x2": 0.2})  # 1 epoch: quick (0.90), the leader (0.70), x1, x2
    asha.recorded[2].update({"x3": 0.5, "x4": 0.6, "x5": 0.4})  # 4 epochs: the leader (0.70) first of four
    # Pace is measured from a trial's first report on (its start-up left out): 0.01 epochs/s.
    assert asha.pace(leader.trial_id, leader.last_result) == pytest.approx(0.01)
    assert asha.pace("new", {}) is None and asha.pace("new", {M.EPOCHS_SEEN: 0.25, "time_total_s": 2}) is None
    assert asha.candidates(controller.trials, quick, quick.last_result)[0].trial_id == leader.trial_id
    need = 20 / 0.01 * FINISH_MARGIN + 1 / 0.01 + FINAL_SCORING_S
    # A trial that could no longer finish in the time left (at its pace, without the margin) is
    # never the leader; nor is one past fewer than half of the explored rungs (2 of 3).
    raw = 20 / 0.01 + 1 / 0.01 + FINAL_SCORING_S
    assert asha.candidates(controller.trials, quick, quick.last_result, left=raw + 1)[0].trial_id == leader.trial_id
    assert asha.candidates(controller.trials, quick, quick.last_result, left=raw - 1)[0].trial_id == quick.trial_id
    early = _Running(5, 0.5, 10, 0.99)
    asha.on_trial_add(controller, early)
    report(early, 0.25, 2, 0.99)
    report(early, 0.5, 10, 0.99)
    assert asha.candidates([early], early, early.last_result) == []
    # Nor one that scraped through its last rung below ASHA's cut-off of everyone recorded there.
    laggard = _Running(6, 1.0, 30, 0.10)
    asha.on_trial_add(controller, laggard)
    asha.recorded[1][laggard.trial_id] = 0.10  # recorded at 1 epoch (five there: floor(5/4) = 1 place, quick's)
    assert not asha.in_top(laggard.trial_id) and asha.in_top(quick.trial_id) and asha.in_top(leader.trial_id)
    waiting = _Running(7, 0.25, 3, 0.20)  # paused at the first rung
    waiting.status = "PAUSED"
    asha.on_trial_add(controller, waiting)
    asha.on_trial_result(controller, waiting, {**waiting.last_result, M.REPORT: 1})
    controller.trials.append(waiting)
    assert asha.waiting[waiting.trial_id] == 0
    asha._start -= 7200 - need - 5  # 5 s more than the leader needs are left: still exploring
    report(quick, 1.25, 33, 0.90)
    assert not phase.finishing
    asha._start -= 10
    report(quick, 1.5, 36, 0.90)
    assert phase.finishing and phase.leader == leader.trial_id and lines[-1].startswith("switching from exploring to finishing")
    assert waiting.status == "TERMINATED" and waiting.trial_id not in asha.waiting  # nothing is promoted while finishing: the paused end
    searcher = make_searcher(dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={}), 0, 0, 24, phase=phase)
    assert searcher.suggest("new") == Searcher.FINISHED
    # The leader below the bar of its next rung goes on; once it has ended, the others stop.
    other = _Running(4, 16, 900, 0.95)
    asha.on_trial_add(controller, other)
    report(other, 16, 900, 0.95)
    assert report(leader, 16, 1600, 0.10) == TrialScheduler.CONTINUE
    asha.on_trial_complete(controller, leader, {**leader.last_result, M.EPOCHS_SEEN: 24.0, M.EPOCH: 24})
    assert phase.finishing and phase.active == []
    assert report(quick, 2.0, 40, 0.95) == TrialScheduler.STOP
    assert report(seed, 10.25, 615, 0.60) == TrialScheduler.CONTINUE


def test_a_paused_leader_gets_a_slot_at_once_when_the_search_switches_to_finishing():
    """The 2-hour study's case: the leader waits paused at its last rung when the budget
    switches to finishing, and both slots are busy exploring. The next exploring trial to
    report stops, and the leader is the next trial to run."""
    from ray.tune.schedulers import TrialScheduler

    from fersearch.scheduler import FINAL_SCORING_S, Phase, SearchASHA

    phase, lines = Phase(), []
    asha = SearchASHA(max_epochs=24, grace=0.25, factor=4, points=[], budget_s=3600, phase=phase, emit=lines.append)
    leader, a, b = _Running(1, 0.25, 25, 0.5), _Running(2, 0.0, 0, 0.5), _Running(3, 0.0, 0, 0.5)
    controller = _Controller([leader, a, b])
    for trial in controller.trials:
        asha.on_trial_add(controller, trial)
    for k, rung in enumerate(asha.rungs[: asha.cap]):  # the leader passed every rung below the cap, first each time
        asha.recorded[k].update({"x1": 0.3, "x2": 0.2, "x3": 0.1})
        assert asha.on_trial_result(controller, leader, {M.EPOCHS_SEEN: rung, "time_total_s": 25 + 100 * rung,
                                                         M.JUDGE_METRIC: 0.8, M.EPOCH: int(rung)}) == TrialScheduler.CONTINUE
    asha.recorded[asha.cap].update({"x1": 0.3, "x2": 0.2, "x3": 0.1})
    top = {M.EPOCHS_SEEN: 4.0, "time_total_s": 25 + 100 * 4.0, M.JUDGE_METRIC: 0.82, M.EPOCH: 4, M.REPORT: 16}
    assert asha.promotable("x1", asha.cap) is False
    # First of four at the capped rung, so promotable there, yet it waits: exploring ends at 4 epochs.
    assert asha.on_trial_result(controller, leader, top) == TrialScheduler.PAUSE and asha.promotable(leader.trial_id, asha.cap)
    leader.status, leader.last_result = "PAUSED", top
    assert asha.waiting == {leader.trial_id: asha.cap}
    assert asha.choose_trial_to_run(_Controller([leader])) is None  # not resumed while exploring (a new configuration comes)
    # Time left: what the leader needs at its pace (0.01 epochs/s) without the margin, and a
    # little more: it can still finish, with no margin to spare, so it is finished now.
    asha._start -= 3600 - (20 / 0.01 + 1 / 0.01 + FINAL_SCORING_S + 5)
    # a reports between rungs (a rung arrival would stop it anyway while finishing): it stops.
    assert asha.on_trial_result(controller, a, {M.EPOCHS_SEEN: 0.2, "time_total_s": 40, M.JUDGE_METRIC: 0.6, M.EPOCH: 0}) \
        == TrialScheduler.STOP
    assert phase.finishing and phase.leader == leader.trial_id
    a.status = "TERMINATED"
    assert asha.choose_trial_to_run(controller) is leader  # its slot goes to the leader
    leader.status = "RUNNING"
    # The leader has its slot; b stops at its next report all the same, between rungs: exploring
    # is over (it could not reach the budget, and beside the leader it would slow it).
    assert asha.on_trial_result(controller, b, {M.EPOCHS_SEEN: 0.2, "time_total_s": 40, M.JUDGE_METRIC: 0.6, M.EPOCH: 0}) \
        == TrialScheduler.STOP


def test_a_budgeted_search_explores_to_the_capped_rung_and_finishes_one_trial_per_slot():
    """With a budget, no trial trains past the capped rung while exploring (the 2-hour study
    spent half its slot time on trials promoted past 6.75 epochs); the switch, timed by the
    leader, finishes one trial per slot: the leader and the best others that need no more time
    than it; without a budget the ladder is not capped."""
    from ray.tune.schedulers import TrialScheduler

    from fersearch.config import explore_cap
    from fersearch.scheduler import FINAL_SCORING_S, FINISH_MARGIN, Phase, SearchASHA

    assert explore_cap([0.25, 1, 4, 16], 24) == 2 and explore_cap([0.25, 0.75, 2.25, 6.75, 20.25], 24) == 2
    assert explore_cap([0.25, 1], 4) == 1 and explore_cap([2.0], 4) == 0
    free = SearchASHA(max_epochs=24, grace=0.25, factor=4, points=[], trials=20)
    assert free.cap == len(free.rungs)
    phase, lines = Phase(), []
    asha = SearchASHA(max_epochs=24, grace=0.25, factor=4, points=[], budget_s=3600, slots=2, phase=phase, emit=lines.append)
    fast, slow, third, explorer = (_Running(i, 0.0, 0, 0.0) for i in range(1, 5))
    controller = _Controller([fast, slow, third, explorer])
    for t in controller.trials:
        asha.on_trial_add(controller, t)
    for k in range(asha.cap + 1):
        for other in (f"x{i}" for i in range(12)):  # with the three: floor(15/4) = 3 places at each rung
            asha.recorded[k][other] = 0.1
            free.recorded[k][other] = 0.1

    def report(sched, trial, seen, spent, judge):
        result = {M.EPOCHS_SEEN: seen, "time_total_s": spent, M.JUDGE_METRIC: judge, M.EPOCH: int(seen)}
        decision = sched.on_trial_result(controller, trial, result)
        trial.last_result = result
        return decision

    # fast: 0.01 epochs/s; slow: 0.008; third: 0.01 but ranked last of the three at the cap.
    for trial, pace, judge in ((fast, 0.01, 0.8), (slow, 0.008, 0.7), (third, 0.01, 0.6)):
        for seen in asha.rungs[: asha.cap]:
            assert report(asha, trial, seen, 5 + seen / pace, judge) == TrialScheduler.CONTINUE
        assert report(asha, trial, 4.0, 5 + 4.0 / pace, judge) == TrialScheduler.PAUSE  # the cap: all three wait
        trial.status = "PAUSED"
    assert report(free, fast, 4.0, 405, 0.8) == TrialScheduler.CONTINUE  # top at 4 epochs, no budget: it goes on
    assert asha.choose_trial_to_run(controller) is None and set(asha.waiting) == {fast.trial_id, slow.trial_id, third.trial_id}
    fast_need = 20 / 0.01 * FINISH_MARGIN + 1 / 0.01 + FINAL_SCORING_S  # the leader's
    slow_need = 20 / 0.008 * FINISH_MARGIN + 1 / 0.008 + FINAL_SCORING_S
    asha._start -= 3600 - slow_need + 5
    report(asha, explorer, 0.2, 40, 0.5)
    assert not phase.finishing  # the slower second no longer ends the exploring early
    asha._start -= slow_need - fast_need - 10
    report(asha, explorer, 0.205, 41, 0.5)
    assert not phase.finishing  # the leader still has 5 s in hand
    proposed = _Paused(9)  # proposed while exploring, not started yet
    started, newcomer = _Running(10, 0, 0, 0), _Running(11, 0, 0, 0)  # started while exploring, no report yet
    started.last_result = newcomer.last_result = {}
    controller.trials += [proposed, started, newcomer]
    asha.on_trial_add(controller, newcomer)
    asha._start -= 10
    # newcomer's first report comes when the leader has no time in hand: the switch.
    assert report(asha, newcomer, 0.25, 50, 0.5) == TrialScheduler.STOP
    # The leader times the switch; the second slot goes to the best candidate that needs no
    # more time than it: third (slow, ranked above it, needs more: it ends).
    assert phase.finishing and phase.finishers == [fast.trial_id, third.trial_id]
    assert phase.describe() == f"finishing {fast.trial_id}, {third.trial_id}" and "need ~" in lines[-1]
    assert slow.status == "TERMINATED" and slow.trial_id not in asha.waiting
    explorer.status = "TERMINATED"
    # The configurations proposed before the switch and not yet reported, started or not, ended with it.
    assert started.status == "TERMINATED" and newcomer.status == "RUNNING"  # the reporting one stops by its decision
    assert report(asha, explorer, 0.22, 43, 0.5) == TrialScheduler.STOP  # finishers wait for its slot
    assert asha.choose_trial_to_run(controller) is fast and proposed.status == "TERMINATED"
    # Ray makes a trial it resumes PENDING until its actor runs: the next choice leaves it be.
    fast.status = "PENDING"
    assert asha.choose_trial_to_run(controller) is third and fast.status == "PENDING"
    fast.status = "RUNNING"
    third.status = "RUNNING"
    assert report(asha, fast, 16, 5 + 1600, 0.1) == TrialScheduler.CONTINUE  # finishers are never cut
    asha.on_trial_complete(controller, fast, {})
    assert phase.active == [third.trial_id] and report(asha, third, 16.25, 5 + 16.25 / 0.01, 0.6) == TrialScheduler.CONTINUE
    asha.on_trial_complete(controller, third, {})
    assert phase.finishing and phase.active == []


def _two_slot_search(lines):
    """A 1-hour search on 2 slots (rungs 0.25, 1, 4, 16 of 24; exploring to 4 epochs) whose first
    two rungs already hold eight trials at 0.1 each, with a reporting helper."""
    from fersearch.scheduler import Phase, SearchASHA

    phase = Phase()
    asha = SearchASHA(max_epochs=24, grace=0.25, factor=4, points=[], budget_s=3600, slots=2, phase=phase, emit=lines.append)
    for k in range(2):
        asha.recorded[k].update({f"x{i}": 0.1 for i in range(8)})
    controller = _Controller([])

    def report(trial, seen, spent, judge):
        if trial not in controller.trials:
            controller.trials.append(trial)
            asha.on_trial_add(controller, trial)
        result = {M.EPOCHS_SEEN: seen, "time_total_s": spent, M.JUDGE_METRIC: judge, M.EPOCH: int(seen)}
        decision = asha.on_trial_result(controller, trial, result)
        trial.last_result = result
        return decision

    def leave(seconds):  # the budget left from now on
        asha._start = time.monotonic() - (3600 - seconds)

    return asha, phase, controller, report, leave


def test_a_slot_without_a_finisher_keeps_exploring_until_its_own_candidate_needs_the_time_left():
    """The 30-minute TPE study of seed 2: a slow leader (0.45 epochs a minute) timed the switch at
    minute 4, and the other slot idled for 26 minutes. Now the leader's slot finishes and the
    other keeps exploring (the searcher still proposes) until the budget left is what its own
    best candidate needs; then exploring is over."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from fersearch.scheduler import FINAL_SCORING_S, FINISH_MARGIN

    lines = []
    asha, phase, controller, report, leave = _two_slot_search(lines)
    searcher = make_searcher(dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={}), 0, 0, 24, phase=phase)
    slow, explorer, quick, idle = _Running(1, 0, 0, 0), _Running(2, 0, 0, 0), _Running(3, 0, 0, 0), _Running(4, 0, 0, 0)
    report(slow, 0.25, 30, 0.7)
    assert report(slow, 1.0, 105, 0.7) == TrialScheduler.CONTINUE  # 0.01 epochs/s, first at 1 epoch
    slow_need = 23 / 0.01 * FINISH_MARGIN + 1 / 0.01 + FINAL_SCORING_S
    leave(slow_need - 5)
    assert report(explorer, 0.2, 40, 0.5) == TrialScheduler.CONTINUE  # the other slot goes on
    assert phase.finishers == [slow.trial_id] and not phase.finishing
    assert lines[-1].startswith("finishing on 1 of 2 slots") and "keep exploring" in lines[-1]
    assert phase.describe() == f"exploring, finishing {slow.trial_id}"
    assert searcher.suggest("new") not in (Searcher.FINISHED, None)  # a new configuration for the free slot
    # A paused trial the finisher's slot would need gives way: the finisher takes the next slot.
    idle.status = "PAUSED"
    report(idle, 0.25, 30, 0.05)
    assert idle.trial_id in asha.waiting
    # A faster trial explored beside the finisher: 0.05 epochs/s, best at 1 epoch.
    report(quick, 0.25, 5, 0.8)
    assert report(quick, 1.0, 20, 0.8) == TrialScheduler.CONTINUE
    quick_need = 23 / 0.05 * FINISH_MARGIN + 1 / 0.05 + FINAL_SCORING_S
    leave(quick_need + 30)
    assert report(quick, 1.25, 25, 0.8) == TrialScheduler.CONTINUE and not phase.finishing  # still time to explore
    leave(asha.need_s(1.5, 0.05) - 5)  # its need at its next report
    assert report(quick, 1.5, 30, 0.8) == TrialScheduler.CONTINUE
    assert phase.finishing and phase.finishers == [slow.trial_id, quick.trial_id]
    assert lines[-1].startswith("switching from exploring to finishing") and "1 paused trial(s) end" in lines[-1]
    assert idle.status == "TERMINATED" and searcher.suggest("newer") == Searcher.FINISHED
    asha.on_trial_complete(controller, slow, {})
    assert phase.active == [quick.trial_id]
    asha.on_trial_complete(controller, quick, {})
    assert phase.finishing and phase.active == [] and report(explorer, 0.5, 100, 0.5) == TrialScheduler.STOP


def test_exploring_beside_a_finisher_ends_once_nothing_more_could_reach_the_budget():
    """Exploring beside a finisher ends when no other trial, running, paused or new at the
    fastest pace seen, could train to the budget in the time left: the paused trials end and
    the search does not run exploring trials to its deadline."""
    from ray.tune.schedulers import TrialScheduler

    from fersearch.scheduler import FINAL_SCORING_S, FINISH_MARGIN

    lines = []
    asha, phase, controller, report, leave = _two_slot_search(lines)
    slow, explorer, idle = _Running(1, 0, 0, 0), _Running(2, 0, 0, 0), _Running(3, 0, 0, 0)
    report(slow, 0.25, 30, 0.7)
    report(slow, 1.0, 105, 0.7)
    leave(23 / 0.01 * FINISH_MARGIN + 1 / 0.01 + FINAL_SCORING_S - 5)
    report(explorer, 0.2, 40, 0.5)
    assert phase.finishers == [slow.trial_id] and not phase.finishing
    idle.status = "PAUSED"
    report(idle, 0.25, 30, 0.05)
    new_trial_need = 24 / 0.01 + 1 / 0.01 + FINAL_SCORING_S  # at the fastest pace seen (slow's), no margin
    leave(new_trial_need + 5)
    # The explorer trains 0.005 epochs/s: it could not finish, but a new trial at 0.01 could.
    assert report(explorer, 0.21, 42, 0.5) == TrialScheduler.CONTINUE and not phase.finishing
    leave(new_trial_need - 5)
    assert report(explorer, 0.22, 44, 0.5) == TrialScheduler.STOP  # the report that ends exploring ends it too
    assert phase.finishing and lines[-1].startswith("exploring ends") and idle.status == "TERMINATED"
    assert phase.finishers == [slow.trial_id] and report(slow, 1.25, 130, 0.7) == TrialScheduler.CONTINUE


def test_a_candidate_too_slow_to_leave_a_third_of_the_budget_for_exploring_is_not_finished_for():
    """The 30-minute TPE studies of seed 2: nets at 0.39-0.45 epochs a minute led at minutes 2.5-5.5
    and ended both slots' exploring. A candidate whose need would end its slot's exploring within
    the budget's first third (EXPLORE_FIRST) is not finished for once a faster trial has been seen
    (with none, a new configuration could need no less); a faster candidate then leads."""
    from fersearch.scheduler import EXPLORE_FIRST, FINAL_SCORING_S, FINISH_MARGIN

    lines = []
    asha, phase, controller, report, leave = _two_slot_search(lines)
    slow, quick, moderate = _Running(1, 0, 0, 0), _Running(2, 0, 0, 0), _Running(3, 0, 0, 0)
    report(slow, 0.25, 30, 0.9)
    report(slow, 1.0, 105, 0.9)  # 0.01 epochs/s, first at 1 epoch
    slow_need = 23 / 0.01 * FINISH_MARGIN + 1 / 0.01 + FINAL_SCORING_S
    assert slow_need > (1 - EXPLORE_FIRST) * 3600 and asha.longest_need() > slow_need  # the fastest seen is slow
    assert [c.trial_id for c in asha.candidates(controller.trials, slow, slow.last_result)] == [slow.trial_id]
    # One report so far (most trials pause at the first rung): its pace from its start, start-up
    # in it, 0.05 epochs/s: a new configuration may need far less.
    report(quick, 0.25, 5, 0.3)
    assert asha.longest_need() == pytest.approx((1 - EXPLORE_FIRST) * 3600)
    assert asha.candidates(controller.trials, quick, quick.last_result) == []
    leave(slow_need - 5)
    report(quick, 0.75, 15, 0.3)
    assert phase.finishers == [] and not lines  # the slow leader no longer ends the exploring
    report(moderate, 0.25, 20, 0.8)
    report(moderate, 1.0, 70, 0.8)  # 0.015 epochs/s, second at 1 epoch (two places there)
    moderate_need = asha.need_s(1.0, 0.015)
    assert moderate_need < (1 - EXPLORE_FIRST) * 3600 and phase.finishers == []
    leave(moderate_need - 5)
    report(quick, 1.0, 20, 0.3)
    assert phase.finishers == [moderate.trial_id] and lines[-1].startswith("finishing on 1 of 2 slots")


def test_a_candidate_outranked_only_by_trials_that_could_not_finish_stays_eligible():
    """A trial once in the top of a rung a leader must pass stays a candidate when later, better
    trials outrank it there but are too slow to reach the budget (TPE's later proposals tend to
    be better, slower nets): dropping it left a slot with nothing to finish. (One way the second
    slot of the 30-minute TPE study of seed 2 could end its exploring without a finisher.)"""
    lines = []
    asha, phase, controller, report, leave = _two_slot_search(lines)
    quick = _Running(1, 0, 0, 0)
    report(quick, 0.25, 5, 0.7)
    report(quick, 1.0, 20, 0.7)  # 0.05 epochs/s, first of nine at 1 epoch (two places)
    leave(2000)
    assert [c.trial_id for c in asha.candidates(controller.trials, quick, quick.last_result, 2000)] == [quick.trial_id]
    for i in range(4):  # four better nets at 1 epoch, each at ~0.004 epochs/s: 23 epochs take ~5,900 s
        big = _Running(10 + i, 0, 0, 0)
        report(big, 0.25, 60, 0.9)
        report(big, 1.0, 250, 0.9 - i / 100)
    assert not asha.in_quota(quick.trial_id, 1)  # fifth of thirteen: three places
    assert asha.in_top(quick.trial_id) and not phase.finishers
    assert [c.trial_id for c in asha.candidates(controller.trials, quick, quick.last_result, 2000)] == [quick.trial_id]
    leave(asha.need_s(1.25, 0.05) - 5)  # its need at its next report
    report(quick, 1.25, 25, 0.7)
    assert phase.finishers == [quick.trial_id] and lines[-1].startswith("finishing on 1 of 2 slots")
    # A trial that never reached the top of such a rung is not eligible.
    laggard = _Running(20, 0, 0, 0)
    report(laggard, 0.25, 5, 0.2)
    report(laggard, 1.0, 20, 0.2)
    assert not asha.in_top(laggard.trial_id)


def test_tpe_takes_over_after_its_start_up_and_says_so(tmp_path):
    """The start-up rule (a tenth of the trials, or 5 per slot-hour of a time budget; 5 to 20), and every proposal's label: random
    during the start-up, TPE's model after it (the known points count towards it)."""
    from fersearch.searcher import STARTUP_MAX, STARTUP_MIN, proposals, startup_trials

    assert startup_trials(20) == STARTUP_MIN == 5 and startup_trials(120) == 12
    assert startup_trials(2000) == STARTUP_MAX == 20 and startup_trials(2000, quasi_random=8) == 8
    # With a time budget: per slot and hour (the trial cap still bounds it), within the bounds.
    assert startup_trials(2000, budget_s=1800, slots=2) == 5 and startup_trials(2000, budget_s=3600, slots=2) == 10
    assert startup_trials(2000, budget_s=7200, slots=2) == 20 and startup_trials(2000, budget_s=86400, slots=16) == STARTUP_MAX
    assert startup_trials(60, budget_s=7200, slots=2) == 6 and startup_trials(2000, budget_s=480, slots=2) == STARTUP_MIN
    space = dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={})
    searcher = make_searcher(space, 0, 0, 3, startup=startup_trials(50))
    for i in range(9):
        searcher.suggest(str(i))
        searcher.on_trial_complete(str(i), {M.BEST_METRIC: 0.5 + 0.01 * i, M.EPOCH: 3})
    labels = [t.user_attrs[PROPOSED_BY] for t in searcher._ot_study.trials]
    assert labels == ["random"] * 5 + ["tpe"] * 4
    assert proposals(searcher._ot_study) == {"random": 5, "tpe": 4}
    # Random search is labelled random throughout.
    rand = make_searcher(space, 0, 0, 3, sampler="random", startup=5)
    for i in range(7):
        rand.suggest(str(i))
        rand.on_trial_complete(str(i), {M.BEST_METRIC: 0.5, M.EPOCH: 3})
    assert proposals(rand._ot_study) == {"random": 7}


def test_a_quasi_random_searcher_saves_and_restores(tmp_path):
    """--quasi-random N: the phased sampler is a module-level class, so Ray's saved searcher
    (a pickle) restores, and the restored one goes on with the same proposals."""
    space = dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={})

    def searcher_on(db):
        return make_searcher(space, 1, 3, 3, f"sqlite:///{tmp_path / db}", "q", startup=3)

    def run(searcher, ids):
        out = []
        for tid in ids:
            out.append(searcher.suggest(tid))
            value = 0.5 + 0.001 * (len(str(sorted(out[-1].items()))) % 97)  # a function of the proposal
            searcher.on_trial_complete(tid, {M.BEST_METRIC: value, M.EPOCH: 3})
        return out

    whole = run(searcher_on("whole.db"), [f"t{i}" for i in range(6)])
    first = searcher_on("cut.db")
    before = run(first, ["t0", "t1"])
    first.save(str(tmp_path / "searcher.pkl"))
    restored = searcher_on("cut.db")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert before + run(restored, [f"t{i}" for i in range(2, 6)]) == whole
    labels = [t.user_attrs[PROPOSED_BY] for t in restored._ot_study.trials]
    assert labels == ["qmc"] * 3 + ["tpe"] * 3


def test_warm_start_keeps_what_the_current_space_can_use():
    """Trials of an earlier study enter a new one before its first proposal: parameters the
    space no longer searches are dropped, a trial with a value outside it is skipped, a pruned
    trial keeps its intermediate values only at the same fidelity."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from fersearch.config import FIDELITY
    from fersearch.searcher import FIDELITY_ATTR, WARM_START_FROM, warm_start

    space = dataclasses.replace(load_space(SPACES / "cnn.yaml", "cnn"), points={})
    lr, gone = FloatDistribution(0.001, 1.0, log=True), CategoricalDistribution(["a", "b"])
    old = optuna.create_study(direction="maximize")
    old.set_user_attr(FIDELITY_ATTR, FIDELITY)
    old.add_trial(create_trial(value=0.8, params={"lr": 0.05, "gone": "a"}, distributions={"lr": lr, "gone": gone}))
    old.add_trial(create_trial(value=0.7, params={"lr": 0.5}, distributions={"lr": lr}))  # outside 0.01-0.2
    old.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.02}, distributions={"lr": lr},
                               intermediate_values={1: 0.4}))
    old.add_trial(create_trial(state=TrialState.FAIL, params={"lr": 0.03}, distributions={"lr": lr}))
    other = optuna.create_study(direction="maximize")  # another fidelity: its pruned trials do not compare
    other.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.02}, distributions={"lr": lr},
                                 intermediate_values={3: 0.5}))
    other.add_trial(create_trial(value=0.75, params={"lr": 0.04}, distributions={"lr": lr}, intermediate_values={3: 0.5}))
    searcher = make_searcher(space, 0, 0, 3)
    assert warm_start(searcher._ot_study, space, {"old": old, "other": other}) == {"old": 2, "other": 1}
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [(t.state, t.params, t.value) for t in trials] == [
        (TrialState.COMPLETE, {"lr": 0.05}, 0.8), (TrialState.PRUNED, {"lr": 0.02}, None), (TrialState.COMPLETE, {"lr": 0.04}, 0.75)]
    assert trials[1].intermediate_values == {1: 0.4} and trials[2].intermediate_values == {}
    assert [t.user_attrs[WARM_START_FROM] for t in trials] == ["old", "old", "other"]
    # The sampler counts them: its first own proposal already comes from TPE's model (5 start-up).
    searcher2 = make_searcher(space, 0, 0, 3, startup=3)
    warm_start(searcher2._ot_study, space, {"old": old, "other": other})
    searcher2.suggest("first")
    assert searcher2._ot_study.trials[-1].user_attrs[PROPOSED_BY] == "tpe"


def test_a_second_search_reuses_known_points_and_warm_starts_from_the_first(smoke_search, synthetic_dir):
    """On the same store and data: the known points' stored results are reused (not trained
    again: no Ray trial is a point, their runs are tagged with their source), and --warm-start
    gives the first study's trials to the sampler before its first proposal."""
    import optuna

    from fersearch.searcher import WARM_START_FROM
    from fersearch.tracking import REUSED_TAG

    first, mlruns, _ = smoke_search
    lines: list[str] = []
    settings = SearchSettings(model="cnn", data_dir=synthetic_dir, name="second", mlruns=mlruns, trials=2,
                              max_epochs=2, cpus_per_trial=1, warm_start=["smoke"])
    out = run_search(settings, emit=lines.append)
    assert not out.interrupted and out.counts["trials"] == 2  # both are searched trials
    assert sum(line.startswith("known point ") and "not trained again" in line for line in lines) == 2
    client, runs = _children(mlruns, out.parent_run_id)
    reused = {r.data.tags[POINT_TAG]: r for r in runs if REUSED_TAG in r.data.tags}
    assert set(reused) == {"seed", "modern"}
    _, first_runs = _children(mlruns, first.parent_run_id)
    source = {r.data.tags[POINT_TAG]: r for r in first_runs if r.data.tags.get(POINT_TAG)}
    for name, run in reused.items():
        assert run.data.tags[REUSED_TAG] == source[name].info.run_id
        assert run.data.metrics[M.BEST_METRIC] == source[name].data.metrics[M.BEST_METRIC]
    trained = [r for r in runs if REUSED_TAG not in r.data.tags]
    assert len(trained) == 2 and not any(r.data.tags.get(POINT_TAG) for r in trained)
    # A stored point above the search's best (a 2-epoch net, the best of 2 trials) is named:
    # the search scores and exports only what it trained.
    chosen = next(r for r in trained if r.info.run_id == out.best["run_id"])
    assert out.best["best_val"] == chosen.data.metrics[M.BEST_METRIC]
    assert out.stored_above_best == {
        name: {"run_id": source[name].info.run_id, "val": run.data.metrics[M.BEST_METRIC]}
        for name, run in reused.items() if run.data.metrics[M.BEST_METRIC] > out.best["best_val"]}
    # The first study's finished and pruned trials came first, then this search's own.
    old = optuna.load_study(study_name="smoke", storage=f"sqlite:///{mlruns / 'optuna.db'}")
    study = optuna.load_study(study_name="second", storage=f"sqlite:///{mlruns / 'optuna.db'}")
    # Finished trials, and pruned ones with their intermediate values (same fidelity).
    usable = [t for t in old.trials if t.state == optuna.trial.TrialState.COMPLETE
              or (t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values)]
    copied = [t for t in study.trials if t.user_attrs.get(WARM_START_FROM) == "smoke"]
    assert len(copied) == len(usable) and [t.number for t in copied] == list(range(len(usable)))
    assert [t.state for t in copied] == [t.state for t in usable]
    assert f"warm start: {len(usable)} trial(s) of smoke given to the sampler before its first proposal" in lines
    assert out.proposals == {k: v for k, v in out.proposals.items() if k in ("random", "tpe")} and sum(out.proposals.values()) == 2


@pytest.mark.slow
def test_a_time_budget_ends_with_its_best_configuration_trained_to_the_end(ray_runtime, synthetic_dir, tmp_path):
    """A short budget on the synthetic data: the search switches to finishing its leader, which
    then trains every epoch of the budget, and the search's best is a trial that did."""
    cheap = _space_file(tmp_path, {
        "model": "cnn",
        "params": {"lr": {"loguniform": [0.005, 0.1]}, "dropout": {"uniform": [0.0, 0.5]},
                   "scheduler": "wsd", "warmup_epochs": 0.25},
        "points": {},
    })
    lines: list[str] = []
    out = run_search(_settings(synthetic_dir, tmp_path, "finish", max_epochs=12, time_budget_s=45, trials=500,
                               space_path=cheap, progress_every_s=5), emit=lines.append)
    # Whether it had to switch to finishing depends on the machine's pace (the decision itself
    # is checked in test_the_budget_ends_by_finishing_the_leader); the outcome does not.
    switched = any(line.startswith(("switching from exploring to finishing", "finishing on ")) for line in lines)
    assert not out.interrupted and switched == (out.finishing_at_s is not None)
    assert out.counts["completed"] >= 1 and out.best is not None
    client, runs = _children(tmp_path / "mlruns", out.parent_run_id)
    best = next(r for r in runs if r.info.run_id == out.best["run_id"])
    assert best.data.tags[STATUS_TAG] == "completed" and best.data.metrics[M.EPOCHS_TRAINED] == 12
    # The capped rung (1 of 12 epochs) reports a decayed branch, once, on every trial that got
    # there (the finisher too: it was there), and on no other epoch.
    for run in runs:
        cooled = client.get_metric_history(run.info.run_id, M.COOLED_ACCURACY)
        reached = run.data.metrics.get(M.EPOCHS_TRAINED, 0) >= 1
        assert [m.step for m in cooled] == ([1] if reached else []), run.info.run_name
        assert all(0 <= m.value <= 1 for m in cooled)


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
            searcher.on_trial_complete(tid, {M.BEST_METRIC: score(config), M.EPOCH: 3})
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
            searcher.on_trial_complete(str(i), {M.BEST_METRIC: 0.1 * i, M.EPOCH: 3})
        sequences.append(seq)
    assert sequences[0] == sequences[1]
    assert sequences[0][0]["lr"] == 0.01 and sequences[0][0]["channels"] == "6,16"


@pytest.mark.slow
def test_resume_after_interrupted_search(ray_runtime, synthetic_dir, tmp_path):
    mlruns = tmp_path / "mlruns"
    env = {**os.environ, "FERSEARCH_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--trials", "4",
           "--max-epochs", "3", "--reduction-factor", "10", "--name", "resumable", "--mlruns", str(mlruns),
           "--cpus-per-trial", "2", "--quasi-random", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[1 ended]") or time.time() > deadline:
            break
    assert any(s.startswith("[1 ended]") for s in seen), "".join(seen)
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
    # (both known points lie outside the focused space: never told), and none is left running.
    import optuna

    study = optuna.load_study(study_name="resumable", storage=f"sqlite:///{mlruns / 'optuna.db'}")
    told = [r for r in runs if not r.data.tags.get(POINT_TAG)]
    assert len(latest_records(study)) == len(told)
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    # --quasi-random 3: the searched trials' values came from the QMC phase (the modern point
    # lies outside the space), across the interruption.
    assert proposals(study) == {"qmc": len(told)}


@pytest.mark.slow
def test_a_fault_inside_ray_tunes_controller_ends_the_search_in_one_line_and_resume_finishes_it(
        ray_runtime, synthetic_dir, tmp_path, monkeypatch):
    """Ray Tune's controller raising (Ray 2.60's reuse_actors fault ended a 2-hour study at minute
    69 with a TypeError from its own error handler) ends the search with one line naming
    --resume, the traceback in the search's log file, no MLflow run left RUNNING but the parent
    (interrupted); --resume then finishes the search without repeating what was done."""
    from fersearch.errors import FersearchError
    from fersearch.ray_runtime import LOG_FILE
    from fersearch.record import INTERRUPTED
    from fersearch.scheduler import SearchASHA

    real, raised = SearchASHA.choose_trial_to_run, []

    def faulty(self, tune_controller):  # the controller asks this inside its step, in the driver
        if not raised and any(M.EPOCHS_SEEN in t.last_result for t in tune_controller.get_trials()):
            raised.append(True)
            raise TypeError("expected str, bytes or os.PathLike object, not NoneType")
        return real(self, tune_controller)

    monkeypatch.setattr(SearchASHA, "choose_trial_to_run", faulty)
    settings = _settings(synthetic_dir, tmp_path, "faulty", trials=3, max_epochs=1, reduction_factor=10)
    with pytest.raises(FersearchError) as stopped:
        run_search(settings)
    said = str(stopped.value)
    assert "\n" not in said and "TypeError: expected str" in said and said.endswith("--resume faulty"), said
    log_file = tmp_path / "mlruns" / "ray" / "faulty" / LOG_FILE
    assert "Traceback" in log_file.read_text() and str(log_file) in said
    state = json.loads((tmp_path / "mlruns" / "ray" / "faulty" / "fersearch_search.json").read_text())
    client, runs = _children(tmp_path / "mlruns", state["parent_run_id"])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    assert client.get_run(state["parent_run_id"]).data.tags[STATUS_TAG] == INTERRUPTED
    monkeypatch.undo()
    out = run_search(SearchSettings(model="cnn", data_dir=Path("."), name="faulty", mlruns=tmp_path / "mlruns",
                                    resume=True, cpus_per_trial=1))
    assert not out.interrupted and out.counts["trials"] == 3 and out.counts["failed"] == 0 and out.best is not None
    _, runs = _children(tmp_path / "mlruns", state["parent_run_id"])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}


# What a user's terminal shows during `fersearch search`: fersearch's own lines, and only the
# dependency lines this list names, each with the reason it stays.
FERSEARCH_LINES = (
    r"search \S+: model \w+, up to \d+ trials(, a \S+ budget)?, up to \d+ epochs each$",
    r"searcher: (TPE after \d+ (quasi-)?random start-up trial\(s\)|random search)",
    r"\[\d+ ended\] \w+ (finished|stopped by ASHA|failed|cut short) after [\d.]+ epoch\(s\)",
    r"\[\d+:\d\d:\d\d spent",
    r"trials \d+: completed \d+, stopped early by ASHA \d+, failed \d+",
    r"proposals: \d+ by ",
    r"known point \w+: taken from run \w+ of an earlier search",
    r"switching from exploring to finishing: ",
    r"finishing on \d+ of \d+ slots: ",
    r"exploring ends: ",
    r"best trial \w+ \(MLflow run \w+\), epoch \d+:$",
    r"\s+(ferplus8|seed10): val accuracy [01]\.\d{4}, test accuracy [01]\.\d{4}, test f1_macro [01]\.\d{4}$",
    r"  the known point \w+, a stored result of this data \(MLflow run \w+\), scored val [01]\.\d{4} without TTA, above this search's best",
    r"study report: \S+report\.md$",
    r"MLflow store: \S+ \(make ui\)$",
    r"\w+ stopped unexpectedly \(its worker died or it raised\); restarting it from its last checkpoint",
    r"no trial finished successfully$",
)
ALLOWED_DEPENDENCY_LINES = (
    # Ray 2.60's notice that token authentication is on: a security setting a user should know
    # of (README's cluster section says what to do about it), so it stays visible.
    r".*WARNING authentication_token_setup\.py:\d+ -- Token authentication is enabled",
)


def _terminal_of_a_search(synthetic_dir: Path, tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """`fersearch search` in its own process, as a user's terminal runs it: the process, the
    lines it printed, and those neither fersearch's nor an allowed dependency line."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["FERSEARCH_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--mlruns", str(tmp_path / "m"), *flags],
        capture_output=True, text=True, env=env, timeout=900,
    )
    patterns = [re.compile(p) for p in FERSEARCH_LINES + ALLOWED_DEPENDENCY_LINES]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc, lines, [line for line in lines if not any(p.match(line) for p in patterns)]


@pytest.mark.slow
def test_the_terminal_shows_fersearch_not_its_dependencies(synthetic_dir, tmp_path):
    proc, lines, others = _terminal_of_a_search(synthetic_dir, tmp_path, "--trials", "2", "--max-epochs", "1",
                                                "--grace-period", "1", "--name", "terminal")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert others == []
    assert any(line.startswith("trials 2: completed 2") for line in lines)
    # The dependencies' chatter went to the search's log file instead (Optuna's study line was on
    # the terminal before).
    log_text = (tmp_path / "m" / "ray" / "terminal" / "driver.log").read_text()
    assert "A new study created" in log_text and "A new study created" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_trial_cut_before_its_first_report_leaves_only_fersearchs_lines(synthetic_dir, tmp_path):
    """A budget that ends before the only trial's first report: Ray Tune's results table warned
    on the terminal that the trial had no result file; the warning now goes to the search's log
    file."""
    _, lines, others = _terminal_of_a_search(synthetic_dir, tmp_path, "--trials", "1", "--max-epochs", "50",
                                             "--time-budget", "2s", "--name", "cut")
    assert any(re.match(r"trials 1: .* cut short by the budget or an interruption 1;", line) for line in lines), lines
    assert others == []
    log_text = (tmp_path / "m" / "ray" / "cut" / "driver.log").read_text()
    assert "Failed to fetch metrics" in log_text


def test_the_search_gives_ray_tune_its_trial_lines_in_place_of_rays_own(smoke_search):
    """Ray Tune adds a TrialProgressCallback of its own, which prints to the terminal, unless the
    Tuner has one: the Tuner of a real search, as Ray saved it for --resume, has fersearch's
    RayTrialLines, and Ray's defaults then add no other (the old output flow the search runs)."""
    import ray.cloudpickle
    from ray.tune.progress_reporter import TrialProgressCallback
    from ray.tune.utils.callback import _create_default_callbacks

    from fersearch.progress import RayTrialLines
    from fersearch.record import experiment_path

    _, mlruns, _ = smoke_search
    saved = ray.cloudpickle.loads((experiment_path(mlruns, "smoke") / "tuner.pkl").read_bytes())
    callbacks = saved["_run_config"].callbacks
    for given in (callbacks, _create_default_callbacks(list(callbacks), metric=M.SELECT_METRIC)):
        progress = [c for c in given if isinstance(c, TrialProgressCallback)]
        assert len(progress) == 1 and type(progress[0]) is RayTrialLines, given


def test_ray_tunes_line_for_a_trial_ended_without_a_result_goes_to_the_log(capsys, caplog):
    """Ray Tune prints "Trial ... completed. Last result:" (empty) when the scheduler stops a
    trial before its first report, at any verbosity; the search gives Ray this callback in place
    of its own, so the line is a log record (the search's log file), not terminal output."""
    from fersearch.progress import RayTrialLines

    class Ended:  # what the callback reads of a trial: its name and last result
        last_result: dict = {}

        def __str__(self) -> str:
            return "train_trial_0000"

    with caplog.at_level(logging.INFO, logger="ray.tune"):
        RayTrialLines(metric=M.SELECT_METRIC).on_trial_complete(iteration=0, trials=[], trial=Ended())
    assert capsys.readouterr() == ("", "")
    assert any("train_trial_0000 completed" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_best_trial_cut_by_the_time_budget_stays_killed_after_its_model_is_logged(ray_runtime, synthetic_dir, tmp_path):
    """The one trial of a search is cut by the budget and is its best: logging its model reopens
    its MLflow run, which must end KILLED again, not FINISHED (the full tier once met this case
    by chance in the test above, whose best is whichever trial the timing favours)."""
    out = run_search(_settings(synthetic_dir, tmp_path, "cutbest", trials=1, max_epochs=400, time_budget_s=20,
                               cpus_per_trial=2))
    assert out.counts["unfinished"] == 1 and out.best is not None
    client, runs = _children(tmp_path / "mlruns", out.parent_run_id)
    (run,) = runs
    assert run.info.run_id == out.best["run_id"] and run.data.tags.get(STATUS_TAG) == "unfinished"
    assert run.info.status == "KILLED" and client.get_run(run.info.run_id).data.tags.get(MODEL_URI_TAG)


def test_a_promoted_trial_cut_by_the_budget_keeps_the_best_and_epochs_of_its_last_report(tmp_path):
    """A finisher paused at a rung (its run then got that rung's best and epochs), was promoted,
    trained on and was cut by the budget, which ends no trial through a callback: its run is
    current as of its last report, and closing it changes only its status (the report ranks
    trials by these two figures)."""
    from fersearch.outcome import UNFINISHED
    from fersearch.record import _close_unfinished_runs
    from fersearch.tracking import STATUS_TAG

    client, experiment, parent, callback, trial = _callback_on_a_store(tmp_path, max_epochs=24)
    best = 0.0
    for epoch, acc in enumerate([0.61, 0.70, 0.74, 0.79, 0.82, 0.845, 0.84], start=1):
        if epoch > 1:  # a quarter epoch in: the best of the epochs before, no whole-set score
            callback.on_trial_result(0, [], trial, {M.EPOCHS_SEEN: epoch - 0.75, M.REPORT: 4 * epoch - 3, M.EPOCH: epoch - 1,
                                                    M.JUDGE_METRIC: acc - 0.05, M.BEST_METRIC: best})
        best = max(best, acc)
        report = {M.EPOCHS_SEEN: float(epoch), M.REPORT: 4 * epoch, M.EPOCH: epoch, M.JUDGE_METRIC: acc,
                  M.VAL_ACCURACY: acc, M.BEST_METRIC: best}
        callback.on_trial_result(0, [], trial, {**report, M.PAUSED: 1} if epoch == 4 else report)
    run_id = callback.run_id(trial)
    assert client.get_run(run_id).info.status == "RUNNING"  # promoted at 4 epochs: reopened
    done = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_metric(done, M.BEST_METRIC, 0.5)
    client.set_terminated(done, "FINISHED")

    _close_unfinished_runs(client, parent)

    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[STATUS_TAG] == UNFINISHED
    assert run.data.metrics[M.BEST_METRIC] == 0.845 and run.data.metrics[M.EPOCHS_TRAINED] == 7
    assert client.get_run(done).data.metrics[M.BEST_METRIC] == 0.5  # a finished run is left alone
