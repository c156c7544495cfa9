#!/usr/bin/env python3
"""Benchmark: the CPU expert loop's matmul chain on real models' expert shapes, as collect runs it
(two lanes, single-threaded BLAS, the runner's allocator settings), with large float32 weights
converted in pieces (families/experts.weight_pieces) and, side by side, whole.

    python tools/bench_expert_matmul.py                        # bf16 and 4-bit, the README's models
    python tools/bench_expert_matmul.py --models DeepSeek-V3 --dtypes bf16 --rows 64

Each case runs in its own process (page faults and peak RSS are per process): ms per expert per
lane (median of --repeats rounds of 8 experts on each lane), minor page faults per expert, and the
process's peak RSS (VmHWM). Synthetic weights, 4 experts of the shape, reused.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time

import click

from real_models import REAL_MODELS   # tools/, the script's own directory

MODELS = ("Qwen3-30B-A3B", "MiniMax-M2", "Qwen3-235B-A22B", "DeepSeek-V3")


def _shape(model: str) -> tuple[int, int]:
    cfg = REAL_MODELS[model]   # MiniMax-M2 names its expert width intermediate_size
    return cfg["hidden_size"], cfg.get("moe_intermediate_size", cfg["intermediate_size"])


def child(hidden: int, width: int, rows: int, dtype: str, pieces: bool, repeats: int) -> dict:
    import resource
    from types import SimpleNamespace

    from reap_stream.blas import blas_threads, ensure_blas
    ensure_blas()
    import mlx.core as mx
    import numpy as np

    from reap_stream import procstats
    from reap_stream.families import experts

    procstats.return_freed_memory()
    if not pieces:
        experts.weight_pieces = lambda n, _in: [(0, n)]
    rng = np.random.default_rng(0)

    def stack(out_dims: int, in_dims: int) -> dict:
        w = mx.array(rng.standard_normal((4, out_dims, in_dims), dtype=np.float32)).astype(mx.bfloat16)
        if dtype == "bf16":
            return {"weight": w}
        q, s, b = mx.quantize(w, group_size=64, bits=4)
        return {"weight": q, "scales": s, "biases": b}

    gate, up, down = stack(width, hidden), stack(width, hidden), stack(hidden, width)
    lin = SimpleNamespace(group_size=64, bits=4, mode="affine")
    x = mx.array(rng.standard_normal((rows, hidden), dtype=np.float32)).astype(mx.bfloat16)
    mx.eval(gate, up, down, x)

    def lane(count: int) -> None:
        with mx.stream(mx.new_stream(mx.cpu)), blas_threads(1):
            for e in range(count):
                a = experts._expert_linear(lin, gate, e % 4, x) * experts._expert_linear(lin, up, e % 4, x)
                np.array(experts._expert_linear(lin, down, e % 4, a))

    def both(count: int) -> float:
        threads = [threading.Thread(target=lane, args=(count,)) for _ in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (time.perf_counter() - start) / count

    both(2)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [both(8) for _ in range(repeats)]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (16 * repeats)
    return {"ms_per_expert": statistics.median(times) * 1e3, "faults_per_expert": faults,
            "peak_rss_mb": procstats.peak_rss_bytes() / 1e6}


@click.command()
@click.option("--models", default=",".join(MODELS), show_default=True)
@click.option("--dtypes", default="bf16,q4", show_default=True)
@click.option("--rows", default=64, show_default=True, help="routed rows per expert (2048 tokens x top-8 / 256 experts = 64)")
@click.option("--repeats", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--child", "child_args", nargs=6, hidden=True)
def main(models: str, dtypes: str, rows: int, repeats: int, as_json: bool, child_args) -> None:
    if child_args:
        hidden, width, r, dtype, pieces, n = child_args
        print(json.dumps(child(int(hidden), int(width), int(r), dtype, pieces == "1", int(n))))
        return
    unknown = [m for m in models.split(",") if m not in REAL_MODELS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)} (known: {', '.join(REAL_MODELS)})", param_hint="--models")
    if not set(dtypes.split(",")) <= {"bf16", "q4"}:
        raise click.BadParameter(f"{dtypes!r}: bf16 and q4 only", param_hint="--dtypes")
    results = []
    for model in models.split(","):
        hidden, width = _shape(model)
        for dtype in dtypes.split(","):
            row = {"model": model, "hidden": hidden, "width": width, "dtype": dtype}
            for label, pieces in (("pieces", "1"), ("whole", "0")):
                out = subprocess.run([sys.executable, __file__, "--child", str(hidden), str(width), str(rows), dtype,
                                      pieces, str(repeats)], capture_output=True, text=True, check=True)
                row[label] = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    print(f"{rows} rows per expert; two lanes; ms per expert per lane (faults per expert, peak RSS MB)\n")
    print("| model | hidden x width | dtype | pieces | whole | whole / pieces |")
    print("|---|---|---|---|---|---|")
    for r in results:
        p, w = r["pieces"], r["whole"]
        cell = lambda m: f"{m['ms_per_expert']:.1f} ({m['faults_per_expert']:.0f}, {m['peak_rss_mb']:.0f})"  # noqa: E731
        print(f"| {r['model']} | {r['hidden']} x {r['width']} | {r['dtype']} | {cell(p)} | {cell(w)} | "
              f"{w['ms_per_expert'] / p['ms_per_expert']:.2f}x |")


if __name__ == "__main__":
    main()
