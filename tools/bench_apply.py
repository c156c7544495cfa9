#!/usr/bin/env python3
"""Benchmark `reap-stream apply` against a plain copy of the same kept bytes and a naive
in-memory load -> slice -> save, on synthetic qwen3_moe-shaped checkpoints of chosen sizes.

    python tools/bench_apply.py --sizes 1,4 --repeats 3 --workdir /tmp/bench-apply
    python tools/bench_apply.py --sizes 1,4 --compare /path/to/other/checkout   # before / after

Each contender runs in its own process; peak RSS is the child's VmHWM (reap_stream.procstats).
Wall times are medians of --repeats runs, taken in rotation so that each sees the same page-cache
state. Disk: a size of G GB needs about 1.05 G (the model) + 2 x 0.5 G (apply's output and its copy).
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

from reap_stream.surgery.safetensors import OutShard, OutTensor  # noqa: E402
from reap_stream.planning.plan import LayerPlan, Plan  # noqa: E402

HIDDEN, INTER, EXPERTS, LAYERS = 1024, 512, 64, 8


def make_checkpoint(root: Path, expert_gb: float) -> Path:
    """A qwen3_moe-shaped fp16 checkpoint whose routed experts total about `expert_gb` GB."""
    per_layer_experts = 3 * EXPERTS * HIDDEN * INTER * 2
    layers = max(1, round(expert_gb * 1e9 / per_layer_experts))
    cfg = {"model_type": "qwen3_moe", "hidden_size": HIDDEN, "num_hidden_layers": layers,
           "intermediate_size": 2 * INTER, "moe_intermediate_size": INTER, "num_attention_heads": 8,
           "num_key_value_heads": 2, "head_dim": 128, "num_experts": EXPERTS, "num_experts_per_tok": 4,
           "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "vocab_size": 1024,
           "rope_theta": 1e6, "tie_word_embeddings": False, "max_position_embeddings": 4096,
           "norm_topk_prob": True}
    if (root / "config.json").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pattern = np.random.default_rng(0).integers(0, 2**16, 1 << 22, dtype=np.uint16).tobytes()
    shards = []
    for layer in range(layers):
        p = f"model.layers.{layer}"
        tensors = [(f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN))]
        tensors += [(f"{p}.mlp.switch_mlp.{n}.weight", (EXPERTS, INTER, HIDDEN)) for n in ("gate_proj", "up_proj")]
        tensors += [(f"{p}.mlp.switch_mlp.down_proj.weight", (EXPERTS, HIDDEN, INTER))]
        tensors += [(f"{p}.self_attn.{n}.weight", (HIDDEN, HIDDEN)) for n in ("q_proj", "o_proj")]
        tensors += [(f"{p}.input_layernorm.weight", (HIDDEN,))]
        shard = OutShard(f"model-{layer + 1:05d}-of-{layers:05d}.safetensors", {"format": "mlx"},
                         [OutTensor(n, "F16", s, [(Path("/dev/zero"), 0, int(np.prod(s)) * 2)]) for n, s in tensors])
        with open(tmp / shard.name, "wb") as f:
            f.write(shard.header())
            left = shard.data_bytes
            while left:
                n = min(left, len(pattern))
                f.write(pattern[:n])
                left -= n
        shards.append(shard)
    index = {"metadata": {}, "weight_map": {t.name: s.name for s in shards for t in s.tensors}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp / "config.json").write_text(json.dumps(cfg))
    tmp.rename(root)
    return root


def make_plan(model: Path, ratio: float) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    rng = np.random.default_rng(1)
    layers = {}
    for layer in range(cfg["num_hidden_layers"]):
        pruned = sorted(int(e) for e in rng.choice(EXPERTS, int(EXPERTS * ratio), replace=False))
        layers[layer] = LayerPlan(sorted(set(range(EXPERTS)) - set(pruned)), pruned)
    path = model.parent / f"{model.name}-plan.json"
    Plan(layers=layers, method="random", ratio=ratio).save(path)
    return path


# checksum (the manifest's default hash) and flush every copied file, as apply does for its outputs
HASH = ("import os, sys, pathlib; from reap_stream.io.files import file_digest\n"
        "for p in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n"
        "    file_digest(p, \"blake3\"); fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)")

NAIVE = r"""
import sys, json, mlx.core as mx
src, plan_path, out = sys.argv[1:]
plan = json.load(open(plan_path))
import glob, os
w = {}
for f in sorted(glob.glob(src + "/model-*.safetensors")):
    w.update(mx.load(f))
for layer, lp in plan["layers"].items():
    idx = mx.array(lp["kept"])
    for k in list(w):
        if k.startswith(f"model.layers.{layer}.mlp.") and w[k].shape[0] == len(lp["kept"]) + len(lp["pruned"]):
            w[k] = w[k][idx]
os.makedirs(out, exist_ok=True)
mx.save_safetensors(out + "/model.safetensors", w, metadata={"format": "mlx"})
"""


def timed(cmd: list[str], python_module: bool = False, source: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; peak RSS only for Python modules, which
    report their own VmHWM (a fork of this process would inherit this process's ru_maxrss).
    `source`: the checkout whose reap_stream a Python child imports (default: this one)."""
    report = Path(f"/tmp/bench-apply-peak-{os.getpid()}.json")
    if python_module:
        cmd = [sys.executable, "-m", "reap_stream.procstats", str(report), *cmd]
    env = {**os.environ, "PYTHONPATH": str(source or REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd="/")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.decode()}")
    return wall, json.loads(report.read_text())["peak_rss"] / 2**20 if python_module else float("nan")


@click.command()
@click.option("--sizes", default="1,4", show_default=True, help="Expert gigabytes per synthetic model.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--workdir", default="/tmp/bench-apply", show_default=True, type=click.Path(path_type=Path))
@click.option("--naive-max-gb", default=4.0, show_default=True, help="Largest size the in-memory baseline runs at.")
@click.option("--compare", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Another checkout (e.g. of main): its apply is timed in the same rotation.")
@click.option("--json", "as_json", is_flag=True)
def main(sizes: str, repeats: int, workdir: Path, naive_max_gb: float, compare: Path | None, as_json: bool) -> None:
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "naive_apply.py"
    script.write_text(NAIVE)
    rows = []
    for gb in [float(s) for s in sizes.split(",")]:
        model = make_checkpoint(workdir / f"model-{gb:g}GB", gb)
        plan = make_plan(model, 0.5)
        out, copy, naive = workdir / "out", workdir / "copy", workdir / "naive"
        runs: dict[str, list[tuple[float, float]]] = {"apply": [], "apply-sha256": [], "cp": [], "cp+sync": [],
                                                      "cp+hash": [], "naive": [], "compare": []}
        for _ in range(repeats):
            for d in (out, copy, naive):
                shutil.rmtree(d, ignore_errors=True)
            # the manifest hashed with sha256, as before BLAKE3 became the default
            runs["apply-sha256"].append(timed(["reap_stream.cli", "apply", str(model), str(plan), "--out", str(out),
                                               "--quiet", "--manifest-hash", "sha256"], python_module=True))
            if compare is not None:
                shutil.rmtree(out)
                runs["compare"].append(timed(["reap_stream.cli", "apply", str(model), str(plan), "--out", str(out),
                                              "--quiet"], python_module=True, source=compare))
            shutil.rmtree(out)
            runs["apply"].append(timed(["reap_stream.cli", "apply", str(model), str(plan), "--out", str(out), "--quiet"],
                                       python_module=True))
            # the same kept bytes, as plain files: what a copy costs, and a copy plus what apply
            # also does for every output file (BLAKE3 for the manifest, fsync)
            runs["cp"].append(timed(["cp", "-r", str(out), str(copy)]))
            shutil.rmtree(copy)
            # as durable as apply's output: the copied files flushed to disk (coreutils sync FILE...)
            runs["cp+sync"].append(timed(["sh", "-c", f"cp -r {out} {copy} && sync {copy}/*"]))
            shutil.rmtree(copy)
            runs["cp+hash"].append(timed(["sh", "-c", f"cp -r {out} {copy} && {sys.executable} -c '{HASH}' {copy}"]))
            if gb <= naive_max_gb:
                runs["naive"].append(timed([str(script), str(model), str(plan), str(naive)], python_module=True))
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        med = {k: (statistics.median(w for w, _ in v), max(r for _, r in v)) for k, v in runs.items() if v}
        row = {"expert_gb": gb, "out_gb": round(out_bytes / 1e9, 3),
               "apply_s": round(med["apply"][0], 3), "cp_s": round(med["cp"][0], 3),
               "apply_over_cp": round(med["apply"][0] / med["cp"][0], 3),
               "apply_sha256_s": round(med["apply-sha256"][0], 3),
               "cp_sync_s": round(med["cp+sync"][0], 3),
               "apply_over_cp_sync": round(med["apply"][0] / med["cp+sync"][0], 3),
               "cp_hash_s": round(med["cp+hash"][0], 3),
               "apply_over_cp_hash": round(med["apply"][0] / med["cp+hash"][0], 3),
               "apply_rss_mib": round(med["apply"][1], 1)}
        if "compare" in med:
            row.update({"compare_s": round(med["compare"][0], 3),
                        "apply_over_compare": round(med["apply"][0] / med["compare"][0], 3),
                        "compare_rss_mib": round(med["compare"][1], 1)})
        if "naive" in med:
            row.update({"naive_s": round(med["naive"][0], 3), "naive_over_apply": round(med["naive"][0] / med["apply"][0], 3),
                        "naive_rss_mib": round(med["naive"][1], 1)})
        rows.append(row)
        for d in (out, copy, naive):
            shutil.rmtree(d, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"load average before / after: {load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if compare is not None:
        click.echo(f"--compare {compare}: apply there (s) / apply here over it / its peak RSS (MiB): " + "; ".join(
            f"{r['expert_gb']:g} GB {r['compare_s']} / {r['apply_over_compare']} / {r['compare_rss_mib']}" for r in rows))
    click.echo("| experts (GB) | output (GB) | apply (s) | apply, sha256 manifest (s) | cp (s) | cp + sync (s) "
               "| cp + blake3 + fsync (s) "
               "| apply / cp | apply / (cp + sync) | apply / (cp + blake3 + fsync) | apply peak RSS (MiB) "
               "| naive load→slice→save (s) | naive peak RSS (MiB) |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['expert_gb']:g} | {r['out_gb']} | {r['apply_s']} | {r['apply_sha256_s']} | {r['cp_s']} | {r['cp_sync_s']} | "
                   f"{r['cp_hash_s']} | {r['apply_over_cp']} | {r['apply_over_cp_sync']} | {r['apply_over_cp_hash']} | "
                   f"{r['apply_rss_mib']} | "
                   f"{r.get('naive_s', '—')} | {r.get('naive_rss_mib', '—')} |")


if __name__ == "__main__":
    main()
