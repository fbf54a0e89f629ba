import json
import os
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from fersearch.tracking import get_experiment_id, tracking_uri
from tests.helpers import free_port, output, spawn, wait_output

pytestmark = pytest.mark.slow  # an MLflow server process of its own


def test_ui_serves_the_store_on_localhost(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlruns = tmp_path / "mlruns"
    mlruns.mkdir()
    uri = tracking_uri(mlruns)
    experiment_id = get_experiment_id(uri, "cnn", mlruns)
    MlflowClient(uri).create_run(experiment_id, run_name="a-search")
    port = free_port()
    # A plain user environment: earlier tests in this process (Ray, MLflow) leave variables
    # behind that are not part of what `make ui` sees.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER") if k in os.environ}
    proc = spawn([sys.executable, "-m", "fersearch", "ui", "--mlruns", str(mlruns), "--port", str(port)],
                 tmp_path / "ui.log", env=env, start_new_session=True)
    try:
        # A direct opener: urllib caches its first opener with the proxies of that moment (the
        # offline-weights test points them at a closed port), and localhost needs none.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body, last_error = None, None
        deadline = time.time() + 120
        while time.time() < deadline and body is None:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cnn"
                with opener.open(url, timeout=10) as response:
                    body = json.loads(response.read())
            except OSError as exc:
                last_error = exc
                assert proc.poll() is None, output(proc)[-3000:]
                time.sleep(1)
        if body is None:
            os.killpg(proc.pid, 15)
            raise AssertionError(f"MLflow UI did not answer ({last_error!r}): {wait_output(proc, 30)[-3000:]}")
        assert body["experiment"]["experiment_id"] == experiment_id
        with opener.open(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
