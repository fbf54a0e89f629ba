"""Beyond the local store (issue 13): a real `mlflow server` on loopback, as a team runs one.

The server gets a sqlite backend and an artifacts destination in a temp folder; a search logs
to it through MLFLOW_TRACKING_URI, and export and report read from it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fersearch import metrics as M
from fersearch.ray_runtime import is_loopback
from tests.helpers import (
    MlflowServer,
    cmdline,
    end,
    epochs_reported,
    listening,
    process_tree,
    spawn,
    trial_results,
    wait_output,
)

# Each test runs whole searches in subprocesses against servers, or kills them: the full tier.
pytestmark = pytest.mark.slow


def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "fersearch", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_search_export_and_report_against_an_mlflow_server(synthetic_dir, tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    server = MlflowServer(tmp_path, base)
    url = server.url
    try:
        server.start()
        env = {**base, "MLFLOW_TRACKING_URI": url, "FERSEARCH_CACHE": str(tmp_path / "cache")}
        mlruns = tmp_path / "m"
        search = _run(["search", "--data", str(synthetic_dir), "--trials", "2", "--max-epochs", "1", "--name", "served",
                       "--mlruns", str(mlruns)], env)
        assert search.returncode == 0, search.stdout[-2000:] + search.stderr[-3000:]
        assert not (mlruns / "mlflow.db").exists()  # everything went to the server
        export = _run(["export", "--model", "cnn", "--search", "served", "--mlruns", str(mlruns),
                       "--out", str(tmp_path / "bundle")], env)
        assert export.returncode == 0, export.stderr[-3000:]
        source = json.loads((tmp_path / "bundle" / "source.json").read_text())
        assert source["tracking_uri"] == url and source["registered"] == "fersearch-cnn v1"
        report = _run(["report", "--model", "cnn", "--search", "served", "--mlruns", str(mlruns),
                       "--out", str(tmp_path / "report")], env)
        assert report.returncode == 0, report.stderr[-3000:]
        assert "| trials | 2: 2 completed" in (tmp_path / "report" / "report.md").read_text()
        client = MlflowClient(url)
        (version,) = client.search_model_versions("name = 'fersearch-cnn'")
        assert version.version == "1" and "test_ferplus8_accuracy" in version.tags
        # The artifacts are in the server's destination, not beside the client.
        assert any((tmp_path / "artifacts").rglob("model.pt"))
    finally:
        server.stop()


# --------------------------------------------------------------- nothing listens beyond loopback

def test_a_local_search_listens_on_loopback_only(synthetic_dir, tmp_path):
    """Every port the search's processes (driver, GCS, raylet, workers) listen on, sampled
    while it runs, is on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = spawn(
        [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--trials", "1",
         "--max-epochs", "3", "--name", "ports", "--mlruns", str(tmp_path / "m")],
        tmp_path / "search.log", env=env,
    )
    seen: dict[tuple[str, int], int] = {}  # (address, port) listened on -> the process
    try:
        while proc.poll() is None:
            for address, port, pid in listening(process_tree(proc.pid)):
                seen[(address, port)] = pid
            time.sleep(0.3)
        printed = wait_output(proc, 60)
    finally:
        end(proc)
    assert proc.returncode == 0, printed[-3000:]
    assert len(seen) >= 4, seen  # GCS, raylet (2), the driver's and workers' servers at least
    outside = {where: cmdline(pid)[:120] for where, pid in seen.items() if not is_loopback(where[0])}
    assert outside == {}, outside


# --------------------------------------------------------------------------------- packaging


def test_a_built_wheel_carries_the_spaces_and_the_kernels_and_runs_from_any_folder(synthetic_dir, tmp_path):
    """Build the wheel: its listing holds the default search spaces and the C source; install
    it (--no-deps) into a fresh venv that borrows this venv's dependencies, and from a folder
    that is not the checkout load every default space and run a command of the installed
    package (a search itself is tested in-process: the wheel adds nothing to it)."""
    import site
    import zipfile

    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(root)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("fersearch-*.whl")
    listing = set(zipfile.ZipFile(wheel).namelist())
    spaces = {f"fersearch/search_spaces/{p.name}" for p in (root / "search_spaces").glob("*.yaml")}
    assert spaces and spaces <= listing, spaces - listing
    assert "fersearch/csrc/cpu_kernels.c" in listing
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies come from this venv's site-packages, as a plain path: its .pth files
    # (this checkout's editable install among them) are not run, so fersearch is the wheel's.
    Path(purelib, "_project_dependencies.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    probe = ("import fersearch.space as s; print(s.__file__); print(s.SPACES_DIR); "
             "print(sorted(len(s.load_space(s.space_path(m, n), m).searched()) > 0 for m in ('cnn', 'resnet18') for n in (None, 'broad')))")
    where = subprocess.run([python, "-c", probe], cwd=work, check=True, capture_output=True, text=True, env=env).stdout.split("\n")
    assert where[0].startswith(purelib) and where[1] == str(Path(purelib) / "fersearch" / "search_spaces")
    assert where[2] == "[True, True, True, True]"
    made = subprocess.run([venv / "bin" / "fersearch", "synthetic", "--out", "syn", "--train", "20", "--valid", "8", "--test", "8"],
                          cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    assert (work / "syn" / "FER2013Train" / "label.csv").read_text().count("\n") == 20


# ------------------------------------------------------------------------------------- faults


def test_a_killed_trial_worker_is_retried_from_its_checkpoint(synthetic_dir, tmp_path):
    """kill -9 of the process training a trial: Ray restarts the trial from its last checkpoint
    (FailureConfig), the search completes, and MLflow shows the retry with each epoch once."""
    from fersearch.tracking import RETRIES_TAG, TRIAL_TAG

    mlruns = tmp_path / "m"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = spawn(
        [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--trials", "1",
         "--max-epochs", "6", "--name", "kill", "--mlruns", str(mlruns)],
        tmp_path / "search.log", env=env,
    )
    killed = None
    try:
        deadline = time.time() + 600
        while killed is None and proc.poll() is None and time.time() < deadline:
            if epochs_reported(mlruns / "ray" / "kill") >= 2:  # the driver has the second checkpoint
                titles = {pid: cmdline(pid) for pid in process_tree(proc.pid)}
                workers = [pid for pid, title in titles.items() if "ImplicitFunc" in title or "train_trial" in title]
                if workers:
                    killed = workers[0]
                    os.kill(killed, 9)
            time.sleep(0.2)
        output = wait_output(proc, 900)
    finally:
        end(proc)
    assert killed is not None, "no trial worker found to kill:\n" + output[-2000:] + "\n" + "\n".join(
        f"{pid} {title[:100]}" for pid, title in locals().get("titles", {}).items())
    assert proc.returncode == 0, output[-3000:]
    assert "stopped unexpectedly" in output and "restarting it from its last checkpoint" in output
    assert "trials 1: completed 1, stopped early by ASHA 0, failed 0" in output
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if TRIAL_TAG in r.data.tags]
    assert run.data.tags[RETRIES_TAG] == "1" and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY)]
    # Restarted from its last checkpoint, not from scratch: epoch 1 was trained once, and the
    # trial still ran its whole budget.
    assert steps.count(1) == 1 and set(steps) == {1, 2, 3, 4, 5, 6}


def test_two_searches_at_once_on_one_new_store(synthetic_dir, tmp_path):
    from fersearch.tracking import KIND_TAG

    """Two searches started together on the same (new) store both finish, each parent has
    exactly its own trials, and no store error reaches the user."""
    mlruns = tmp_path / "m"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    procs = {
        name: spawn(
            [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--trials", "2",
             "--max-epochs", "1", "--cpus-per-trial", "1", "--name", name, "--mlruns", str(mlruns)],
            tmp_path / f"{name}.log", env=env,
        )
        for name in ("first", "second")
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = wait_output(proc, 900)
    finally:
        for proc in procs.values():
            end(proc)
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][-3000:]
        assert "trials 2: completed" in outputs[name]
        assert "database is locked" not in outputs[name] and "Traceback" not in outputs[name], outputs[name][-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = {r.info.run_name: r for r in client.search_runs(experiments, filter_string=f"tags.`{KIND_TAG}` = 'search'")}
    assert set(parents) == {"first", "second"}
    for parent in parents.values():
        children = client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)


def test_a_search_outlives_its_mlflow_server_and_sync_sends_what_it_missed(synthetic_dir, tmp_path):
    """The tracking server stops after the first epoch: the search finishes with one warning line
    per failed call and says to sync; with the server back, `fersearch sync` sends every trial,
    epoch and the best trial to MLflow, once (a second sync changes nothing)."""
    from fersearch.tracking import BEST_TRIAL_TAG, STATUS_TAG, TRIAL_TAG

    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    server = MlflowServer(tmp_path / "mlflow", base)
    env = {**base, "MLFLOW_TRACKING_URI": server.url}
    mlruns = tmp_path / "m"
    proc = None
    try:
        server.start()
        proc = spawn(
            [sys.executable, "-m", "fersearch", "search", "--data", str(synthetic_dir), "--trials", "2",
             "--max-epochs", "4", "--reduction-factor", "10", "--name", "offline", "--mlruns", str(mlruns)],
            tmp_path / "search.log", env=env,
        )
        deadline = time.time() + 600
        while proc.poll() is None and epochs_reported(mlruns / "ray" / "offline") < 1 and time.time() < deadline:
            time.sleep(0.2)
        server.stop()
        output = wait_output(proc, 900)
        assert proc.returncode == 0, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
        warnings = [line for line in output.splitlines() if line.startswith("WARNING ")]
        assert warnings and all("MLflow" in line for line in warnings), warnings[:5]
        assert "trials 2: completed" in output
        assert "fersearch sync --model cnn --search offline" in output, output[-2000:]

        server.start()  # the same port and store, as a restarted team server
        sync = _run(["sync", "--search", "offline", "--mlruns", str(mlruns)], env)
        assert sync.returncode == 0, sync.stdout[-2000:] + sync.stderr[-3000:]
        assert "2 trials in the Ray results" in sync.stdout and "recorded on the parent run" in sync.stdout, sync.stdout
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("cnn").experiment_id
        (parent,) = [r for r in client.search_runs([experiment]) if r.info.run_name == "offline"]
        assert parent.info.status == "FINISHED" and parent.data.tags[STATUS_TAG] == "finished"
        assert BEST_TRIAL_TAG in parent.data.tags and any(a.path == "best" for a in client.list_artifacts(parent.info.run_id))
        children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        for run in children:
            (trial_dir,) = (mlruns / "ray" / "offline").glob(f"train_trial_{run.data.tags[TRIAL_TAG]}_*")
            rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
            epochs = [row[M.EPOCH] for row in rows if M.VAL_ACCURACY in row]  # the epochs' own reports
            reports = [m.step for m in client.get_metric_history(run.info.run_id, M.JUDGE_METRIC)]
            assert sorted(reports) == [row[M.REPORT] for row in rows]  # and every report, once
            steps = [m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY)]
            assert sorted(steps) == epochs  # every epoch, once
        again = _run(["sync", "--search", "offline", "--mlruns", str(mlruns)], env)
        assert again.returncode == 0 and "0 MLflow run(s) brought up to date; the parent run was up to date" in again.stdout
    finally:
        end(proc)
        server.stop()


class ChildStatuses:
    """The statuses of a search's trial runs in MLflow so far (none before its state file
    exists); one client, so that polling keeps up with a fast trial."""

    def __init__(self, mlruns, experiment) -> None:
        self.mlruns, self.state_file = mlruns, experiment / "fersearch_search.json"
        self.client = self.filter = self.experiment_id = None

    def __call__(self) -> list[str]:
        if self.filter is None:
            if not self.state_file.exists():
                return []
            self.client = MlflowClient(tracking_uri=f"sqlite:///{self.mlruns / 'mlflow.db'}")
            experiment = self.client.get_experiment_by_name("cnn")
            if experiment is None:
                return []
            parent = json.loads(self.state_file.read_text())["parent_run_id"]
            self.experiment_id, self.filter = experiment.experiment_id, f"tags.`mlflow.parentRunId` = '{parent}'"
        return [r.info.status for r in self.client.search_runs([self.experiment_id], filter_string=self.filter)]


def test_a_driver_killed_with_kill_9_resumes_with_nothing_lost_or_repeated(synthetic_dir, tmp_path):
    """kill -9 of the search's driver once a trial has finished and another is training; then
    --resume: the finished trial is kept once in Ray, Optuna and MLflow, the cut one continues
    from its checkpoint, the same parent run ends FINISHED and no run is left RUNNING."""
    import optuna
    from ray.tune import ExperimentAnalysis

    from fersearch.searcher import latest_records
    from fersearch.tracking import POINT_TAG, STATUS_TAG, TRIAL_TAG

    mlruns = tmp_path / "m"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    search = [sys.executable, "-m", "fersearch", "search", "--model", "cnn", "--mlruns", str(mlruns)]
    proc = spawn(
        [*search, "--data", str(synthetic_dir), "--trials", "4", "--max-epochs", "4", "--reduction-factor", "10",
         "--cpus-per-trial", "2", "--name", "killed"],
        tmp_path / "search.log", env=env,
    )
    experiment = mlruns / "ray" / "killed"
    child_statuses = ChildStatuses(mlruns, experiment)
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            rows = trial_results(experiment).values()
            # A trial trained all 4 epochs and another is training (Ray's result files are
            # written before MLflow hears of a trial: wait for both).
            if any(r and r[-1].get(M.EPOCH) == 4 for r in rows) and "RUNNING" in child_statuses():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        output = wait_output(proc, 120)
    finally:
        end(proc)
    assert proc.returncode == -signal.SIGKILL, "the search ended before it was killed:\n" + output[-3000:]
    state = json.loads((experiment / "fersearch_search.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("cnn").experiment_id
    children = f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'"
    before = {r.data.tags[TRIAL_TAG]: r for r in client.search_runs([experiment_id], filter_string=children)}
    done_before = {trial: sorted(m.step for m in client.get_metric_history(r.info.run_id, M.VAL_ACCURACY))
                   for trial, r in before.items() if r.data.tags.get(STATUS_TAG) == "completed"}
    assert done_before and any(r.info.status == "RUNNING" for r in before.values())

    resumed = subprocess.run([*search, "--resume", "killed"], capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "trials 4: completed" in resumed.stdout and "failed 0" in resumed.stdout, resumed.stdout[-3000:]

    # One parent run, the same one, FINISHED; no run RUNNING.
    parents = client.search_runs([experiment_id], filter_string="attributes.run_name = 'killed'")
    assert [p.info.run_id for p in parents] == [state["parent_run_id"]] and parents[0].info.status == "FINISHED"
    runs = client.search_runs([experiment_id], filter_string=children)
    assert all(r.info.status != "RUNNING" for r in runs)
    # Ray's results: 4 trials, each once, each with one FINISHED run that logged every epoch once.
    trials = [t.trial_id for t in ExperimentAnalysis(str(experiment)).trials]
    assert len(trials) == 4 == len(set(trials))
    finished = {r.data.tags[TRIAL_TAG]: r for r in runs if r.info.status == "FINISHED"}
    assert set(finished) == set(trials)
    for trial, run in finished.items():
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY))
        assert steps == list(range(1, len(steps) + 1)), (trial, steps)
        if trial in done_before:
            assert steps == done_before[trial]  # finished before the kill: untouched
    # Anything else is a trial asked for after Ray's last saved state: closed as unfinished.
    assert all(r.data.tags.get(STATUS_TAG) == "unfinished" for r in runs if r.data.tags[TRIAL_TAG] not in finished)
    # Optuna: each trial it was told of once (both known points lie outside the space), none RUNNING.
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{mlruns / 'optuna.db'}")
    told = [r for r in finished.values() if not r.data.tags.get(POINT_TAG)]
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in study.trials]
    states = [t.state for t in latest_records(study)]  # a promoted trial's latest record stands for it
    assert len([s for s in states if s != optuna.trial.TrialState.FAIL]) == len(told)
