"""Benchmark distributed `collect`: tokens/s of 1, 2 and 3 ranks on this machine, the cost per
layer of combining the ranks' sums, and the scaling model that predicts N machines.

Every rank count runs the same collect (a synthetic Qwen3-MoE, seeded random token ids) in fresh
processes: 1 rank as a plain process, N ranks on 127.0.0.1 started as `mlx.launch -n N --backend
ring` starts them (MLX_RANK + MLX_HOSTFILE; the launcher process itself is left out: it polls its
ranks' pipes without sleeping and would take ~0.8 of a core from them), with the BLAS threads split
so that the ranks share the cores fairly (OPENBLAS_NUM_THREADS = max(1, cores // N)). Rank counts alternate over the repeats; the table gives medians. A second
part times the combination alone (side-channel barrier, MLX all_gather of the float64 bytes,
rank-order adds) for the per-layer payloads of real models.

    python tools/bench_distributed.py                     # full run, markdown on stdout
    python tools/bench_distributed.py --quick             # a smoke test (about a minute)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPE = {"hidden_size": 512, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 256,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_hidden_layers": 8}
# per-layer payloads of real models: (name, experts E, hidden H)
REAL = [("Qwen3-30B-A3B", 128, 2048), ("Qwen3-235B-A22B", 128, 4096), ("Qwen3-Next-80B", 512, 2048),
        ("DeepSeek-V3 / Kimi-K2", 256, 7168)]
# link payload bandwidths (bytes/s): Ethernet at line rate less framing; the Thunderbolt figure is an
# assumption, not a measurement
LINKS = [("1 GbE", 0.118e9), ("10 GbE", 1.18e9), ("Thunderbolt (assumed 3 GB/s)", 3e9)]


def payload_bytes(experts: int, hidden: int) -> int:
    """What each rank hands in per MoE layer: 5 [E] sums + max, [E, H], [E, E], tokens; float64."""
    return 8 * (experts * hidden + experts * experts + 5 * experts + 1)


# ------------------------------------------------------------------ children (one rank each)

def child_collect(model: str, out: str, work: str, tokens: int, seq: int, chunk_tokens: int) -> None:
    from reap_stream.blas import ensure_blas

    ensure_blas()
    import numpy as np

    from reap_stream.families.model import open_model
    from reap_stream.runner import RunOptions
    from reap_stream.telemetry.calibration import CalibrationSet, token_fingerprint
    from reap_stream.telemetry.collect import collect

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 512, seq).astype(np.int32) for _ in range(tokens // seq)]
    calib = CalibrationSet(seqs, token_fingerprint(seqs, {}), {"bench": True}, True, seq)
    summary = collect(open_model(model), calib, out, RunOptions("stream", chunk_tokens, work_dir=Path(work)),
                      progress=False)
    if summary.get("distributed", {}).get("rank", 0) == 0:
        print(json.dumps(summary), flush=True)


def child_probe(repeats: int) -> None:
    """The combination alone, for each real payload: ms per layer on every rank (min, median)."""
    from reap_stream.blas import ensure_blas

    ensure_blas()
    import numpy as np

    from reap_stream.runner.distributed import join_group

    group = join_group(required=True)
    result = {}
    for name, e, h in REAL:
        rng = np.random.default_rng(group.rank)
        arrays = {"expert_output_sum": rng.standard_normal((e, h)), "coactivation": rng.standard_normal((e, e)),
                  "small": rng.standard_normal(5 * e + 1)}
        times = []
        for _ in range(repeats + 1):   # the first one warms up
            group.exchange("sync")
            started = time.perf_counter()
            group.reduce(arrays, maxes={"small"})
            times.append(time.perf_counter() - started)
        result[name] = [round(min(times[1:]) * 1e3, 1), round(statistics.median(times[1:]) * 1e3, 1)]
    barrier = []
    for _ in range(50):
        started = time.perf_counter()
        group.exchange("barrier")
        barrier.append(time.perf_counter() - started)
    result["barrier"] = [round(min(barrier) * 1e3, 2), round(statistics.median(barrier) * 1e3, 2)]
    everyone = group.exchange("result", result)
    group.close()
    if group.rank == 0:
        print(json.dumps(everyone), flush=True)


# ------------------------------------------------------------------ the driver

def run_ranks(ranks: int, args: list[str], timeout: float = 1800) -> dict:
    """This script's child as `ranks` ranks on 127.0.0.1 (started as mlx.launch starts them, without
    its launcher process, which keeps a core busy polling); rank 0's JSON line."""
    from reap_stream.testing.ranks import child_env, spawn

    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env = {"OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if ranks == 1:
        done = subprocess.run([sys.executable, __file__, *args], env=child_env(env), capture_output=True,
                              text=True, timeout=timeout)
        outputs, codes = [done.stdout], [done.returncode]
    else:
        done = spawn(ranks, args, env=env, program=[sys.executable, __file__], timeout=timeout)
        outputs, codes = [r.stdout for r in done], [r.code for r in done]
    lines = [line for line in outputs[0].splitlines() if line.startswith(("{", "["))]
    if len(lines) != 1 or any(codes):
        raise SystemExit(f"{ranks} ranks: exit codes {codes}\n{outputs}")
    return json.loads(lines[0])


def model_dir(root: Path) -> Path:
    from reap_stream.testing import synth

    path = root / "qwen3_moe-h512-e64-L8"
    if not (path / "model.safetensors.index.json").exists():
        synth.make_mlx_fixture("qwen3_moe", path, seed=1, num_shards=4, config_overrides=SHAPE)
    return path


def collect_table(model: Path, counts: list[int], repeats: int, tokens: int, seq: int, chunk: int) -> dict:
    """{(ranks, tokens): [rank 0's summary per repeat]}: every rank count on all the tokens, and one
    rank on 1/2 and 1/3 of them (to fit the model); the runs alternate over the repeats."""
    cases = [(n, tokens) for n in counts] + [(1, tokens // 2), (1, tokens // 3)]
    runs: dict[tuple[int, int], list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        for rep in range(repeats):
            for n, t in cases:
                out, work = Path(tmp) / f"{n}-{t}-{rep}.zarr", Path(tmp) / f"{n}-{t}-{rep}.work"
                runs[(n, t)].append(run_ranks(n, ["--child-collect", str(model), str(out), str(work),
                                                  str(t), str(seq), str(chunk)]))
    return runs


def summarise(runs: dict[tuple[int, int], list[dict]], tokens: int) -> list[dict]:
    """One row per (ranks, tokens): medians."""
    rows = []
    base = statistics.median(r["tokens_per_s"] for r in runs[(1, tokens)])
    for (n, t), rs in runs.items():
        layers = len(rs[0]["layers"])
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        row = {"ranks": n, "tokens": t, "threads": max(1, (os.cpu_count() or 1) // n), "tokens_per_s": round(tps, 1),
               "vs_1": round(tps / base, 3) if t == tokens else "-", "layers": layers,
               "seconds": statistics.median(r["seconds"] for r in rs),
               "same_counts": len({r["telemetry_fingerprint"] for r in rs}) == 1}
        if n > 1:
            t0 = [r["distributed"]["timings"][0] for r in rs]
            per_layer = lambda key: statistics.median(t[key] for t in t0) / layers * 1e3  # noqa: E731
            row.update(join_s=round(statistics.median(t["join_s"] for t in t0), 2),
                       barrier_ms=round(per_layer("barrier_s"), 1), gather_ms=round(per_layer("gather_s"), 1),
                       reduce_ms=round(per_layer("reduce_s"), 2), payload=t0[0]["gather_bytes"],
                       shares=rs[0]["distributed"]["tokens_per_rank"])
        rows.append(row)
    return rows


def fit(rows: list[dict], tokens: int) -> dict:
    """One machine, one rank: t(T) = L * w + T / r  (w: what every rank pays per layer whatever its
    share: reading the layer's weights, setting it up; r: tokens/s of the token work), fitted on
    all the tokens and a third of them."""
    one = {r["tokens"]: r for r in rows if r["ranks"] == 1}
    full, third = one[tokens], one[tokens // 3]
    per_token = (full["seconds"] - third["seconds"]) / (tokens - tokens // 3)
    return {"w": (full["seconds"] - tokens * per_token) / full["layers"], "r": 1 / per_token, "layers": full["layers"]}


def predict(rows: list[dict], model: dict, tokens: int) -> list[str]:
    w, r, layers = model["w"], model["r"], model["layers"]
    half = next(x for x in rows if x["ranks"] == 1 and x["tokens"] == tokens // 2)
    return [f"fitted on one rank with {tokens} and {tokens // 3} tokens: w = {w * 1e3:.0f} ms per layer, "
            f"r = {r:.0f} tokens/s of token work, L = {layers}; checked on {tokens // 2} tokens: "
            f"predicted {layers * w + half['tokens'] / r:.2f} s, measured {half['seconds']:.2f} s"]


def machines(rows: list[dict], model: dict, tokens: int, barrier_ms: dict[int, float]) -> list[str]:
    """N machines like this one, a rank each: t(N) = j + L * w + T / (N r) + L * g(N), g(N) = 2
    barriers + the all_gather + the rank-order adds: measured here for N = 2, 3 (127.0.0.1), and
    2 barriers + (N-1) P / B + (N-1) P / A over a link of B bytes/s otherwise (A: the adds, measured)."""
    w, r, layers = model["w"], model["r"], model["layers"]
    ranks = {x["ranks"]: x for x in rows if x["ranks"] > 1 and x["tokens"] == tokens}
    adds = statistics.median(x["payload"] * (n - 1) / (x["reduce_ms"] / 1e3) for n, x in ranks.items())
    join = max(x["join_s"] for x in ranks.values())
    one = layers * w + tokens / r
    lines = [f"one machine: {one:.2f} s; joining the group {join:.2f} s; rank-order adds at {adds / 1e9:.2f} GB/s\n",
             "| payload per layer | link | N = 2 | N = 3 | N = 4 | N = 8 |", "|---|---|---|---|---|---|"]

    def g(n: int, p: int, link: float | None) -> float:
        if link is None:
            x = ranks[n]
            return (2 * barrier_ms[n] + x["gather_ms"] + x["reduce_ms"]) / 1e3
        return 2 * max(barrier_ms.values()) / 1e3 + (n - 1) * p / link + (n - 1) * p / adds

    p = rows[0].get("payload") or next(iter(ranks.values()))["payload"]
    for name, link in [("127.0.0.1 (measured)", None), *LINKS]:
        cells = []
        for n in (2, 3, 4, 8):
            if link is None and n not in ranks:
                cells.append("-")
                continue
            t = join + layers * w + tokens / (n * r) + layers * g(n, p, link)
            cells.append(f"{one / t:.2f}x")
        lines.append(f"| this benchmark's ({p / 1e3:.0f} kB) | {name} | " + " | ".join(cells) + " |")
    big = payload_bytes(256, 7168)
    for c in (10.0, 60.0, 600.0):   # a real model: C = one machine's work per MoE layer, w included
        name, link = LINKS[1]
        cells = [f"{c / (c / n + g(n, big, link)):.2f}x" for n in (2, 3, 4, 8)]
        lines.append(f"| DeepSeek-V3's ({big / 1e6:.1f} MB), C = {c:.0f} s per layer | {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-collect":
        model, out, work, tokens, seq, chunk = sys.argv[2:8]
        return child_collect(model, out, work, int(tokens), int(seq), int(chunk))
    if len(sys.argv) > 1 and sys.argv[1] == "--child-probe":
        return child_probe(int(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=12288, help="calibration tokens (12 chunks: 1, 2, 3 ranks balance)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--probe-repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3072 tokens, 1 repeat, 2 probe repeats")
    ap.add_argument("--cache", type=Path, default=REPO / "fixtures" / "generated" / "bench")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.probe_repeats = 3072, 1, 2
    if args.tokens % (6 * args.seq):
        ap.error("--tokens must be a multiple of 6 sequences (the model is fitted on 1/3 and checked on 1/2)")
    counts = [int(n) for n in args.ranks.split(",")]
    load_before = os.getloadavg()
    model = model_dir(args.cache)
    rows = summarise(collect_table(model, counts, args.repeats, args.tokens, args.seq, args.chunk_tokens), args.tokens)
    probes = {n: run_ranks(n, ["--child-probe", str(args.probe_repeats)]) for n in counts if n > 1}
    load_after = os.getloadavg()

    print(f"cores {os.cpu_count()}, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; "
          f"sequences of {args.seq}, --chunk-tokens {args.chunk_tokens}, median of {args.repeats}\n")
    print("| ranks | tokens | BLAS threads/rank | tokens/s | vs 1 rank | collect s | of which joining s | "
          "tokens per rank | barrier wait ms/layer (rank 0) | all_gather ms/layer | adds ms/layer | "
          "bytes/rank/layer | same telemetry every run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['tokens']} | {r['threads']} | {r['tokens_per_s']} | {r['vs_1']} | {r['seconds']} | "
              f"{r.get('join_s', '-')} | {r.get('shares', '-')} | {r.get('barrier_ms', '-')} | "
              f"{r.get('gather_ms', '-')} | {r.get('reduce_ms', '-')} | {r.get('payload', '-')} | {r['same_counts']} |")
    barrier = {n: statistics.median(p["barrier"][1] for p in res) for n, res in probes.items()}
    fitted = fit(rows, args.tokens)
    print("\nScaling model:\n")
    print("\n".join(predict(rows, fitted, args.tokens)))
    print("\nPredicted speedup of N machines like this one over one, a rank each:\n")
    print("\n".join(machines(rows, fitted, args.tokens, barrier)))
    print("\nCombination alone, per layer, on 127.0.0.1 (ms, min / median over ranks' medians):\n")
    print("| model | bytes/rank/layer | " + " | ".join(f"{n} ranks" for n in probes) + " |")
    print("|---|---|" + "---|" * len(probes))
    for name, e, h in REAL:
        cells = [f"{min(p[name][0] for p in res)} / {statistics.median(p[name][1] for p in res):.1f}"
                 for res in probes.values()]
        print(f"| {name} (E={e}, H={h}) | {payload_bytes(e, h):,} | " + " | ".join(cells) + " |")
    print("| side-channel barrier | - | " + " | ".join(
        f"{min(p['barrier'][0] for p in res)} / {statistics.median(p['barrier'][1] for p in res):.2f}"
        for res in probes.values()) + " |")
    print("\nPredicted all_gather time per layer over a link of bandwidth B: (N-1) * P / B\n")
    print("| model | P | " + " | ".join(f"{name}, N=2 / 4 / 8" for name, _ in LINKS) + " |")
    print("|---|---|" + "---|" * len(LINKS))
    for name, e, h in REAL:
        p = payload_bytes(e, h)
        print(f"| {name} | {p / 1e6:.1f} MB | " + " | ".join(
            " / ".join(f"{(n - 1) * p / b * 1e3:.0f} ms" for n in (2, 4, 8)) for _, b in LINKS) + " |")


if __name__ == "__main__":
    main()
