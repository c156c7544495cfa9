"""Load an optimised BLAS under MLX on Linux.

The Linux `mlx[cpu]` wheels link a vendored *reference* BLAS (~30x slower sgemm than OpenBLAS).
Python opens extension modules with RTLD_NOW, so libmlx binds its BLAS symbols the moment it is
imported; a library opened earlier with RTLD_GLOBAL sits in the global scope, which the dynamic
linker searches first, and wins. Hence `ensure_blas()` must run before the first `import mlx`.

Search order: $REAP_STREAM_BLAS (a path, or "none" to disable), an OpenBLAS already in the process
(LD_PRELOAD), the system OpenBLAS (Debian/Ubuntu libopenblas0-pthread), MKL's libmkl_rt (pip `mkl`).
Thread count: OpenBLAS reads OPENBLAS_NUM_THREADS (then OMP_NUM_THREADS) when it is loaded; MKL
reads MKL_NUM_THREADS. Results agree with the reference BLAS to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BadInput

ENV_VAR = "REAP_STREAM_BLAS"
INSTALL_HINT = "apt-get install libopenblas0-pthread"
_DISABLE = ("none", "off", "0", "false", "no")

# Where distributions put OpenBLAS, relative to a library directory (pthread build first: MLX
# runs its own threads, and the OpenMP build would fight them for cores).
_OPENBLAS_NAMES = (
    "openblas-pthread/libblas.so.3",
    "openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
    "openblas-openmp/libblas.so.3",
    "openblas-openmp/libopenblas.so.0",
    "libopenblasp-r*.so",
    "libopenblas.so",
)
_MKL_NAMES = ("libmkl_rt.so.2", "libmkl_rt.so.1", "libmkl_rt.so")

_state: dict | None = None
# the loaded BLAS's process-wide thread count: (getter, setter) symbol names per kind
_THREAD_SYMBOLS = {"openblas": ("openblas_get_num_threads", "openblas_set_num_threads"),
                   "mkl": ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads")}
_thread_controls: tuple | None = None


def _lib_dirs() -> list[Path]:
    arch = f"{platform.machine()}-linux-gnu"
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/usr/lib", "/usr/local/lib",
            "/opt/OpenBLAS/lib"]
    return [Path(d) for d in dirs]


def openblas_candidates() -> list[Path]:
    """System OpenBLAS libraries that exist, in preference order."""
    found: list[Path] = []
    for d in _lib_dirs():
        for name in _OPENBLAS_NAMES:
            found += [Path(p) for p in sorted(glob.glob(str(d / name)))]
    lib = ctypes.util.find_library("openblas")
    if lib:
        found.append(Path(lib))
    return _unique(found)


def mkl_candidates() -> list[Path]:
    """MKL single dynamic libraries that exist: the active environment's lib/ first."""
    dirs = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib", *_lib_dirs()]
    found = [d / n for d in dirs for n in _MKL_NAMES if (d / n).exists()]
    lib = ctypes.util.find_library("mkl_rt")
    if lib:
        found.append(Path(lib))
    return _unique(found)


def _unique(paths: list[Path]) -> list[Path]:
    out, seen = [], set()
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen and (p.exists() or not p.is_absolute()):
            seen.add(key)
            out.append(p)
    return out


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_sgemm_provider() -> str | None:
    """Path of the library that gives `cblas_sgemm` in the global symbol scope (what libmlx binds
    to when it is imported), or None when no library there has it."""
    try:
        libc = ctypes.CDLL(None)
        addr = ctypes.cast(libc.cblas_sgemm, ctypes.c_void_p).value
        dladdr = libc.dladdr
    except (AttributeError, OSError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(addr, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _describe(lib: ctypes.CDLL) -> dict:
    """Kind, version string and thread count read from a loaded BLAS."""
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        return {"kind": "openblas", "version": lib.openblas_get_config().decode(),
                "threads": int(lib.openblas_get_num_threads()), "threads_env": "OPENBLAS_NUM_THREADS"}
    if hasattr(lib, "MKL_Get_Max_Threads"):
        buf = ctypes.create_string_buffer(256)
        if hasattr(lib, "MKL_Get_Version_String"):
            lib.MKL_Get_Version_String(buf, len(buf))
        return {"kind": "mkl", "version": buf.value.decode().strip(),
                "threads": int(lib.MKL_Get_Max_Threads()), "threads_env": "MKL_NUM_THREADS"}
    return {"kind": "unknown", "version": None, "threads": None, "threads_env": None}


def _load(path: Path | str, source: str) -> dict:
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    if not hasattr(lib, "cblas_sgemm"):
        raise OSError(f"{path} has no cblas_sgemm (not a CBLAS library)")
    return {"state": "loaded", "source": source, "path": os.path.realpath(path), **_describe(lib)}


def _warn(line: str) -> None:
    sys.stderr.write(f"reap-stream: warning: {line}\n")
    sys.stderr.flush()


def _search(env: str) -> dict:
    if env.lower() in _DISABLE:
        return {"state": "disabled", "source": "env", "kind": "reference", "path": None}
    if env and env.lower() != "auto":
        try:
            return _load(env, "env")
        except OSError as e:
            raise BadInput(ENV_VAR, f"cannot load BLAS {env!r}: {e}") from None
    provider = global_sgemm_provider()
    if provider:  # LD_PRELOAD or the embedding program loaded one already
        return {**_load(provider, "preloaded"), "state": "preloaded"}
    failures = []
    for source, paths in (("system", openblas_candidates()), ("mkl", mkl_candidates())):
        for path in paths:
            try:
                return _load(path, source)
            except OSError as e:
                failures.append(f"{path}: {e}")
    return {"state": "missing", "source": None, "kind": "reference", "path": None,
            "tried": failures}


def ensure_blas() -> dict:
    """Find and load an optimised BLAS into the global symbol scope, once per process.

    Call before the first `import mlx`. Returns `blas_info()`. Prints one warning line on stderr
    when MLX is left on its reference BLAS (none found, or mlx imported first); never raises
    except for an explicit $REAP_STREAM_BLAS path that cannot be loaded (BadInput).
    """
    global _state
    if _state is not None:
        return blas_info()
    env = os.environ.get(ENV_VAR, "").strip()
    if not sys.platform.startswith("linux"):
        # macOS MLX uses Accelerate; other platforms are not ours to patch.
        _state = {"state": "native", "source": None, "kind": "platform", "path": None}
    elif "mlx.core" in sys.modules and env.lower() not in _DISABLE:
        provider = global_sgemm_provider()
        if provider is not None:  # LD_PRELOAD: MLX bound to it all the same
            _state = {**_load(provider, "preloaded"), "state": "preloaded"}
        else:
            _state = {"state": "too-late", "source": None, "kind": "reference", "path": None}
            _warn("mlx was imported before reap_stream.blas.ensure_blas(); "
                  "MLX keeps its slow reference BLAS in this process")
    else:
        _state = _search(env)
        if _state["state"] == "missing":
            _warn(f"no optimised BLAS found; MLX falls back to its slow reference BLAS "
                  f"(install one: {INSTALL_HINT}, or set {ENV_VAR}=/path/to/libopenblas.so)")
    return blas_info()


def mlx_core():
    """`mlx.core`, imported after the optimised BLAS is in place (ensure_blas)."""
    ensure_blas()
    import mlx.core as mx
    return mx


def blas_info() -> dict:
    """The BLAS in use, JSON-able: state (loaded, preloaded, disabled, missing, too-late, native,
    not-checked), kind (openblas, mkl, unknown, reference, platform), path, version, threads."""
    if _state is None:
        return {"state": "not-checked", "kind": None, "path": None}
    return dict(_state)


def _controls() -> tuple | None:
    """(get, set) of the loaded BLAS's thread count, or None where it cannot be controlled."""
    global _thread_controls
    state = _state or {}
    names = _THREAD_SYMBOLS.get(state.get("kind"))
    if names is None or not state.get("path"):
        return None
    if _thread_controls is None:
        lib = ctypes.CDLL(state["path"])  # already loaded: the same handle
        _thread_controls = (getattr(lib, names[0]), getattr(lib, names[1]))
    return _thread_controls


def lane_threads() -> int | None:
    """1 where two lanes should each call the BLAS single-threaded, else None (keep the count).

    Single-threaded calls from two threads run side by side; OpenBLAS runs multi-threaded GEMMs
    of different callers one at a time, so with more than 2 threads configured, halving the count
    per lane only slows the matmuls (measured on 16 cores: two lanes at half the threads took
    1.4-1.8x as long as one lane at all of them). Hence only at 2 threads or fewer.
    """
    total = total_threads()
    return 1 if total and total <= 2 else None


def total_threads() -> int | None:
    """The BLAS thread count the process was configured with (OPENBLAS_NUM_THREADS etc.)."""
    total = (_state or {}).get("threads")
    return int(total) if total else None


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block (MLX is lazy: evaluate inside it) with the BLAS using n threads.

    The count is process-wide, so only change it where no other thread is inside the BLAS. A
    no-op when n is None or the BLAS's count cannot be set (reference BLAS, macOS, Metal).
    Callers keep results independent of the count: they use the same count for a computation in
    every mode (families.experts.run_experts), or probe that it gives the same bits (runner.lanes.SplitCheck).
    """
    controls = _controls() if n else None
    if controls is None:
        yield
        return
    get, set_ = controls
    before = int(get())
    set_(int(n))
    try:
        yield
    finally:
        set_(before)
