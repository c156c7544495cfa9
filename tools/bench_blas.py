#!/usr/bin/env python3
"""Benchmark MLX with its bundled reference BLAS against the BLAS reap_stream.blas loads.

    python tools/bench_blas.py --repeats 5 --workdir /tmp/bench-blas [--threads 1,2]

Each measurement is a fresh process (a BLAS only takes effect when loaded before `import mlx`),
run in rotation: REAP_STREAM_BLAS=none vs auto (optionally at several OPENBLAS_NUM_THREADS).
A process reports the median of its matmul timings (float32 4096x256x512) and the tokens/s of a
plain mlx_lm forward over a packed batch, on a 4-layer, 32-expert, hidden-256 Qwen3-MoE built by
reap_stream.testing.synth. Figures are medians over --repeats processes; peak RSS is each child's own VmHWM.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]

MODEL_OVERRIDES = {"hidden_size": 256, "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 128,
                   "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32}

CHILD = r"""
import json, sys, time
from reap_stream import blas
from reap_stream.procstats import peak_rss_bytes
info = blas.ensure_blas()
import mlx.core as mx
from mlx_lm import load

def median_time(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]

a = mx.random.normal((4096, 256), key=mx.random.key(0)); b = mx.random.normal((256, 512), key=mx.random.key(1))
mx.eval(a, b)
matmul = median_time(lambda: mx.eval(a @ b), 9)
model, _ = load(sys.argv[1])
batch, seq = 4, 256
ids = mx.random.randint(0, 512, (batch, seq), key=mx.random.key(2))
forward = median_time(lambda: mx.eval(model(ids)), 3)
print(json.dumps({"blas": info["kind"], "threads": info.get("threads"), "matmul_ms": matmul * 1e3,
                  "forward_tok_s": batch * seq / forward, "peak_rss_mib": peak_rss_bytes() / 2**20}))
"""


def run_child(model: Path, mode: str, threads: str | None) -> dict:
    env = {**os.environ, "REAP_STREAM_BLAS": mode}
    if threads:
        env["OPENBLAS_NUM_THREADS"] = threads
    # the child reports its own VmHWM: a forked child's ru_maxrss starts at this process's peak
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({mode}): {proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/bench-blas"), show_default=True)
@click.option("--threads", default="", help="Comma-separated OPENBLAS_NUM_THREADS values to compare (default: unset).")
@click.option("--json", "as_json", is_flag=True)
def main(repeats: int, workdir: Path, threads: str, as_json: bool) -> None:
    from reap_stream.testing import synth

    model = workdir / "qwen3_moe-h256-e32"
    if not synth.fixture_complete(model):
        synth.make_mlx_fixture("qwen3_moe", model, config_overrides=MODEL_OVERRIDES)
    contenders = [("reference", "none", None)]
    contenders += [(f"optimised{'@' + t if t else ''}", "auto", t or None) for t in (threads.split(",") if threads else [""])]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in contenders}
    for _ in range(repeats):
        for name, mode, t in contenders:
            runs[name].append(run_child(model, mode, t))
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"blas": rs[0]["blas"], "threads": rs[0]["threads"],
                         "matmul_ms": statistics.median(r["matmul_ms"] for r in rs),
                         "forward_tok_s": statistics.median(r["forward_tok_s"] for r in rs),
                         "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs)}
    ref = summary["reference"]
    for s in summary.values():
        s["matmul_speedup"] = ref["matmul_ms"] / s["matmul_ms"]
        s["forward_speedup"] = s["forward_tok_s"] / ref["forward_tok_s"]
    if as_json:
        click.echo(json.dumps({"repeats": repeats, "cpus": os.cpu_count(), "results": summary}, indent=2))
        return
    click.echo(f"{'contender':<16}{'blas':<11}{'threads':>8}{'matmul ms':>11}{'x':>7}{'fwd tok/s':>11}{'x':>7}{'RSS MiB':>9}")
    for name, s in summary.items():
        click.echo(f"{name:<16}{s['blas']:<11}{str(s['threads'] or '-'):>8}{s['matmul_ms']:>11.1f}"
                   f"{s['matmul_speedup']:>7.1f}{s['forward_tok_s']:>11.0f}{s['forward_speedup']:>7.1f}"
                   f"{s['peak_rss_mib']:>9.0f}")
    click.echo(f"medians of {repeats} processes each, taken in rotation; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
