"""What several test modules share: free ports, listening sockets and process trees (psutil), and a
real `mlflow server` that a test can stop and start again on the same port and store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(pids: set[int] | None = None) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by `pids` (psutil), or by
    any process when `pids` is None."""
    if pids is None:
        return {(c.laddr.ip, c.laddr.port, c.pid or 0) for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}
    found = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found |= {(c.laddr.ip, c.laddr.port, pid) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def process_tree(root: int) -> set[int]:
    """`root` and all its descendants (none when it has ended)."""
    try:
        return {root, *(child.pid for child in psutil.Process(root).children(recursive=True))}
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return set()


def trial_results(experiment: Path) -> dict[str, list[dict]]:
    """trial folder -> the results Ray's driver recorded so far (each appended to the trial's
    result.json with its checkpoint registered). Read from Ray's folder, not MLflow: a second
    client of a store being created can race its migrations."""
    from fersearch.record import read_results

    return {file.parent.name: read_results(file) for file in experiment.glob("*/result.json")}


def epochs_reported(experiment: Path) -> int:
    """The most whole epochs (reports with a checkpoint) any trial of the search has recorded."""
    return max((sum(r.get("checkpoint_dir_name") is not None for r in rows) for rows in trial_results(experiment).values()),
               default=0)


def stop_group(proc: subprocess.Popen | None, seconds: float = 60) -> None:
    """SIGTERM to a process started in a session of its own (and its group), SIGKILL if it
    outlives `seconds`."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def spawn(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A child process whose output (stdout and stderr) goes to the file `log`: a pipe that no
    one reads while the test polls would block a chatty child (a server logging each request)."""
    with open(log, "w") as sink:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, **kwargs)
    proc.log = Path(log)
    return proc


def output(proc: subprocess.Popen) -> str:
    """What a `spawn`ed child has written so far."""
    return proc.log.read_text(errors="replace")


def wait_output(proc: subprocess.Popen, timeout: float) -> str:
    """Wait (at most `timeout` s) for a `spawn`ed child to end; its whole output."""
    proc.wait(timeout=timeout)
    return output(proc)


def end(proc: subprocess.Popen | None) -> None:
    """A test's child process, killed if it still runs, and reaped."""
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait()


def cmdline(pid: int) -> str:
    """A process's command line, words joined by spaces ("" when it has ended)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


class MlflowServer:
    """`mlflow server` on a loopback port: sqlite backend and artifacts destination in `folder`.
    `stop()` and `start()` again keep the port and the store, as a restarted team server does."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 180) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            self.folder / "server.log",
            env={**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback needs no proxy
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                with opener.open(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError("mlflow server exited:\n" + output(self.proc)[-3000:])
            time.sleep(1)
        raise AssertionError(f"mlflow server at {self.url} did not answer /health in {wait_s:.0f} s")

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None
