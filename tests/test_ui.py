import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from mlflow.tracking import MlflowClient

from fersearch.tracking import get_experiment_id, tracking_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_on_localhost(tmp_path):
    mlruns = tmp_path / "mlruns"
    mlruns.mkdir()
    uri = tracking_uri(mlruns)
    experiment_id = get_experiment_id(uri, "cnn", mlruns)
    MlflowClient(uri).create_run(experiment_id, run_name="a-search")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "fersearch", "ui", "--mlruns", str(mlruns), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        body = None
        deadline = time.time() + 90
        while time.time() < deadline and body is None:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cnn"
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(1)
        assert body is not None, "MLflow UI did not answer within 90 s"
        assert body["experiment"]["experiment_id"] == experiment_id
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
