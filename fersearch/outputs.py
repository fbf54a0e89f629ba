"""Writing results safely: nothing half-written is ever left where a reader looks.

`atomic_write` writes one file through a temp file in the same folder, then renames it;
`staged_dir` builds a whole folder beside its destination and renames it into place only when
everything inside was written. Both leave the modes a plain `open`/`mkdir` would give (the
umask decides), not the private 0600/0700 of `tempfile`'s temp files: results are meant to
be read by a teammate or a cluster's other users.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fersearch.errors import FersearchError


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it
    (and restoring it at once), which another thread could race with."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_out_dir(
    out: str | Path, owned: Sequence[str] | None = None, overwrite: bool = False, what: str = "--out"
) -> Path:
    """`out` as an absolute folder path a command may write, checked before any work and without
    creating it (a failed run leaves no empty folder behind).

    It must not be a file, and the nearest existing folder on its path must be writable. With
    `owned` None the command writes a whole new folder (a bundle, a data layout): `out` must be
    absent or empty. Otherwise it writes the files named in `owned` into `out`, which must hold
    none of them unless `overwrite`.
    """
    if not str(out).strip():
        raise FersearchError(f"{what} is empty: give a folder path")  # `--out "$UNSET"` is not the current folder
    try:
        out = Path(out).expanduser().resolve()
        if out.exists() and not out.is_dir():
            raise FersearchError(f"{what} {out} is a file, not a folder")
        if owned is None and out.is_dir() and any(out.iterdir()):
            raise FersearchError(f"{out} already exists and is not empty; refusing to overwrite it")
    except OSError as exc:  # a name too long, a loop of links, no permission to look
        raise FersearchError(f"cannot use {what} {str(out)[:80]!r} ({exc.strerror or exc})") from None
    existing = out
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".probe-"):
            pass
    except OSError as exc:
        raise FersearchError(f"cannot write to {what} {out} ({exc.strerror or exc})") from None
    clash = [name for name in owned or () if (out / name).exists()]
    if clash and not overwrite:
        raise FersearchError(f"{out} already holds {', '.join(clash)}; pass --overwrite or pick another {what}")
    return out


def make_out_dir(out: Path, what: str = "--out") -> Path:
    """Create a checked output folder once the results are ready to be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FersearchError(f"cannot write to {what} {out} ({exc.strerror or exc})") from None
    return out


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock beside a sqlite database (`sqlite:///PATH`) for a block; no-op for
    any other URL. MLflow and Optuna create a new database's tables
    on first open: two processes doing that at once (two searches started together on one
    store) race, and one of them fails ("table ... already exists")."""
    from filelock import FileLock  # torch's own dependency: cross-platform file locks

    prefix = "sqlite:///"
    if not url.startswith(prefix):
        yield
        return
    lock = Path(url[len(prefix):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        yield


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it becomes `out` (which must be empty)."""
    out = check_out_dir(out, what="output folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(staging, 0o777 & ~_umask())
    except OSError as exc:
        raise FersearchError(f"cannot write to {out.parent} ({exc.strerror or exc})") from None
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
