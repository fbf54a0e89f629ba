import json

from mlflow.tracking import MlflowClient

from fersearch.cli import main
from fersearch.report import build_report
from fersearch.tracking import STATUS_TAG, tracking_uri

SECTIONS = (
    "## Record", "## Known points and the search", "## Top ", "## Hyperparameter importance", "## Findings",
    "## Range edges", "## Axis plots", "## Learning curves and search progress",
    "## Best trial: confusion matrix and per-class F1 (test)", "## Seed variance of the best configuration",
)


def test_report_from_a_smoke_search_matches_the_store(smoke_search, tmp_path):
    outcome, mlruns, _ = smoke_search
    path = build_report("cnn", tmp_path / "report", mlruns, "smoke", repeats=2)
    text = path.read_text()
    for section in SECTIONS:
        assert section in text, section
    client = MlflowClient(tracking_uri(mlruns))
    exp = client.get_experiment_by_name("cnn")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    stopped = sum(r.data.tags[STATUS_TAG] == "stopped_early" for r in runs)
    completed = sum(r.data.tags[STATUS_TAG] == "completed" for r in runs)
    assert f"| trials | 4: {completed} completed, {stopped} stopped early by ASHA, 0 failed |" in text
    best_val = max(r.data.metrics["val/best_accuracy"] for r in runs)
    assert f"| best validation accuracy | {best_val:.4f}" in text
    test_acc = outcome.best["by_protocol"]["seed10"]["test"]["accuracy"]
    assert f"| best trial, test accuracy (seed10) | {test_acc:.4f} |" in text
    assert "| seed report, published (100 epochs) | - | 0.7257 |" in text
    assert "Retrained 2 times with seeds 1..2" in text
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert summary["trials"] == 4 and summary["epochs"] == sum(int(r.data.metrics["epochs_trained"]) for r in runs)
    for figure in ("curves.png", "confusion_matrix.png", "per_class_f1.png", "axis_lr.png", "axis_block.png", "time_to_accuracy.png", "size.png"):
        assert (tmp_path / "report" / figure).is_file(), figure
    # The search wrote the same report on its own and logged it to the parent run.
    assert outcome.report and outcome.report.endswith("report.md")
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert "report/report.md" in artifacts


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", "--model", "cnn", "--mlruns", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert f"no MLflow store at {tmp_path / 'empty' / 'mlflow.db'}" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()
