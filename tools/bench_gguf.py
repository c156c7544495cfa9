"""Benchmark GGUF recompaction against a plain copy of the kept bytes and a naive gguf-py rewrite.

    python tools/bench_gguf.py --sizes 256,1024 --repeats 3 [--dir /tmp/reap-bench-gguf] [--json]

For each size a synthetic qwen3moe GGUF (Q8_0 experts, 64 experts per layer) is written once; a
seeded plan keeps half the experts of every layer. Each method runs in its own subprocess (peak RSS
is that process's VmHWM), methods interleaved, `--repeats` times; the table gives median walls and
the median of the per-repeat ratios (runs made side by side).
  copy   — read the kept byte ranges and write them to one file through an 8 MiB buffer, fsync
           (no header; ranges planned before the clock starts): the floor for any recompaction.
  reap   — reap_stream.surgery.gguf.apply_gguf (header parse + validation, layout, range copy, fsync).
  naive  — gguf-py: GGUFReader, np.take of every expert tensor, GGUFWriter with all tensors in
           memory, fsync.
The page cache is warm for every run (the source is read once before timing).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from reap_stream.procstats import peak_rss_bytes  # noqa: E402

E, H, FF, TOP_K = 64, 1024, 512, 8


def _write_model(path: Path, mib: int) -> None:
    from gguf.constants import GGMLQuantizationType as T

    from reap_stream.io.gguf import VType, tensor_nbytes
    from reap_stream.io.gguf_write import OutTensor, encode_header, encode_kv, plan_offsets

    per_layer = 3 * tensor_nbytes((H, FF, E), T.Q8_0)
    layers = max(1, (mib << 20) // per_layer)
    specs = [("token_embd.weight", (H, 4096), T.F32)]
    for L in range(layers):
        specs.append((f"blk.{L}.ffn_gate_inp.weight", (H, E), T.F32))
        for p in ("gate", "up", "down"):
            specs.append((f"blk.{L}.ffn_{p}_exps.weight", (H, FF, E) if p != "down" else (FF, H, E), T.Q8_0))
    sizes = [tensor_nbytes(ne, t) for _, ne, t in specs]
    offsets = plan_offsets(sizes, 32)
    tensors = [OutTensor(n, ne, t, off, size, ()) for (n, ne, t), off, size in zip(specs, offsets, sizes)]
    kvs = [encode_kv("general.architecture", VType.STRING, "qwen3moe"),
           encode_kv("qwen3moe.block_count", VType.UINT32, layers),
           encode_kv("qwen3moe.expert_count", VType.UINT32, E),
           encode_kv("qwen3moe.expert_used_count", VType.UINT32, TOP_K)]
    rng = np.random.default_rng(0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode_header(3, kvs, tensors, 32))
        for t in tensors:
            left = t.nbytes
            while left:
                n = min(left, 34 * 4 * 61680)   # ~8 MiB, whole Q8_0 blocks and f32s
                if t.ggml_type == T.Q8_0:   # keep the f16 block scales finite: small positive values
                    chunk = np.frombuffer(rng.bytes(n), np.uint8).copy().reshape(-1, 34)
                    chunk[:, 1] &= 0x3B
                    f.write(chunk.tobytes())
                else:
                    f.write(rng.standard_normal(n // 4).astype(np.float32).tobytes())
                left -= n
            f.write(bytes(-t.nbytes % 32))
    tmp.replace(path)


def _plan(model: Path) -> Path:
    from reap_stream.families.model import open_model
    from reap_stream.planning.plan import LayerPlan, Plan

    st = open_model(model).structure
    rng = np.random.default_rng(1)
    layers = {}
    for L, n in st.layer_experts.items():
        kept = sorted(rng.choice(n, n // 2, replace=False).tolist())
        layers[L] = LayerPlan(kept, sorted(set(range(n)) - set(kept)))
    path = model.with_suffix(".plan.json")
    Plan(layers, method="bench", ratio=0.5).save(path)
    return path


# ---------------------------------------------------------------- methods (run in a child process)

def _copy(model: Path, plan_path: Path, out: Path) -> float:
    from reap_stream.families.model import open_model
    from reap_stream.surgery.gguf import plan_layout
    from reap_stream.planning.plan import Plan

    # the ranges are planned before the clock starts: this method times only the byte copy
    parts, _ = plan_layout(open_model(model), Plan.load(plan_path), out, "plan")
    ranges = [p for t in parts[0].tensors for p in t.pieces]
    buf = memoryview(bytearray(8 << 20))
    t0 = time.perf_counter()
    with open(model, "rb", buffering=0) as src, open(out, "wb", buffering=0) as dst:
        for start, length in ranges:
            src.seek(start)
            while length:
                n = src.readinto(buf[:min(length, len(buf))])
                dst.write(buf[:n])
                length -= n
        os.fsync(dst.fileno())   # apply_gguf makes its output durable too
    return time.perf_counter() - t0


def _reap(model: Path, plan_path: Path, out: Path) -> float:
    from reap_stream.surgery.gguf import apply_gguf
    from reap_stream.planning.plan import Plan

    t0 = time.perf_counter()
    apply_gguf(model, Plan.load(plan_path), out, overwrite=True, dry_run=False)
    return time.perf_counter() - t0


def _naive(model: Path, plan_path: Path, out: Path) -> float:
    import gguf

    from reap_stream.planning.plan import Plan

    t0 = time.perf_counter()
    plan = Plan.load(plan_path)
    r = gguf.GGUFReader(model)
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(out, arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        if k == f"{arch}.expert_count":
            v = len(next(iter(plan.layers.values())).kept)
        w.add_key_value(k, v, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        data = np.asarray(t.data)
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) in plan.layers and ("_exps" in t.name or "gate_inp" in t.name):
            data = np.take(data, plan.layers[int(parts[1])].kept, axis=0)
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fd = os.open(out, os.O_RDONLY)  # durable, as the other two make their outputs
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


METHODS = {"copy": _copy, "reap": _reap, "naive": _naive}


def _child(method: str, model: str, plan: str, out: str) -> None:
    wall = METHODS[method](Path(model), Path(plan), Path(out))
    print(json.dumps({"wall_s": wall, "peak_rss": peak_rss_bytes()}))


def _run(method: str, model: Path, plan: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", method, str(model), str(plan), str(out)],
                         capture_output=True, text=True, check=True)
    out.unlink(missing_ok=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--sizes", default="256,1024", show_default=True, help="Model sizes in MiB.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--dir", "workdir", default="/tmp/reap-bench-gguf", show_default=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--child", nargs=4, hidden=True, default=None)
def main(sizes: str, repeats: int, workdir: Path, as_json: bool, child) -> None:
    if child:
        _child(*child)
        return
    from tqdm import tqdm

    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mib in (int(s) for s in sizes.split(",")):
        model = workdir / f"bench-{mib}MiB.gguf"
        if not model.exists():
            _write_model(model, mib)
        plan = _plan(model)
        buf = bytearray(8 << 20)
        with open(model, "rb") as f:   # warm the page cache once
            while f.readinto(buf):
                pass
        results = {m: [] for m in METHODS}
        for i in tqdm(range(repeats), desc=f"{mib} MiB", leave=False):
            order = list(METHODS) if i % 2 == 0 else list(reversed(METHODS))   # no method always goes first
            for m in order:
                results[m].append(_run(m, model, plan, workdir / f"out-{m}.gguf"))
        row = {"size_mib": model.stat().st_size / 2**20}
        for m, runs in results.items():
            row[f"{m}_wall_s"] = statistics.median(r["wall_s"] for r in runs)
            row[f"{m}_rss_mib"] = max(r["peak_rss"] for r in runs) / 2**20
        # ratios of runs made side by side (same repeat), then their median: robust to a busy machine
        for m in ("reap", "naive"):
            row[f"{m}_vs_copy"] = statistics.median(
                a["wall_s"] / c["wall_s"] for a, c in zip(results[m], results["copy"]))
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo("| model | copy s | reap s | naive s | reap/copy | naive/copy | copy RSS | reap RSS | naive RSS |")
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['size_mib']:.0f} MiB | {r['copy_wall_s']:.3f} | {r['reap_wall_s']:.3f} | {r['naive_wall_s']:.3f} "
                   f"| {r['reap_vs_copy']:.2f}x | {r['naive_vs_copy']:.2f}x | {r['copy_rss_mib']:.0f} MiB "
                   f"| {r['reap_rss_mib']:.0f} MiB | {r['naive_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
