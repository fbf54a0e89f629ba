"""Optional C kernels (`csrc/cpu_kernels.c`), compiled once per machine at first use.

`library()` returns the loaded library, or None when it cannot be had: no C compiler, a failed
build, a platform without `ctypes` loading, an OpenMP runtime other than PyTorch's, or
`FERSEARCH_NATIVE=0`. Every caller keeps a PyTorch implementation of the same computation for
that case, so the kernels only ever make training faster, never possible. Each kernel splits
its work among `torch.get_num_threads()` threads of the OpenMP pool PyTorch already runs (see
the source). Callers go through `call`, which turns a kernel's error code (a shape it does not
take, a failed allocation) into a Python exception.

`FERSEARCH_NATIVE_SANITIZE=1` builds the kernels with AddressSanitizer and UBSan, for the CI
step that runs the kernel tests under them (`make sanitize`).

The build takes under a second with gcc. The shared object is cached under
`$FERSEARCH_CACHE/native/`, keyed by the source, the flags and the CPU (it is built with
`-march=native`), and written atomically, so concurrent trials never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch  # noqa: F401  (loaded first: its OpenMP runtime is the one the kernels must resolve to)

from fersearch.data import default_cache_dir
from fersearch.outputs import atomic_write

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
# Tried in order: compilers without OpenMP (Apple's clang) or without -march=native still build
# the kernels, single-threaded or generic.
OPTIONAL_FLAGS = [["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []]

_P, _I, _D, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
# Argument types of each exported function, in the order of its C signature. All return int:
# a kernel returns one of ERRORS' keys (0 is success), a `_supported` query 1 or 0.
SIGNATURES: dict[str, list] = {
    "bnrp_forward": [_P, _I, _I, _I, _I, _P, _P, _D, _P, _P, _P, _P, _P, _P, _T],
    "bnrp_backward": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _T],
    "conv1_supported": [_I, _I],
    "conv1_forward": [_P, _P, _P, _I, _I, _I, _I, _I, _P, _T],
    "conv1_backward": [_P, _P, _I, _I, _I, _I, _I, _P, _P, _T],
    "conv_grad_input_supported": [_I, _I],
    "conv_grad_input": [_P, _P, _I, _I, _I, _I, _I, _I, _P, _T],
}

# The kernels' error codes (FS_* in the source) and the exception each becomes.
ERRORS: dict[int, tuple[type[Exception], str]] = {
    1: (MemoryError, "out of memory for its scratch buffers"),
    2: (ValueError, "does not take this shape"),
}

_state: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("FERSEARCH_NATIVE", "1") != "0"


def sanitized() -> bool:
    return os.environ.get("FERSEARCH_NATIVE_SANITIZE", "0") == "1"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (logged once) when unavailable."""
    if not enabled():
        return None
    if "lib" not in _state:
        try:
            before = openmp_runtimes()
            lib = _load_or_rebuild(_build())
            foreign = foreign_openmp(before, openmp_runtimes())
            if foreign:
                raise OSError(f"they resolved OpenMP to {', '.join(sorted(foreign))}, not PyTorch's runtime")
            _state["lib"] = lib
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            log.warning("C kernels unavailable (%s); using the PyTorch implementation", exc)
            _state["lib"] = None
    return _state["lib"]


def call(lib: ctypes.CDLL, name: str, *args) -> None:
    """Runs kernel `name`; a non-zero result becomes the exception ERRORS gives for it."""
    status = getattr(lib, name)(*args)
    if status:
        kind, what = ERRORS.get(status, (RuntimeError, f"failed with code {status}"))
        raise kind(f"C kernel {name} {what}")


OPENMP_RUNTIME = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.(so|dylib)[^/]*$")


def openmp_runtimes() -> set[str] | None:
    """Files of the OpenMP runtimes mapped into this process; None where that cannot be read."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return {line.split(None, 5)[5].strip() for line in f if OPENMP_RUNTIME.search(line.strip())}
    except (OSError, IndexError):
        return None


def foreign_openmp(before: set[str] | None, after: set[str] | None) -> set[str]:
    """OpenMP runtimes that loading the kernels brought in: any is not the one PyTorch runs (a
    second thread pool would compete with PyTorch's spinning threads). Empty where unknown."""
    if before is None or after is None:
        return set()
    return after - before


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler found (set CC)")
    return cc


def _cpu_id() -> str:
    """What -march=native depends on: the machine type and, on Linux, the CPU's feature flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            ident += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return ident


def _build() -> Path:
    """The cached build for this source, flags and CPU; compiled first if there is none.

    The compiler is not part of the key: any compiler's build of the same source and flags
    for this CPU serves, and a cached build loads on a machine with no compiler at all.
    """
    source = SOURCE.read_bytes()
    flags = " ".join(_flags() + [f for group in OPTIONAL_FLAGS for f in group])
    key = hashlib.sha256(b"\0".join([source, flags.encode(), _cpu_id().encode()]))
    target = default_cache_dir() / "native" / f"{SOURCE.stem}-{key.hexdigest()[:16]}{_suffix()}"
    if target.is_file():
        return target
    cc = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling C kernels into %s (once per machine)", target)
    return atomic_write(target, lambda path: compile_library(path, cc))


def compile_library(path: Path, cc: str, flag_sets: list[list[str]] = OPTIONAL_FLAGS) -> None:
    """Compile SOURCE into `path` with FLAGS plus the first of `flag_sets` the compiler takes."""
    for extra in flag_sets:
        command = [cc, *_flags(), *extra, "-o", str(path), str(SOURCE), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            return
    last = (result.stderr.strip().splitlines() or ["no message"])[-1]
    raise OSError(f"{cc} could not build {SOURCE.name}: {last}")


def _flags() -> list[str]:
    return FLAGS + SANITIZE_FLAGS if sanitized() else FLAGS


def _suffix() -> str:
    return ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"


def _load_or_rebuild(path: Path) -> ctypes.CDLL:
    """Load the cached build; a damaged one (a truncated file, say) is deleted and built again."""
    try:
        return _load(path)
    except (OSError, AttributeError) as exc:
        log.warning("cached C kernels %s unusable (%s); rebuilding them", path, exc)
        path.unlink(missing_ok=True)
        return _load(_build())


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        func = getattr(lib, name)
        func.argtypes, func.restype = argtypes, ctypes.c_int
    return lib
