"""Benchmark `collect`: tokens/s and peak RSS, stream vs memory mode, side by side.

Models: the largest tiny test fixture, and larger synthetic Qwen3-MoE checkpoints of 8 and 16
layers with the same layer shape (peak RSS of stream mode should not grow with the layer count);
with `--family F`, a synthetic checkpoint of family F instead (FAMILY_SHAPES: e.g. qwen3_next, whose
Gated-DeltaNet linear-attention layers run through mlx_lm's own modules in both modes).
Each (model, mode) runs in a fresh process `--repeats` times, alternating modes; the table gives
medians. The RSS budget is: largest layer's tensor bytes + one activation chunk + 512 MiB.

    python tools/bench_collect.py                 # full run, markdown table on stdout
    python tools/bench_collect.py --quick         # fewer tokens, 1 repeat (smoke test)
    python tools/bench_collect.py --family qwen3_next   # a hybrid family
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# larger synthetic model: layer shape fixed, layer count varied
SYNTH_SHAPE = {"hidden_size": 512, "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 256,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}
# --family F: that family's synthetic model (8 layers), its layer shape beside SYNTH_SHAPE's
FAMILY_SHAPES = {
    # 3 of 4 layers Gated DeltaNet (linear attention), shared expert behind its sigmoid gate
    "qwen3_next": {**SYNTH_SHAPE, "num_hidden_layers": 8, "shared_expert_intermediate_size": 512,
                   "linear_num_value_heads": 8, "linear_num_key_heads": 4, "linear_key_head_dim": 64,
                   "linear_value_head_dim": 64, "full_attention_interval": 4, "mlp_only_layers": []},
}


def child(model: str, mode: str, num_tokens: int, seq_len: int, chunk_tokens: int, out: str) -> None:
    """One measured run (in its own process): prints a JSON line."""
    from reap_stream.blas import ensure_blas

    ensure_blas()
    import numpy as np

    from reap_stream.telemetry.calibration import CalibrationSet, token_fingerprint
    from reap_stream.families.model import open_model
    from reap_stream.runner import RunOptions
    from reap_stream.telemetry.collect import collect
    from reap_stream.procstats import peak_rss_bytes

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 512, seq_len).astype(np.int32) for _ in range(num_tokens // seq_len)]
    calib = CalibrationSet(seqs, token_fingerprint(seqs, {}), {"bench": True}, True, seq_len)
    summary = collect(open_model(model), calib, out, RunOptions(mode, chunk_tokens),
                      progress=False)
    rss = peak_rss_bytes()
    print(json.dumps({"tokens_per_s": summary["tokens_per_s"], "seconds": summary["seconds"],
                      "peak_rss": rss, "fingerprint": summary["telemetry_fingerprint"]}))


def largest_layer_bytes(model_dir: Path) -> int:
    from reap_stream.io.safetensors import Checkpoint

    ckpt = Checkpoint.open(model_dir)
    per_layer: dict[str, int] = {}
    for name, ref in ckpt.tensors.items():
        if ".layers." in name:
            key = name.split(".layers.")[1].split(".")[0]
            per_layer[key] = per_layer.get(key, 0) + ref.nbytes
    return max(per_layer.values())


def family_model(root: Path, family: str) -> list[tuple[str, Path]]:
    from reap_stream.testing import synth

    shape = FAMILY_SHAPES[family]
    path = root / f"{family}-h{shape['hidden_size']}-L{shape['num_hidden_layers']}"
    if not (path / "model.safetensors.index.json").exists():
        synth.make_mlx_fixture(family, path, seed=1, num_shards=4, config_overrides=shape)
    return [(f"synthetic {family} h{shape['hidden_size']} e64, {shape['num_hidden_layers']} layers", path)]


def models(root: Path) -> list[tuple[str, Path]]:
    from reap_stream.testing import synth

    fixtures = [(f, synth.cached_fixture(f, "fp32", REPO / "fixtures" / "generated")) for f in synth.FIRST_FAMILIES]
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    family, largest = max(fixtures, key=lambda fp: size(fp[1]))
    out = [(f"fixture {family} (largest)", largest)]
    for layers in (8, 16):
        path = root / f"qwen3_moe-h512-e64-L{layers}"
        if not (path / "model.safetensors.index.json").exists():
            synth.make_mlx_fixture("qwen3_moe", path, seed=1, num_shards=4,
                                   config_overrides={**SYNTH_SHAPE, "num_hidden_layers": layers})
        out.append((f"synthetic qwen3_moe h512 e64 {layers} layers", path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reap_stream_bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--family", choices=sorted(FAMILY_SHAPES), help="bench a synthetic model of this family")
    ap.add_argument("--child", nargs=6, metavar=("MODEL", "MODE", "TOKENS", "SEQ", "CHUNK", "OUT"))
    args = ap.parse_args()
    if args.child:
        m, mode, t, s, c, out = args.child
        return child(m, mode, int(t), int(s), int(c), out)
    if args.quick:
        args.repeats, args.tokens = 1, 1024
    args.root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, path in family_model(args.root, args.family) if args.family else models(args.root):
        runs: dict[str, list[dict]] = {"stream": [], "memory": []}
        for r in range(args.repeats):
            for mode in ("stream", "memory"):
                with tempfile.TemporaryDirectory(dir=args.root) as tmp:
                    cmd = [sys.executable, __file__, "--child", str(path), mode, str(args.tokens),
                           str(args.seq_len), str(args.chunk_tokens), str(Path(tmp) / "t.zarr")]
                    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                    if res.returncode != 0:
                        sys.exit(f"{label} {mode} failed:\n{res.stderr}")
                    runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
        med = {m: {k: statistics.median(x[k] for x in v) for k in ("tokens_per_s", "peak_rss")}
               for m, v in runs.items()}
        same = len({x["fingerprint"] for v in runs.values() for x in v}) == 1
        hidden = json.loads((path / "config.json").read_text())["hidden_size"]
        budget = largest_layer_bytes(path) + args.chunk_tokens * hidden * 4 + (512 << 20)
        rows.append((label, med, budget, same))
    mib = lambda b: f"{b / (1 << 20):.0f}"  # noqa: E731
    print(f"tokens={args.tokens} seq_len={args.seq_len} chunk_tokens={args.chunk_tokens} "
          f"repeats={args.repeats} (medians)\n")
    print("| model | stream tok/s | memory tok/s | stream/memory | stream peak RSS MiB | memory peak RSS MiB "
          "| RSS budget MiB | identical telemetry |")
    print("|---|---|---|---|---|---|---|---|")
    for label, med, budget, same in rows:
        s, m = med["stream"], med["memory"]
        print(f"| {label} | {s['tokens_per_s']:.0f} | {m['tokens_per_s']:.0f} | "
              f"{s['tokens_per_s'] / m['tokens_per_s']:.2f} | {mib(s['peak_rss'])} | {mib(m['peak_rss'])} | "
              f"{mib(budget)} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
