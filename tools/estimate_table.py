#!/usr/bin/env python3
"""The README's table of `reap-stream estimate` for real MoE models, from their published configs
(tools/real_models.py) in bf16 and as `mlx_lm convert -q` would quantise them to 8 and 4 bits.

Each cell is `reap-stream estimate CONFIG --max-tokens 8192 --window-tokens 2048 --ratio 0.5
[--quantize N] --max-memory SIZE --json`, run as a user would (a fresh process per model).

    python tools/estimate_table.py --max-memory 64GB
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path



def main() -> None:
    from real_models import REAL_MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-memory", default="64GB")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--models", default=",".join(REAL_MODELS))
    args = ap.parse_args()
    gb = 1e9
    print(f"{args.tokens} calibration tokens in windows of {args.window}; ratio 0.5; --max-memory {args.max_memory}\n")
    print("| model | dtype | size (GB) | experts / layer (GB) | collect peak, whole layers (GB) | collect peak, "
          f"experts in chunks (GB) | under {args.max_memory}: tokens / experts per chunk | output at 0.5 (GB) "
          "| telemetry (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            cfg = Path(tmp) / name / "config.json"
            cfg.parent.mkdir()
            cfg.write_text(json.dumps(REAL_MODELS[name]))
            for bits in (None, 8, 4):
                cmd = [sys.executable, "-m", "reap_stream.cli", "estimate", str(cfg), "--max-tokens", str(args.tokens),
                       "--window-tokens", str(args.window), "--ratio", "0.5", "--max-memory", args.max_memory,
                       "--no-calibrate", "--json"] + ([] if bits is None else ["--quantize", str(bits)])
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"| {name} | {bits or 'bf16'} | failed: {res.stderr.strip()[:200]} |||||||")
                    continue
                e = json.loads(res.stdout)
                m, mem, disk = e["model"], e["memory"], e["disk"]
                fit = mem["max_memory"]
                under = (f"{fit['chunk_tokens']} / {fit['expert_chunk_bytes'] / 1e6:.0f} MB" if fit["fits"]
                         else "needs " + fit["why"].rsplit("at least ", 1)[-1])
                print(f"| {name} | {'bf16' if bits is None else f'{bits}-bit'} | {m['total_bytes'] / gb:.1f} "
                      f"| {m['expert_bytes_per_layer'] / gb:.2f} | {mem['whole_layer_peak_bytes'] / gb:.1f} "
                      f"| {mem['chunked_peak_bytes'] / gb:.1f} | {under} | {disk['output_bytes'] / gb:.1f} "
                      f"| {disk['telemetry_bytes'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
