import json
import logging

import pytest
from mlflow.tracking import MlflowClient

from fersearch import metrics as M
from fersearch.cli import main
from fersearch.repeat import REPEAT_VAL
from fersearch.report import build_report
from fersearch.tracking import POINT_TAG, STATUS_TAG, tracking_uri

SECTIONS = (
    "## Record", "## Known points and the search", "## Top ", "## Hyperparameter importance", "## Findings",
    "## Range edges", "## Optuna's figures", "## ASHA's rungs against the final result",
    "## Best trial: confusion matrix and per-class F1 (test)", "## Seed variance of the best configuration",
    "## Who chose the configurations",
)


def test_report_from_a_smoke_search_matches_the_store(smoke_search, tmp_path):
    outcome, mlruns, _ = smoke_search
    # Seed variance: `fersearch repeat` trains and logs; the report only reads those runs.
    assert main(["repeat", "--model", "cnn", "--search", "smoke", "--mlruns", str(mlruns), "--seeds", "2",
                 "--threads", "2"]) == 0
    path = build_report("cnn", tmp_path / "report", mlruns, "smoke")
    text = path.read_text()
    for section in SECTIONS:
        assert section in text, section
    client = MlflowClient(tracking_uri(mlruns))
    exp = client.get_experiment_by_name("cnn")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    stopped = sum(r.data.tags[STATUS_TAG] == "stopped_early" for r in runs)
    completed = sum(r.data.tags[STATUS_TAG] == "completed" for r in runs)
    assert f"| trials | 4: {completed} completed, {stopped} stopped early by ASHA, 0 failed |" in text
    best_val = max(r.data.metrics[M.BEST_METRIC] for r in runs if r.data.tags[STATUS_TAG] == "completed")
    assert f"| best validation accuracy | {best_val:.4f}" in text
    test_acc = outcome.best["by_protocol"]["seed10"]["test"]["accuracy"]
    assert f"| best trial, test accuracy (seed10) | {test_acc:.4f} |" in text
    assert "| seed report, published (100 epochs) | - | 0.7257 |" in text
    # 4 trials, fewer than the random start-up: every searched configuration is a random draw.
    searched = sum(POINT_TAG not in r.data.tags for r in runs)
    assert searched and f"| random | {searched} | " in text and "| tpe |" not in text
    assert "Retrained 2 times (seeds 1, 2) for the full budget by `fersearch repeat`" in text
    repeats = client.search_runs([exp.experiment_id], filter_string=f"tags.`fersearch.repeat_of` = '{outcome.parent_run_id}'")
    assert len(repeats) == 2 and all(r.info.status == "FINISHED" for r in repeats)
    vals = [r.data.metrics[REPEAT_VAL] for r in repeats]
    assert f"validation accuracy {sum(vals) / 2:.4f} +/- " in text
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert summary["trials"] == 4
    assert summary["epochs"] == pytest.approx(sum(r.data.metrics[M.EPOCHS_TRAINED] for r in runs))  # fractional
    for figure in ("slice.png", "history.png", "intermediate.png", "confusion_matrix.png", "per_class_f1.png",
                   "time_to_accuracy.png", "size.png"):
        assert (tmp_path / "report" / figure).is_file(), figure
        assert f"]({figure})" in text, figure
    # The search wrote the same report on its own and logged it to the parent run.
    assert outcome.report and outcome.report.endswith("report.md")
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert "report/report.md" in artifacts


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", "--model", "cnn", "--mlruns", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert f"no MLflow store at {tmp_path / 'empty' / 'mlflow.db'}" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


def _trials(n):
    from fersearch.report import Trial

    trials = []
    for i in range(n):
        lr, batch = 0.02 * (i + 1), (64, 128)[i % 2]
        score = 0.5 + 0.02 * i + (0.05 if batch == 64 else 0.0)
        status = "completed" if i % 3 else "stopped_early"
        epochs = 9 if status == "completed" else 3
        history = [(e, score - 0.01 * (epochs - e)) for e in range(1, epochs + 1)]
        trials.append(Trial(f"r{i}", f"t{i}", status, i, {"lr": str(lr), "batch_size": str(batch)}, score, epochs, history))
    # A known point outside the space (lr 1.0): left out of the study.
    trials.append(Trial("rs", "seed", "completed", n, {"lr": "1.0", "batch_size": "64"}, 0.6, 9, [(9, 0.6)], point="seed"))
    return trials


def _stored(tmp_path, completed: int, pruned: int):
    """A stored study as a search's searcher leaves it: completed and pruned trials with their
    reports, a trial paused (PRUNED) then promoted (a second record continuing it), and a
    warm-start record; saved in sqlite and named as the parent run's tags name it."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from fersearch.study_records import CONTINUES, PROPOSED_BY

    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    dists = {"lr": FloatDistribution(0.01, 0.5, log=True), "batch_size": CategoricalDistribution((64, 128))}
    import numpy as np

    rng = np.random.default_rng(0)

    def add(state, value, steps, **attrs):
        params = {"lr": float(rng.uniform(0.01, 0.5)), "batch_size": int(rng.choice([64, 128]))}
        reports = {k: 0.5 + 0.01 * k + 0.02 * params["lr"] for k in range(1, steps + 1)}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, state=state, value=value,
                                                  intermediate_values=reports, user_attrs={PROPOSED_BY: "tpe", **attrs}))
        return study.trials[-1]

    for i in range(completed):
        add(optuna.trial.TrialState.COMPLETE, 0.7 + 0.01 * i, 8)
    for _ in range(pruned):
        add(optuna.trial.TrialState.PRUNED, None, 2)
    first = add(optuna.trial.TrialState.PRUNED, None, 3)  # paused at a rung ...
    study.add_trial(optuna.trial.create_trial(  # ... promoted: its later record
        params=first.params, distributions=dists, state=optuna.trial.TrialState.COMPLETE, value=0.95,
        intermediate_values={k: 0.6 for k in range(1, 9)}, user_attrs={PROPOSED_BY: "promoted", CONTINUES: first.number}))
    add(optuna.trial.TrialState.COMPLETE, 0.99, 8, **{PROPOSED_BY: "warm_start"})  # another study's: left out

    class Parent:  # what stored_study reads of the parent run: its tags
        class data:
            tags = {"fersearch.optuna_study": "s", "fersearch.optuna_storage": url}

    return Parent


def test_the_report_reads_the_searchs_stored_study_and_feeds_optunas_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    from fersearch.report import _optuna_figures, importance, stored_study, study_for_figures

    # Fewer than 8 completed: the stopped ones count at their last report, as complete; one
    # record per configuration (the promoted trial's latest), no warm-start record.
    stored = stored_study(_stored(tmp_path / "a", completed=3, pruned=5), tmp_path / "a")
    study, basis = study_for_figures(stored)
    assert len(study.trials) == 9 and "ASHA-stopped" in basis
    assert all(t.state == TrialState.COMPLETE for t in study.trials) and 0.95 in [t.value for t in study.trials]
    assert 0.99 not in [t.value for t in study.trials]
    # 8 or more completed: stopped ones are PRUNED with their reports.
    stored = stored_study(_stored(tmp_path / "b", completed=8, pruned=4), tmp_path / "b")
    study, basis = study_for_figures(stored)
    states = [t.state for t in study.trials]
    assert basis == "completed trials" and states.count(TrialState.PRUNED) == 4 and states.count(TrialState.COMPLETE) == 9
    assert study.best_value == 0.95
    scores, _ = importance(study, basis)
    assert set(scores) == {"lr", "batch_size"}
    files = _optuna_figures(tmp_path, study, scores, plt)
    assert files == {k: f"{k}.png" for k in ("slice", "history", "intermediate", "importance")}
    assert all((tmp_path / f).stat().st_size > 1000 for f in files.values())
    # A store copied elsewhere (the tag's storage gone): its own optuna.db is read.
    moved = tmp_path / "moved"
    moved.mkdir()
    parent = _stored(tmp_path / "d", 1, 0)
    parent.data.tags = {**parent.data.tags, "fersearch.optuna_storage": f"sqlite:///{tmp_path / 'gone' / 'optuna.db'}"}
    (tmp_path / "d" / "optuna.db").rename(moved / "optuna.db")
    assert len(stored_study(parent, moved).trials) == 4  # 1 completed, a paused one twice, a warm start
    assert stored_study(parent, tmp_path / "nowhere") is None


def test_the_figures_of_a_large_study_draw_quietly_without_a_legend_per_trial(tmp_path, caplog):
    """A real study has dozens of trials with learning curves: Optuna's legend (one entry per
    trial) outgrows the figure (matplotlib warned that its layout failed); it is dropped, and
    the in-memory study the figures are drawn from is not announced on the user's terminal."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    from fersearch.report import (
        LEGEND_MAX,
        _optuna_figures,
        importance,
        stored_study,
        study_for_figures,
    )

    stored = stored_study(_stored(tmp_path / "a", completed=10, pruned=30), tmp_path / "a")
    caplog.clear()
    optuna.logging.enable_propagation()  # Optuna's records reach caplog while the test runs
    try:
        with caplog.at_level(logging.INFO, logger="optuna"):
            study, basis = study_for_figures(stored)
    finally:
        optuna.logging.disable_propagation()
    assert not [r for r in caplog.records if "created in memory" in r.getMessage()]
    assert sum(bool(t.intermediate_values) for t in study.trials) > LEGEND_MAX
    scores, _ = importance(study, basis)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = _optuna_figures(tmp_path, study, scores, plt)
    assert "intermediate" in files
    assert not [w for w in caught if "layout" in str(w.message).lower()], [str(w.message) for w in caught]


def test_rank_correlation_gives_ties_their_mean_rank():
    import numpy as np
    import pytest

    from fersearch.report import _spearman

    # Ranks of x with a tie: 1.5, 1.5, 3, 4 against 1, 2, 3, 4 -> 4.5 / sqrt(4.5 * 5).
    assert _spearman(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def test_rung_agreement_compares_each_rung_with_the_final_ranking():
    import pytest

    from fersearch.report import Trial, rung_agreement

    def trial(name, curve, status="completed", final=None):
        # `curve`: the subset score at each report (4 an epoch); `final`: the best validation.
        judge = list(enumerate(curve, start=1))
        return Trial(name, name, status, 0, {}, final if final is not None else max(curve), len(curve) / 4, [], "", judge)

    # Rungs at 0.25, 0.75 and 2.25 epochs of 3 (reports 1, 3 and 9). Three trials trained the
    # whole budget; at the first rung their ranking is reversed, from the second on it is right.
    ramp = [0.0] * 12
    trials = [
        trial("a", [0.30, 0.4, 0.50] + ramp[3:], final=0.60),
        trial("b", [0.20, 0.4, 0.60] + ramp[3:], final=0.70),
        trial("c", [0.10, 0.4, 0.70] + ramp[3:], final=0.85),
        trial("cut", [0.05, 0.1, 0.05], status="stopped_early"),  # stopped at the second rung
    ]
    for t, later in zip(trials[:3], (0.55, 0.65, 0.75), strict=True):
        t.judge[8] = (9, later)  # the third rung keeps the order of the second
    rows = rung_agreement(trials, max_epochs=3, grace=0.25, factor=3)
    assert [(r["epoch"], r["trials"], r["final_n"]) for r in rows] == [(0.25, 4, 3), (0.75, 4, 3), (2.25, 3, 3)]
    assert rows[0]["rho"] == pytest.approx(-1.0) and not rows[0]["winner_kept"]
    assert rows[1]["rho"] == pytest.approx(1.0) and rows[1]["winner_kept"]
    # Against the next rung, among the trials that reached both: the stopped trial counts at
    # the first rung (reversed against the second's ranking but for itself), not at the third.
    assert rows[0]["next_n"] == 4 and rows[1]["next_n"] == 3 and rows[1]["rho_next"] == pytest.approx(1.0)
    assert "next_n" not in rows[2]
    assert rung_agreement(trials[:2], max_epochs=3, grace=0.25, factor=3) == []


def test_the_report_names_the_trial_the_search_chose(smoke_search, tmp_path):
    """The search ranks the trials it trained and names its best on the parent run; the report
    names that trial, not another run of higher score (as a known point's stored result, or a run
    a later sync rescored)."""
    import shutil

    from fersearch.tracking import BEST_RUN_TAG

    outcome, mlruns, _ = smoke_search
    copy = tmp_path / "mlruns"
    shutil.copytree(mlruns, copy)
    client = MlflowClient(tracking_uri(copy))
    exp = client.get_experiment_by_name("cnn")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    chosen = client.get_run(outcome.parent_run_id).data.tags[BEST_RUN_TAG]
    other = next(r for r in runs if r.info.run_id != chosen and r.data.tags[STATUS_TAG] == "completed")
    client.log_metric(other.info.run_id, M.BEST_METRIC, 0.999)
    text = build_report("cnn", tmp_path / "report", copy, "smoke").read_text()
    best = client.get_run(chosen)
    assert f"| best validation accuracy | {best.data.metrics[M.BEST_METRIC]:.4f} ({best.info.run_name})" in text
    assert "0.9990" not in text.split("## Top ")[0]


def test_findings_count_the_trials_of_each_choice_in_whole_numbers():
    """The study report's sentence per choice: the median score and how many trials drew it (a
    2-hour study's report read '85.0 trials': pandas turned the row into floats)."""
    from fersearch.report import Trial, findings
    from fersearch.space import Param

    trials = [Trial(f"r{i}", f"t{i}", "completed", i, {"block": block}, score, 1.0, [])
              for i, (block, score) in enumerate([("plain", 0.7), ("plain", 0.8), ("plain", 0.9), ("residual", 0.5)])]
    sentences, _ = findings(trials, {"block": Param("block", "choice", ("plain", "residual"))})
    assert sentences == ["block: plain: median 0.800 (3 trials); residual: median 0.500 (1 trial)."]


def test_a_decayed_branch_passes_a_known_point_on_its_own_timeline():
    """Cooled rows (scored branches, not kept) are a timeline of their own: the point's bar comes
    from the kept epochs, a reused point's rows never count, and passing by a branch is stated
    beside passing by a kept epoch, never mixed into it."""
    import pandas as pd

    from fersearch.timeline import COLUMNS, minutes_to_pass

    epochs = pd.DataFrame([(1.0, "s", "seed", False, 3, 0.70), (2.0, "a", "", False, 1, 0.60),
                           (9.0, "a", "", False, 4, 0.72)], columns=COLUMNS)
    cooled = pd.DataFrame([(3.0, "a", "", False, 1, 0.69), (4.5, "b", "", False, 1, 0.71),
                           (4.0, "r", "", True, 1, 0.90)], columns=COLUMNS)
    assert minutes_to_pass(epochs) == {"seed": 9.0}
    assert minutes_to_pass(epochs, cooled) == {"seed": 4.5}
    assert minutes_to_pass(epochs, cooled.iloc[:1])["seed"] != minutes_to_pass(epochs, cooled.iloc[:1])["seed"]  # NaN


def test_first_rung_scores_are_grouped_by_who_proposed_the_configuration():
    """The report's "who chose" table: each searched configuration's score at the first rung
    (its intermediate value at that report), by proposer; known points, warm-start copies and a
    promoted trial's later record are left out, and a configuration stopped before the rung too."""
    import optuna

    from fersearch.report import proposer_table
    from fersearch.study_records import PROPOSED_BY, first_rung_scores

    study = optuna.create_study(direction="maximize")
    for who, values in (("random", {1: 0.3, 2: 0.40}), ("random", {1: 0.2, 2: 0.30}), ("tpe", {1: 0.4, 2: 0.50}),
                        ("tpe", {1: 0.5, 2: 0.60}), ("tpe", {1: 0.1}), ("point", {2: 0.90}),
                        ("warm_start", {2: 0.95}), ("promoted", {2: 0.60, 8: 0.7})):
        study.add_trial(optuna.trial.create_trial(
            params={}, distributions={}, state=optuna.trial.TrialState.PRUNED, value=None,
            intermediate_values=values, user_attrs={PROPOSED_BY: who}))
    assert first_rung_scores(study, 0.5) == {"random": [0.4, 0.3], "tpe": [0.5, 0.6]}
    rows = proposer_table(study, 0.5)  # 4 reports an epoch: the rung at 0.5 epochs is report 2
    assert [(r["proposer"], r["n"], r["best"]) for r in rows] == [("random", 2, 0.4), ("tpe", 2, 0.6)]
    assert rows[0]["mean"] == pytest.approx(0.35) and rows[1]["median"] == pytest.approx(0.55)
    assert proposer_table(None, 0.5) == [] and proposer_table(study, 0) == []
