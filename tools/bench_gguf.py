"""Benchmark GGUF recompaction (apply) and collect straight from a GGUF.

    python tools/bench_gguf.py apply --arch arctic --sizes 256,1024,2048 --repeats 3 [--dir DIR] [--json]
    python tools/bench_gguf.py collect --repeats 3 [--tokens 4096] [--dir DIR] [--json]

apply: for each size a synthetic GGUF of the architecture (testing/gguf_synth: every expert-axis
tensor gguf-py lists for it, Q8_0 expert stacks, 64 experts of width 512, hidden 1024) is written
once; a seeded plan keeps half the experts of every layer. Each method runs in its own subprocess
(peak RSS is that process's VmHWM), methods interleaved, `--repeats` times; the table gives median
walls and the median of the per-repeat ratios (runs made side by side).
  copy   — read the kept byte ranges and write them to one file through an 8 MiB buffer, fsync
           (no header; ranges planned before the clock starts): the floor for any recompaction.
  reap   — open_model + apply_gguf (header parse + validation, layout, range copy, fsync).
  naive  — gguf-py: GGUFReader, np.take of every expert-axis tensor, GGUFWriter with all tensors
           in memory, fsync.
The page cache is warm for every run (the source is read once before timing).

collect: a synthetic Qwen3-MoE (hidden 512, 64 experts of width 256, top-8, 8 layers; the MLX form,
float32) and its Q8_0 GGUF. `collect` runs on each, stream mode, the same token ids, in fresh
processes, alternating; tokens/s and peak RSS, and whether both prune the same experts (REAP, 50 %).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from reap_stream.procstats import peak_rss_bytes

E, H, FF, TOP_K = 64, 1024, 512, 8
COLLECT_SHAPE = {"hidden_size": 512, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 256,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_hidden_layers": 8}


# ---------------------------------------------------------------- apply

def _write_model(path: Path, arch: str, mib: int) -> None:
    from gguf.constants import GGMLQuantizationType as T

    from reap_stream.io.gguf import tensor_nbytes
    from reap_stream.testing.gguf_synth import write_moe_gguf

    per_layer = 3 * tensor_nbytes((H, FF, E), T.Q8_0)
    write_moe_gguf(path, arch, layers=max(1, (mib << 20) // per_layer), experts=E, top_k=TOP_K, hidden=H, ff=FF)


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


def _copy(model: Path, plan_path: Path, out: Path) -> float:
    from reap_stream.families.model import open_model
    from reap_stream.planning.plan import Plan
    from reap_stream.surgery.gguf import plan_layout

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
    from reap_stream.families.model import open_model
    from reap_stream.planning.plan import Plan
    from reap_stream.surgery.gguf import apply_gguf

    t0 = time.perf_counter()
    apply_gguf(open_model(model), Plan.load(plan_path), out, overwrite=True, dry_run=False, progress=False)
    return time.perf_counter() - t0


def _naive(model: Path, plan_path: Path, out: Path) -> float:
    import gguf

    from reap_stream.families.gguf_arch import Role, Roles
    from reap_stream.planning.plan import Plan

    t0 = time.perf_counter()
    plan = Plan.load(plan_path)
    r = gguf.GGUFReader(model)
    arch = str(r.fields["general.architecture"].contents())
    roles = Roles(arch)
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
        parts = t.name.split(".", 2)
        role = roles.of(parts[2]) if parts[0] == "blk" and int(parts[1]) in plan.layers else None
        if role in (Role.EXPERTS, Role.ROUTER, Role.SELECTION_BIAS):
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


APPLY_METHODS = {"copy": _copy, "reap": _reap, "naive": _naive}


def bench_apply(arch: str, sizes: list[int], repeats: int, workdir: Path) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for mib in sizes:
        model = workdir / f"bench-{arch}-{mib}MiB.gguf"
        if not model.exists():
            _write_model(model, arch, mib)
        plan = _plan(model)
        buf = bytearray(8 << 20)
        with open(model, "rb") as f:   # warm the page cache once
            while f.readinto(buf):
                pass
        results = {m: [] for m in APPLY_METHODS}
        for i in tqdm(range(repeats), desc=f"apply {mib} MiB", leave=False):
            order = list(APPLY_METHODS) if i % 2 == 0 else list(reversed(APPLY_METHODS))   # none always first
            for m in order:
                out = workdir / f"out-{m}.gguf"
                results[m].append(_run(["apply", m, str(model), str(plan), str(out)]))
                out.unlink(missing_ok=True)
        row = {"arch": arch, "size_mib": model.stat().st_size / 2**20}
        for m, runs in results.items():
            row[f"{m}_wall_s"] = statistics.median(r["wall_s"] for r in runs)
            row[f"{m}_rss_mib"] = max(r["peak_rss"] for r in runs) / 2**20
        # ratios of runs made side by side (same repeat), then their median: robust to a busy machine
        for m in ("reap", "naive"):
            row[f"{m}_vs_copy"] = statistics.median(
                a["wall_s"] / c["wall_s"] for a, c in zip(results[m], results["copy"]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- collect

def _collect(model: str, tokens: int, out: str) -> dict:
    from reap_stream.blas import ensure_blas

    ensure_blas()
    from reap_stream.families.model import open_model
    from reap_stream.runner import RunOptions
    from reap_stream.telemetry.calibration import CalibrationSet, token_fingerprint
    from reap_stream.telemetry.collect import collect

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 512, 256).astype(np.int32) for _ in range(tokens // 256)]
    calib = CalibrationSet(seqs, token_fingerprint(seqs, {}), {"bench": True}, True, 256)
    s = collect(open_model(model), calib, out, RunOptions("stream", 2048), progress=False)
    return {"tokens_per_s": s["tokens_per_s"], "seconds": s["seconds"]}


def _prune_sets(store: Path) -> dict:
    from reap_stream.planning.criteria import scores
    from reap_stream.telemetry.store import TelemetryStore

    t = TelemetryStore.open(store)
    return {L: sorted(np.argsort(scores("reap", t.read(L)), kind="stable")[: t.read(L).num_experts // 2].tolist())
            for L in t.layers()}


def bench_collect(repeats: int, tokens: int, workdir: Path) -> list[dict]:
    from reap_stream.testing import synth
    from reap_stream.testing.gguf_convert import convert_mlx_to_gguf

    mlx = workdir / "collect-qwen3_moe-h512-e64-L8"
    if not (mlx / "model.safetensors.index.json").exists():
        synth.make_mlx_fixture("qwen3_moe", mlx, seed=1, num_shards=4, config_overrides=COLLECT_SHAPE)
    gguf = workdir / "collect-qwen3_moe-h512-e64-L8-q8_0.gguf"
    if not gguf.exists():
        convert_mlx_to_gguf(mlx, gguf, qtype="q8_0")
    forms = {"mlx": mlx, "gguf_q8_0": gguf}
    runs: dict[str, list[dict]] = {f: [] for f in forms}
    sets = {}
    for i in range(repeats):
        for form in (list(forms) if i % 2 == 0 else list(reversed(forms))):
            out = workdir / f"collect-{form}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            runs[form].append(_run(["collect", str(forms[form]), str(tokens), str(out)]))
            sets[form] = _prune_sets(out)
    sizes = {"mlx": sum(p.stat().st_size for p in mlx.glob("*.safetensors")), "gguf_q8_0": gguf.stat().st_size}
    return [{"form": form, "size_mib": sizes[form] / 2**20,
             "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
             "peak_rss_mib": max(r["peak_rss"] for r in rs) / 2**20,
             "same_reap_prune_sets_as_mlx": sets[form] == sets["mlx"]} for form, rs in runs.items()]


# ---------------------------------------------------------------- children and CLI

def _child(args: list[str]) -> None:
    if args[0] == "apply":
        method, model, plan, out = args[1:]
        result = {"wall_s": APPLY_METHODS[method](Path(model), Path(plan), Path(out))}
    else:
        model, tokens, out = args[1:]
        result = _collect(model, int(tokens), out)
    print(json.dumps({**result, "peak_rss": peak_rss_bytes()}))


def _run(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{args[:2]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


@click.command()
@click.argument("part", type=click.Choice(["apply", "collect"]), required=False, default="apply")
@click.option("--arch", default="arctic", show_default=True, help="apply: llama.cpp architecture of the synthetic GGUF.")
@click.option("--sizes", default="256,1024", show_default=True, help="apply: model sizes in MiB.")
@click.option("--tokens", default=4096, show_default=True, help="collect: calibration tokens.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--dir", "workdir", default="/tmp/reap-bench-gguf", show_default=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--child", hidden=True, default=None)
def main(part: str, arch: str, sizes: str, tokens: int, repeats: int, workdir: Path, as_json: bool, child) -> None:
    if child:
        _child(json.loads(child))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    if part == "collect":
        rows = bench_collect(repeats, tokens, workdir)
        if as_json:
            click.echo(json.dumps(rows, indent=1))
            return
        click.echo(f"{tokens} tokens, stream mode, medians of {repeats}\n")
        click.echo("| form | size MiB | tokens/s | peak RSS MiB | same REAP prune sets (50 %) as the MLX form |")
        click.echo("|---|---|---|---|---|")
        for r in rows:
            click.echo(f"| {r['form']} | {r['size_mib']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                       f"{'yes' if r['same_reap_prune_sets_as_mlx'] else 'no'} |")
        return
    rows = bench_apply(arch, [int(s) for s in sizes.split(",")], repeats, workdir)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo("| arch | model | copy s | reap s | naive s | reap/copy | naive/copy | copy RSS | reap RSS | naive RSS |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['arch']} | {r['size_mib']:.0f} MiB | {r['copy_wall_s']:.3f} | {r['reap_wall_s']:.3f} | "
                   f"{r['naive_wall_s']:.3f} | {r['reap_vs_copy']:.2f}x | {r['naive_vs_copy']:.2f}x | "
                   f"{r['copy_rss_mib']:.0f} MiB | {r['reap_rss_mib']:.0f} MiB | {r['naive_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
