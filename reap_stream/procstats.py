"""Peak memory of this process, measured the same way by the CLI summaries, tests and benchmarks."""
from __future__ import annotations

import atexit
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


if __name__ == "__main__":  # python -m reap_stream.procstats REPORT MODULE|SCRIPT.py ARGS...
    run_reporting_peak(*sys.argv[1:])


_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Make glibc give every allocation of `threshold` bytes or more its own mapping, returned to
    the system when freed. By default glibc raises that threshold (up to 32 MiB) each time such a
    block is freed, after which the arrays of a layer (numpy's and MLX's, made on several threads)
    come from heaps that keep their freed memory: the RSS then grew ~200 MiB a layer on
    Qwen3-30B-shaped layers (docs/memory.md). A no-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, int(threshold))
