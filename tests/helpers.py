"""What several test modules share: free ports, the kernel's socket table, process trees, and a
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

# 127.0.0.1 as /proc/net/tcp{,6} write it (little-endian hex), IPv4 and IPv4-mapped IPv6.
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_sockets() -> dict[str, tuple[str, int]]:
    """inode -> (local address in /proc hex, port) of every TCP socket in LISTEN state."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                address, port = fields[1].rsplit(":", 1)
                found[fields[9]] = (address, int(port, 16))
    return found


def process_tree(root: int) -> set[int]:
    """`root` and all its descendants, from /proc/*/stat."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def socket_inodes(pids: set[int]) -> dict[str, int]:
    """inode -> pid of every socket the processes hold open."""
    inodes = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    return inodes


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
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
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
