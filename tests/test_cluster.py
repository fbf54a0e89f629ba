"""A real two-node Ray cluster on loopback (issue 13), started the way README's "On a Ray cluster"
section says, with token authentication on and an MLflow tracking server: a search runs on
both nodes, the second node is stopped mid-search, and its trial moves to the head.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from fersearch import metrics as M
from fersearch.ray_runtime import is_loopback
from tests.helpers import (
    MlflowServer,
    cmdline,
    free_port,
    listening,
    output,
    process_tree,
    spawn,
    stop_group,
    trial_results,
    wait_output,
)

pytestmark = pytest.mark.slow

WORKER_NODE = Path(__file__).with_name("ray_worker_node.py")


def _kill_leftovers(marker: str) -> None:
    """Any process of the test cluster still alive (its command line names the cluster's temp dir)."""
    for process in psutil.process_iter():
        if marker in cmdline(process.pid):
            try:
                process.kill()
            except psutil.Error:
                pass


def test_a_search_on_a_two_node_cluster_survives_losing_a_node(synthetic_dir, tmp_path):
    from fersearch.tracking import NODE_TAG, NODES_TAG, RETRIES_TAG, STATUS_TAG, TRIAL_TAG

    ray = str(Path(sys.executable).with_name("ray"))
    home = tmp_path / "home"  # the token lives in ~/.ray: a private home keeps the user's untouched
    home.mkdir()
    temp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")  # README: token authentication on every node
    head = worker = search = None
    server = MlflowServer(tmp_path / "mlflow", env)
    seen: dict[tuple[str, int], int] = {}  # (address, port) listened on -> the process
    raylets: dict[str, set[int]] = {}  # role -> raylet processes seen in its process tree
    try:
        # README, step by step: the token, the head, a second node, the tracking server.
        subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
        assert (home / ".ray" / "auth_token").is_file()
        head = spawn(
            [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
             "--include-dashboard=false", f"--temp-dir={temp}", "--block"], tmp_path / "head.log",
            env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, start_new_session=True,
        )
        worker = spawn(
            [sys.executable, str(WORKER_NODE), address, "1"], tmp_path / "worker.log",
            env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, start_new_session=True,
        )
        deadline = time.time() + 300  # "node <id>" once the node has joined
        while not (joined := [x for x in output(worker).splitlines() if x.startswith("node ")]):
            assert worker.poll() is None and time.time() < deadline, "the second node did not join:\n" + output(worker)[-3000:]
            time.sleep(0.2)
        worker_node = joined[0].split()[1]
        server.start()
        mlruns = tmp_path / "shared"  # the Ray storage and checkpoints: a path both nodes see
        search = spawn(
            [sys.executable, "-m", "fersearch", "search", "--model", "cnn", "--data", str(synthetic_dir),
             "--address", address, "--mlruns", str(mlruns), "--cpus-per-trial", "1", "--trials", "4",
             "--max-epochs", "6", "--reduction-factor", "10", "--name", "cluster"], tmp_path / "search.log",
            env={**env, "MLFLOW_TRACKING_URI": server.url}, start_new_session=True,
        )
        # Stop the second node while a trial trains there (it has reported an epoch, not its last).
        stopped_trial = None
        deadline = time.time() + 600
        while search.poll() is None and time.time() < deadline:
            for role, proc in (("head", head), ("worker", worker), ("driver", search)):
                tree = process_tree(proc.pid) if proc.poll() is None else set()
                raylets.setdefault(role, set()).update(p for p in tree if cmdline(p).split(" ", 1)[0].endswith("/raylet"))
                for address, port, holder in listening(tree):
                    seen[(address, port)] = holder
            if stopped_trial is None:
                for trial, rows in trial_results(mlruns / "ray" / "cluster").items():
                    last = rows[-1] if rows else {}
                    if last.get(M.NODE) == worker_node and not last.get(M.DONE) and last.get(M.EPOCH, 0) < 6:
                        stopped_trial = trial
                        stop_group(worker)
                        break
            time.sleep(0.2)
        printed = wait_output(search, 600)
        assert stopped_trial is not None, "no trial ran on the second node before the search ended:\n" + printed[-3000:]
        assert search.returncode == 0, printed[-4000:]
        assert "trials 4: completed" in printed and "failed 0" in printed, printed[-3000:]
        assert "stopped unexpectedly" in printed, printed[-3000:]  # the lost node's trial was restarted

        # Two nodes: a raylet of its own in each node's processes.
        assert raylets["head"] and raylets["worker"] and raylets["head"].isdisjoint(raylets["worker"]), raylets

        # Every trial's MLflow run names its node; trials ran on both; the moved one shows both.
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("cnn").experiment_id
        runs = [r for r in client.search_runs([experiment]) if TRIAL_TAG in r.data.tags]
        assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
        assert all(r.data.tags.get(NODE_TAG) for r in runs)
        nodes = {n for r in runs for n in r.data.tags[NODES_TAG].split(",")}
        assert len(nodes) == 2 and worker_node in nodes
        (moved,) = [r for r in runs if r.data.tags[TRIAL_TAG] in stopped_trial]
        head_node = (nodes - {worker_node}).pop()
        # (a trial paused at a rung and promoted may have run on either node before)
        assert moved.data.tags[NODES_TAG].split(",")[-2:] == [worker_node, head_node], moved.data.tags
        assert moved.data.tags[NODE_TAG] == head_node and moved.data.tags[RETRIES_TAG] == "1"
        assert moved.data.tags[STATUS_TAG] in ("completed", "stopped_early")
        steps = [m.step for m in client.get_metric_history(moved.info.run_id, M.VAL_ACCURACY)]
        assert len(steps) == len(set(steps))  # continued from its checkpoint: no epoch logged twice

        # No dashboard, and nothing of the cluster, the driver or the workers listened beyond loopback.
        assert len(seen) >= 6, seen  # GCS, two raylets' servers, the driver, workers at least
        outside = {where: holder for where, holder in seen.items() if not is_loopback(where[0])}
        assert outside == {}, {where: cmdline(holder)[:120] for where, holder in outside.items()}
        assert 8265 not in {port for _, port in seen}
    finally:
        stop_group(search)
        stop_group(worker)
        stop_group(head, seconds=90)
        server.stop()
        _kill_leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)
