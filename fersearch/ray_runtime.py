"""The Ray runtime of a search: joined or started (a local one on loopback only), and where the
dependencies' log records go while a search runs."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from fersearch.config import LOOPBACK_HOSTS
from fersearch.errors import FersearchError, one_line

log = logging.getLogger(__name__)


def init_ray(address: str | None) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    if address:
        check_reachable(address)  # given explicitly: checked even when this process has joined one
    if ray.is_initialized():
        return
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        check_reachable(address)
    if not address or on_loopback(address):
        ray_on_loopback()
    else:
        log.warning(
            "joining the Ray cluster at %s: this search's driver listens on this machine's network "
            "address, as every node of the cluster does (README: On a Ray cluster, token authentication)",
            address,
        )
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except AuthenticationError:
        raise FersearchError(
            f"the Ray cluster at {address} refused this search's authentication token: set "
            "RAY_AUTH_MODE=token and give it the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH "
            "or RAY_AUTH_TOKEN; README: On a Ray cluster)"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise FersearchError(f"cannot start or reach {where} ({one_line(exc)})") from None
    if not address or on_loopback(address):
        # ray_on_loopback patches a private Ray constant: a Ray release that renamed it would
        # silently expose the servers. What Ray started is checked, not assumed.
        try:
            check_loopback_only(ray.util.get_node_ip_address())
        except FersearchError:
            ray.shutdown()
            raise


CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A host:port address (or ray://host:port) must accept a TCP connection within `timeout_s`:
    ray.init would retry a dead one for minutes. `auto` and `local` are Ray's own words."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FersearchError(f"--address {address!r} is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise FersearchError(f"no Ray cluster at {address} ({exc.strerror or exc})") from None


def check_trial_resources(cpus: float, gpus: float) -> None:
    """A trial must fit on the cluster: Ray would wait forever for a GPU that is not there."""
    import ray

    total = ray.cluster_resources()
    for name, asked, option in (("CPU", cpus, "--cpus-per-trial"), ("GPU", gpus, "--gpus-per-trial")):
        have = float(total.get(name, 0))
        if asked > have:
            raise FersearchError(
                f"{option} {asked:g} asks for more {name}s than the Ray cluster has ({have:g}): no trial could start")


def on_loopback(address: str) -> bool:
    """Whether a Ray address (host:port, [v6]:port or ray://host:port) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host.strip("[]") in LOOPBACK_HOSTS


def is_loopback(ip: str) -> bool:
    """Whether a socket's address is this machine's loopback (127.0.0.0/8, ::1, and IPv4-mapped
    ::ffff:127.0.0.1, as gRPC's sockets show it)."""
    import ipaddress

    try:
        parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip == "localhost"
    mapped = getattr(parsed, "ipv4_mapped", None)
    return (mapped or parsed).is_loopback


def check_loopback_only(node_ip: str, root=None) -> None:
    """A local search's Ray node must have a loopback address, and no process this one started
    (Ray's GCS, raylet, agents, workers) may listen beyond loopback; else one line. `root`: the
    process whose tree is checked (default: this one)."""
    import psutil

    loopback = is_loopback
    if not loopback(node_ip):
        raise FersearchError(
            f"the local Ray runtime took the network address {node_ip}, not loopback; stopped so that "
            "nothing of this search is reachable from the network (this Ray version is newer than fersearch knows)"
        )
    root = root or psutil.Process()
    outside = []
    for process in [root, *root.children(recursive=True)]:
        try:
            listening = [c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # gone already, or not ours to read
        outside += [f"{name} (pid {process.pid}) on {addr.ip}:{addr.port}" for addr in listening if not loopback(addr.ip)]
    if outside:
        raise FersearchError(
            f"processes of the local Ray runtime listen beyond loopback: {', '.join(outside[:4])}; stopped so "
            "that nothing of this search is reachable from the network (this Ray version is newer than fersearch knows)"
        )


def ray_on_loopback() -> None:
    """Make Ray keep 127.0.0.1 as this machine's address, so every server binds to it.

    Ray binds its servers (GCS, raylet, object manager, workers) to the node's IP, and on Linux
    replaces a loopback address by the machine's network address: a local search (or a search
    on a cluster started on 127.0.0.1, as the cluster test does) would be reachable from the
    network, or could not reach its loopback-only cluster. Ray keeps the loopback address where
    clusters are off (its default on macOS and Windows); this switches that on, both in the
    environment (read when ray is imported, and by the processes Ray starts) and in the
    already-imported constant. A search on a networked cluster is left as Ray sets it up.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# Dependencies whose records below WARNING belong in the search's log file, not the terminal.
DEPENDENCY_LOGGERS = ("mlflow", "alembic", "optuna", "ray")
# Whose records, warnings included, go to the log file only: urllib3 warns of every retry of an
# MLflow call to a server that is down; the failed call itself is one fersearch warning.
# A fault inside Ray Tune's controller: its traceback is for the log file, the user gets one line.
# Ray Tune's results table warns of every trial cut before its first report (no result file to
# read); the search's own line says the trial was cut short.
FAULT_LOGGER = "fersearch.ray_fault"
FILE_ONLY_LOGGERS = ("urllib3.connectionpool", FAULT_LOGGER, "ray.tune.analysis.experiment_analysis")
LOG_FILE = "driver.log"  # beside the Ray results of the search


@contextlib.contextmanager
def dependency_log(path: Path) -> Iterator[None]:
    """While a search runs, its dependencies' INFO chatter (MLflow creating its tables, Optuna
    creating its study) goes to `path`; their warnings and errors still reach the terminal."""
    import mlflow  # noqa: F401 - importing them installs their terminal handlers, quieted below
    import optuna  # noqa: F401

    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    quieted = []
    for name in DEPENDENCY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                quieted.append((handler, handler.level))
                handler.setLevel(max(handler.level, logging.WARNING))
        logger.addHandler(to_file)
    propagated = {}
    for name in FILE_ONLY_LOGGERS:
        logger = logging.getLogger(name)
        propagated[name] = logger.propagate
        logger.propagate = False
        logger.addHandler(to_file)
    try:
        yield
    finally:
        for handler, level in quieted:
            handler.setLevel(level)
        for name in DEPENDENCY_LOGGERS + FILE_ONLY_LOGGERS:
            logging.getLogger(name).removeHandler(to_file)
        for name, value in propagated.items():
            logging.getLogger(name).propagate = value
        to_file.close()
