"""`reap-stream doctor`: what this machine gives reap-stream (BLAS, MLX device, memory, versions)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time

import click

from ..blas import ENV_VAR, INSTALL_HINT, ensure_blas, lane_threads

_PACKAGES = ("mlx", "mlx-lm", "numpy", "safetensors", "gguf", "zarr", "datasets", "transformers", "tokenizers")
_PROBE_SHAPE = (4096, 256, 512)  # M, K, N of the float32 matmul probe


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _matmul_probe(repeats: int = 5) -> dict:
    """Median time of one float32 M×K @ K×N matmul through MLX (the BLAS actually in use)."""
    import mlx.core as mx

    m, k, n = _PROBE_SHAPE
    a = mx.random.normal((m, k), key=mx.random.key(0))
    b = mx.random.normal((k, n), key=mx.random.key(1))
    mx.eval(a, b)
    mx.eval(a @ b)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    ms = sorted(times)[len(times) // 2] * 1e3
    return {"shape": list(_PROBE_SHAPE), "median_ms": round(ms, 2),
            "gflops": round(2 * m * k * n / ms / 1e6, 1)}


def diagnose(probe: bool = True) -> dict:
    """Everything `doctor` reports, JSON-able. Loads the BLAS first, then imports mlx."""
    blas = ensure_blas()
    import psutil
    import mlx.core as mx

    mem = psutil.virtual_memory()
    report = {
        "platform": {"system": platform.system(), "machine": platform.machine(),
                     "python": platform.python_version(), "cpus": os.cpu_count()},
        "memory": {"total_gib": round(mem.total / 2**30, 1), "available_gib": round(mem.available / 2**30, 1)},
        "mlx": {"default_device": str(mx.default_device()), "metal": bool(mx.metal.is_available())},
        "blas": blas,
        "lanes": _lanes(mx.default_device() == mx.cpu, blas),
        "packages": {name: _version(name) for name in _PACKAGES},
        "hub_offline": any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    }
    if probe:
        report["matmul_probe"] = _matmul_probe()
    return report


def _lanes(on_cpu: bool, blas: dict) -> dict:
    """How stream mode uses the CPU (runner.Lanes): two MLX streams, and what each gets of the BLAS."""
    if not on_cpu:
        return {"cpu_lanes": 0}
    single = lane_threads() == 1
    return {"cpu_lanes": 2, "blas_threads_per_lane": 1 if single else blas.get("threads"),
            "experts_shared_out": single}


def _lanes_line(lanes: dict) -> str:
    if not lanes["cpu_lanes"]:
        return "one GPU stream"
    per = lanes["blas_threads_per_lane"]
    if lanes["experts_shared_out"]:
        return "2 CPU streams, single-threaded BLAS each; attention halves and experts shared out"
    return f"2 CPU streams for attention halves, BLAS at {per or 'its own'} threads each; experts on one"


def _blas_line(b: dict) -> str:
    state = b["state"]
    if state in ("loaded", "preloaded"):
        n = b.get("threads")
        threads = f", {n} thread{'s' if n != 1 else ''} ({b['threads_env']})" if n else ""
        return f"{b['kind']} {b['path']}{threads}"
    if state == "disabled":
        return f"disabled by {ENV_VAR}=none: MLX's reference BLAS"
    if state == "missing":
        return f"none found: MLX's slow reference BLAS (install: {INSTALL_HINT})"
    if state == "native":
        return "the platform's own (Accelerate on macOS)"
    return state


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Time a float32 4096x256x512 matmul through MLX.")
def doctor_cmd(as_json: bool, probe: bool) -> None:
    """Report the BLAS, MLX device, memory and package versions reap-stream will use."""
    r = diagnose(probe)
    if as_json:
        click.echo(json.dumps(r, indent=2, sort_keys=True))
        return
    p, m = r["platform"], r["memory"]
    lines = [
        f"platform   {p['system']} {p['machine']}, Python {p['python']}, {p['cpus']} CPUs",
        f"memory     {m['total_gib']} GiB total, {m['available_gib']} GiB available",
        f"mlx        {r['packages']['mlx']} on {r['mlx']['default_device']}",
        f"blas       {_blas_line(r['blas'])}",
        f"lanes      {_lanes_line(r['lanes'])}",
    ]
    if probe:
        q = r["matmul_probe"]
        lines.append(f"matmul     {'x'.join(map(str, q['shape']))} float32: {q['median_ms']} ms ({q['gflops']} GFLOP/s)")
    lines.append("packages   " + ", ".join(f"{k} {v}" for k, v in r["packages"].items() if v))
    lines.append(f"hub        {'offline' if r['hub_offline'] else 'online allowed'}")
    click.echo("\n".join(lines))
    sys.stdout.flush()
