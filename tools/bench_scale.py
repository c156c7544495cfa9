#!/usr/bin/env python3
"""Benchmark: `reap-stream full` on a synthetic checkpoint larger than this machine's RAM.

The checkpoint has a real model's per-layer shapes (default Qwen3-30B-A3B: hidden 2048, 128 experts
of width 768, top-8, 32 q / 4 kv heads of 128; tools/real_models.py) and as many layers as asked,
in bf16 or quantised as `mlx_lm convert -q` would (reap_stream/testing/scaled.py writes it block by
block, seeded; it is never committed, and deleted at the end unless --keep). Each run is a fresh
process, started with the checkpoint dropped from the page cache, that runs

    reap-stream full CKPT --dataset-file calib.txt --pack-samples --window-tokens 256
                          --max-tokens 2048 --ratio 0.5 --out OUT [--max-memory SIZE]

and reports its peak RSS (VmHWM), wall time per stage, bytes read against the model's size, tokens/s,
and collect's time against the read + compute bound (each layer's bytes at the disk rate plus its
matmul FLOPs at the float32 GEMM rate: reap_stream/runner/timing.py). Both rates are measured just
before and just after each run (a cold read of the checkpoint, a GEMM) and the smaller of the two
bounds is taken: on a shared machine the rates move from minute to minute, so each run is held
against the machine as it was around it, at its faster. `--repeats N` runs each limit N times, in
rotation, and prints the median ratio.

    python tools/bench_scale.py --layers 24 --limits none,1GB          # 29.9 GB bf16 (the README table)
    python tools/bench_scale.py --layers 8 --bits 4 --limits none --repeats 3   # mlx 4-bit, 3.2 GB
    python tools/bench_scale.py --layers 2 --breakdown                 # where collect's time goes
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def make_checkpoint(root: Path, model: str, layers: int, bits: int | None) -> Path:
    from real_models import REAL_MODELS

    from reap_stream.blas import ensure_blas

    ensure_blas()
    from reap_stream.testing.scaled import write_scaled

    path = root / f"{model}-L{layers}-{'bf16' if bits is None else f'q{bits}'}"
    if (path / "complete").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    write_scaled({**REAL_MODELS[model], "num_hidden_layers": layers}, path, bits=bits, progress=True)
    (path / "complete").write_text("")
    return path


def calibration_file(root: Path) -> Path:
    import argparse as a
    import collections
    import json.decoder as jd

    path = root / "calib.txt"
    if not path.exists():
        path.write_text("".join(inspect.getsource(m) for m in (a, collections, jd)))
    return path


def drop_cache(ckpt: Path) -> None:
    """Evict the checkpoint from the page cache (posix_fadvise; clean pages, no privileges)."""
    for f in ckpt.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)   # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_full(ckpt: Path, calib: Path, out: Path, tokens: int, window: int, limit: str | None) -> dict:
    report = out.with_suffix(".rss.json")
    cmd = [sys.executable, "-m", "reap_stream.procstats", str(report), "reap_stream.cli", "full", str(ckpt),
           "--dataset-file", str(calib), "--pack-samples", "--window-tokens", str(window), "--max-tokens", str(tokens),
           "--ratio", "0.5", "--out", str(out), "--json"] + ([] if limit is None else ["--max-memory", limit])
    drop_cache(ckpt)
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"full failed ({limit}):\n{res.stderr[-3000:]}")
    summary = json.loads(res.stdout)
    verify = subprocess.run([sys.executable, "-m", "reap_stream.cli", "verify", str(out), "--json"],
                            capture_output=True, text=True)
    summary["verified"] = json.loads(verify.stdout)["ok"] if verify.returncode in (0, 1) else False
    return {"wall": wall, "summary": summary, **json.loads(report.read_text())}


def bounder(ckpt: Path, tokens: int, window: int):
    """A function that measures this machine's rates now (a cold read of the checkpoint, a GEMM)
    and returns them with the read + compute bound of collect at them; the model's shapes are read
    once."""
    from reap_stream.families.model import open_model
    from reap_stream.runner.budget import checkpoint_shapes
    from reap_stream.runner.timing import bound_seconds, measure

    model = open_model(ckpt)
    shapes = checkpoint_shapes(model.checkpoint, model.family, model.structure.top_k)
    files = sorted({r.file for r in model.checkpoint.tensors.values()})

    def bound():
        rates = measure(files)
        return rates, bound_seconds(shapes, tokens, window, rates)["total_s"]
    return bound


# ---------------------------------------------------------------- breakdown (one child)

def breakdown_child(ckpt: str, calib: str, tokens: int, window: int, limit: str | None) -> None:
    """collect with wall-clock timers around its stages (inclusive; the reader thread's reads
    overlap the main thread's work), printed as JSON."""
    from reap_stream.blas import ensure_blas

    ensure_blas()
    import threading
    from collections import defaultdict

    from reap_stream.families import expert_source, experts, self_check
    from reap_stream.runner import skeleton, spill, stream, weights
    from reap_stream.telemetry import accumulate, store

    totals: dict[str, float] = defaultdict(float)
    lock = threading.Lock()

    def timed(owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                with lock:
                    totals[label] += time.perf_counter() - t
        setattr(owner, name, wrapper)

    real_slabs = expert_source.slabs

    def slabs(*args, **kwargs):   # time the main thread waits for a slab
        it = real_slabs(*args, **kwargs)
        while True:
            t = time.perf_counter()
            try:
                slab = next(it)
            except StopIteration:
                return
            finally:
                totals["waiting for expert reads"] += time.perf_counter() - t
            yield slab

    experts.slabs = slabs
    for owner, name, label in [
        (stream.StreamRunner, "embed", "embedding"), (weights.Weights, "load", "reading the layer's other tensors"),
        (stream, "split_layer_forward", "layer (two lanes)"), (skeleton.Forward, "layer_forward", "layer (one lane)"),
        (experts, "capture", "MoE block"), (experts, "run_experts", "experts (incl. waiting for reads)"),
        (self_check, "self_check", "self-check: block forward"), (self_check.ExpertCheck, "__call__", "self-check: experts"),
        (expert_source.CheckpointExperts, "read", "expert reads (reader thread)"),
        (spill.HiddenSpill, "read", "spill read"), (spill.HiddenSpill, "write", "spill write"),
        (accumulate.Accumulator, "add", "telemetry sums"), (store.TelemetryStore, "commit", "telemetry commit"),
        (stream.StreamRunner, "_split", "split probe"),
    ]:
        timed(owner, name, label)
    for kind, fn in list(experts.ROUTERS.items()):
        def routed(*a, _fn=fn, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals["routing"] += time.perf_counter() - t
        experts.ROUTERS[kind] = routed
    from reap_stream.cli.options import parse_size
    from reap_stream.families.model import open_model
    from reap_stream.runner import RunOptions
    from reap_stream.telemetry.calibration import CalibrationOptions
    from reap_stream.telemetry.collect import collect
    from reap_stream.telemetry.tokenizer import tokenise

    model = open_model(ckpt)
    calib_set = tokenise(model, CalibrationOptions(dataset_file=calib, pack_samples=True, window_tokens=window,
                                                   max_tokens=tokens))
    out = Path(tempfile.mkdtemp()) / "t.zarr"
    run = RunOptions(max_memory=None if limit is None else parse_size(limit, "--max-memory"))
    summary = collect(model, calib_set, out, run, progress=False)
    shutil.rmtree(out.parent)
    print(json.dumps({"seconds": summary["seconds"], "stages": dict(totals)}))


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen3-30B-A3B")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--bits", type=int, choices=(4, 8), default=None, help="quantise as mlx_lm convert -q (default bf16)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reap_stream_bench_scale")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--limits", default="none,1GB", help="--max-memory values, none for no limit")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each limit, in rotation")
    ap.add_argument("--breakdown", action="store_true", help="also time collect's stages (one more run)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child-breakdown", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.child_breakdown:
        c, cal, t, w, lim = args.child_breakdown
        return breakdown_child(c, cal, int(t), int(w), None if lim == "none" else lim)

    args.root.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.root, args.model, args.layers, args.bits)
    calib = calibration_file(args.root)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    limits = [None if x == "none" else x for x in args.limits.split(",")]
    runs = []
    bound = bounder(ckpt, args.tokens, args.window)
    try:
        after = bound()
        for _ in range(args.repeats):
            for limit in limits:   # in rotation; one run's "after" is the next one's "before"
                before = after
                out = args.root / "out"
                res = run_full(ckpt, calib, out, args.tokens, args.window, limit)
                for p in (out, out.with_name(out.name + ".reap-work")):
                    shutil.rmtree(p, ignore_errors=True)
                after = bound()
                rates, bnd = min(before, after, key=lambda rb: rb[1])
                runs.append({"max_memory": limit, "read_bytes_per_s": rates.read_bytes_per_s,
                             "gemm_flops_per_s": rates.gemm_flops_per_s, "bound_s": bnd, **res})
        breakdown = None
        if args.breakdown:
            drop_cache(ckpt)
            cmd = [sys.executable, __file__, "--child-breakdown", str(ckpt), str(calib), str(args.tokens),
                   str(args.window), "none"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            breakdown = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else res.stderr[-2000:]
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    load = os.getloadavg()
    report = {"model": args.model, "layers": args.layers, "dtype": "bf16" if args.bits is None else f"{args.bits}-bit",
              "checkpoint_bytes": size, "tokens": args.tokens, "window": args.window, "loadavg_after": load,
              "runs": runs, "breakdown": breakdown}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return
    gb = 1e9
    print(f"{args.model} shapes, {args.layers} layers, {report['dtype']}: {size / gb:.1f} GB; {args.tokens} tokens in "
          f"windows of {args.window}; load average after {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print("| --max-memory | disk (MB/s, cold) | BLAS (GFLOP/s) | bound (s) | collect (s) | collect / bound | peak RSS (GB) "
          "| tokenise / plan / apply (s) | collect's reads / model size | tokens/s | verified |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        s = r["summary"]
        sec = s["seconds"]
        print(f"| {r['max_memory'] or 'none'} | {r['read_bytes_per_s'] / 1e6:.0f} | {r['gemm_flops_per_s'] / 1e9:.0f} "
              f"| {r['bound_s']:.1f} | {sec['collect']:.1f} | {sec['collect'] / r['bound_s']:.2f} | {r['peak_rss'] / gb:.2f} "
              f"| {sec['tokenise']:.0f} / {sec['plan']:.1f} / {sec['apply']:.0f} "
              f"| {s['collect']['bytes_read'] / size:.2f} | {args.tokens * args.layers / sec['collect']:.0f} "
              f"| {'yes' if s['verified'] else 'NO'} |")
    for limit in limits:
        ratios = sorted(r["summary"]["seconds"]["collect"] / r["bound_s"] for r in runs if r["max_memory"] == limit)
        print(f"--max-memory {limit or 'none'}: collect / bound median {statistics.median(ratios):.2f} "
              f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f}, {len(ratios)} runs)")
    if isinstance(breakdown, dict):
        total = breakdown["seconds"]
        print(f"\ncollect's stages ({total:.1f} s; inclusive, the reader thread overlaps the rest):")
        for k, v in sorted(breakdown["stages"].items(), key=lambda kv: -kv[1]):
            print(f"  {k}: {v:.1f} s ({v / total:.0%})")
    elif breakdown:
        print("breakdown failed:", breakdown)


if __name__ == "__main__":
    main()
