"""Beyond the local store (issue 13): a real `mlflow server` on loopback, as a team runs one.

The server gets a sqlite backend and an artifacts destination in a temp folder; a search logs
to it through MLFLOW_TRACKING_URI, and export and report read from it.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from mlflow.tracking import MlflowClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback needs no proxy
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with opener.open(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(1)
    raise AssertionError(f"mlflow server at {url} did not answer /health in {seconds:.0f} s")


def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "fersearch", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_search_export_and_report_against_an_mlflow_server(synthetic_dir, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )
    try:
        _wait_for_health(url, server)
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
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
