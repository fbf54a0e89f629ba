"""Where fersearch's servers (`fersearch ui`, `fersearch app`) listen: checked before they start."""

from __future__ import annotations

import socket

from fersearch.config import LOOPBACK_HOSTS
from fersearch.errors import FersearchError


def listen_warning(host: str) -> str | None:
    """What to tell the user before serving on `host`: None on loopback."""
    if host in LOOPBACK_HOSTS:
        return None
    return (f"--host {host} makes this server reachable from the network, "
            "to anyone who can reach this machine; it has no authentication")


def check_listen(host: str, port: int) -> None:
    """A port in 1..65535 that `host` can bind now, or one line saying why not."""
    if not 1 <= port <= 65535:
        raise FersearchError(f"--port {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FersearchError(f"--host {host} cannot be resolved ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise FersearchError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
