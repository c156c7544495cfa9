"""Peak memory of this process, measured the same way by the CLI summaries, tests and benchmarks."""
from __future__ import annotations

import atexit
import functools
import json
import resource
import runpy
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """High-water RSS of this process.

    VmHWM belongs to the process image: unlike ru_maxrss it does not carry the parent's peak
    across fork + exec (a child of a 500 MB pytest would otherwise report 500 MB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io: rchar (bytes its reads returned, page cache included) and
    read_bytes (bytes fetched from storage); empty where there is no such file."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {k.strip(): int(v) for k, v in pairs if k.strip() in ("rchar", "read_bytes")}


def run_reporting_peak(report: str, target: str, *args: str) -> None:
    """Run a module (`python -m target`) or a script (target ending in .py) with `args` in this
    process; at exit write {"peak_rss": bytes, "rchar": ..., "read_bytes": ...} to `report`."""
    atexit.register(lambda: Path(report).write_text(json.dumps({"peak_rss": peak_rss_bytes(), **io_counters()})))
    sys.argv = [target, *args]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _glibc():
    """glibc's malloc controls (mallopt, malloc_trim), or None off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None


# allocations this large get their own mapping in a layer-by-layer run (return_freed_memory)
MMAP_THRESHOLD = 16 << 20


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> None:
    """Fix glibc's allocator for a layer-by-layer run: an allocation of `threshold` bytes or more
    (a layer's large tensors, a chunk's score matrices) gets its own mapping, returned when freed;
    smaller ones (an expert's float32 upcast, its rows' activations) come from heaps that keep
    freed blocks for reuse until `release_freed_memory()` hands them back at a layer's end.

    glibc's defaults raise the mmap threshold as blocks are freed and trim heaps on every free (the
    RSS grew ~200 MiB a layer on Qwen3-30B shapes); a low fixed threshold made every expert's
    buffers fresh mappings, whose page faults took a third of collect's time (docs/memory.md).
    A no-op off glibc."""
    controls = _glibc()
    if controls is not None:
        mallopt, _ = controls
        mallopt(_M_MMAP_THRESHOLD, int(threshold))
        mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)   # (a C int) trimmed once a layer instead


def release_freed_memory() -> None:
    """Hand the heaps' freed memory back to the system (a layer's end). A no-op off glibc."""
    controls = _glibc()
    if controls is not None:
        controls[1](0)


if __name__ == "__main__":  # python -m reap_stream.procstats REPORT MODULE|SCRIPT.py ARGS...
    run_reporting_peak(*sys.argv[1:])
