"""Writing results safely: nothing half-written is ever left where a reader looks.

`atomic_write` writes one file through a temp file in the same folder, then renames it;
`staged_dir` builds a whole folder beside its destination and renames it into place only when
everything inside was written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fersearch.errors import FersearchError


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it becomes `out` (which must be empty)."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FersearchError(f"{out} already exists and is not empty; refusing to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise FersearchError(f"cannot write to {out.parent} ({exc.strerror})") from None
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
